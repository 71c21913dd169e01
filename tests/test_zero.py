"""DeepSpeed ZeRO-3 on the CPU, end to end: train -> ZeRO checkpoint -> consolidate == trained weights -> resume.

Select with `pytest -m zero`; skipped when DeepSpeed is not installed. The first run on a machine JIT-builds
DeepSpeed's shared-memory comm op (~1 min on 2 cores, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.zero, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed: pip install deepspeed"
)


def _train(run_root: Path, tiny: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """One DeepSpeed process without a launcher: DS_ACCELERATOR=cpu (gloo) + the torch.distributed variables."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29700 + os.getpid() % 200),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    cmd = [
        sys.executable,
        "-m",
        "hpml_ft.train",
        "recipes/fft_embedded.yaml",
        f"model.name_or_path={tiny}",
        f"train.output_dir={run_root}",
        "name=z3",
        "train.deepspeed=deepspeed/zero3.json",
        "peft.method=full",
        f"train.max_steps={steps}",
        "train.save_steps=1",
        "train.save_total_limit=5",
        "train.per_device_batch_size=2",
        "train.effective_batch_size=2",
        "train.max_length=96",
        "data.demo_size=40",
        "train.logging_steps=1",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-2",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    proc = _train(root, tiny_model_dir, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "z3"


@needs_deepspeed
def test_zero3_run_writes_sharded_checkpoints_and_a_real_model(zero3_run):
    assert (zero3_run / "run.json").is_file()
    assert (zero3_run / "checkpoints" / "checkpoint-2" / "global_step2").is_dir()
    merged = load_file(zero3_run / "merged" / "model.safetensors")
    assert all(t.numel() > 0 for t in merged.values())  # stage3_gather_16bit_weights_on_model_save at work


@needs_deepspeed
def test_consolidated_weights_equal_the_trained_model(zero3_run, tmp_path, tiny_model_dir):
    from hpml_ft.consolidate import main as consolidate

    out = tmp_path / "consolidated"
    assert consolidate([str(zero3_run / "checkpoints" / "checkpoint-2"), "--out", str(out)]) == 0
    got, want = load_file(out / "model.safetensors"), load_file(zero3_run / "merged" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(got[k], initial[k]) for k in want)  # it trained: not the starting weights
    assert json.loads((out / "hpml_ft.json").read_text())["tag"] == "global_step2"
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (
        out / "tokenizer_config.json"
    ).read_text()


@needs_deepspeed
def test_resume_auto_continues_the_step_count(zero3_run, tiny_model_dir):
    proc = _train(zero3_run.parent, tiny_model_dir, 3, "train.resume=auto")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    assert json.loads((zero3_run / "metrics.json").read_text())["global_step"] == 3
    state = json.loads((zero3_run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def _consolidate_error(capsys, *argv: str) -> str:
    from hpml_ft.consolidate import main as consolidate
    from hpml_ft.errors import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(consolidate, list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_consolidate_refuses_what_is_not_a_zero_checkpoint(tmp_path, capsys):
    assert "not a directory" in _consolidate_error(
        capsys, str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-7").mkdir(parents=True)
    err = _consolidate_error(capsys, str(ckpts), "--out", str(tmp_path / "o"))
    assert "holds no ZeRO checkpoint" in err and "checkpoint-7" in err
    step = ckpts / "checkpoint-7" / "global_step7"
    step.mkdir()
    assert "pass its parent" in _consolidate_error(capsys, str(step), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_consolidate_says_how_to_install_deepspeed(tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt" / "global_step1").mkdir(parents=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    err = _consolidate_error(capsys, str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"))
    assert "pip install deepspeed" in err
