"""The tokenizer of a Meta-format Llama checkpoint (its tokenizer.model) as a Hugging Face tokenizer, offline.

- Llama 3: tokenizer.model is a tiktoken BPE file, one `<base64 bytes> <rank>` line per token. transformers'
  `TikTokenConverter` derives the merges from the ranks (its own reader needs the tiktoken package, so the file
  is read here instead: the format is those lines). The special tokens follow the ranks, named as Meta's
  tokenizer names them (the Llama 3.1 names when the checkpoint uses scaled RoPE, else 3.0's); BOS is added
  by the post-processor, EOS is `<|eot_id|>` (the end of a chat turn), and the chat template is Llama 3's.
- Llama 2: tokenizer.model is a sentencepiece ModelProto, parsed with the schema bundled in transformers (no
  sentencepiece package); merges come from the piece scores as for a GGUF file, Llama 2's chat template.
- Otherwise: the tokenizer files of a Hugging Face dir beside it (the checkpoint dir or its parent, as in hub
  repos that keep Meta's files under original/), copied as they are.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Llama 3's pre-tokenizer regex (Meta's llama-models tokenizer.py, `pat_str`)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_CHAT = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
    "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
    "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
_LLAMA30 = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
_LLAMA30 += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
_LLAMA31 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
]
_LLAMA31 += ["<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>"]
_LLAMA31 += ["<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_tiktoken(path: Path) -> dict[bytes, int] | None:
    """The ranks of a tiktoken BPE file, or None when the file is not one (a sentencepiece model)."""
    ranks = {}
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        return None
    return ranks or None


def llama3_specials(count: int, scaled_rope: bool) -> list[str]:
    """Names of the `count` special tokens after the ranks, as Meta's tokenizer (3.1+ or 3.0) names them."""
    named, first = (_LLAMA31, 3) if scaled_rope else (_LLAMA30, 5)
    reserved = [f"<|reserved_special_token_{first + i}|>" for i in range(max(0, count - len(named)))]
    return (named + reserved)[:count]


def tiktoken_tokenizer(ranks: dict[bytes, int], n_vocab: int, scaled_rope: bool) -> PreTrainedTokenizerBase:
    """Llama 3's tokenizer from its ranks; the ids past the ranks (up to the embedding rows) are its specials."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama3_specials(n_vocab - len(ranks), scaled_rope)
    if len(specials) < 2:
        fail(
            f"the embedding has {n_vocab} rows for {len(ranks)} BPE ranks: no room for Llama 3's special tokens"
        )

    class Ranks(TikTokenConverter):
        def load_tiktoken_bpe(self, _url: str) -> dict[bytes, int]:
            return ranks  # read above: transformers' own reader needs the tiktoken package

    backend = Ranks(vocab_file="", pattern=LLAMA3_SPLIT, extra_special_tokens=specials).converted()
    bos = specials[0]
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, len(ranks))]
            ),
        ]
    )
    eos = "<|eot_id|>" if "<|eot_id|>" in specials else specials[1]
    pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in specials else None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=LLAMA3_CHAT,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=True,
    )


def sentencepiece_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """Llama 2's sentencepiece BPE model as transformers' LlamaTokenizer, or None when `path` is not one."""
    from google.protobuf.message import DecodeError
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return None
    if not proto.pieces or proto.trainer_spec.model_type != 2:  # 2: BPE (Llama 2); unigram models differ
        return None
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    spec = proto.trainer_spec
    names = [proto.pieces[i].piece for i in (spec.unk_id, spec.bos_id, spec.eos_id)]
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=names[0],
        bos_token=names[1],
        eos_token=names[2],
        add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
        add_bos_token=True,  # as Llama 2's sentencepiece encoder is run (bos=True)
        chat_template=LLAMA2_CHAT,
    )


def tokenizer_kind(src: Path) -> str:
    """'tiktoken' (Llama 3), 'sentencepiece' (Llama 2) or 'hf' (tokenizer files beside it); else one error line."""
    model = src / "tokenizer.model"
    if model.is_file() and read_tiktoken(model) is not None:
        return "tiktoken"
    if model.is_file() and sentencepiece_tokenizer(model) is not None:
        return "sentencepiece"
    if _hf_tokenizer_dir(src) is None:
        fail(
            f"{src} has no tokenizer hpml_ft can read offline (a tiktoken or sentencepiece tokenizer.model); "
            f"put a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) in {src} or {src.parent}"
        )
    return "hf"


def _hf_tokenizer_dir(src: Path) -> Path | None:
    return next((d for d in (src, src.parent) if (d / "tokenizer.json").is_file()), None)


def save_tokenizer(src: Path, kind: str, n_vocab: int, scaled_rope: bool, out: Path) -> dict[str, Any]:
    """Write the checkpoint's tokenizer into the HF dir `out`; returns its special token ids for config.json and
    `stop_ids`, every end-of-text / end-of-turn id, for generation_config.json."""
    if kind == "tiktoken":
        tok = tiktoken_tokenizer(read_tiktoken(src / "tokenizer.model") or {}, n_vocab, scaled_rope)
        tok.save_pretrained(out)
    elif kind == "sentencepiece":
        tok = sentencepiece_tokenizer(src / "tokenizer.model")
        tok.save_pretrained(out)
    else:  # 'hf'
        from transformers import AutoTokenizer

        where = _hf_tokenizer_dir(src) or src
        for name in HF_TOKENIZER_FILES:
            if (where / name).is_file():
                shutil.copy2(where / name, out / name)
        tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)  # plain files copied: no code
    vocab = tok.get_vocab()
    stops = [vocab[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in vocab]
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {**ids, "stop_ids": stops or [tok.eos_token_id]}
