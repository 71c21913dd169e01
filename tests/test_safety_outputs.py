"""Issue #21, one output rule for every command: a command never replaces or writes inside its own input, a full
disk is one error line with no temp files left, a stopped or killed write leaves nothing that survives the next
write, an earlier result is replaced only with --overwrite, and written files honour the umask."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpml_ft.errors import UserError, run_cli

torch = pytest.importorskip("torch")


def _train_args(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "name=r",
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",
        "data.max_samples=8",
        "train.eval_generate=0",
        "train.max_length=96",
        *extra,
    ]


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime (ns): proof that nothing was rewritten."""
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*")}


def _cli(capsys, main, argv: list[str]) -> tuple[int, list[str]]:
    """Exit code and the `error:` lines on stderr (model-loading progress bars are left out)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exc.value.code, [line for line in err.splitlines() if line.startswith("error")]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny model (it records the base, so merge needs no --base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


# ---------------------------------------------------------------- data loss: a run feeding itself


def test_run_training_from_itself_is_refused_and_left_untouched(tiny_model_dir, alpaca_file, tmp_path):
    from hpml_ft.train import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\n")
    out = tmp_path / "out"
    assert main([str(recipe), *_train_args(tiny_model_dir, alpaca_file, out)]) == 0
    run = out / "r"
    before = _state(run)
    # the finished run is the base of the new one, which is written into it
    again = _train_args(run, alpaca_file, out, "train.overwrite=true", "train.merge=false")
    with pytest.raises(UserError, match="overlaps the input"):
        main([str(recipe), *again])
    assert _state(run) == before
    assert sorted(p.name for p in out.iterdir()) == [".r.lock", "r"]


# ---------------------------------------------------------------- full disk


def _full_disk(monkeypatch) -> None:
    """safetensors writes into a staging dir fail half way with ENOSPC, as on a full disk."""
    import peft.peft_model
    import transformers.modeling_utils

    def save_file(tensors, filename, *args, **kwargs):
        if ".tmp" not in Path(filename).parent.name:  # checkpoints during training still save
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 4096)  # a partial file, as a real full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    real = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


@pytest.mark.parametrize("cli", ["merge", "quantize", "train"])
def test_full_disk_is_one_error_line_and_leaves_no_temp_files(
    cli, capsys, monkeypatch, tmp_path, tiny_model_dir, adapter, alpaca_file
):
    _full_disk(monkeypatch)
    out = tmp_path / "out"
    if cli == "merge":
        from hpml_ft.merge import main

        argv, target = ["--adapter", str(adapter), "--out", str(out)], out
    elif cli == "quantize":
        pytest.importorskip("torchao")
        from hpml_ft.quant.cli import main

        argv, target = [str(tiny_model_dir), "--bits", "8", "--out", str(out), "--no-measure"], out
    else:
        from hpml_ft.train import main

        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("name: r\n")
        argv, target = [str(recipe), *_train_args(tiny_model_dir, alpaca_file, out)], out / "r" / "adapter"
    code, err = _cli(capsys, main, argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no space left on device writing {target} (") and "free there" in err[0]
    assert not target.exists()
    assert [p for p in _hidden(target.parent) if ".tmp" in p] == []
    assert not (target.parent / "run.json").exists()


# ---------------------------------------------------------------- SIGTERM / kill -9 during a write

_SLOW_MERGE = """
import sys, time
import hpml_ft.merge as merge
from hpml_ft.errors import run_cli

real = merge.set_generation_eos
def stall(path, tok):  # the weights are in the staging dir: stop here until a signal comes
    real(path, tok)
    print("writing", flush=True)
    time.sleep(300)
