"""Load Alpaca / chat / TAT-QA / demo data as chat samples, split without leaks, tokenize with answer-only labels.

A sample is `{"id", "group", "messages", "meta"}`; its last message is the assistant's gold answer. Evaluation and
inference use `messages[:-1]` as the prompt; training uses every assistant turn.

Over 300 lines: reading, validating, splitting and masking are one pipeline whose line-numbered error
messages share helpers; split it (data/ package) before adding a new format.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import Config, DataConfig
from hpml_ft.demo import generate_demo
from hpml_ft.errors import fail
from hpml_ft.tatqa.render import group_conversations, tatqa_samples

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Splits:
    train: list[dict]
    eval: list[dict]
    format: str


def read_records(path: str, split: str = "train") -> list[Any]:
    """A .json list / .jsonl file, or a hub dataset id (needs the hub or its local cache)."""
    return read_located(path, split)[0]


def read_text_file(p: Path, expected: str = "a JSON text file; pass a .json/.jsonl file") -> str:
    """A data file's text; binary or non-UTF-8 files are one clear error (file, line, byte)."""
    raw = p.read_bytes()
    if b"\x00" in raw[:8192]:
        fail(f"{p}: binary data, not {expected}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        fail(f"{p}: not UTF-8 text (line {line}, byte {err.start}); re-save the file as UTF-8")


def _read_file(p: Path) -> tuple[list[Any], list[str]]:
    """Records and where each one is ('line 7' in JSONL, 'record 3' in a JSON list)."""
    text = read_text_file(p)
    if p.suffix == ".jsonl":
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                fail(f"{p}: malformed JSON at line {n}, column {err.colno}: {err.msg}; fix the data file")
            where.append(f"line {n}")
        return records, where
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the data file")
    records = (
        data if isinstance(data, list) else data.get("data", [data]) if isinstance(data, dict) else [data]
    )
    if not isinstance(records, list):
        fail(f"{p}: 'data' must be a list of records, not {type(records).__name__}")
    return records, [f"record {i}" for i in range(len(records))]


def read_located(path: str, split: str = "train") -> tuple[list[Any], list[str]]:
    """`read_records` plus where each record is, for error messages."""
    p = Path(path)
    if p.is_file():
        return _read_file(p)
    if p.suffix in (".json", ".jsonl") or path.startswith((".", "/", "~")) or path.count("/") != 1:
        fail(f"data file not found: {path} (pass an existing .json/.jsonl path, a hub dataset id, or 'demo')")
    try:
        records = list(_load_hub_dataset(path, split))
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(
            f"could not load dataset '{path}' (split {split}): {first}; pass a local .json/.jsonl path instead"
        )
    return records, [f"row {i}" for i in range(len(records))]


def _load_hub_dataset(path: str, split: str) -> Any:
    """Hub id via datasets; offline, datasets reads only its own arrow cache, so also a downloaded snapshot
    (`hf download --repo-type dataset ID`) in the HF hub cache."""
    from datasets import load_dataset

    try:
        return load_dataset(path, split=split)
    except ConnectionError as offline:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            local = snapshot_download(path, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise offline from None
        return load_dataset(local, split=split)


def check_field(value: Any, types: type | tuple[type, ...], where: str, field: str, expected: str) -> Any:
    """Refuse a field of the wrong type with one line naming the place, the field and the expected type."""
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        fail(f"{where}: '{field}' must be {expected}, got {shown}; fix the record")
    return value


def detect_format(records: list[Any], path: str) -> str:
    first = records[0]
    if isinstance(first, dict):
        if {"table", "questions"} <= first.keys():
            return "tatqa"
        if "messages" in first:
            return "chat"
        if {"instruction", "output"} <= first.keys():
            return "alpaca"
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    fail(
        f"{path}: cannot tell the data format from the first record (keys {keys}); expected Alpaca "
        "(instruction/input/output), chat (messages) or TAT-QA (table/paragraphs/questions)"
    )


def _alpaca_samples(records: list[dict], where: list[str], system: str | None) -> list[dict]:
    samples = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            fail(f"{where[i]} lacks 'instruction'/'output' columns needed by the alpaca format")
        instruction = check_field(r["instruction"], str, where[i], "instruction", "a string")
        extra = check_field(r.get("input"), (str, type(None)), where[i], "input", "a string or null")
        output = check_field(r["output"], (str, int, float), where[i], "output", "a string (or a number)")
        user = instruction + (f"\n\n{extra}" if extra else "")
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(output)},
        ]
        samples.append({"id": str(i), "group": str(i), "messages": msgs, "meta": {"question": user}})
    return samples


