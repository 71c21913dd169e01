"""Uncertainty of evaluation scores: a bootstrap interval per model and a paired comparison of each model
against the first (the same questions answered by both).

Questions are the unit that is resampled: an eval set is a sample of the questions a model will meet, and two
models answering the same questions are compared question by question (paired), which is much tighter than
comparing two independent intervals. McNemar's exact test on the questions where exactly one of the two
models is right gives a p-value for the EM difference that needs no resampling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

BOOTSTRAP_SAMPLES = 2000  # resamples: the interval ends move by ~0.1 point at n = 300 between seeds
LEVEL = 0.95
SEED = 0  # fixed: the same predictions give the same interval


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _index_draws(n: int, samples: int, seed: int) -> Iterator[Any]:
    """Bootstrap row indices, 200 resamples at a time (bounded memory on large eval sets): arrays (<=200, n)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for start in range(0, samples, 200):
        yield rng.integers(0, n, size=(min(200, samples - start), n))


def _resampled_means(columns: Sequence[Sequence[float]], samples: int, seed: int) -> list[float]:
    """Means of `sum(columns)` over `samples` bootstrap resamples of the rows (one index draw per resample, so
    paired columns stay paired), sorted."""
    import numpy as np

    totals = np.sum(np.asarray(columns, dtype=np.float64), axis=0)
    means = [totals[idx].mean(axis=1) for idx in _index_draws(len(totals), samples, seed)]
    return sorted(np.concatenate(means).tolist())


def bootstrap_interval(
    values: Sequence[float], level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-question scores)."""
    if not values:
        return (math.nan, math.nan)
    means = _resampled_means([values], samples, seed)
    tail = (1 - level) / 2
    return (_percentile(means, tail), _percentile(means, 1 - tail))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    level: float = LEVEL,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
) -> dict[str, float]:
    """mean(b) - mean(a) over the same questions, with its paired bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} vs {len(b)}")
    if not a:
        return {"diff": math.nan, "low": math.nan, "high": math.nan}
    means = _resampled_means([[-x for x in a], b], samples, seed)
    tail = (1 - level) / 2
    diff = (sum(b) - sum(a)) / len(a)
    return {"diff": diff, "low": _percentile(means, tail), "high": _percentile(means, 1 - tail)}


def recovery_interval(
    full: Sequence[float],
    ptq: Sequence[float],
    qat: Sequence[float],
    level: float = LEVEL,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
) -> dict[str, float] | None:
    """Recovery (QAT - PTQ) / (full - PTQ) of per-question scores on the same questions, with a paired
    percentile bootstrap interval (resamples whose full == PTQ have no ratio and are skipped). None when the
    whole set has full == PTQ."""
    import numpy as np

    f, p, q = (np.asarray(x, dtype=np.float64) for x in (full, ptq, qat))
    if not (len(f) == len(p) == len(q)) or f.mean() == p.mean():
        return None
    ratios = []
    for idx in _index_draws(len(f), samples, seed):
        den = f[idx].mean(axis=1) - p[idx].mean(axis=1)
        ok = den != 0
        ratios.append((q[idx].mean(axis=1)[ok] - p[idx].mean(axis=1)[ok]) / den[ok])
    r = sorted(np.concatenate(ratios).tolist())
    tail = (1 - level) / 2
    value = (q.mean() - p.mean()) / (f.mean() - p.mean())
    return {"recovery": float(value), "low": _percentile(r, tail), "high": _percentile(r, 1 - tail)}


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar test: of the questions exactly one model got right, is the split 50/50?"""
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def half_width(p: float, n: int, z: float = 1.96) -> float:
    """Normal-approximation half-width of a 95% interval of an accuracy p on n questions (planning only)."""
    return z * math.sqrt(p * (1 - p) / n) if n else math.inf


def _scores(rows: list[dict]) -> tuple[list[float], list[float]]:
    return [float(r["em"]) for r in rows], [float(r["f1"]) for r in rows]


def _pct(x: float) -> float:
    return round(100 * x, 2)


def add_intervals(results: list[dict]) -> None:
    """Into each result's metrics: `exact_match_ci` / `f1_ci` (percent), and for every model after the first,
    `vs_first`: the paired EM/F1 difference against the first model with its interval and McNemar's p."""
    first = None
    for r in results:
        em, f1 = _scores(r["rows"])
        m = r["metrics"]
        m["exact_match_ci"] = [_pct(x) for x in bootstrap_interval(em)]
        m["f1_ci"] = [_pct(x) for x in bootstrap_interval(f1)]
        if first is None:
            first = (r["name"], em, f1)
            continue
        name, em0, f10 = first
        d_em, d_f1 = paired_difference(em0, em), paired_difference(f10, f1)
        m["vs_first"] = {
            "model": name,
            "em_diff": _pct(d_em["diff"]),
            "em_ci": [_pct(d_em["low"]), _pct(d_em["high"])],
            "f1_diff": _pct(d_f1["diff"]),
            "f1_ci": [_pct(d_f1["low"]), _pct(d_f1["high"])],
            # 3 significant digits, not 4 decimals: a clear difference keeps its p (1.2e-07), not 0
            "mcnemar_p": float(f"{mcnemar_p([x >= 1 for x in em0], [x >= 1 for x in em]):.3g}"),
        }


def interval_text(m: dict[str, Any]) -> str:
    """`+X EM, 95% CI [a, b] (McNemar p = ...)` for a model with a `vs_first` entry, else ''."""
    v = m.get("vs_first")
    if not v:
        return ""
    p = "p < 0.001" if v["mcnemar_p"] < 0.001 else f"p = {v['mcnemar_p']:.3g}"
    return f"{v['em_diff']:+.2f} EM, 95% CI [{v['em_ci'][0]:+.2f}, {v['em_ci'][1]:+.2f}] (McNemar {p})"
