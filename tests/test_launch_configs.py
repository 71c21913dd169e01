"""Launch files are data: every accelerate config, DeepSpeed JSON and recipe must be accepted by the code that
reads it (accelerate's launcher, DeepSpeed's config parser after the Trainer fills "auto", hpml_ft's config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from hpml_ft.config import grad_accum_steps, load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
DEEPSPEED = sorted((ROOT / "deepspeed").glob("*.json"))
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SCRIPTS = ROOT / "scripts"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other relative to the repo root, as launches run from there


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "hpml_ft.train", "r.yaml"])
    return _validate_launch_command(args)


def test_the_expected_files_exist():
    names = {p.name for p in ACCELERATE}
    assert {
        "single_gpu.yaml",
        "ddp.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "multinode_2x8_zero3.yaml",
    } <= names
    assert {p.name for p in DEEPSPEED} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_accepted_by_accelerate_launch(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    assert isinstance(load_config_from_file(str(path)), ClusterConfig)  # unknown keys raise here
    args, defaults, _ = _launch_args(path)
    assert args.num_processes >= 1 and args.num_machines >= 1
    assert (
        args.mixed_precision == "no"
    )  # precision comes from the recipe (TrainingArguments / DeepSpeed "auto")
    if defaults.distributed_type == "DEEPSPEED":
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        ds_file = defaults.deepspeed_config["deepspeed_config_file"]
        assert (ROOT / ds_file).is_file()
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert (
            env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == ds_file
        )


def test_multinode_config_uses_torchrun_on_every_node():
    args, defaults, _ = _launch_args(ROOT / "accelerate_configs" / "multinode_2x8_zero3.yaml")
    assert (args.num_machines, args.num_processes) == (2, 16)
    assert defaults.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # no pdsh/ssh needed


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_json_is_accepted_once_the_trainer_fills_auto(path, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed: pip install deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        use_cpu=True,
        learning_rate=3e-5,
        weight_decay=0.1,
        max_grad_norm=0.5,
        report_to="none",
    )
    hf = HfTrainerDeepSpeedConfig(str(path))
    try:  # the object registers itself globally (is_deepspeed_zero3_enabled); never leak it into other tests
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(
            args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64)), 10
        )
        filled = hf.config
    finally:
        unset_hf_deepspeed_config()
        del hf
    assert '"auto"' not in json.dumps(filled)  # every "auto" is something TrainingArguments decides
    assert (filled["train_batch_size"], filled["gradient_clipping"]) == (8, 0.5)
    ds = DeepSpeedConfig(filled)  # DeepSpeed's own validation: unknown zero_optimization keys raise
    assert ds.gradient_accumulation_steps == 4
    zero = filled["zero_optimization"]
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_model writes real weights
    opt = filled.get("optimizer", {}).get("params", {})
    assert opt in ({}, {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1})
    assert "scheduler" not in filled  # the recipe's lr_scheduler (cosine, ...) stays the Trainer's


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_its_launch_files_exist(path):
    cfg = load_config(path)
    if cfg.accelerate_config:
        accel = ROOT / cfg.accelerate_config
        assert accel.is_file(), f"{path.name}: {cfg.accelerate_config} missing"
        launch = yaml.safe_load(accel.read_text())
        if cfg.model.name_or_path != "embedded":  # GPU recipes: the batch splits over the intended GPUs
            grad_accum_steps(cfg, launch.get("num_processes", 1))
        if cfg.train.deepspeed:  # the launcher and the recipe must name the same DeepSpeed file
            assert launch["deepspeed_config"]["deepspeed_config_file"] == cfg.train.deepspeed
    if cfg.train.deepspeed:
        assert (ROOT / cfg.train.deepspeed).is_file(), f"{path.name}: {cfg.train.deepspeed} missing"


def test_shell_scripts_parse():
    for script in [*SCRIPTS.glob("*.sh"), SCRIPTS / "launch.slurm"]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def _slurm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"}  # no srun
    return subprocess.run(
        ["bash", str(SCRIPTS / "launch.slurm"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_slurm_check_mode_prints_the_launch_and_dry_runs(tiny_model_dir):
    proc = _slurm(
        "--check",
        "recipes/fft_embedded.yaml",
        f"model.name_or_path={tiny_model_dir}",
        "train.effective_batch_size=128",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "2 node(s) x 8 GPU(s) = 16 ranks" in out
    assert "--machine_rank $SLURM_NODEID" in out and "--num_processes 16" in out
    assert "8 per device x 1 accumulation x 16 processes = 128" in out  # the dry run saw WORLD_SIZE=16
    assert "# memory estimate" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "no recipe"),
        (("recipes/nope.yaml",), "recipe not found"),
        (("recipes/fft_embedded.yaml", "--accelerate-config", "nope.yaml"), "accelerate config not found"),
        (("recipes/fft_embedded.yaml", "--frobnicate"), "unknown option --frobnicate"),
        (("recipes/fft_embedded.yaml",), "not divisible by per_device_batch_size x processes = 8 x 16"),
    ],
)
def test_slurm_bad_input_exits_2(args, message):
    proc = _slurm(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