merge.set_generation_eos = stall
run_cli(merge.main, sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_merge_leaves_no_temp_after_the_next_merge(sig, tmp_path, adapter):
    from hpml_ft.merge import main

    out = tmp_path / "merged"
    argv = ["--adapter", str(adapter), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_MERGE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # blocks until the stall (or exit)
        assert line.strip() == "writing", proc.stderr.read()[-2000:]
        assert any(".tmp-" in p for p in _hidden(tmp_path)), "the staging dir should exist mid-write"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    if sig == signal.SIGTERM:  # cleaned up by the process itself
        assert proc.returncode == 143, proc.stderr.read()[-2000:]
        assert _hidden(tmp_path) == [] and not out.exists()
    assert main(argv) == 0  # kill -9 ran no cleanup: the next write to the same target does it
    assert _hidden(tmp_path) == []
    assert (out / "model.safetensors").is_file()


def test_stale_staging_is_swept_only_when_its_process_is_gone(tmp_path):
    from hpml_ft.outputs import _owner, sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _owner().partition("@")[2]
    target = tmp_path / "m"
    names = {
        "dead_tmp": f".m.tmp-{dead.pid}@{host}-abc",
        "dead_old": f".m.old-{dead.pid}@{host}",
        "live_tmp": f".m.tmp-{os.getpid()}@{host}-abc",
        "other_host": f".m.tmp-{dead.pid}@elsewhere-abc",
        "users": ".m.tmp-notes",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    sweep_stale(target)
    assert (target / "f").read_text() == names["dead_old"]  # an old result set aside and not replaced: back
    assert _hidden(tmp_path) == sorted(names[k] for k in ("live_tmp", "other_host", "users"))


# ---------------------------------------------------------------- silent replacement


def _quantize(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [str(tiny), "--bits", "8", "--out", str(out), "--no-measure", *extra]


def _eval(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--models",
        str(tiny),
        "--data",
        str(data),
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("cli", ["quantize", "eval"])
def test_earlier_result_is_replaced_only_with_overwrite(cli, capsys, tmp_path, tiny_model_dir, alpaca_file):
    if cli == "quantize":
        pytest.importorskip("torchao")
        from hpml_ft.quant.cli import main

        args = _quantize
    else:
        from hpml_ft.eval.cli import main

        args = _eval
    out = tmp_path / "out"
    argv = args(tiny_model_dir, out) if cli == "quantize" else args(tiny_model_dir, alpaca_file, out)
    assert main(argv) == 0
    before = _state(out)
    code, err = _cli(capsys, main, argv)
    assert code == 2 and len(err) == 1 and "pass --overwrite to replace it" in err[0], err
    assert _state(out) == before
    time.sleep(0.01)  # a new mtime for the replacement
    assert main([*argv, "--overwrite"]) == 0
    assert _state(out).keys() == before.keys() and _state(out) != before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_quantize_out_on_its_input_is_refused(where, capsys, tmp_path, tiny_model_dir):
    pytest.importorskip("torchao")
    import shutil

    from hpml_ft.quant.cli import main
    from hpml_ft.quant.ptq import quantize_dir

    src = tmp_path / "model"
    if where == "same":  # an earlier quantize result, quantized again into itself
        quantize_dir(tiny_model_dir, src, 8, 32)
    else:
        shutil.copytree(tiny_model_dir, src)
    before = _state(src)
    out = src if where == "same" else src / "q"
    code, err = _cli(capsys, main, _quantize(src, out))  # refused even where --overwrite would be needed
    assert code == 2 and len(err) == 1 and "overlaps the input" in err[0], err
    assert _state(src) == before


# ---------------------------------------------------------------- file modes


def test_atomic_writes_honour_the_umask(tmp_path):
    from hpml_ft.outputs import atomic_dir, write_json_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        write_text_atomic(tmp_path / "b.md", "b")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "w").write_text("w")
        os.umask(0o002)  # a team-shared dir: group-writable
        write_text_atomic(tmp_path / "c.md", "c")
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"a.json": 0o644, "b.md": 0o644, "d": 0o755, "c.md": 0o664}
    assert (tmp_path / "d" / "hpml_ft.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
