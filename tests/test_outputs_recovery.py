"""Replacing a finished run (train.overwrite=true): `promote_run` renames the old run aside, the new one into
place, then deletes the old; `recover_replaced` (run by the next training of that name, before anything else)
repairs what a kill -9 between any two of those steps left. At every point a complete run must end up in place,
and a complete copy must never be deleted while it is the only one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpml_ft.errors import UserError
from hpml_ft.outputs import promote_run, recover_replaced, release_run_locks, run_state, staging_run_dir

OLD = {
    "run.json": '{"status": "finished", "which": "old"}',
    "metrics.json": '{"final_loss": 1.5}',
    "adapter/adapter_model.safetensors": "old adapter weights",
    "merged/model.safetensors": "old merged weights",
}
NEW = {
    "run.json": '{"status": "finished", "which": "new"}',
    "metrics.json": '{"final_loss": 0.5}',
    "adapter/adapter_model.safetensors": "new adapter weights",
    "merged/model.safetensors": "new merged weights",
}
KILLED = 137  # the child's exit code when it stopped at the planned point
# Every call that changes the file system; shutil.rmtree goes through os.unlink / os.rmdir file by file, so a kill
# lands in the middle of a delete too.
MUTATIONS = ("replace", "rename", "unlink", "remove", "rmdir")


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _tree(root: Path) -> dict[str, str] | None:
    """Every file under `root` with its text (None when `root` is not a directory)."""
    if not root.is_dir():
        return None
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def _swap(tmp_path: Path) -> tuple[Path, Path, Path]:
    """outputs/t holds the old finished run; the new one finished in its staging dir. (target, staged, aside)"""
    target = tmp_path / "outputs" / "t"
    staged = staging_run_dir(target)
    _write(target, OLD)
    _write(staged, NEW)
    return target, staged, target.parent / ".t.replaced"


def _promote_killed_at(staged: Path, target: Path, k: int) -> bool:
    """promote_run in a forked child that dies (os._exit: no cleanup, no finally) just before its k-th file
    system change. True when it was killed, False when it got through all of them."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            done = 0

            def guard(real):
                def call(*args, **kwargs):
                    nonlocal done
                    if done == k:
                        os._exit(KILLED)
                    done += 1
                    return real(*args, **kwargs)

                return call

            for name in MUTATIONS:
                setattr(os, name, guard(getattr(os, name)))
            promote_run(staged, target)
            code = 0
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code in (0, KILLED), f"promote_run failed in the child (exit {code})"
    return code == KILLED


def test_a_kill_at_every_step_of_the_swap_is_repaired(tmp_path):
    """Kill promote_run before each of its renames and deletes in turn, then recover: the new run when it had
    been renamed into place, else the old one, complete and in place; the new run kept until it is."""
    points = []
    for k in range(200):
        case = tmp_path / str(k)
        target, staged, aside = _swap(case)
        killed = _promote_killed_at(staged, target, k)
        before = {"target": _tree(target), "aside": _tree(aside), "staged": _tree(staged)}
        where = f"killed before change {k}: {before}"
        assert OLD in before.values() or before["target"] == NEW, where  # the swap never leaves neither run
        recover_replaced(target)
        # the new run counts once it has been renamed into place
        want = NEW if before["target"] == NEW else OLD
        assert _tree(target) == want and run_state(target) == "finished", where
        assert not aside.exists(), where  # nothing left that the next swap would delete unseen
        if want == OLD:
            assert _tree(staged) == NEW, where  # the finished new run, not yet in place, is not deleted
        recover_replaced(target)  # a second recovery (the next training) changes nothing
        assert _tree(target) == want, where
        points.append(want)
        if not killed:
            break
    # the kill points covered both halves: before the new run was in place and after
    assert points[0] == OLD and points[-1] == NEW and len(points) > 4, points


def test_kill_between_the_two_renames_puts_the_old_run_back(tmp_path):
    """The window recover_replaced exists for: old run moved aside, new one not yet in place."""
    target, staged, aside = _swap(tmp_path)
    os.replace(target, aside)  # promote_run's first rename, then the kill
    recover_replaced(target)
    assert _tree(target) == OLD and not aside.exists()
    assert _tree(staged) == NEW


def test_kill_after_both_renames_keeps_the_new_run(tmp_path):
    """Both present (new in place, old still aside): the old one is the leftover, the new one stays."""
    target, staged, aside = _swap(tmp_path)
    os.replace(target, aside)
    os.replace(staged, target)  # both renames done, killed before the deletes
    recover_replaced(target)
    assert _tree(target) == NEW and not aside.exists()


def test_kill_while_deleting_the_old_run_keeps_the_new_one(tmp_path):
    """Killed halfway through deleting the old run: the half-deleted copy is not restored over the new one."""
    target, staged, aside = _swap(tmp_path)
    os.replace(target, aside)
    os.replace(staged, target)
    (aside / "merged" / "model.safetensors").unlink()  # rmtree got this far; run.json still there
    recover_replaced(target)
    assert _tree(target) == NEW and not aside.exists()


def test_an_empty_dir_in_place_does_not_cost_the_old_run(tmp_path):
    """Killed between the renames, then something created an empty outputs/t (another rank's mkdir, a tool
    writing beside it) before the next training recovered: the aside copy is the only complete old run."""
    target, staged, aside = _swap(tmp_path)
    os.replace(target, aside)
    target.mkdir()
    recover_replaced(target)
    assert _tree(target) == OLD or _tree(aside) == OLD


def test_the_next_training_recovers_before_it_looks_at_the_run_dir(tmp_path):
    """train's prepare_run_dir runs the recovery first: after a kill between the renames, a training of the
    same name without overwrite finds the old finished run (and refuses), not an empty name to train into."""
    from hpml_ft.config import load_config
    from hpml_ft.train.cli import prepare_run_dir

    target, staged, aside = _swap(tmp_path)
    os.replace(target, aside)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\n")
    cfg = load_config(
        recipe, ["train.max_steps=1", "train.num_epochs=null", f"train.output_dir={target.parent}"]
    )
    try:
        with pytest.raises(UserError, match="holds a finished run"):
            prepare_run_dir(cfg)
    finally:
        release_run_locks()
    assert _tree(target) == OLD and not aside.exists()
