"""Voting over executed derivations: the majority executed answer wins, ties go to greedy, and `eval --samples`
keeps every sample with its row."""

from __future__ import annotations

import json
from pathlib import Path

from hpml_ft.eval.voting import answer_key, vote

FIXTURE = Path(__file__).parent / "fixtures" / "eval_tatqa.json"


def test_outputs_that_compute_the_same_answer_vote_together():
    # two different derivations of 25% and one of 50%: the majority is the computed value, not the text
    samples = ["(150 - 120) / 120 | percent", "150 / 120 - 1 | percent", "(150 - 100) / 100 | percent"]
    chosen, info = vote("(150 - 100) / 100 | percent", samples, "tatqa")
    assert answer_key(chosen, "tatqa") == answer_key(samples[0], "tatqa")
    assert info == {"votes": 3, "winner_votes": 2, "distinct": 2, "greedy": False, "for_greedy": 1}


def test_ties_go_to_the_greedy_answer_and_malformed_outputs_do_not_vote():
    # derivations that do not parse or compute cast no vote (not even for one another)
    samples = ["10 + 5 | million", "20 - 5 | thousand", "(3 + 4 | thousand", "1 / 0", "1 / 0"]
    chosen, info = vote("20 - 5 | thousand", samples, "tatqa")  # 1 vs 1: greedy's answer wins the tie
    assert chosen == "20 - 5 | thousand" and info["greedy"] and info["votes"] == 2
    chosen, info = vote("3 + 4", ["(1 + 2 | percent"], "tatqa")  # no vote cast: the greedy output stands
    assert chosen == "3 + 4" and info["votes"] == 0
    # without greedy among the tied, the tied answer sampled first wins
    chosen, _ = vote("999", ["1 + 1", "3", "2"], "tatqa")
    assert answer_key(chosen, "tatqa") == answer_key("2", "tatqa")


def test_scale_is_part_of_the_answer_and_plain_text_is_normalised():
    assert answer_key("5 | million", "tatqa") != answer_key("5 | thousand", "tatqa")
    assert answer_key("1,200", "tatqa") == answer_key("1200.0", "tatqa")
    chosen, info = vote("Paris", ["paris.", "Lyon", "PARIS"], "alpaca")
    assert answer_key(chosen, "alpaca") == answer_key("Paris", "alpaca") and info["winner_votes"] == 2


def test_sample_summary_against_a_hand_count():
    from hpml_ft.eval.voting import sample_summary

    # 4 questions, 2 samples each: 3 of 8 samples right, 2 questions with a right sample, 3 with greedy or a
    # sample right, 3 of 8 samples computing the greedy answer
    got = sample_summary([1, 0, 0, 0], [[0, 0], [1, 0], [0, 0], [1, 1]], [0, 1, 2, 0])
    assert got == {"sample_em": 37.5, "pass_at_k": 50.0, "ceiling": 75.0, "agree_greedy": 37.5}


def test_vote_rows_report_what_their_samples_held():
    """Per K, the vote row's metrics count only its first K samples: the second sample is the only right one, so
    pass@1 is 0 and pass@2 is 2 of 3 questions; greedy (right on question 3 only) lifts the ceiling."""
    from hpml_ft.eval.answers import Voting, voted_results
    from hpml_ft.eval.tasks import Task
    from hpml_ft.runs import ModelSpec

    golds = ["paris", "rome", "oslo"]
    items = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": g}]}
        for i, g in enumerate(golds)
    ]
    greedy = ["lyon", "milan", "oslo"]
    sampled = [["lyon", "paris", "nice"], ["turin", "rome", "rome"], ["bergen", "bergen", "oslo"]]
    spec = ModelSpec("m", "dir")
    answers = {("dir", None): (greedy, {"tokens_per_s": 1.0}, sampled)}
    rows = voted_results(spec, Task("qa", "alpaca", "x", items), answers, Voting((1, 2, 3), 0.7))
    held = {r["name"]: r["metrics"]["voting"] for r in rows}
    assert [held[f"m@vote{k}"]["pass_at_k"] for k in (1, 2, 3)] == [0.0, 66.67, 100.0]
    assert held["m@vote1"]["ceiling"] == 33.33 and held["m@vote2"]["ceiling"] == 100.0
    assert held["m@vote1"]["agree_greedy"] == 33.33  # lyon = lyon; rome's samples never match milan
    assert held["m@vote3"]["sample_em"] == round(100 * 4 / 9, 2)
    # the votes themselves: K=1 outvotes greedy's right oslo; only K=3 finds rome (2 of 3)
    assert [r["metrics"]["exact_match"] for r in rows] == [0.0, 0.0, 33.33]


def test_eval_samples_keeps_every_sample_and_votes(tiny_model_dir, tmp_path, monkeypatch):
    """`--samples 2,3`: samples drawn once; a greedy row, then MODEL@vote2 over the first 2 and MODEL@vote3 over
    all 3, each row keeping its samples; the vote rows are compared with the greedy one (paired)."""
    from hpml_ft.eval.cli import main
    from hpml_ft.eval.voting import vote

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    argv = ["--models", str(tiny_model_dir), "--data", str(FIXTURE), "--limit", "3", "--max-new-tokens", "4"]
    assert main([*argv, "--samples", "3,2", "--temperature", "1.0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    label = res["models"][0]["name"]  # the model as named in outputs
    assert [m["name"] for m in res["models"]] == [label, f"{label}@vote2", f"{label}@vote3"]
    greedy = [json.loads(x)["pred"] for x in (out / res["models"][0]["predictions"]).read_text().splitlines()]
    assert "voting" not in res["models"][0]["metrics"]
    by_k = {}
    for k, model in zip((2, 3), res["models"][1:], strict=True):
        assert model["metrics"]["voting"]["samples"] == k
        rows = [json.loads(line) for line in (out / model["predictions"]).read_text().splitlines()]
        by_k[k] = rows
        for row, g in zip(rows, greedy, strict=True):
            v = row["vote"]
            assert len(v["samples"]) == k and v["greedy_output"] == g
            assert row["pred"] == vote(g, v["samples"], "tatqa")[0]
    assert all(
        a["vote"]["samples"] == b["vote"]["samples"][:2] for a, b in zip(by_k[2], by_k[3], strict=True)
    )
    md = (out / "results.md").read_text()
    assert "@vote3" in md and "## Voting: what the samples held" in md


def test_samples_read_the_prompt_once_and_match_generate():
    """The shared-prefix path (prompt KV cache computed once, copied to K rows) must answer as plain generate:
    greedy rows equal `generate`'s greedy answer, and sampled rows come from the same prompt (they differ)."""
    import torch
    from conftest import build_tiny_model, build_tiny_tokenizer

    from hpml_ft.generation import generate, sample_shared_prefix

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=3)
    prompt = [{"role": "user", "content": "What was the revenue in 2019 and in 2018? " * 3}]
    greedy, _ = generate(model, tok, [prompt], max_new_tokens=10)
    rows, speed = sample_shared_prefix(model, tok, prompt, 3, max_new_tokens=10)
    assert rows == greedy * 3 and speed["new_tokens"] > 0
    torch.manual_seed(0)
    sampled, _ = sample_shared_prefix(
        model, tok, prompt, 4, max_new_tokens=10, do_sample=True, temperature=1.0
    )
    assert len(sampled) == 4 and len(set(sampled)) > 1
