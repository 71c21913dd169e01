"""A user's finished run is never lost: overwrite swaps at the end, one writer per run, names stay inside."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpml_ft.errors import UserError
from hpml_ft.merge import main as merge_main
from hpml_ft.train import main as train_main


def _args(tiny: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "name=r",
        f"train.max_steps={steps}",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",
        "train.logging_steps=1",
        "data.max_samples=8",
        "train.eval_generate=0",
        "train.max_length=96",
        *extra,
    ]


@pytest.fixture()
def recipe(tmp_path) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text("name: r\n")
    return p


def _digest(run: Path) -> dict[str, str]:
    """Hash of every file in a run dir, to prove it was not touched."""
    return {
        str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(run.rglob("*"))
        if f.is_file()
    }


def _spawn(recipe: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "hpml_ft.train", str(recipe), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def test_kill9_during_overwrite_keeps_old_run(tiny_model_dir, alpaca_file, tmp_path, recipe):
    out = tmp_path / "out"
    run = out / "r"
    assert train_main([str(recipe), *_args(tiny_model_dir, alpaca_file, out, 2)]) == 0
    before = _digest(run)
    proc = _spawn(
        recipe, _args(tiny_model_dir, alpaca_file, out, 200, "train.overwrite=true", "train.save_steps=2")
    )
    staged_ckpt = out / ".r.overwrite" / "r" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    _wait_for(staged_ckpt.exists, proc)
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _digest(run) == before, "the finished run changed while the overwriting run was killed"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "merged")  # still loadable
    # the rerun replaces it only once finished, and leaves no staging dir behind
    args = _args(tiny_model_dir, alpaca_file, out, 3, "train.overwrite=true")
    assert train_main([str(recipe), *args]) == 0
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in out.iterdir()) == [".r.lock", "r"]


def test_second_writer_is_refused(tiny_model_dir, alpaca_file, tmp_path, recipe):
    out = tmp_path / "out"
    first = _spawn(recipe, _args(tiny_model_dir, alpaca_file, out, 400, "train.resume=auto"))
    lock = out / ".r.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().startswith("pid"), first)
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "hpml_ft.train",
                str(recipe),
                *_args(tiny_model_dir, alpaca_file, out, 4, "train.resume=auto"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run ended before the second one started"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "in use by another training" in second.stderr
    assert f"pid {first.pid}" in second.stderr


@pytest.mark.parametrize("name", ["", "name=", "..", "../x", "/tmp/escape", ".hidden", "a/b", "a b"])
def test_run_names_must_be_one_plain_component(tiny_model_dir, alpaca_file, tmp_path, recipe, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "keep.txt").write_text("mine")
    # "name=" empties the recipe's name (the default run name); the rest set train.run_name
    override = name if name.endswith("=") else f"train.run_name={name}"
    args = _args(tiny_model_dir, alpaca_file, out, 2, override, "train.overwrite=true")
    with pytest.raises(UserError, match="one plain directory name"):
        train_main([str(recipe), *args])
    assert (out / "keep.txt").read_text() == "mine" and (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_failed_start_does_not_block_rerun(tiny_model_dir, alpaca_file, tmp_path, recipe):
    out = tmp_path / "out"
    bad = _args(tiny_model_dir, alpaca_file, out, 2, "peft.target_modules=[no_such_module]")
    # the model's modules are known only once it loads, after the run dir was created: one error line
    with pytest.raises(UserError, match="names no module of the model"):
        train_main([str(recipe), *bad])
    assert (out / "r").exists()
    assert train_main([str(recipe), *_args(tiny_model_dir, alpaca_file, out, 2)]) == 0
    assert (out / "r" / "run.json").exists()


def test_overwrite_never_deletes_a_foreign_dir(tiny_model_dir, alpaca_file, tmp_path, recipe):
    out = tmp_path / "out"
    (out / "r").mkdir(parents=True)
    (out / "r" / "thesis.tex").write_text("years of work")
    args = _args(tiny_model_dir, alpaca_file, out, 2, "train.overwrite=true")
    with pytest.raises(UserError, match="not an hpml_ft run"):
        train_main([str(recipe), *args])
    assert (out / "r" / "thesis.tex").read_text() == "years of work"


def test_merge_refuses_out_overlapping_its_input(tiny_model_dir, alpaca_file, tmp_path, recipe):
    out = tmp_path / "out"
    assert train_main([str(recipe), *_args(tiny_model_dir, alpaca_file, out, 2, "train.merge=false")]) == 0
    run = out / "r"
    before = _digest(run)
    for target in (run, run / "adapter", run / "adapter" / "sub"):
        with pytest.raises(UserError, match="overlaps the input|training run directory"):
            merge_main(["--adapter", str(run / "adapter"), "--out", str(target), "--overwrite"])
    assert _digest(run) == before