ROLES = ("system", "user", "assistant")


def _check_messages(r: Any, where: str) -> list[dict]:
    msgs = r.get("messages") if isinstance(r, dict) else None
    if not msgs or not isinstance(msgs, list):
        fail(f"{where}: needs 'messages': a non-empty list of {{role, content}} dicts")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            fail(f"{where}: messages[{j}] must be a {{role, content}} dict, got {str(m)[:60]!r}")
        if m["role"] not in ROLES:
            fail(f"{where}: messages[{j}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        check_field(m["content"], str, where, f"messages[{j}].content", "a string")
    return msgs


def _chat_samples(records: list[dict], where: list[str], system: str | None) -> list[dict]:
    samples = []
    for i, r in enumerate(records):
        msgs = _check_messages(r, where[i])
        if msgs[-1]["role"] != "assistant":
            fail(f"{where[i]}: must end with an assistant message (the answer to learn)")
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}, *msgs]
        question = next((m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user"), "")
        samples.append(
            {"id": str(r.get("id", i)), "group": str(i), "messages": msgs, "meta": {"question": question}}
        )
    return samples


def load_samples(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    system: str | None = None,
    demo_size: int = 800,
    seed: int = 0,
    tatqa: tuple[str, str] = ("answer", "pipe"),
) -> tuple[list[dict], str]:
    """Read one source into samples; returns (samples, format)."""
    if path == "demo":
        records, fmt = generate_demo(demo_size, seed), "alpaca"
        where = [f"demo record {i}" for i in range(len(records))]
    else:
        records, where = read_located(path, split)
        where = [f"{path}: {w}" for w in where]
    if not records:
        fail(f"{path}: the dataset is empty; point data.path at a file with records")
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    builders = {"alpaca": _alpaca_samples, "chat": _chat_samples}
    if fmt == "tatqa":
        samples = tatqa_samples(records, path, system, where, target=tatqa[0], table=tatqa[1])
    else:
        samples = builders[fmt](records, where, system)
    if not samples:
        fail(f"{path}: no usable samples (a TAT-QA file with no questions?)")
    return samples, fmt


def split_by_group(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole groups (TAT-QA: whole contexts) so no context appears in both splits."""
    groups = sorted({s["group"] for s in samples})
    random.Random(seed).shuffle(groups)
    n_eval = math.ceil(len(groups) * fraction) if fraction > 0 else 0
    if fraction > 0 and n_eval >= len(groups):
        fail(f"data.eval_fraction={fraction} leaves no training data ({len(groups)} groups); lower it")
    held = set(groups[:n_eval])
    return [s for s in samples if s["group"] not in held], [s for s in samples if s["group"] in held]


def load_splits(cfg: DataConfig) -> Splits:
    tatqa = (cfg.tatqa_target, cfg.tatqa_table)
    samples, fmt = load_samples(
        cfg.path, cfg.format, cfg.split, cfg.system_prompt, cfg.demo_size, cfg.seed, tatqa
    )
    if cfg.eval_path or cfg.eval_split:
        train = samples
        evals, _ = load_samples(
            cfg.eval_path or cfg.path, fmt, cfg.eval_split or cfg.split, cfg.system_prompt, tatqa=tatqa
        )
    else:
        train, evals = split_by_group(samples, cfg.eval_fraction, cfg.seed)
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
    return Splits(train=train, eval=evals, format=fmt)


def training_conversations(samples: list[dict], cfg: DataConfig, fmt: str) -> list[list[dict]]:
    if fmt == "tatqa" and cfg.tatqa_multi_turn:
        return group_conversations(samples)
    return [s["messages"] for s in samples]


def tokenize_conversation(tok: PreTrainedTokenizerBase, messages: list[dict]) -> dict[str, list[int]]:
    """input_ids + assistant_masks for any prefix-preserving chat template.

    TRL builds assistant masks from `{% generation %}` markers, which only a fixed list of templates get patched
    with (SmolLM2's is not among them). Rendering each assistant turn's prefix and marking the characters the turn
    adds works for any template that renders a conversation as the concatenation of its turns.
    """
    eos = tok.eos_token or ""
    base = tok.apply_chat_template(messages, tokenize=False)
    pieces, spans, cursor = [], [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (base.startswith(upto) and upto.startswith(prefix)):
            fail(
                "the chat template is not prefix-preserving, so answer tokens cannot be located; use another model"
            )
        answer, tail = upto[len(prefix) :], ""
        if eos and eos in answer:  # text after the end-of-turn token (ChatML's "\n") is template, not answer
            cut = answer.rindex(eos) + len(eos)
            answer, tail = answer[:cut], answer[cut:]
        elif eos:  # every answer must end with EOS or generation never stops
            answer += eos
        pieces.append(base[cursor : len(prefix)])
        start = sum(map(len, pieces))
        pieces += [answer, tail]
        spans.append((start, start + len(answer)))
        cursor = len(upto)
    pieces.append(base[cursor:])
    full = "".join(pieces)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def build_dataset(
    convs: list[list[dict]], tok: PreTrainedTokenizerBase, max_length: int, name: str
) -> Dataset:
    """Tokenized dataset for SFTTrainer (it builds labels from `assistant_masks` and truncates to max_length)."""
    from datasets import Dataset

    rows = [tokenize_conversation(tok, c) for c in convs]
    first_answer = [
        r["assistant_masks"].index(1) if 1 in r["assistant_masks"] else len(r["input_ids"]) for r in rows
    ]
    if rows and all(pos >= max_length for pos in first_answer):
        fail(
            f"train.max_length={max_length} is shorter than every {name} prompt (shortest answer starts at token "
            f"{min(first_answer)}), so every answer would be cut off; raise train.max_length"
        )
    # TRL drops these itself only when it truncates (not under packing): drop them here, for every layout
    kept = [r for r, pos in zip(rows, first_answer, strict=True) if pos < max_length]
    if len(kept) < len(rows):
        print(
            f"[hpml_ft] {len(rows) - len(kept)} of {len(rows)} {name} samples left out: their answer starts after "
            f"train.max_length={max_length} tokens (nothing to learn from); raise it to keep them",
            file=sys.stderr,
        )
    return Dataset.from_list(kept)


def token_stats(ds: Dataset, max_length: int) -> dict[str, float]:
    lengths = [min(len(x), max_length) for x in ds["input_ids"]]
    cut = sum(len(x) > max_length for x in ds["input_ids"])
    return {"samples": len(lengths), "mean_tokens": sum(lengths) / max(len(lengths), 1), "truncated": cut}


def check_answers(samples: list[dict], path: str) -> None:
    """Training data whose every answer is empty teaches only to stop: refuse it, naming the file."""
    answers = [m["content"] for s in samples for m in s["messages"] if m["role"] == "assistant"]
    if answers and not any(str(a or "").strip() for a in answers):
        fail(
            f"{path}: every answer in the training data is empty ({len(answers)} answers), so there is nothing "
            "to learn; fill in the output / assistant texts or point data.path at another file"
        )


def build_train_eval(
    cfg: Config, tok: PreTrainedTokenizerBase, splits: Splits
) -> tuple[Dataset, Dataset | None]:
    check_answers(splits.train, cfg.data.path)
    train = build_dataset(
        training_conversations(splits.train, cfg.data, splits.format), tok, cfg.train.max_length, "training"
    )
    evals = [s["messages"] for s in splits.eval]
    return train, (build_dataset(evals, tok, cfg.train.max_length, "eval") if evals else None)
