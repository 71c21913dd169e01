"""The used-by sequence: a LoRA run, a full-FT run, then `python -m hpml_ft.infer --sid N` with no model named
shows sample N of the held-out split both runs share, answered by base, LoRA and full FT side by side."""

from __future__ import annotations

import json
from pathlib import Path

from hpml_ft.config import load_config
from hpml_ft.data import load_splits
from hpml_ft.infer import main as infer_main
from hpml_ft.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def _train(tiny_model_dir: Path, name: str, method: str, eval_fraction: float = 0.5) -> None:
    recipe = Path("recipe.yaml")
    recipe.write_text(f"name: {name}\n")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        "data.path=demo",
        "data.demo_size=40",
        f"data.eval_fraction={eval_fraction}",
        f"peft.method={method}",
        "train.max_steps=1",
        "train.per_device_batch_size=2",
        "train.effective_batch_size=2",
        "train.eval_generate=0",
        "train.max_length=128",
        "train.output_dir=outputs",
    ]
    assert train_main([str(recipe), *overrides]) == 0


def test_lora_then_full_then_infer_sid_shows_both_runs_and_base(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _train(tiny_model_dir, "lora", "lora")
    _train(tiny_model_dir, "other_split", "lora", eval_fraction=0.25)  # another split: not shown
    _train(tiny_model_dir, "full", "full")
    capsys.readouterr()
    assert infer_main(["--sid", "15", "--max-new-tokens", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert [a["model"] for a in rec["answers"]] == ["base", "outputs/lora", "outputs/full"]
    held_out = load_splits(load_config(Path("outputs/lora/recipe.yaml")).data).eval
    assert rec["sid"] == 15 and rec["id"] == held_out[15]["id"]
    assert rec["gold"] == held_out[15]["messages"][-1]["content"]


def test_the_two_used_by_recipes_hold_out_one_split_with_a_sample_100():
    lora = load_config(ROOT / "recipes" / "lora_alpaca.yaml").data
    full = load_config(ROOT / "recipes" / "fft_embedded.yaml").data
    assert lora == full  # same data section = the same held-out split (infer compares such runs)
    assert len(load_splits(lora).eval) > 100  # `infer --sid 100` is in range
