"""Data loaders on project-written fixtures of every format, leak-free splits, answer-only labels."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_tokenizer

from hpml_ft.config import DataConfig
from hpml_ft.data import build_dataset, load_samples, load_splits, split_by_group, tokenize_conversation
from hpml_ft.errors import UserError
from hpml_ft.tatqa.render import group_conversations, render_answer


def make_tatqa(n_contexts: int = 6, questions: int = 3) -> list[dict]:
    """Invented TAT-QA-shaped contexts (the real dev file is never needed by tests)."""
    out = []
    for c in range(n_contexts):
        qs = [
            {
                "uid": f"q{c}-{k}",
                "order": k + 1,
                "question": f"What was revenue in 20{10 + k}?",
                "answer": [f"{100 + c + k}"] if k % 2 == 0 else 12.345 + c,
                "derivation": "",
                "answer_type": "span" if k % 2 == 0 else "arithmetic",
                "answer_from": "table",
                "rel_paragraphs": [],
                "req_comparison": False,
                "scale": "million" if k % 2 == 0 else "percent",
            }
            for k in range(questions)
        ]
        out.append(
            {
                "table": {"uid": f"t{c}", "table": [["", "2019", "2018"], ["Revenue", f"{c}0", f"{c}1"]]},
                "paragraphs": [{"uid": f"p{c}", "order": 1, "text": f"Company {c} grew in 2019."}],
                "questions": qs,
            }
        )
    return out


@pytest.fixture()
def tatqa_file(tmp_path):
    p = tmp_path / "tatqa.json"
    p.write_text(json.dumps(make_tatqa()))
    return p


def test_alpaca_json_and_jsonl(tmp_path):
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "1+1", "output": "2"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "a.jsonl"):
        samples, fmt = load_samples(str(tmp_path / name))
        assert fmt == "alpaca" and len(samples) == 2
        assert samples[1]["messages"][0] == {"role": "user", "content": "Add\n\n1+1"}
        assert samples[1]["messages"][-1] == {"role": "assistant", "content": "2"}


def test_chat_format(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        }
    ]
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]))
    samples, fmt = load_samples(str(tmp_path / "c.jsonl"), system="be brief")
    assert fmt == "chat" and samples[0]["messages"][0]["content"] == "be brief"
    assert samples[0]["meta"]["question"] == "c"


def test_tatqa_answers_carry_scale(tatqa_file):
    samples, fmt = load_samples(str(tatqa_file))
    assert fmt == "tatqa" and len(samples) == 18
    assert samples[0]["messages"][-1]["content"] == "100 million"
    assert samples[1]["messages"][-1]["content"] == "12.35%"
    assert "| Revenue | 00 | 01 |" in samples[0]["messages"][1]["content"]
    assert render_answer(["a", "b"], "") == "a | b"
    assert render_answer(3.0, "thousand") == "3 thousand"


def test_tatqa_split_is_by_context(tatqa_file):
    splits = load_splits(DataConfig(path=str(tatqa_file), eval_fraction=0.34))
    train_groups = {s["group"] for s in splits.train}
    eval_groups = {s["group"] for s in splits.eval}
    assert eval_groups and train_groups and not train_groups & eval_groups
    assert len(splits.train) + len(splits.eval) == 18


def test_split_is_deterministic():
    samples = [{"group": str(i)} for i in range(50)]
    a = split_by_group(samples, 0.2, seed=1)
    assert a == split_by_group(samples, 0.2, seed=1)
    assert len(a[1]) == 10


def test_multi_turn_reads_the_table_once(tatqa_file):
    samples, _ = load_samples(str(tatqa_file))
    convs = group_conversations(samples)
    assert len(convs) == 6 and len(convs[0]) == 1 + 2 * 3
    assert sum("Table:" in m["content"] for m in convs[0]) == 1


def test_labels_cover_answers_and_eos_only():
    tok = build_tiny_tokenizer()
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Which is larger? 12 or 40"},
        {"role": "assistant", "content": "40"},
        {"role": "user", "content": "And 7 or 3?"},
        {"role": "assistant", "content": "7"},
    ]
    row = tokenize_conversation(tok, msgs)
    kept = tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])
    assert kept == "40<|im_end|>7<|im_end|>"  # the template's "\n" after each end-of-turn is not trained
    assert tok.eos_token_id in row["input_ids"]


def test_eos_added_when_template_omits_it():
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = tokenize_conversation(
        tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    kept = [t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m]
    assert kept[-1] == tok.eos_token_id


def test_max_length_shorter_than_every_prompt():
    tok = build_tiny_tokenizer()
    convs = [[{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(UserError, match="shorter than every training prompt"):
        build_dataset(convs, tok, max_length=16, name="training")
    assert len(build_dataset(convs, tok, max_length=512, name="training")) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "the dataset is empty"),
        ('[{"instruction": "x", "oops": 1}]', "cannot tell the data format"),
        ('{"a": [1, 2}', "malformed JSON at line 1"),
        (
            '[{"table": {"uid": "t", "table": []}, "paragraphs": [], "questions": [{"uid": "q"}]}]',
            "question lacks",
        ),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        load_samples(str(p))


def test_missing_columns_and_missing_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    with pytest.raises(UserError, match="record 1 lacks 'instruction'/'output'"):
        load_samples(str(p))
    with pytest.raises(UserError, match="data file not found"):
        load_samples(str(tmp_path / "missing.json"))


def test_demo_data_is_deterministic():
    a, _ = load_samples("demo", demo_size=50, seed=0)
    b, _ = load_samples("demo", demo_size=50, seed=0)
    assert a == b and len({s["messages"][0]["content"].split("\n")[0] for s in a}) == 7
