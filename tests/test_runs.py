"""hpml_ft.runs, the one resolver: every kind of model name, without loading; then a train.merge=false run that
infer and eval both load as base + adapter, answering exactly as the merged model does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import hpml_ft.model as hm
from hpml_ft.errors import UserError
from hpml_ft.runs import (
    ModelSpec,
    base_model_path,
    model_config,
    resolve,
    standalone_dir,
    with_adapter,
)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A real (non-zero) LoRA adapter of the tiny model; adapter_config.json records the tiny model as base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(out)
    return out


def _run(root: Path, base: Path, merged: Path | None, adapter: Path | None) -> Path:
    """A finished run dir as training leaves it: merged/ and/or adapter/, run.json naming them."""
    run = root / "run"
    arts = {}
    for name, src in (("merged", merged), ("adapter", adapter)):
        if src is not None:
            shutil.copytree(src, run / name)
            arts[name] = name
    run.mkdir(parents=True, exist_ok=True)
    record = {"status": "finished", "artifacts": arts, "base_path": str(base), "recipe": {}}
    (run / "run.json").write_text(json.dumps(record))
    return run


@pytest.fixture()
def fake_embedded(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """'embedded' resolves to its cached conversion: stand the tiny model in for it (nothing converted)."""
    monkeypatch.setattr(hm, "embedded_model_dir", lambda: tiny_model_dir)
    return tiny_model_dir


def test_embedded_and_base_without_a_run(fake_embedded):
    assert resolve("embedded") == ModelSpec("embedded", str(fake_embedded))
    assert resolve("base") == ModelSpec("base", str(fake_embedded))  # no run, no recipe: the embedded model


def test_base_is_the_recipe_model_else_the_run_base(tmp_path, tiny_model_dir, adapter_dir, fake_embedded):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "other")
    run = _run(tmp_path, copy, merged=tiny_model_dir, adapter=None)
    assert resolve("base", run) == ModelSpec("base", str(copy))  # the run's recorded base
    assert resolve("base", run, base=str(tiny_model_dir)).path == str(tiny_model_dir)  # a recipe's model wins
    assert resolve("base", None, base="embedded").path == str(fake_embedded)


def test_model_dir_is_itself(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == ModelSpec(str(tiny_model_dir), str(tiny_model_dir))


def test_run_dir_with_merged_model_loads_merged(tmp_path, tiny_model_dir, adapter_dir):
    run = _run(tmp_path, tiny_model_dir, merged=tiny_model_dir, adapter=adapter_dir)
    assert resolve(str(run)) == ModelSpec(str(run), str(run / "merged"))
    assert base_model_path(str(run)) == str(run / "merged")  # a recipe's model.name_or_path may be a run
    assert standalone_dir(str(run)) == str(run / "merged")


def test_run_dir_without_merged_model_is_base_plus_adapter(tmp_path, tiny_model_dir, adapter_dir):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    run = _run(tmp_path, base, merged=None, adapter=adapter_dir)
    assert resolve(str(run)) == ModelSpec(str(run), str(base), str(run / "adapter"))
    assert resolve(str(run / "adapter")).path == str(base)  # the run's base, not adapter_config.json's
    with pytest.raises(UserError, match=r"no merged/ model to start from.*python -m hpml_ft.merge"):
        base_model_path(str(run))
    with pytest.raises(UserError, match="needs a standalone model; merge it first"):
        standalone_dir(str(run), "quantize")


def test_adapter_dir_uses_the_base_it_records_or_an_explicit_one(tmp_path, tiny_model_dir, adapter_dir):
    assert resolve(str(adapter_dir)) == ModelSpec(str(adapter_dir), str(tiny_model_dir), str(adapter_dir))
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    spec = with_adapter(str(adapter_dir), str(other), None)
    assert (spec.path, spec.adapter, spec.label) == (str(other), str(adapter_dir), f"{other} + {adapter_dir}")
    with pytest.raises(UserError, match="is not a PEFT adapter"):
        with_adapter(str(tiny_model_dir), None, None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("{tmp}/no_such_model", "model path not found"),
        ("{tmp}/empty", "is not a saved model"),
        ("{tmp}/crashed", "is a run that did not finish"),
        ("{tmp}/bare_run", "has no merged/ model and no adapter/"),
        ("no-such-org/no-such-model", "not in the Hugging Face cache"),
    ],
)
def test_unknown_or_broken_names_fail_in_one_line(tmp_path, name, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "crashed" / "recipe.yaml").write_text("name: crashed\n")
    (tmp_path / "bare_run").mkdir()
    (tmp_path / "bare_run" / "run.json").write_text(json.dumps({"status": "finished", "artifacts": {}}))
    with pytest.raises(UserError, match=message):
        resolve(name.format(tmp=tmp_path))


def test_remote_code_comes_from_the_flag_only(capsys):
    from hpml_ft.config import ModelConfig

    asked = ModelConfig(trust_remote_code=True, attn_implementation="eager")
    cfg = model_config(asked, trust_remote_code=False, dtype="float32")
    assert not cfg.trust_remote_code and cfg.attn_implementation == "eager" and cfg.dtype == "float32"
    assert "is not run unless you pass --trust-remote-code" in capsys.readouterr().err
    assert model_config(None, trust_remote_code=True).trust_remote_code


# ---------------------------------------------------------------- train.merge=false, then infer and eval


@pytest.fixture(scope="module")
def unmerged_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 3-step LoRA run trained with train.merge=false, and (for comparison) its adapter merged by the merge
    CLI's library function into a separate dir."""
    from hpml_ft.demo import generate_demo
    from hpml_ft.merge import merge_adapter
    from hpml_ft.train import main as train

    root = tmp_path_factory.mktemp("unmerged")
    data = root / "alpaca.json"
    data.write_text(json.dumps(generate_demo(40, seed=3)))
    (root / "recipe.yaml").write_text("name: nomerge\n")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"train.output_dir={root / 'out'}",
        "peft.method=lora",
        "train.max_steps=3",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",
        "train.learning_rate=1e-2",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "data.max_samples=8",
        "data.eval_fraction=0.25",
        "train.eval_generate=0",
        "train.max_length=128",
        "train.merge=false",
    ]
    assert train([str(root / "recipe.yaml"), *overrides]) == 0
    run = root / "out" / "nomerge"
    assert (run / "adapter").is_dir() and not (run / "merged").exists()
    merged = root / "merged_for_comparison"
    merge_adapter(run / "adapter", merged, base_path=str(tiny_model_dir))
    return run, merged


