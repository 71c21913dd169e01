"""`data.path: org/name` offline: a dataset downloaded into the HF hub cache (`hf download --repo-type dataset`)
loads through the toolkit's loader with HF_HUB_OFFLINE=1; an id that is not cached is one clear error.

Runs in a subprocess so that huggingface_hub / datasets read the cache and offline variables of this test
(both read them once, at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = """
from hpml_ft.config import DataConfig
from hpml_ft.data import load_splits
from hpml_ft.errors import UserError

splits = load_splits(DataConfig(path="acme/tiny-alpaca", eval_fraction=0.2))
print("OK", splits.format, len(splits.train), len(splits.eval), splits.train[0]["messages"][-1]["content"])
try:
    load_splits(DataConfig(path="acme/not-cached"))
except UserError as err:
    print("ERR", err)
"""


def _hub_snapshot(cache: Path, repo: str, files: dict[str, str]) -> None:
    """The layout huggingface_hub writes: datasets--org--name/{refs/main, snapshots/<sha>/...}."""
    folder = cache / ("datasets--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA)
    for name, text in files.items():
        path = folder / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_hub_id_loads_from_the_local_hub_cache_offline(tmp_path):
    rows = [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(10)]
    _hub_snapshot(
        tmp_path / "hub",
        "acme/tiny-alpaca",
        {"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows)},
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ok = next(line for line in lines if line.startswith("OK "))
    assert ok.split()[1:4] == ["alpaca", "8", "2"]  # 10 rows, 20% held out
    assert ok.split()[4] in {r["output"] for r in rows}
    err = next(line for line in lines if line.startswith("ERR "))
    assert "could not load dataset 'acme/not-cached'" in err and "Couldn't reach" in err
