"""TRL/PEFT options a recipe can set: each one is shown to reach the trainer or the adapter on a tiny model.

NEFTune, rsLoRA, LoRA+, PiSSA, modules_to_save, scheduler kwargs, dataloader workers, Liger, and the
`train.sft_extra` / `peft.extra` pass-through (names checked against the real dataclasses at load time).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from hpml_ft.config import load_config
from hpml_ft.config.extras import LORA_MAPPED, SFT_MAPPED
from hpml_ft.errors import UserError, run_cli
from hpml_ft.train import main as train_main


def _overrides(tiny_model_dir, alpaca_file, tmp_path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={alpaca_file}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=1",
        "train.per_device_batch_size=2",
        "train.effective_batch_size=2",
        "train.learning_rate=1e-3",
        "train.warmup_ratio=0",
        "train.lr_scheduler=constant",
        "train.max_length=64",
        "train.eval_generate=0",
        "train.sample_every=0",
        "data.max_samples=4",
        "name=t",
        *extra,
    ]


def _cfg(tiny_model_dir, alpaca_file, tmp_path, *extra: str):
    return load_config(None, _overrides(tiny_model_dir, alpaca_file, tmp_path, *extra))


def _trainer(cfg, tiny_model_dir, tmp_path):
    """The real build path of a run: recipe -> data -> model -> adapter -> SFTConfig -> SFTTrainer."""
    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import build_model, load_tokenizer, wrap_peft
    from hpml_ft.train.trainer import build_trainer, sft_config

    tok = load_tokenizer(str(tiny_model_dir))
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    model = wrap_peft(build_model(cfg, str(tiny_model_dir)), cfg)
    return build_trainer(cfg, model, tok, train_ds, None, 1, sft_config(cfg, 1, tmp_path / "run"))


def _lora_layer(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


# ---------------------------------------------------------------- pass-through dicts


def test_every_sft_argument_is_mapped_to_a_recipe_key(tiny_model_dir, alpaca_file, tmp_path):
    """sft_config and the refusal table cannot drift: every argument it sets names the key that sets it."""
    from peft import LoraConfig
    from trl import SFTConfig

    from hpml_ft.train.trainer import sft_arguments

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "train.save_steps=5")
    assert set(sft_arguments(cfg, 1)) <= set(SFT_MAPPED)
    assert set(SFT_MAPPED) <= {f.name for f in dataclasses.fields(SFTConfig)}  # no stale names
    assert set(LORA_MAPPED) <= {f.name for f in dataclasses.fields(LoraConfig)}


def test_sft_extra_and_peft_extra_reach_the_dataclasses(tiny_model_dir, alpaca_file, tmp_path):
    from hpml_ft.lora import lora_config
    from hpml_ft.train.trainer import sft_config

    cfg = _cfg(
        tiny_model_dir,
        alpaca_file,
        tmp_path,
        "train.sft_extra={adam_beta2: 0.95, dataloader_pin_memory: false}",
        "peft.extra={layers_to_transform: [0], bias: lora_only}",
        "peft.target_modules=[q_proj, v_proj]",
    )
    args = sft_config(cfg, 1)
    assert args.adam_beta2 == 0.95 and args.dataloader_pin_memory is False
    lc = lora_config(cfg.peft)
    assert lc.layers_to_transform == [0] and lc.bias == "lora_only"
    model = _trainer(cfg, tiny_model_dir, tmp_path).model
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(".layers.0." in n for n in names)  # only layer 0 got an adapter


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.sft_extra={adam_beta: 0.9}",
            "unknown key 'train.sft_extra.adam_beta' (not a trl.SFTConfig field; did you mean 'train.sft_extra.adam_beta2'?)",
        ),
        (
            "train.sft_extra={learning_rate: 0.1}",
            "train.sft_extra.learning_rate: set train.learning_rate instead",
        ),
        ("peft.extra={lora_alpha: 8}", "peft.extra.lora_alpha: set peft.alpha instead"),
        (
            "peft.extra={layers_to_transfrom: [0]}",
            "unknown key 'peft.extra.layers_to_transfrom' (not a peft.LoraConfig field; did you mean "
            "'peft.extra.layers_to_transform'?)",
        ),
    ],
)
def test_bad_extra_name_is_one_error_line_before_any_model_loads(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys, override, message
):
    import hpml_ft.model
    import hpml_ft.train.cli

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hpml_ft.train.cli, "load_tokenizer", no_load)
    monkeypatch.setattr(hpml_ft.model, "build_model", no_load)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\n")
    argv = [str(recipe), *_overrides(tiny_model_dir, alpaca_file, tmp_path, override)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: invalid recipe: {message}"
    assert not (tmp_path / "out").exists()


def test_bad_extra_value_fails_in_preflight(tiny_model_dir, alpaca_file, tmp_path):
    """A known name with a value the dataclass refuses: one line from check_environment, no model."""
    from hpml_ft.train.cli import check_environment

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "peft.extra={layers_to_transform: [0]}")
    with pytest.raises(
        UserError, match=r"peft.LoraConfig refused the peft: section \(`layers_to_transform` cannot"
    ):
        check_environment(cfg)


# ---------------------------------------------------------------- first-class options


def _embedding_outputs(model, ids) -> dict[str, torch.Tensor]:
    emb = model.get_input_embeddings()
    was = emb.training
    emb.train()
    out = {"train_a": emb(ids), "train_b": emb(ids)}
    emb.eval()
    out["eval"] = emb(ids)
    emb.train(was)
    return out


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_neftune_reaches_trainer_and_noises_embeddings_in_training(
    tiny_model_dir, alpaca_file, tmp_path, alpha
):
    from transformers import TrainerCallback

    extra = [f"train.neftune_noise_alpha={alpha}"] if alpha else []
    trainer = _trainer(_cfg(tiny_model_dir, alpaca_file, tmp_path, *extra), tiny_model_dir, tmp_path)
    assert trainer.args.neftune_noise_alpha == alpha
    ids = torch.arange(4, 20).unsqueeze(0)
    seen: dict[str, torch.Tensor] = {}

    class Probe(TrainerCallback):  # inside trainer.train(), where the trainer has attached its hooks
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                seen.update(_embedding_outputs(model, ids))

    trainer.add_callback(Probe())
    trainer.train()
    assert seen
    assert torch.equal(seen["eval"], trainer.model.get_input_embeddings()(ids))  # eval mode: never noised
    noised = not torch.equal(seen["train_a"], seen["train_b"])
    assert noised == (alpha is not None)
    if alpha:  # NEFTune's scale: uniform(-1, 1) x alpha / sqrt(seq_len x hidden)
        bound = alpha / (ids.shape[1] * seen["eval"].shape[-1]) ** 0.5
        assert (seen["train_a"] - seen["eval"]).abs().max().item() <= bound + 1e-6


@pytest.mark.parametrize(("rslora", "scale"), [(False, 8 / 4), (True, 8 / 4**0.5)])
def test_rslora_scaling(tiny_model_dir, alpaca_file, tmp_path, rslora, scale):
    from hpml_ft.model import build_model, wrap_peft

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "peft.r=4", "peft.alpha=8", f"peft.use_rslora={rslora}")
    model = wrap_peft(build_model(cfg, str(tiny_model_dir)), cfg)
    assert _lora_layer(model).scaling["default"] == pytest.approx(scale)


def test_loraplus_gives_lora_b_ratio_times_the_lr(tiny_model_dir, alpaca_file, tmp_path):
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "peft.loraplus_lr_ratio=16")
    trainer = _trainer(cfg, tiny_model_dir, tmp_path)
    trainer.train()  # the optimizer the training loop really used
    layer = _lora_layer(trainer.model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def lr_of(param: torch.Tensor) -> float:
        (group,) = [g for g in trainer.optimizer.param_groups if any(p is param for p in g["params"])]
        return group["lr"]

    assert lr_of(a) == pytest.approx(1e-3)
    assert lr_of(b) == pytest.approx(16 * 1e-3)


def test_pissa_init_moves_principal_part_into_the_adapter(tiny_model_dir, alpaca_file, tmp_path):
    from hpml_ft.model import build_model, wrap_peft

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "peft.init_lora_weights=pissa", "peft.r=4")
    base = build_model(cfg, str(tiny_model_dir))
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    layer = _lora_layer(wrap_peft(base, cfg))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert b.abs().sum() > 0  # plain LoRA starts B at zero
    rebuilt = layer.base_layer.weight + layer.scaling["default"] * (b @ a)
    assert torch.allclose(rebuilt, original, atol=1e-5)
    assert not torch.allclose(layer.base_layer.weight, original, atol=1e-3)  # the base holds the residual


def test_pissa_run_saves_an_adapter_for_the_original_base(tiny_model_dir, alpaca_file, tmp_path):
    """The saved adapter is converted to plain LoRA (rank 2r) so it applies to the unmodified base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\n")
    extra = ("peft.init_lora_weights=pissa", "peft.r=4", "train.max_steps=2", "train.learning_rate=1e-2")
    assert train_main([str(recipe), *_overrides(tiny_model_dir, alpaca_file, tmp_path, *extra)]) == 0
    run = tmp_path / "out" / "t"
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["init_lora_weights"] is True
    ids = torch.randint(0, 300, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        on_base = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()(ids).logits
    assert (on_base - merged).abs().max().item() < 1e-4
    assert (base_logits - merged).abs().max().item() > 1e-4  # it trained


def test_modules_to_save_trains_the_module_in_full(tiny_model_dir, alpaca_file, tmp_path):
    from hpml_ft.model import build_model, wrap_peft

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "peft.modules_to_save=[lm_head]")
    model = wrap_peft(build_model(cfg, str(tiny_model_dir)), cfg)
    head = model.base_model.model.lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


