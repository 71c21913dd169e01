"""Docs that cannot rot: every command line shown in README.md and docs/*.md is checked against the code.

Collected: each `python -m hpml_ft...`, `accelerate launch ... -m hpml_ft...` and `make ...` line of a fenced
code block (continuation lines joined, `$ ` prompts, `# comments` and `VAR=x` prefixes stripped) and of inline
code. Checked, in this process and without running anything heavy:
- `python -m hpml_ft.X ARGS`: X's own argparse parser accepts ARGS exactly (the command's `main` is called with
  argparse stopped right after parsing; `bench train|generate|all` through its own `parse_args`); a command with
  a recipe and dotted overrides (train, plan, bench train) also loads them with `load_config`, so a documented
  key that does not exist fails too. A bare `python -m hpml_ft.X` names a command: its module must exist.
- `accelerate launch OPTS -m hpml_ft.X ARGS`: accelerate's own launch parser accepts OPTS, a `--config_file`
  exists, and ARGS as above.
- `make TARGET VAR=value`: TARGET is a Makefile target and VAR a variable the Makefile uses; `make train|fft`
  with `RECIPE`/`ARGS` load them as a recipe and overrides, `make eval|serve` parse `ARGS`/`RUN` as their
  commands do.
Also here: the `--docs` writer of `python -m hpml_ft.bench` (it replaces a marked block; missing markers fail
before any benchmark runs) and every bench block in the docs being well formed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import stat
from pathlib import Path

import pytest

from hpml_ft.bench.report import check_docs, write_docs
from hpml_ft.config import load_config
from hpml_ft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Documented commands this test cannot check, matched as a substring of the normalised command: the reason says
# why. Keep it short: a command that can be parsed is parsed (placeholders such as RUN_DIR or /path/to/file are
# just strings to a parser, and nothing here loads a model, a data file or a GPU).
SKIP: dict[str, str] = {}

COMMAND_START = re.compile(r"^(python -m hpml_ft\b|accelerate launch\b|make\b)")
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _normalise(line: str) -> list[str] | None:
    """The tokens of a shell command line without `$ ` prompt, comment and VAR=x prefixes; None if not one of ours."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # unbalanced quotes: prose, not a command
        return None
    while tokens and ENV_PREFIX.match(tokens[0]):
        tokens = tokens[1:]
    return tokens if tokens and COMMAND_START.match(" ".join(tokens)) else None


