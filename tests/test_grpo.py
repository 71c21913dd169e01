"""Reward fine-tuning (train.stage=grpo): TAT-QA rewards on hand-made outputs, the reward registry and user
rewards by dotted path, config checks, GRPOConfig names against TRL, and real GRPO steps on the tiny model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_tatqa

from hpml_ft.config import load_config
from hpml_ft.errors import UserError, run_cli
from hpml_ft.tatqa.rewards import tatqa_correct, tatqa_f1, tatqa_format, tatqa_scale
from hpml_ft.train import main as train_main
from hpml_ft.train.rewards import load_reward, reward_functions

PCT = {  # a TAT-QA arithmetic question: (44.1 - 56.7) / 56.7 * 100 = -22.22 percent
    "uid": "q1",
    "answer": -22.22,
    "answer_type": "arithmetic",
    "answer_from": "table",
    "scale": "percent",
    "derivation": "(44.1 - 56.7) / 56.7 * 100",
}
SPANS = {
    "uid": "q2",
    "answer": ["2019", "2018"],
    "answer_type": "multi-span",
    "answer_from": "table",
    "scale": "",
}


def _chat(*texts: str) -> list[list[dict]]:
    """Completions as GRPOTrainer passes them for chat prompts."""
    return [[{"role": "assistant", "content": t}] for t in texts]


def _rewards(outputs: list[str], gold: dict) -> dict[str, list[float]]:
    golds = [json.dumps(gold)] * len(outputs)  # the dataset column holds JSON
    return {f.__name__: f(completions=_chat(*outputs), gold=golds) for f in REWARD_FUNCS}


REWARD_FUNCS = (tatqa_correct, tatqa_f1, tatqa_scale, tatqa_format)


def test_rewards_score_derivations_as_eval_does():
    outputs = [
        "(44.1 - 56.7) / 56.7 * 100 | percent",  # the right cells: executes to -22.22 %
        "(44.1 - 50.0) / 50.0 * 100 | percent",  # wrong cells, right form and scale
        "(44.1 - * 56.7 | percent",  # a derivation that does not parse
        "(44.1 - 56.7) / 56.7 * 100 | million",  # right value, wrong scale
        "-22.22%",  # right, but a plain number where the recipe teaches a derivation
    ]
    r = _rewards(outputs, PCT)
    assert r["tatqa_correct"] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert r["tatqa_f1"] == r["tatqa_correct"]  # F1 = EM for arithmetic, as the official scorer
    assert r["tatqa_scale"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert r["tatqa_format"] == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_rewards_on_spans_counts_and_plain_strings():
    r = _rewards(["2019 | 2018", "2019", "", "2019 million"], SPANS)
    assert r["tatqa_correct"] == [1.0, 0.0, 0.0, 0.0]
    assert r["tatqa_f1"][0] == 1.0 and 0.0 < r["tatqa_f1"][1] < 1.0  # partial credit for one of two spans
    assert r["tatqa_scale"] == [1.0, 1.0, 0.0, 0.0]  # an empty answer gets no scale credit
    assert r["tatqa_format"] == [1.0, 1.0, 0.0, 1.0]
    count = {"uid": "q3", "answer": "2", "answer_type": "count", "answer_from": "table", "scale": ""}
    plain = ["count: Revenue | Cost", "count: Revenue"]  # plain-string completions, gold as a dict
    assert tatqa_correct(completions=plain, gold=[count, count]) == [1.0, 0.0]
    assert tatqa_format(completions=plain, gold=[count, count]) == [1.0, 1.0]


def _user_module(tmp_path, monkeypatch, body: str, name: str = "my_rewards") -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


LENGTH = """
    def length_reward(completions, **kwargs):
        return [float(len(c[-1]["content"])) for c in completions]

    def no_kwargs(completions):
        return [0.0 for _ in completions]

    NOT_CALLABLE = 3