def _infer_answers(argv: list[str], capsys) -> list[dict]:
    from hpml_ft.infer import main as infer

    capsys.readouterr()
    argv = [*argv, "--dtype", "float32"]  # on any device: bf16 rounding differs between merged and unmerged
    assert (
        infer([*argv, "--prompt", "Name a fruit.", "Sort: pear, fig", "--max-new-tokens", "8", "--json"]) == 0
    )
    return [json.loads(line)["answers"][0] for line in capsys.readouterr().out.strip().splitlines()]


def test_infer_loads_an_unmerged_run_as_base_plus_adapter(unmerged_run, tiny_model_dir, capsys):
    run, merged = unmerged_run
    unmerged = _infer_answers(["--model", str(run)], capsys)
    assert unmerged[0]["adapter"] == str(run / "adapter") and unmerged[0]["path"] == str(tiny_model_dir)
    assert [a["answer"] for a in unmerged] == [
        a["answer"] for a in _infer_answers(["--model", str(merged)], capsys)
    ]
    base = [a["answer"] for a in _infer_answers(["--model", str(tiny_model_dir)], capsys)]
    assert base != [a["answer"] for a in unmerged]  # the adapter really is applied


def test_eval_loads_an_unmerged_run_as_base_plus_adapter(unmerged_run, tiny_model_dir, tmp_path, monkeypatch):
    from hpml_ft.data import load_splits
    from hpml_ft.eval.cli import main as evaluate
    from hpml_ft.runs import run_config

    run, merged = unmerged_run
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ev"
    argv = [
        "--models",
        f"{run},{merged}",
        "--runs-dir",
        str(run.parent),
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--dtype",
        "float32",
    ]
    assert evaluate(argv) == 0  # data: the eval split of the run's own recipe
    res = json.loads((out / "results.json").read_text())
    first, second = res["models"]
    assert first["adapter"] == str(run / "adapter") and first["path"] == str(tiny_model_dir)
    assert "adapter" not in second and second["path"] == str(merged)
    preds = [[json.loads(x)["pred"] for x in (out / m["predictions"]).open()] for m in res["models"]]
    assert res["n"] == len(load_splits(run_config(run).data).eval) and "nomerge eval split" in res["data"]
    assert preds[0] == preds[1]


def test_a_recipe_can_start_from_a_finished_run(tmp_path, tiny_model_dir, alpaca_file):
    """model.name_or_path = a run dir (e.g. QAT from a LoRA run): training preflight resolves it to merged/."""
    from hpml_ft.train import main as train

    run = _run(tmp_path / "runs", tiny_model_dir, merged=tiny_model_dir, adapter=None)
    (tmp_path / "r.yaml").write_text("name: chained\n")
    argv = [f"model.name_or_path={run}", f"data.path={alpaca_file}", f"train.output_dir={tmp_path / 'out'}"]
    assert train([str(tmp_path / "r.yaml"), *argv, "train.max_steps=1", "--dry-run"]) == 0
    assert not (tmp_path / "out" / "chained").exists()
