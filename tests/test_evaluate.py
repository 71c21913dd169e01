"""Scoring library and the eval CLI on the tiny model with a project-written TAT-QA file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpml_ft.config import load_config
from hpml_ft.data import load_samples
from hpml_ft.eval.report import comparison_table
from hpml_ft.scoring import official_predictions, score_samples

FIXTURE = Path(__file__).parent / "fixtures" / "eval_tatqa.json"
UIDS = ["q-orchard-1", "q-orchard-2", "q-orchard-3", "q-orchard-4", "q-harbor-1", "q-harbor-2"]


def _samples() -> list[dict]:
    samples, fmt = load_samples(str(FIXTURE))
    assert fmt == "tatqa"
    return samples


def test_gold_answers_score_perfectly_with_breakdown():
    samples = _samples()
    rows, metrics = score_samples(samples, [s["messages"][-1]["content"] for s in samples], "tatqa")
    assert [r["id"] for r in rows] == UIDS
    assert (metrics["n"], metrics["exact_match"], metrics["f1"]) == (6, 100.0, 100.0)
    assert metrics["scale_accuracy"] == 100.0
    cells = metrics["breakdown"]
    assert cells["arithmetic"]["table"]["count"] == 2 and cells["span"]["table-text"]["count"] == 1
    assert cells["multi-span"]["text"] == {"count": 1, "exact_match": 100.0, "f1": 100.0}
    assert set(rows[0]) >= {
        "id",
        "prompt",
        "gold",
        "pred",
        "em",
        "f1",
        "pred_answer",
        "pred_scale",
        "scale_ok",
    }
    official = official_predictions(rows)
    assert list(official) == UIDS and official["q-orchard-3"][0] == ["grocery chains", "online subscriptions"]


def test_wrong_scale_and_wrong_answer_score_zero():
    samples = _samples()[:2]
    rows, metrics = score_samples(samples, ["4,210", "banana"], "tatqa")
    assert rows[0]["em"] == 0 and rows[0]["scale_ok"] is False  # 4,210 without "thousand" is 1000x off
    assert metrics["exact_match"] == 0.0
    _, right = score_samples(samples, ["4,210 thousand", "115 thousand"], "tatqa")
    assert (right["exact_match"], right["f1"]) == (100.0, 100.0)


def test_plain_formats_use_em_and_token_f1():
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the red fox"}]
    samples = [{"id": "0", "messages": chat}]
    rows, metrics = score_samples(samples, ["Red fox!"], "alpaca")
    assert rows[0]["em"] == 1.0 and metrics == {"n": 1, "exact_match": 100.0, "f1": 100.0}
    worse = {**metrics, "exact_match": 0.0}
    table = comparison_table(
        [
            {"name": "m1", "metrics": metrics, "speed": {"tokens_per_s": 3.0}},
            {"name": "m2", "metrics": worse, "speed": {"tokens_per_s": 1.0}},
        ],
        "alpaca",
    )
    assert table.splitlines()[2].startswith("| m1 | 1 | 100.00") and "| m2 |" in table


# ---------------------------------------------------------------- CLI on the tiny model


@pytest.fixture()
def runs(tmp_path, tiny_model_dir) -> Path:
    """outputs/run_a: a finished run whose merged model is a second tiny model and whose base is the first."""
    from conftest import build_tiny_model
    from transformers import AutoTokenizer

    outputs = tmp_path / "outputs"
    merged = outputs / "run_a" / "merged"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_model(tok, seed=1).save_pretrained(merged)
    tok.save_pretrained(merged)
    cfg = load_config(
        None,
        [
            "train.max_steps=1",
            f"data.path={FIXTURE}",
            "data.eval_fraction=0.5",
            f"model.name_or_path={tiny_model_dir}",
        ],
    )
    run = {"status": "finished", "base_path": str(tiny_model_dir), "recipe": cfg.model_dump(mode="json")}
    (outputs / "run_a" / "run.json").write_text(json.dumps(run))
    return outputs


def test_eval_cli_compares_models_and_loads_each_once(tmp_path, tiny_model_dir, runs, monkeypatch, capsys):
    import hpml_ft.eval.answers as answers
    from hpml_ft.eval.cli import main

    monkeypatch.chdir(tmp_path)  # no outputs/ of the checkout can leak in
    loads = []
    real = answers.load_model
    monkeypatch.setattr(answers, "load_model", lambda spec, *a: loads.append(spec.path) or real(spec, *a))
    out = tmp_path / "eval"
    models = f"base,{runs / 'run_a'},{tiny_model_dir}"
    assert (
        main(
            [
                "--models",
                models,
                "--data",
                str(FIXTURE),
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    # base is the run's base, i.e. the same tiny model as the third spec: loaded once
    assert sorted(loads) == sorted([str(tiny_model_dir), str(runs / "run_a" / "merged")])
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert names == ["base", "run_a", tiny_model_dir.name] and res["n"] == 2 and res["format"] == "tatqa"
    md = (out / "results.md").read_text()
    assert all(f"| {n} | 2 |" in md for n in names) and "answer_type" in md
    # every model gets its interval, every model after the first a paired comparison against it
    first, *rest = res["models"]
    assert "vs_first" not in first["metrics"] and all(m["metrics"]["vs_first"]["model"] == "base" for m in rest)
    for m in res["models"]:
        lo, hi = m["metrics"]["exact_match_ci"]
        assert lo <= m["metrics"]["exact_match"] <= hi
    assert "## Against base on the same questions" in md and "95% CI [" in md
    assert md in capsys.readouterr().out
    for m in res["models"]:
        rows = [json.loads(line) for line in (out / m["predictions"]).read_text().splitlines()]
        assert [r["id"] for r in rows] == UIDS[:2] and {"prompt", "gold", "pred", "em", "f1"} <= set(rows[0])
        official = json.loads((out / m["official_predictions"]).read_text())
        assert list(official) == UIDS[:2]
        scales = ("", "thousand", "million", "billion", "percent")
        assert all(isinstance(v, list) and len(v) == 2 and v[1] in scales for v in official.values())


def test_eval_cli_defaults_to_latest_run_eval_split(tmp_path, runs):
    from hpml_ft.eval import main

    out = tmp_path / "eval_default"
    assert main(["--runs-dir", str(runs), "--limit", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["base", "run_a"]
    assert res["n"] == 1 and "run_a" in res["data"]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpml_ft.eval", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_eval_labels_name_the_models_in_results_and_files(tmp_path, tiny_model_dir, runs, monkeypatch):
    from hpml_ft.eval.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    argv = ["--models", f"{runs / 'run_a'},{tiny_model_dir}", "--labels", "sft,tiny", "--data", str(FIXTURE)]
    assert main([*argv, "--limit", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["sft", "tiny"]
    assert res["models"][0]["path"] == str(runs / "run_a" / "merged")  # the label renames, the path stays
    assert res["models"][1]["metrics"]["vs_first"]["model"] == "sft"
    assert sorted(p.name for p in (out / "predictions").glob("*.jsonl")) == ["sft.jsonl", "tiny.jsonl"]


def test_eval_cli_help_is_instant(tmp_path):
    proc = _run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--models" in proc.stdout and "--judge-url" in proc.stdout
    code = (
        "import sys, hpml_ft.eval.cli, hpml_ft.eval.judge, hpml_ft.eval.ifeval, hpml_ft.runs; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


BAD = ["missing data", "unknown model", "limit 0", "out not an eval dir", "no run", "labels count", "label a path"]


@pytest.mark.parametrize("case", BAD)
def test_eval_cli_bad_input_one_line_exit_2(tmp_path, tiny_model_dir, case):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    good = ["--models", str(tiny_model_dir), "--data", str(FIXTURE)]
    args = {
        "missing data": ["--models", str(tiny_model_dir), "--data", str(tmp_path / "nope.json")],
        "unknown model": ["--models", f"{tiny_model_dir},{tmp_path}/no_such_model", "--data", str(FIXTURE)],
        "limit 0": [*good, "--limit", "0"],
        "out not an eval dir": [*good, "--out", str(busy)],
        "no run": ["--runs-dir", str(tmp_path / "empty")],
        "labels count": [*good, "--labels", "a,b"],
        "label a path": [*good, "--labels", "../a"],
    }[case]
    proc = _run_cli(*args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert (busy / "keep.txt").exists()


def test_run_dir_without_merged_model_or_adapter_is_refused(tmp_path, runs):
    from hpml_ft.errors import UserError
    from hpml_ft.runs import resolve

    shutil.rmtree(runs / "run_a" / "merged")
    with pytest.raises(UserError, match="no merged/ model and no adapter/"):
        resolve(str(runs / "run_a"))


def test_eval_recipe_uses_its_eval_split_and_its_model_as_base(tmp_path, runs, monkeypatch):
    """--recipe: the samples are the recipe's eval split (not the latest run's, not the demo data) and 'base' is
    the recipe's model, here a finished run dir (its merged/ model), as users chain runs."""
    from hpml_ft.config import dump_config
    from hpml_ft.data import load_splits
    from hpml_ft.eval.cli import main

    monkeypatch.chdir(tmp_path)
    overrides = [f"data.path={FIXTURE}", "data.eval_fraction=0.5", "data.seed=7"]
    cfg = load_config(None, [*overrides, f"model.name_or_path={runs / 'run_a'}", "train.max_steps=1"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_config(cfg))
    out = tmp_path / "ev"
    argv = ["--recipe", str(recipe), "--models", "base", "--runs-dir", str(runs), "--max-new-tokens", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    want = [s["id"] for s in load_splits(cfg.data).eval]
    rows = [json.loads(x) for x in (out / res["models"][0]["predictions"]).open()]
    assert res["data"] == f"{recipe} eval split" and [r["id"] for r in rows] == want and set(want) < set(UIDS)
    assert res["models"][0]["path"] == str(runs / "run_a" / "merged")
