"""The tokenizer of a model as GGUF metadata: llama.cpp's `gpt2` (byte-level BPE) vocabulary.

What llama.cpp's convert_hf_to_gguf.py writes for a BPE model (`_set_vocab_gpt2`): every id up to the model's
vocab size (ids the tokenizer lacks as `[PAD<id>]`, UNUSED), a token type per id (special added tokens and
`<|...|>` ones CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges, the special token ids,
whether BOS/EOS are added, the chat template, and `tokenizer.ggml.pre`: the name of the pre-tokenizer (the regex
that splits text before BPE) llama.cpp must use. llama.cpp picks that name by hashing token ids of a test
string, which only works for published tokenizers; here it is read from the tokenizer's own pre-tokenizer
(`pre_tokenizer_name`), which also covers a tokenizer trained here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail
from hpml_ft.meta_tokenizer import LLAMA3_SPLIT

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase

SPECIAL_IDS = ("bos", "eos", "unk", "pad")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: 'gpt-2' (GPT-2's regex), 'smollm' (single digits,
    then GPT-2's regex), 'llama-bpe' (Llama 3's regex); else 'default', with a note."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    print(
        f"[hpml_ft] note: pre-tokenizer {kinds} has no llama.cpp name here; writing 'default' (llama.cpp may split "
        "text differently from transformers; check a few prompts with llama-cli)",
        file=sys.stderr,
    )
    return "default"


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    # tokenizers >= 0.20 stores pairs; GGUF wants "a b" (a space inside a part is written as U+0120, as gguf-py does)
    return [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]


def _token_types(tok: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _adds(tok: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether plain encoding adds BOS / EOS (the tokenizer's post-processor decides; read off its output)."""
    ids = tok("a")["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(ids) > len(bare) and ids[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(ids) > len(bare) and ids[-1] == tok.eos_token_id
    return add_bos, add_eos


def read_vocab(tok: PreTrainedTokenizerBase, vocab_size: int, src: str) -> Vocab:
    """The GGUF vocabulary of `tok` for a model with `vocab_size` embedding rows."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        fail(
            f"the tokenizer of {src} is not a byte-level BPE tokenizer (model {model.get('type')}, decoder "
            f"{decoder.get('type')}); GGUF export covers Llama 3 / SmolLM / GPT-2 style tokenizers, not "
            "sentencepiece ones (Llama 2): convert those with llama.cpp's convert_hf_to_gguf.py"
        )
    if max(tok.get_vocab().values()) >= vocab_size:
        fail(f"the tokenizer of {src} has ids beyond the model's vocab_size={vocab_size}; they do not match")
    tokens, types = _token_types(tok, vocab_size)
    special = {k: i for k in SPECIAL_IDS if (i := getattr(tok, f"{k}_token_id", None)) is not None}
    add_bos, add_eos = _adds(tok)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return Vocab(tokens, types, _merges(model), pre_tokenizer_name(spec), special, add_bos, add_eos, template)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
