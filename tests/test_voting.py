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
    assert info == {"votes": 3, "winner_votes": 2, "distinct": 2, "greedy": False}


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


def test_eval_samples_keeps_every_sample_and_votes(tiny_model_dir, tmp_path, monkeypatch):
    from hpml_ft.eval.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    argv = ["--models", str(tiny_model_dir), "--data", str(FIXTURE), "--limit", "3", "--max-new-tokens", "4"]
    assert main([*argv, "--samples", "3", "--temperature", "1.0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / res["models"][0]["predictions"]).read_text().splitlines()]
    assert len(rows) == 3 and res["models"][0]["metrics"]["voting"] == {"samples": 3}
    for row in rows:
        v = row["vote"]
        assert len(v["samples"]) == 3 and "greedy_output" in v
        assert row["pred"] == v["greedy_output"] or row["pred"] in v["samples"]
