"""Scoring model answers against gold: exact match / token F1, TAT-QA's official semantics, result tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import ModelConfig
from hpml_ft.errors import fail
from hpml_ft.generation import exact_match, normalize

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_answers(samples: list[dict], preds: list[str], fmt: str) -> dict[str, Any]:
    """Mean EM and F1 in percent; TAT-QA samples use the official scale-aware scorer."""
    if fmt == "tatqa":
        from hpml_ft.tatqa_exec import execute
        from hpml_ft.tatqa_metric import score_prediction

        runs = [execute(p) for p in preds]  # derivations computed, other answers parsed
        rows = [
            score_prediction(s["meta"]["gold"], r.answer, r.scale) for s, r in zip(samples, runs, strict=True)
        ]
        ems, f1s = [r[0] for r in rows], [r[1] for r in rows]
    else:
        golds = [s["messages"][-1]["content"] for s in samples]
        ems = [exact_match(p, g) for p, g in zip(preds, golds, strict=True)]
        f1s = [token_f1(p, g) for p, g in zip(preds, golds, strict=True)]
    n = max(len(preds), 1)
    return {"exact_match": round(100 * sum(ems) / n, 2), "f1": round(100 * sum(f1s) / n, 2)}


def _pct(x: float) -> float:
    return round(100 * x, 2)


def prompt_text(messages: list[dict]) -> str:
    """A prompt as readable text: a lone user turn as is, else one `role: content` block per turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _tatqa_rows(samples: list[dict], preds: list[str]) -> tuple[list[dict], dict[str, Any]]:
    from hpml_ft.tatqa_exec import execute
    from hpml_ft.tatqa_metric import TaTQAScorer

    scorer, rows = TaTQAScorer(), []
    for s, pred in zip(samples, preds, strict=True):
        gold = s["meta"]["gold"]
        # derivations (`expr | scale`, `count: a | b`) are computed by the safe executor; other answers keep
        # numbers as written: models trained here answer in the gold's own text form (tatqa_data.render_answer)
        run = execute(pred)
        answer, scale = run.answer, run.scale
        score = scorer.add(gold, answer, scale)
        rows.append(
            {
                "pred_answer": answer,
                "pred_scale": scale,
                "derivation": run.derivation,
                "executed": run.executed,
                "exec_failed": run.failed,
                "em": score.em,
                "f1": score.f1,
                "scale_ok": score.scale_ok,
                "answer_type": gold.get("answer_type"),
                "answer_from": gold.get("answer_from"),
            }
        )
    summary = scorer.summary()
    breakdown = {
        kind: {
            src: {"count": c["count"], "exact_match": _pct(c["em"]), "f1": _pct(c["f1"])}
            for src, c in by_src.items()
        }
        for kind, by_src in summary["breakdown"].items()
    }
    metrics = {
        "exact_match": _pct(summary["em"]),
        "f1": _pct(summary["f1"]),
        "scale_accuracy": _pct(summary["scale"]),
        "breakdown": breakdown,
        # answers the executor computed from a derivation / derivation-shaped answers it could not compute
        "executor": {
            "executed": sum(r["executed"] for r in rows),
            "parse_failures": sum(r["exec_failed"] for r in rows),
        },
    }
    return rows, metrics


def score_samples(samples: list[dict], preds: list[str], fmt: str) -> tuple[list[dict], dict[str, Any]]:
    """Per-sample rows (id, prompt, gold, pred, em, f1, ...) and the metrics of the whole set (percent)."""
    if fmt == "tatqa":
        extra, metrics = _tatqa_rows(samples, preds)
    else:
        golds = [s["messages"][-1]["content"] for s in samples]
        extra = [
            {"em": exact_match(p, g), "f1": round(token_f1(p, g), 4)}
            for p, g in zip(preds, golds, strict=True)
        ]
        n = max(len(preds), 1)
        metrics = {
            "exact_match": _pct(sum(r["em"] for r in extra) / n),
            "f1": _pct(sum(r["f1"] for r in extra) / n),
        }
    rows = [
        {
            "id": s["id"],
            "prompt": prompt_text(s["messages"][:-1]),
            "gold": s["messages"][-1]["content"],
            "pred": p,
            **e,
        }
        for s, p, e in zip(samples, preds, extra, strict=True)
    ]
    return rows, {"n": len(samples), **metrics}


def official_predictions(rows: list[dict]) -> dict[str, tuple[Any, str]]:
    """TAT-QA `{uid: (answer, scale)}` from scored rows, for `tatqa_metric.write_official_predictions`."""
    return {r["id"]: (r["pred_answer"], r["pred_scale"]) for r in rows}