"""


def test_user_reward_by_dotted_path(tmp_path, monkeypatch):
    mod = _user_module(tmp_path, monkeypatch, LENGTH)
    for path in (f"{mod}:length_reward", f"{mod}.length_reward"):
        assert load_reward(path)(completions=_chat("ab", "abcd"), prompts=[[], []]) == [2.0, 4.0]
    funcs = reward_functions(["tatqa_correct", f"{mod}:length_reward"])
    assert funcs[0] is tatqa_correct and funcs[1].__name__ == "length_reward"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tatqa_corect", "unknown reward 'tatqa_corect'; use a built-in one"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("my_rewards:missing", "'my_rewards' has no function 'missing'"),
        ("my_rewards:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("my_rewards:no_kwargs", "must accept **kwargs"),
        (
            "broken_rewards:f",
            "cannot import 'broken_rewards' for reward 'broken_rewards:f' (ZeroDivisionError",
        ),
    ],
)
def test_bad_reward_names_are_one_error(tmp_path, monkeypatch, name, message):
    _user_module(tmp_path, monkeypatch, LENGTH)
    _user_module(tmp_path, monkeypatch, "x = 1 / 0\n", "broken_rewards")
    with pytest.raises(UserError) as err:
        load_reward(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def _recipe(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("name: g\n")
    return p


def _overrides(tiny_model_dir, tmp_path, rewards: str, method: str = "full", extra=()):
    data = tmp_path / "tatqa.json"
    data.write_text(json.dumps(make_tatqa(n_contexts=4, questions=2)))
    return [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"train.output_dir={tmp_path / 'out'}",
        f"peft.method={method}",
        "train.stage=grpo",
        f"grpo.rewards={rewards}",
        "grpo.num_generations=2",
        "grpo.max_completion_length=4",
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",  # 4 completions = 2 prompts x 2 generations per step
        "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "train.lr_scheduler=constant",
        "train.logging_steps=1",
        "train.max_length=512",
        "train.eval_generate=2",
        "train.max_new_tokens=4",
        "train.sample_every=0",
        "data.eval_fraction=0.25",
        *extra,
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["grpo.num_generation=2"],
            "unknown key 'grpo.num_generation' (did you mean 'grpo.num_generations'?)",
        ),
        (["train.stage=grpo"], "train.stage=grpo needs grpo.rewards"),
        (["train.stage=grpo", "grpo.rewards=[tatqa_correct]", "grpo.num_generations=3"], "multiple of"),
        (["grpo.rewards=[tatqa_correct]", "grpo.reward_weights=[1, 2]"], "one weight per reward"),
        (
            ["train.stage=grpo", "grpo.rewards=[tatqa_correct]", "train.packing=true"],
            "train.packing apply to",
        ),
        (
            ["train.stage=grpo", "grpo.rewards=[tatqa_correct]", "train.eval_steps=5"],
            "train.eval_steps apply to",
        ),
    ],
)
def test_grpo_config_is_checked(overrides, message):
    with pytest.raises(UserError, match="invalid recipe") as err:
        load_config(None, ["train.max_steps=1", *overrides])
    assert message in str(err.value)


def test_grpo_arguments_are_grpoconfig_fields(tiny_model_dir, tmp_path):
    from trl import GRPOConfig

    from hpml_ft.train.grpo import grpo_arguments, grpo_config

    extra = ["grpo.beta=0.04", "grpo.reward_weights=[1.0, 0.5]", "grpo.loss_type=grpo", "grpo.scale_rewards=none"]
    cfg = load_config(
        _recipe(tmp_path), _overrides(tiny_model_dir, tmp_path, "[tatqa_correct,tatqa_scale]", extra=extra)
    )
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(grpo_arguments(cfg, 1)) - fields == set()  # a renamed TRL field fails here, not in a run
    args = grpo_config(cfg, 1)
    assert (args.num_generations, args.max_completion_length, args.beta) == (2, 4, 0.04)
    assert (args.reward_weights, args.loss_type, args.generation_batch_size) == ([1.0, 0.5], "grpo", 4)
    assert args.scale_rewards == "none"  # the TAT-QA recipe's setting reaches TRL as written


def test_bad_user_reward_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import hpml_ft.train.cli as cli

    monkeypatch.setattr(cli, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    with pytest.raises(SystemExit) as exc:
        run_cli(train_main, [str(_recipe(tmp_path)), *_overrides(tiny_model_dir, tmp_path, "[nope_mod:f]")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: grpo.rewards: cannot import 'nope_mod'"), err


def test_dry_run_prints_prompts_generations_and_completions(tiny_model_dir, tmp_path, capsys):
    args = _overrides(tiny_model_dir, tmp_path, "[tatqa_correct]")
    assert train_main([str(_recipe(tmp_path)), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train_prompts: 6\n" in out  # 4 contexts x 2 questions, one of 4 contexts held out
    assert "prompts_per_step: 2\n" in out and "generations_per_prompt: 2\n" in out
    assert "completions_per_step: 4 per device x 1 accumulation x 1 processes = 4" in out
    assert "generated_tokens_per_step: at most 16 (4 x 4)" in out
    assert "# memory estimate" in out and "| KV cache (generation) |" in out  # the planner models GRPO
    assert not (tmp_path / "out").exists()


def _run(tiny_model_dir, tmp_path, monkeypatch, method: str, extra=()):
    mod = _user_module(tmp_path, monkeypatch, LENGTH)
    rewards = f"[tatqa_correct,tatqa_format,{mod}:length_reward]"  # length varies: the advantages are not 0
    args = _overrides(tiny_model_dir, tmp_path, rewards, method, extra)
    assert train_main([str(_recipe(tmp_path)), *args]) == 0
    run = tmp_path / "out" / "g"
    return run, json.loads((run / "metrics.json").read_text())


def _check_records(run, metrics):
    assert metrics["global_step"] == 1
    assert set(metrics["rewards"]) == {"tatqa_correct", "tatqa_format", "length_reward"}
    assert metrics["rewards"]["length_reward"][0] > 0 and len(metrics["reward_curve"]) == 1
    assert metrics["tokens_seen"] > 0  # GRPO counts prompt + completion tokens itself
    assert "exact_match" in metrics["before"] and "exact_match" in metrics["after"]  # the quick eval ran
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["recipe"]["train"]["stage"] == "grpo"
    assert load_config(run / "recipe.yaml").grpo.rewards[0] == "tatqa_correct"
    assert "GRPO on rewards tatqa_correct" in (run / "README.md").read_text()


def test_full_grpo_step_moves_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    extra = ["tracking.report_to=[tensorboard]", "train.sample_every=1"] if tensorboard else []
    run, metrics = _run(tiny_model_dir, tmp_path, monkeypatch, "full", extra)
    _check_records(run, metrics)
    if tensorboard:  # trackers get TRL's reward keys next to ours, and the samples
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = list((run / "logs").rglob("events.out.tfevents.*"))
        acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        wanted = {"train/reward", "train/rewards/length_reward/mean", "train/rss_mib", "train/tokens_per_s"}
        assert wanted <= set(acc.Tags()["scalars"])
        assert "samples/text_summary" in acc.Tags()["tensors"]
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "merged" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2  # full FT: most tensors moved in one step
    # a finished run is a model to continue from (runs.base_model_path: its merged/), as for SFT
    again = [*_overrides(tiny_model_dir, tmp_path, "[tatqa_correct]"), f"model.name_or_path={run}", "name=g2"]
    assert train_main([str(_recipe(tmp_path)), *again, "--dry-run"]) == 0


def test_lora_grpo_step_with_kl_trains_the_adapter_only(tiny_model_dir, tmp_path, monkeypatch):
    run, metrics = _run(tiny_model_dir, tmp_path, monkeypatch, "lora", ["grpo.beta=0.1"])
    _check_records(run, metrics)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert not (run / "adapter" / "ref").exists()  # TRL's reference copy of the adapter is not saved
    assert (run / "merged" / "model.safetensors").is_file()


def test_grpo_resumes_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A LoRA GRPO run with a KL term saves checkpoint-1; a longer run resumes there (TRL's `ref` adapter is
    rebuilt from the fresh adapter, the trained one comes from the checkpoint) and runs only the missing step."""
    extra = ["grpo.beta=0.1", "train.save_steps=1"]
    run, _ = _run(tiny_model_dir, tmp_path, monkeypatch, "lora", extra)
    assert (run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    run, metrics = _run(
        tiny_model_dir, tmp_path, monkeypatch, "lora", [*extra, "train.max_steps=2", "train.resume=auto"]
    )
    assert metrics["resumed_from"].endswith("checkpoint-1")
    # the log history comes back with the checkpoint: the reward curve covers both steps, as SFT's loss curve
    assert (metrics["global_step"], metrics["steps_run"], len(metrics["reward_curve"])) == (2, 1, 2)
