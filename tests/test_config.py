"""Config: YAML -> overrides -> validation, with actionable messages."""

from __future__ import annotations

import pytest

from hpml_ft.config import Config, grad_accum_steps, load_config
from hpml_ft.errors import UserError


def _recipe(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_need_epochs_or_steps():
    with pytest.raises(UserError, match="exactly one of train.num_epochs and train.max_steps"):
        load_config(None)
    cfg = load_config(None, ["train.max_steps=5"])
    assert cfg.train.max_steps == 5 and cfg.model.name_or_path == "embedded"


def test_dotted_overrides_are_typed(tmp_path):
    p = _recipe(tmp_path, "train:\n  num_epochs: 1\n  learning_rate: 2.0e-4\npeft:\n  r: 16\n")
    cfg = load_config(
        p,
        [
            "train.learning_rate=1e-4",
            "peft.r=8",
            "model.name_or_path=some/model",
            "peft.target_modules=[q_proj, v_proj]",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.peft.r == 8 and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name_or_path == "some/model"


def test_config_is_frozen():
    cfg = load_config(None, ["train.max_steps=1"])
    with pytest.raises(Exception, match="frozen"):
        cfg.train.max_steps = 2


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            "train:\n  lerning_rate: 1e-4\n  max_steps: 1\n",
            [],
            "unknown key 'train.lerning_rate' (did you mean 'train.learning_rate'?)",
        ),
        ("trian:\n  max_steps: 1\n", [], "unknown key 'trian' (did you mean 'train'?)"),
        (
            "train:\n  max_steps: 1\n",
            ["train.learning_rate=-1"],
            "train.learning_rate: Input should be greater than 0",
        ),
        ("train:\n  max_steps: many\n", [], "train.max_steps: Input should be a valid integer"),
        (
            "train:\n  max_steps: 1\n  num_epochs: 2\n",
            [],
            "set exactly one of train.num_epochs and train.max_steps",
        ),
        (
            "train:\n  max_steps: 1\n  effective_batch_size: 6\n  per_device_batch_size: 4\n",
            [],
            "not a multiple",
        ),
        ("train:\n  max_steps: 1\npeft:\n  method: qlora\ntrain2: 1\n", [], "unknown key 'train2'"),
        (
            "train:\n  max_steps: 1\npeft:\n  method: full\nmodel:\n  load_in_4bit: true\n",
            [],
            "full fine-tuning cannot",
        ),
        ("train:\n  max_steps: 1\n  deepspeed: deepspeed/zero3.json\npeft:\n  method: qlora\n", [], "ZeRO-3"),
        ("train:\n  max_steps: 1\npeft:\n  method: lorra\n", [], "peft.method: Input should be"),
    ],
)
def test_bad_recipes_name_problem_and_fix(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as err:
        load_config(_recipe(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(UserError, match="YAML syntax error at line 3"):
        load_config(_recipe(tmp_path, "train:\n  max_steps: 1\n   bad: indent\n"))


def test_missing_recipe_and_bad_override(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not of the form section.key=value"):
        load_config(None, ["train.max_steps"])


def test_grad_accum_from_effective_batch(monkeypatch):
    cfg = load_config(
        None, ["train.max_steps=1", "train.per_device_batch_size=2", "train.effective_batch_size=16"]
    )
    assert grad_accum_steps(cfg, processes=1) == 8
    assert grad_accum_steps(cfg, processes=4) == 2
    with pytest.raises(UserError, match="not divisible by per_device_batch_size x processes = 2 x 3"):
        grad_accum_steps(cfg, processes=3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert grad_accum_steps(cfg) == 4


def test_every_default_lives_in_the_config():
    cfg = Config.model_validate({"train": {"max_steps": 1}})
    assert cfg.run_dir.as_posix() == "outputs/run"
    assert cfg.tracking.wandb_mode == "offline"


def test_public_names_are_exported():
    import hpml_ft.config as config

    assert all(hasattr(config, name) for name in config.__all__)
    assert (*config.ADAPTER_METHODS, "full") == config.TRAIN_METHODS and "auto" in config.DTYPE_CHOICES


def test_extra_dicts_survive_the_saved_recipe(tmp_path):
    """train.sft_extra / peft.extra are part of the recipe a run saves, and reload (names re-checked) as is."""
    from hpml_ft.config import dump_config

    cfg = load_config(
        None, ["train.max_steps=1", "train.sft_extra={adam_beta2: 0.95}", "peft.extra={bias: lora_only}"]
    )
    saved = _recipe(tmp_path, dump_config(cfg))
    again = load_config(saved)
    assert again.train.sft_extra == {"adam_beta2": 0.95} and again.peft.extra == {"bias": "lora_only"}
    assert again == cfg
