"""Assistant-only loss, end to end through the toolkit's data path and TRL's collator, on real chat templates.

The expectation is built independently of data.py's character spans: the batch's input ids must be the plain
tokenization of the template's rendering, and the labelled positions (label != -100) must form one run per
assistant turn that decodes to exactly that turn's content + the end-of-turn token; every other label is -100.
"""

from __future__ import annotations

import pytest
from conftest import build_tiny_tokenizer

# Meta-Llama-3-8B-Instruct's chat template, verbatim (tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Sort: pear, fig"}, {"role": "assistant", "content": "fig, pear"}],
    [
        {"role": "system", "content": "Answer with a number only."},
        {"role": "user", "content": "Which is larger? 12 or 40"},
        {"role": "assistant", "content": "40"},
        {"role": "user", "content": "And 7 or 3?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 5 or 9?"},
        {"role": "assistant", "content": "The larger one is 9."},
    ],
]


def _batch_labels(tok, convs, tmp_path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation as the trainer feeds them: data.py dataset -> SFTTrainer collator."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpml_ft.config import load_config
    from hpml_ft.data import Splits, build_train_eval
    from hpml_ft.train.runner import build_trainer

    cfg = load_config(None, ["train.max_steps=1", "train.max_length=512", f"train.output_dir={tmp_path}"])
    samples = [{"id": str(i), "group": str(i), "messages": c, "meta": {}} for i, c in enumerate(convs)]
    train_ds, _ = build_train_eval(cfg, tok, Splits(train=samples, eval=[], format="chat"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            pad_token_id=tok.pad_token_id,
        )
    )
    trainer = build_trainer(cfg, model, tok, train_ds, None, accum=1)
    out = []
    for row in trainer.train_dataset:
        batch = trainer.data_collator([row])
        ids = batch["input_ids"][0].tolist()
        out.append((ids, batch["labels"][0].tolist()))
    return out


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of positions whose label is not -100."""
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check(tok, convs, tmp_path, eot: str, trim: bool = False) -> None:
    for conv, (ids, labels) in zip(convs, _batch_labels(tok, convs, tmp_path), strict=True):
        rendered = tok.apply_chat_template(conv, tokenize=False)
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"]  # the template's text, unchanged
        runs = _runs(labels)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for (s, e), answer in zip(runs, answers, strict=True):
            assert labels[s:e] == ids[s:e]
            assert tok.decode(ids[s:e]) == (answer.strip() if trim else answer) + eot
        assert ids[runs[-1][1] - 1] == tok.convert_tokens_to_ids(eot)
        unlabelled = [t for t, label in zip(ids, labels, strict=True) if label == -100]
        assert tok.decode(unlabelled).count(eot) == rendered.count(eot) - len(answers)  # system/user turns


def test_smollm2_embedded_template_masks_all_but_answers(tmp_path):
    pytest.importorskip("gguf")
    from hpml_ft.model import embedded_model_dir, load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir()))  # converts once if not cached yet (~25 s), then ~1 s
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    _check(tok, CONVERSATIONS, tmp_path, "<|im_end|>")


def test_llama3_template_masks_all_but_answers(tmp_path):
    tok = build_tiny_tokenizer()
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.chat_template = "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE
    convs = [
        *CONVERSATIONS,
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": " hi \n"}],
    ]
    _check(tok, convs, tmp_path, "<|eot_id|>", trim=True)
