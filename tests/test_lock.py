"""The dependency lock (requirements/) covers what pyproject.toml asks for, inside its ranges, and `make install`
installs from it: a fresh clone gets the versions CI passed with on any day."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _wanted() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return [r for r in reqs if _norm(r.name) != "torch"]  # torch: the machine's build (TORCH_SPEC)


def test_every_dependency_is_pinned_inside_its_range():
    pins = _pins(REQ / "cpu.txt")
    for req in _wanted():
        name = _norm(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements/cpu.txt: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} not in {req}"
    assert "torch" not in pins and not any(line.startswith("-e") for line in (REQ / "cpu.txt").read_text())


def test_no_deps_wheels_and_the_gpu_set_are_pinned():
    nodeps = _pins(REQ / "nodeps.txt")
    wanted = [
        Requirement(line) for line in (REQ / "nodeps.in").read_text().splitlines() if line and line[0] != "#"
    ]
    for req in wanted:
        assert req.specifier.contains(nodeps[_norm(req.name)]), req
    gpu = (REQ / "gpu.txt").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert "-r cpu.txt" in gpu and _pins(REQ / "gpu.txt")["torch"] == torch_spec.group(1)
    assert any(name.startswith("nvidia-") for name in _pins(REQ / "gpu.txt"))


def test_make_install_installs_the_lock():
    dry = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "pip install -q -r requirements/cpu.txt" in dry.stdout
    assert "--no-deps -r requirements/nodeps.txt" in dry.stdout and "--no-deps -e ." in dry.stdout