def _fenced_lines(text: str) -> tuple[list[str], str]:
    """(logical lines inside ``` fences with `\\` continuations joined, the text outside the fences)."""
    inside, outside, fenced, pending = [], [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            outside.append(raw)
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        inside.append(pending + raw)
        pending = ""
    return inside, "\n".join(outside)


def collect(text: str) -> list[list[str]]:
    """Every command of ours in a markdown text: fenced lines, then inline code (which may span a line break)."""
    inside, outside = _fenced_lines(text)
    inline = [m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", outside)]
    return [tokens for line in [*inside, *inline] if (tokens := _normalise(line))]


def documented_commands() -> list[tuple[str, list[str]]]:
    seen, out = set(), []
    for f in DOC_FILES:
        for tokens in collect(f.read_text(encoding="utf-8")):
            key = shlex.join(tokens)
            if key not in seen:
                seen.add(key)
                out.append((f"{f.relative_to(ROOT)}: {key}", tokens))
    return out


# ---------------------------------------------------------------- checking one command


class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace, extras: list[str]) -> None:
        self.ns, self.extras = ns, extras


@contextlib.contextmanager
def _stop_after_parsing():
    """argparse raises _Parsed with the result of the outermost parse instead of returning it, so a CLI's `main`
    stops before doing anything. Sub-parsers (inner parse_known_args calls) run as usual."""
    real_parse, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            ns = real_parse(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise _Parsed(ns, [])
        return ns

    def parse_known_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            ns, extras = real_known(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise _Parsed(ns, extras)
        return ns, extras

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real_parse  # type: ignore[method-assign]
        argparse.ArgumentParser.parse_known_args = real_known  # type: ignore[method-assign]


def _entry(module: str):
    """The `main` that `python -m module` runs (a package's __main__ module, else the module itself)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.fail(f"no module {module}")
    if hasattr(mod, "__path__"):
        mod = importlib.import_module(f"{module}.__main__")
    assert hasattr(mod, "main"), f"{module} has no main()"
    return mod.main


def _quietly(fn, *args):
    """fn(*args) with stdout/stderr captured; (result or exception, captured stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return fn(*args), err.getvalue()
        except (SystemExit, UserError, _Parsed) as e:
            return e, err.getvalue()


def check_module_args(module: str, args: list[str]) -> None:
    """`python -m module args`: parsed by the module's own parser; recipe + overrides loaded."""
    main = _entry(module)
    if not args:
        return  # a bare module name names the command
    if module == "hpml_ft.bench" and args[:1] != ["lowbit"]:
        from hpml_ft.bench.cli import parse_args  # parse_known_args + its own stray check + value checks

        res, err = _quietly(parse_args, args)
        if isinstance(res, argparse.Namespace):
            res = _Parsed(res, [])
    else:
        with _stop_after_parsing():
            res, err = _quietly(main, args)
    if isinstance(res, SystemExit):
        assert res.code in (0, None), f"rejected: {err.strip() or res}"
        return  # --help
    if isinstance(res, UserError):
        pytest.fail(f"rejected: {res}")
    if not isinstance(res, _Parsed):
        assert res in (0, None), f"exited {res}: {err.strip()}"
        return  # answered without parsing (python -m hpml_ft --version)
    assert not res.extras, f"unrecognized arguments: {res.extras}"
    ns = res.ns
    if not hasattr(ns, "overrides"):
        return
    recipe = getattr(ns, "recipe", None)
    assert recipe is None or Path(recipe).is_file(), f"recipe not found: {recipe}"
    overrides = [list(ns.overrides)]
    if module == "hpml_ft.bench":  # each configuration's overrides, as bench's own pre-check loads them
        from hpml_ft.bench.train import overrides_for, plan_configs

        overrides = [overrides_for(ns, c, "outputs") for c in plan_configs(ns)]
    for ov in overrides:
        try:
            load_config(recipe, ov)
        except UserError as e:
            pytest.fail(f"recipe {recipe} with {ov}: {e}")


def check_accelerate(tokens: list[str]) -> None:
    if tokens == ["accelerate", "launch"]:
        return  # the launcher named in prose
    from accelerate.commands.launch import launch_command_parser

    res, err = _quietly(launch_command_parser().parse_args, tokens[2:])
    assert isinstance(res, argparse.Namespace), f"accelerate launch rejected it: {err.strip() or res}"
    if res.config_file:
        assert (ROOT / res.config_file).is_file(), f"accelerate config not found: {res.config_file}"
    assert res.module, "launch with -m hpml_ft.MODULE"
    assert res.training_script.startswith("hpml_ft"), res.training_script
    check_module_args(res.training_script, list(res.training_script_args))


def _makefile() -> tuple[set[str], str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    return targets, text


def check_make(tokens: list[str]) -> None:
    targets, text = _makefile()
    assigned = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
    goals = [t for t in tokens[1:] if "=" not in t]
    if not goals and not assigned:
        return  # `make` named in prose
    for goal in goals:
        assert not goal.startswith("-"), f"make option {goal}: show the plain command"
        assert goal in targets, f"no Makefile target {goal!r} (targets: {', '.join(sorted(targets))})"
    for var in assigned:
        assert re.search(rf"\$\({var}\)|^{var}\s*\?=", text, re.M), f"the Makefile does not use {var}"
    args = shlex.split(assigned.get("ARGS", ""))
    for goal in goals:
        if goal in ("train", "fft"):
            default = "recipes/lora_alpaca.yaml" if goal == "train" else "recipes/fft_embedded.yaml"
            check_module_args("hpml_ft.train", [assigned.get("RECIPE", default), *args])
        elif goal == "eval":
            check_module_args("hpml_ft.eval", args)
        elif goal == "serve":
            check_module_args("hpml_ft.serve", [*([assigned["RUN"]] if "RUN" in assigned else []), *args])


def check_command(tokens: list[str]) -> None:
    if tokens[0] == "make":
        check_make(tokens)
    elif tokens[0] == "accelerate":
        check_accelerate(tokens)
    else:
        check_module_args(tokens[2], tokens[3:])


COMMANDS = documented_commands()


@pytest.mark.parametrize("where,tokens", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where: str, tokens: list[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # recipes/..., accelerate_configs/... are relative to the repository root
    reason = next((why for key, why in SKIP.items() if key in shlex.join(tokens)), None)
    if reason:
        pytest.skip(reason)
    check_command(tokens)


def test_the_docs_show_commands_and_the_skip_list_is_current():
    shown = [shlex.join(t) for _, t in COMMANDS]
    assert len(shown) > 50, "the collector found almost no commands: is the markdown parsing broken?"
    stale = [key for key in SKIP if not any(key in cmd for cmd in shown)]
    assert stale == [], "SKIP entries that match no documented command: remove them"


def test_collector_reads_blocks_continuations_prompts_comments_env_and_inline():
    text = (
        "Run `python -m hpml_ft.infer --sid 1` or `make\ntest`; not `pytest -q`.\n"
        "```bash\n"
        "$ python -m hpml_ft.eval --models base   # a comment\n"
        "OMP_NUM_THREADS=1 python -m hpml_ft.train recipes/lora_alpaca.yaml \\\n"
        "    train.max_steps=2\n"
        "accelerate launch --num_processes 1 -m hpml_ft.train recipes/lora_alpaca.yaml\n"
        "echo python -m hpml_ft.infer\n"
        "```\n"
    )
    assert collect(text) == [
        ["python", "-m", "hpml_ft.eval", "--models", "base"],
        ["python", "-m", "hpml_ft.train", "recipes/lora_alpaca.yaml", "train.max_steps=2"],
        ["accelerate", "launch", "--num_processes", "1", "-m", "hpml_ft.train", "recipes/lora_alpaca.yaml"],
        ["python", "-m", "hpml_ft.infer", "--sid", "1"],
        ["make", "test"],
    ]


@pytest.mark.parametrize(
    "command",
    [
        "python -m hpml_ft.infer --no-such-flag",
        "python -m hpml_ft.merge --adapter a --out b --no-such-flag",
        "python -m hpml_ft.bench train --no-such-flag",
        "python -m hpml_ft.bench lowbit --ifeval",
        "python -m hpml_ft.train recipes/lora_alpaca.yaml train.no_such_key=1",
        "python -m hpml_ft.train recipes/no_such_recipe.yaml",
        "accelerate launch --no-such-flag -m hpml_ft.train recipes/lora_alpaca.yaml",
        "make no-such-target",
        "make train NO_SUCH_VAR=1",
        "make eval ARGS=--no-such-flag",
    ],
)
def test_a_made_up_flag_key_or_target_fails(command: str) -> None:
    tokens = _normalise(command)
    assert tokens
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_command(tokens)


# ---------------------------------------------------------------- bench --docs


DOC = """# Perf

Intro.

<!-- bench:train -->
old train table
<!-- /bench:train -->

Between.

<!-- bench:train:packing -->
old packing table
<!-- /bench:train:packing -->
"""


def test_docs_writer_replaces_only_the_named_block_and_keeps_the_file_mode(tmp_path):
    doc = tmp_path / "perf.md"
    doc.write_text(DOC)
    doc.chmod(0o644)
    write_docs(doc, {"train": "`python -m hpml_ft.bench train`  \nheader\n\n| a |\n|---|\n| 1 |\n"})
    text = doc.read_text()
    assert "old train table" not in text and "| 1 |" in text
    assert "old packing table" in text  # the tagged block is another block
    assert text.startswith("# Perf\n\nIntro.\n\n<!-- bench:train -->\n`python -m hpml_ft.bench train`")
    assert "| 1 |\n<!-- /bench:train -->\n\nBetween." in text
    assert stat.S_IMODE(doc.stat().st_mode) == 0o644
    write_docs(doc, {"train:packing": "new packing"})
    assert "<!-- bench:train:packing -->\nnew packing\n<!-- /bench:train:packing -->" in doc.read_text()


def test_docs_without_markers_fail_in_one_line_before_any_benchmark(tmp_path, monkeypatch):
    doc = tmp_path / "perf.md"
    doc.write_text("# Perf\n\n<!-- bench:train -->\nonly the opening marker\n")
    with pytest.raises(UserError, match=r"needs the markers <!-- bench:train -->"):
        check_docs(doc, ["train"])
    with pytest.raises(UserError, match="no such file"):
        check_docs(tmp_path / "missing.md", ["train"])

    import hpml_ft.bench.cli as cli
    import hpml_ft.bench.lowbit as lowbit

    def must_not_run(*a, **k):
        raise AssertionError("a benchmark started before --docs was checked")

    monkeypatch.setattr(cli, "check_inputs", must_not_run)
    monkeypatch.setattr(cli, "run_bench", must_not_run)
    monkeypatch.setattr(lowbit, "check_torchao", must_not_run)
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["train", "--methods", "lora", "--liger", "off", "--docs", str(doc)],
        ["all", "--methods", "lora", "--liger", "off", "--docs", str(doc)],  # needs bench:generate too
        ["generate", "--docs", str(doc), "--docs-tag", "h200"],
        ["lowbit", "--docs", str(doc)],
    ):
        with pytest.raises(UserError, match="--docs"):
            cli.main(argv)
    assert not (tmp_path / "outputs").exists()


def test_every_bench_block_in_the_docs_is_well_formed():
    for f in DOC_FILES:
        text = f.read_text(encoding="utf-8")
        # block names are lower case (train, generate:h200); `<!-- bench:KIND -->` in prose is no block
        blocks = re.findall(r"<!-- bench:([a-z0-9][a-z0-9:._-]*) -->", text)
        assert sorted(blocks) == sorted(re.findall(r"<!-- /bench:([a-z0-9][a-z0-9:._-]*) -->", text)), f
        check_docs(f, blocks)  # each block once, opening before closing


def test_bench_generate_writes_its_results_md_into_the_doc(tiny_model_dir, tmp_path):
    from hpml_ft.bench.cli import main

    doc, out = tmp_path / "perf.md", tmp_path / "gen"
    doc.write_text("# Perf\n\n<!-- bench:generate:tiny -->\nold\n<!-- /bench:generate:tiny -->\n\nAfter.\n")
    command = "generate --batches 1 --in-tokens 16 --out-tokens 2 --repeats 1 --static off --docs-tag tiny"
    argv = [*shlex.split(command), "--model", str(tiny_model_dir), "--out", str(out), "--docs", str(doc)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    md = (out / "results.md").read_text()
    # the header: the command, then machine, versions, commit and date
    assert md.startswith("`python -m hpml_ft.bench generate --batches 1 ")
    assert " commit " in md.splitlines()[1]
    assert doc.read_text() == (
        f"# Perf\n\n<!-- bench:generate:tiny -->\n{md.strip()}\n<!-- /bench:generate:tiny -->\n\nAfter.\n"
    )
