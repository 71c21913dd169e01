"""Two CPU processes (gloo) under `accelerate launch`: a LoRA run with gradient accumulation finishes, only rank 0
writes, the optimizer step count is the one the config implies for 2 processes, and the adapter trained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SAMPLES, PER_DEVICE, EFFECTIVE, PROCS = 16, 2, 8, 2
ACCUM = EFFECTIVE // (PER_DEVICE * PROCS)  # 2 micro-batches per optimizer step on each process
STEPS = SAMPLES // EFFECTIVE  # one epoch: 16 samples / (2 per device x 2 processes x 2 accumulation) = 2


def test_two_process_lora_run_with_accumulation(tiny_model_dir, alpaca_file, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate CLI not installed next to this Python")
    out, recipe = tmp_path / "out", tmp_path / "recipe.yaml"
    recipe.write_text("name: ddp\n")
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        str(PROCS),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "hpml_ft.train",
        str(recipe),
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={alpaca_file}",
        f"data.max_samples={SAMPLES}",
        "data.eval_fraction=0.1",
        f"train.output_dir={out}",
        "name=ddp",
        "peft.method=lora",
        "train.num_epochs=1",
        "train.max_steps=null",
        f"train.per_device_batch_size={PER_DEVICE}",
        f"train.effective_batch_size={EFFECTIVE}",
        "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "train.save_steps=1",
        "train.logging_steps=1",
        "train.max_length=96",
        "train.eval_generate=0",
        "train.sample_every=0",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = out / "ddp"
    assert proc.stdout.count("[hpml_ft] done:") == 1  # rank 0 finishes the run; rank 1 only trains

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS
    state = json.loads((run / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    # one run, written once: a single run dir, one run.json, the checkpoints of one process, no leftovers
    assert sorted(p.name for p in out.iterdir()) == [".ddp.lock", "ddp"]  # the run dir + its writer lock
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        f"checkpoint-{s}" for s in range(1, STEPS + 1)
    ]
    names = [p.relative_to(run).as_posix() for p in run.rglob("*")]
    assert sum(n.endswith("run.json") for n in names) == 1
    assert not [
        n for n in names if any(mark in n.lower() for mark in ("tmp", "partial", "incomplete", ".lock"))
    ]
    assert (run / "merged" / "model.safetensors").is_file() and not list(run.glob("merged?*"))

    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