def test_scheduler_kwargs_and_dataloader_workers_reach_the_trainer(tiny_model_dir, alpaca_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        alpaca_file,
        tmp_path,
        "train.lr_scheduler=cosine_with_min_lr",
        "train.lr_scheduler_kwargs={min_lr_rate: 0.1}",
        "train.dataloader_num_workers=1",
    )
    trainer = _trainer(cfg, tiny_model_dir, tmp_path)
    assert trainer.args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert trainer.get_train_dataloader().num_workers == 1
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(10):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1 * 1e-3)  # floor = min_lr_rate x lr


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_the_package_is_one_clear_error(tiny_model_dir, alpaca_file, tmp_path):
    from hpml_ft.train.cli import check_environment

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, "train.use_liger_kernel=true")
    with pytest.raises(UserError, match="pip install liger-kernel"):
        check_environment(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.method=qlora", "peft.init_lora_weights=pissa"], "PiSSA needs full-precision base weights"),
        (["peft.method=full", "peft.loraplus_lr_ratio=16"], "apply to LoRA adapters"),
        (["peft.init_lora_weights=loftq"], "peft.init_lora_weights='loftq' is not supported"),
        (
            ["peft.loraplus_lr_ratio=0.5"],
            "peft.loraplus_lr_ratio: Input should be greater than or equal to 1",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["train.max_steps=1", *overrides])


def test_eval_reports_the_loss_without_gathering_logits(tiny_model_dir, alpaca_file, tmp_path):
    """The Trainer would otherwise keep every eval batch's (batch, seq, vocab) logits: +0.9 GB on TAT-QA."""
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path)
    trainer = _trainer(cfg, tiny_model_dir, tmp_path)
    out = trainer.predict(trainer.train_dataset.select(range(4)))
    assert out.predictions is None and out.label_ids is None
    assert out.metrics["test_loss"] > 0