def resolve_model(spec: str) -> str:
    """'embedded', a run dir (its merged/), a saved model dir, or a hub id already in the local HF cache."""
    from hpml_ft.model import check_hub_model_available, resolve_model_path
    from hpml_ft.outputs import RUN_RECORD, require_complete_model

    p = Path(spec).expanduser()
    if spec != EMBEDDED_MODEL and p.is_dir():
        if (p / RUN_RECORD).exists() or (p / "adapter").is_dir():
            if not (p / "merged").is_dir():
                fail(
                    f"run {p} has no merged/ model; write one: "
                    f"python -m hpml_ft.merge --adapter {p}/adapter --out {p}/merged"
                )
            p = p / "merged"
        return str(require_complete_model(p).resolve())
    path = resolve_model_path(spec)  # fails with one line on a missing local path
    if spec != EMBEDDED_MODEL:
        check_hub_model_available(path)
    return path


def load_model(path: str, mcfg: ModelConfig | None = None, dtype: str | None = None) -> PreTrainedModel:
    """A causal LM for generation, dtype and attention picked by model.py (bf16 on GPUs, fp32 on CPU)."""
    from hpml_ft.model import load_causal_lm

    mcfg = mcfg or ModelConfig()
    mcfg = ModelConfig(
        dtype=dtype or mcfg.dtype,
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
    )
    return load_causal_lm(path, mcfg)


def generate_all(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> tuple[list[str], dict[str, float]]:
    """`generation.generate` batch by batch under a tqdm progress bar; speed summed over batches."""
    from tqdm.auto import tqdm

    from hpml_ft.generation import generate

    texts: list[str] = []
    tokens = seconds = 0.0
    with tqdm(total=len(prompts), desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            out, speed = generate(model, tok, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
            texts.extend(out)
            tokens, seconds = tokens + speed["new_tokens"], seconds + speed["seconds"]
            bar.update(len(chunk))
    return texts, {
        "new_tokens": int(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }


# ---------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value).replace("|", "/")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _judge_cells(m: dict) -> list[Any]:
    j = m.get("judge")
    return [j["mean"], f"{j['unparsed']}/{j['n']}"] if j else []


def comparison_table(results: list[dict], fmt: str) -> str:
    """One row per model: EM/F1 (+ scale accuracy for TAT-QA, + judge mean when judged) and speed."""
    judged = any(r["metrics"].get("judge") for r in results)
    header = ["model", "n", "EM", "F1"] + (["scale acc", "executed", "exec failed"] if fmt == "tatqa" else [])
    header += (["judge mean (1-5)", "judge unparsed"] if judged else []) + ["tokens/s"]
    rows = []
    for r in results:
        m = r["metrics"]
        row = [r["name"], m["n"], m["exact_match"], m["f1"]]
        ex = m.get("executor", {})
        row += [m["scale_accuracy"], ex.get("executed"), ex.get("parse_failures")] if fmt == "tatqa" else []
        if judged:
            row += _judge_cells(m) or ["-", "-"]
        row.append(r["speed"]["tokens_per_s"])
        rows.append(row)
    return md_table(header, rows)


def breakdown_table(breakdown: dict[str, dict[str, dict]]) -> str:
    """TAT-QA answer_type x answer_from: `EM / F1 (n)` per cell."""
    sources = sorted({src for by_src in breakdown.values() for src in by_src})
    rows = [
        [kind]
        + [
            f"{c['exact_match']:.2f} / {c['f1']:.2f} ({c['count']})" if c["count"] else "-"
            for c in (by_src.get(src, {"count": 0}) for src in sources)
        ]
        for kind, by_src in breakdown.items()
    ]
    return md_table(["answer_type \\ answer_from", *sources], rows)


def results_markdown(results: list[dict], fmt: str, data: str) -> str:
    """The whole report: comparison table, then the TAT-QA breakdown and judge distribution per model."""
    parts = [
        f"# Evaluation on `{data}` ({fmt}, {results[0]['metrics']['n'] if results else 0} samples)",
        "",
        comparison_table(results, fmt),
        "",
    ]
    for r in results:
        m = r["metrics"]
        if fmt == "tatqa" and m.get("breakdown"):
            parts += [
                f"## {r['name']}: EM / F1 by answer type and source",
                "",
                breakdown_table(m["breakdown"]),
                "",
            ]
        if m.get("judge"):
            dist = m["judge"]["distribution"]
            parts += [
                f"## {r['name']}: judge scores",
                "",
                md_table([*dist, "unparsed"], [[*dist.values(), m["judge"]["unparsed"]]]),
                "",
            ]
    return "\n".join(parts)
