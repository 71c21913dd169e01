"""`python -m hpml_ft.bench`: train and generate run in seconds on the tiny model and write well-formed
JSON / markdown / PNG (with machine, versions, commit, command, date), and --profile writes a Chrome trace.
No timed assertions: speed lives in the benches."""

from __future__ import annotations

import json
import shutil

import pytest

from hpml_ft.bench.cli import main
from hpml_ft.errors import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def _check_results(out, kind: str) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == kind
    for key in ("machine", "git_commit", "command", "date"):
        assert data[key], key
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    md = (out / "results.md").read_text()
    assert md.count("\n|") >= 2 + len(data["rows"]) - 1 and data["command"] in md
    assert (out / f"{kind}.png").read_bytes()[:8] == PNG
    return data


@pytest.mark.slow
def test_train_bench_runs_the_sft_path(tiny_model_dir, tmp_path):
    out = tmp_path / "train"
    argv = [
        "train",
        f"model.name_or_path={tiny_model_dir}",
        "data.demo_size=60",
        "train.max_length=128",
        "--methods",
        "lora,full",
        "--checkpointing",
        "off",
        "--packing",
        "off,on,free",
        "--liger",
        "off",
        "--steps",
        "2",
        "--batch",
        "4",
        "--out",
        str(out),
        "--profile",
    ]
    assert main(argv) == 0
    rows = _check_results(out, "train")["rows"]
    assert [r["config"] for r in rows] == ["lora", "full", "lora+pack", "lora+free"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0
        assert len(r["step_times"]) == 2 and r["trainable_params"] > 0 and r["final_loss"] > 0
    lora, full, packed, free = rows
    assert lora["trainable_params"] < full["trainable_params"]
    # packed rows keep only their pad tails (SDPA here: one row per pack, hpml_ft.train.packing)
    assert packed["padding_frac"] < lora["padding_frac"]
    # padding-free: the padded run's samples (and label tokens) per step, in fewer padded slots
    assert free["padding_frac"] < lora["padding_frac"]
    assert free["tokens_per_step"] == lora["tokens_per_step"]
    assert free["loss_tokens_per_step"] == lora["loss_tokens_per_step"]
    trace = json.loads((out / "profile-lora.json").read_text())
    assert trace["traceEvents"]
    assert "Self CPU" in (out / "profile-lora.md").read_text()


def test_generate_bench_variants_agree(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--batches",
        "1,2",
        "--in-tokens",
        "40",
        "--out-tokens",
        "6",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--profile",
    ]
    assert main(argv) == 0
    rows = _check_results(out, "generate")["rows"]
    names = {(r["variant"], r["prompts"], r["batch"]) for r in rows}
    assert {("kv_cache", "grounded", 2), ("no_cache", "grounded", 2), ("prompt_lookup", "open", 1)} <= names
    for r in rows:
        if r["status"] == "ok":
            assert r["ttft_s"] > 0 and r["latency_s"] > 0 and r["peak_mib"] > 0
            assert r["same_as_kv_cache"] is True, r  # greedy: the same text with or without cache / lookup
        else:
            assert r["variant"] == "static_compile" and r["status"].startswith("skipped:"), r
    assert list(out.glob("profile-*.json")) and list(out.glob("profile-*.md"))


def test_failing_configuration_exits_nonzero(tiny_model_dir, tmp_path):
    """A configuration whose model fails to load is an error row and exit code 1, never 0."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "hidden_size": 72}))  # weights no longer fit
    out = tmp_path / "bad"
    argv = [
        "train",
        f"model.name_or_path={broken}",
        "data.demo_size=20",
        "train.max_length=64",
        "--methods",
        "lora",
        "--checkpointing",
        "off",
        "--packing",
        "off",
        "--liger",
        "off",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as ex:
        run_cli(main, argv)
    assert ex.value.code == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["status"].startswith("error"), rows


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--packing", "maybe"], "--packing: unknown ['maybe']"),
        (["generate", "--batches", "1,x"], "--batches must be a comma list"),
        (["generate", "--model", "/nonexistent/model"], "model path not found"),
        (["train", "train.lerning_rate=1"], "did you mean 'train.learning_rate'"),
        # an override after the options is still an override (it reaches the config check), a stray word is not
        (["train", "--steps", "1", "train.lerning_rate=1"], "did you mean 'train.learning_rate'"),
        (["train", "--steps", "1", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "data.path=x"], "unrecognized arguments: data.path=x"),
    ],
)
def test_bad_input_is_one_line_and_no_output(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        run_cli(main, [*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and message in err.splitlines()[-1], err
    assert not out.exists()


def test_out_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as ex:
        run_cli(main, ["generate", "--out", str(target)])
    assert ex.value.code == 2 and "is a file" in capsys.readouterr().err
