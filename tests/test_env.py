"""`python -m hpml_ft env` / `--version`: the bug-report block names the installed versions, loads no model."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import hpml_ft
from hpml_ft import env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpml_ft", *args], capture_output=True, text=True, timeout=120)


def test_env_json_names_the_installed_versions_and_the_torch_build():
    res = _run("env", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    import torch

    for name in ("transformers", "trl", "peft", "accelerate", "torch"):
        assert info["packages"][name] == importlib.metadata.version(name)
    assert info["torch build"].startswith(torch.__version__) and "CUDA available" in info
    assert info["hpml_ft"].startswith(hpml_ft.__version__) and "commit" in info["hpml_ft"]
    assert "embedded model" in info and "hpml_ft cache" in info


def test_env_text_block_and_missing_packages(monkeypatch):
    monkeypatch.setattr(env, "PACKAGES", ("transformers", "no-such-package-hpml"))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    text = env.render(env.report())
    assert f"- transformers: {importlib.metadata.version('transformers')}" in text
    assert "- no-such-package-hpml: not installed" in text
    assert "- OMP_NUM_THREADS: 3" in text


def test_version_help_and_unknown_command():
    assert _run("--version").stdout.strip() == f"hpml_ft {hpml_ft.__version__}"
    assert "env" in _run("--help").stdout
    bad = _run("trian")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown command 'trian'")
