"""Meta-format Llama checkpoints in (hpml_ft.meta_ckpt, meta_tokenizer): a tiny random HF Llama is written the
way Meta ships one (the inverse of the conversion: interleaved RoPE rows, consolidated.NN.pth shards, params.json,
a tiktoken / sentencepiece tokenizer.model), resolved through hpml_ft's one resolver, and must give the original
model's logits. Tokenizers are checked against a tiktoken-style encoder written here and a hand-built
sentencepiece model."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer

CORPUS = [
    "The revenue in 2019 was 1,234 million, up 12% from 2018's total.",
    "I'm sure they'll say we've done it; it's what THEY'd do!",
    "def f(x):\n    return x ** 2  # squares\n\n\tindented\ttabs",
] * 20
TEXTS = [
    "Hello world",
    "revenue in 2019 was 1,234,567.89",
    "  spaces\n\nand\ttabs",
    "They'll say I'M fine",
    "é ü ß 漢字 🙂",
]


def _ranks() -> dict[bytes, int]:
    """A tiny tiktoken vocabulary: every byte, then the merges a byte-level BPE learns on CORPUS, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in token): i for token, i in tk.get_vocab().items()}


def _tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm: split with Llama 3's regex, then merge the adjacent pair of lowest rank, repeatedly."""
    import regex

    from hpml_ft.meta_tokenizer import LLAMA3_SPLIT

    ids = []
    for piece in regex.findall(LLAMA3_SPLIT, text):
        parts = [bytes([b]) for b in piece.encode()]
        while True:
            found = [
                (ranks[a + b], i)
                for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
                if a + b in ranks
            ]
            if not found:
                break
            i = min(found)[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def _write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


SPM_WORDS = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "▁h",
    "▁he",
    "ll",
    "▁hell",
    "▁hello",
    "▁w",
    "▁wo",
    "▁wor",
]
SPM_WORDS += ["▁worl", "▁world"]


def _write_sentencepiece(path: Path) -> int:
    """A tiny Llama-2-style sentencepiece BPE model (unk, bos, eos, 256 byte pieces, a few words); its size."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    model, kind = pb.ModelProto(), pb.ModelProto.SentencePiece.Type
    for piece, t in [("<unk>", kind.UNKNOWN), ("<s>", kind.CONTROL), ("</s>", kind.CONTROL)]:
        model.pieces.add(piece=piece, score=0.0, type=t)
    for b in range(256):
        model.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=kind.BYTE)
    for i, word in enumerate(SPM_WORDS):
        model.pieces.add(piece=word, score=-float(i), type=kind.NORMAL)
    model.trainer_spec.model_type = 2  # BPE
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.normalizer_spec.add_dummy_prefix = True
    path.write_bytes(model.SerializeToString())
    return len(model.pieces)


def _to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' rotate-half rows -> Meta's interleaved rows (undoes convert_llama_weights_to_hf's permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_llama(vocab: int, rope_theta: float, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=192,  # Meta's FeedForward for dim 64, multiple_of 32: 32 * ceil(int(2 * 256 / 3) / 32)
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _write_meta(model, out: Path, shards: int, emb_dim: int, params: dict) -> None:
    """`model` as Meta ships it: consolidated.NN.pth (model-parallel splits) + params.json."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta, split = {}, {}
    meta["tok_embeddings.weight"], split["tok_embeddings.weight"] = sd["model.embed_tokens.weight"], emb_dim
    meta["norm.weight"], meta["output.weight"] = sd["model.norm.weight"], sd["lm_head.weight"]
    split["norm.weight"], split["output.weight"] = None, 0
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    for i in range(model.config.num_hidden_layers):
        hf = f"model.layers.{i}."
        for w, proj in names.items():
            meta[f"layers.{i}.attention.{w}.weight"] = sd[f"{hf}self_attn.{proj}.weight"]
            split[f"layers.{i}.attention.{w}.weight"] = 1 if w == "wo" else 0
        for w, proj in {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.items():
            meta[f"layers.{i}.feed_forward.{w}.weight"] = sd[f"{hf}mlp.{proj}.weight"]
            split[f"layers.{i}.feed_forward.{w}.weight"] = 1 if w == "w2" else 0
        meta[f"layers.{i}.attention_norm.weight"] = sd[f"{hf}input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[f"{hf}post_attention_layernorm.weight"]
        split[f"layers.{i}.attention_norm.weight"] = split[f"layers.{i}.ffn_norm.weight"] = None
        meta[f"layers.{i}.attention.wq.weight"] = _to_meta(meta[f"layers.{i}.attention.wq.weight"], 4)
        meta[f"layers.{i}.attention.wk.weight"] = _to_meta(meta[f"layers.{i}.attention.wk.weight"], 2)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = {k: v if split[k] is None else v.chunk(shards, split[k])[s].clone() for k, v in meta.items()}
        torch.save(part, out / f"consolidated.{s:02d}.pth")
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5}
    (out / "params.json").write_text(json.dumps({**base, **params}))


def test_meta_rope_on_interleaved_rows_is_transformers_rope_on_permuted_rows():
    """The direction of the wq/wk permutation, against Meta's reference RoPE (complex products of pairs)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from hpml_ft.meta_ckpt import permute

    heads, hd, steps = 2, 16, 6
    w, x = torch.randn(heads * hd, 32), torch.randn(steps, 32)
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(steps, hd // 2), torch.outer(torch.arange(steps).float(), freqs))
    q = torch.view_as_complex((x @ w.T).view(steps, heads, hd // 2, 2))
    meta = torch.view_as_real(q * cis[:, None, :]).reshape(steps, heads, hd)
    hf = (x @ permute(w, heads).T).view(steps, heads, hd).transpose(0, 1)[None]
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * hd, num_attention_heads=heads))
    cos, sin = rope(hf, torch.arange(steps)[None])
    hf = apply_rotary_pos_emb(hf, hf, cos, sin)[0][0].transpose(0, 1)  # (steps, heads, hd)
    assert torch.allclose(meta[..., 0::2], hf[..., : hd // 2], atol=1e-5)  # Meta's pairs are HF's halves
    assert torch.allclose(meta[..., 1::2], hf[..., hd // 2 :], atol=1e-5)


def test_llama3_tokenizer_from_tiktoken_ranks_encodes_as_tiktoken(tmp_path):
    import inspect

    from transformers.convert_slow_tokenizer import TikTokenConverter

    from hpml_ft.meta_tokenizer import LLAMA3_SPLIT, llama3_specials, read_tiktoken, tiktoken_tokenizer

    assert inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default == LLAMA3_SPLIT
    ranks = _ranks()
    _write_tiktoken(tmp_path / "tokenizer.model", ranks)
    assert read_tiktoken(tmp_path / "tokenizer.model") == ranks
    tok = tiktoken_tokenizer(ranks, len(ranks) + 256, scaled_rope=False)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == _tiktoken_encode(text, ranks), text
        assert tok.decode(ids) == text
    n = len(ranks)
    assert (
        tok("hi")["input_ids"][0] == n == tok.bos_token_id
    )  # <|begin_of_text|> added, as Meta's encode(bos=True)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", n + 9)
    assert tok("<|start_header_id|>", add_special_tokens=False)["input_ids"] == [n + 6]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    v31, v30 = llama3_specials(256, True), llama3_specials(256, False)
    assert (v31[4], v31[8], v31[10], v31[-1]) == (
        "<|finetune_right_pad_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
        "<|reserved_special_token_247|>",
    )
    assert (v30[8], v30[9], v30[-1]) == (
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
        "<|reserved_special_token_250|>",
    )


def test_llama2_tokenizer_from_a_sentencepiece_model(tmp_path):
    from hpml_ft.meta_tokenizer import read_tiktoken, sentencepiece_tokenizer

    _write_sentencepiece(tmp_path / "tokenizer.model")
    assert read_tiktoken(tmp_path / "tokenizer.model") is None
    tok = sentencepiece_tokenizer(tmp_path / "tokenizer.model")
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[1:]) == ["▁hello", "▁world"]
    assert tok.convert_ids_to_tokens(tok("hex", add_special_tokens=False)["input_ids"]) == ["▁he", "<0x78>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert "[INST] hi [/INST]" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def _meta_checkpoint(root: Path, tokenizer: str, shards: int, emb_dim: int):
    """(Meta dir, the HF model it holds) with the given tokenizer.model kind."""
    meta = root / "repo" / "original"
    meta.mkdir(parents=True)
    if tokenizer == "tiktoken":
        ranks = _ranks()
        _write_tiktoken(meta / "tokenizer.model", ranks)
        model, params = _hf_llama(len(ranks) + 256, 500000.0), {"rope_theta": 500000.0}
    elif tokenizer == "sentencepiece":  # Llama 2's params.json has no rope_theta: 10000 is the default
        model, params = _hf_llama(_write_sentencepiece(meta / "tokenizer.model"), 10000.0), {}
    else:  # an HF tokenizer in the parent dir, as hub repos keep Meta's files under original/
        tok = build_tiny_tokenizer()
        tok.save_pretrained(meta.parent)
        model, params = _hf_llama(len(tok), 10000.0), {"rope_theta": 10000.0}
    _write_meta(model, meta, shards, emb_dim, {"vocab_size": model.config.vocab_size, **params})
    return meta, model


@pytest.mark.parametrize(
    ("tokenizer", "shards", "emb_dim"),
    [("tiktoken", 1, 0), ("tiktoken", 2, 0), ("sentencepiece", 2, 1), ("hf", 1, 0)],
    ids=["llama3-1-shard", "llama3-2-shards", "llama2-2-shards", "hf-tokenizer-beside"],
)
def test_meta_checkpoint_resolves_to_a_model_with_the_same_logits(
    tmp_path, monkeypatch, tokenizer, shards, emb_dim
):
    from transformers import AutoModelForCausalLM

    from hpml_ft.runs import load_tokenizer, resolve

    monkeypatch.setenv("HPML_FT_CACHE", str(tmp_path / "cache"))
    meta, ref = _meta_checkpoint(tmp_path, tokenizer, shards, emb_dim)
    spec = resolve(str(meta))
    assert Path(spec.path).parent == tmp_path / "cache" / "meta" and spec.adapter is None
    got = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert got.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]
    tok = load_tokenizer(spec)  # hpml_ft's loader: needs a chat template
    assert len(tok) <= ref.config.vocab_size and tok.chat_template
    assert resolve(str(meta)).path == spec.path  # cached: not converted again


def test_a_changed_checkpoint_converts_again(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hpml_ft.runs import resolve

    monkeypatch.setenv("HPML_FT_CACHE", str(tmp_path / "cache"))
    meta, _ = _meta_checkpoint(tmp_path, "hf", 1, 0)
    first = resolve(str(meta)).path
    changed = _hf_llama(len(build_tiny_tokenizer()), 10000.0, seed=1)
    _write_meta(changed, meta, 1, 0, {"vocab_size": changed.config.vocab_size, "rope_theta": 10000.0})
    second = resolve(str(meta)).path
    assert second != first
    got = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, changed(ids).logits, atol=1e-5, rtol=0)


class _Payload:
    """Unpickling this copies a file: what a checkpoint carrying code could do instead."""

    def __init__(self, src: Path, marker: Path) -> None:
        self.args = (str(src), str(marker))

    def __reduce__(self):
        return (shutil.copyfile, self.args)


def _error(argv, capsys) -> str:
    from hpml_ft.errors import run_cli
    from hpml_ft.export.__main__ import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_pickle_that_is_not_weights_only_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPML_FT_CACHE", str(tmp_path / "cache"))
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    out = ["--gguf", "--out", str(tmp_path / "m.gguf")]
    torch.save({"tok_embeddings.weight": torch.zeros(4, 64)}, meta / "consolidated.00.pth")
    assert "has no tokenizer" in _error([str(meta), *out], capsys)
    build_tiny_tokenizer().save_pretrained(meta)
    marker, src = tmp_path / "payload-ran", tmp_path / "payload.txt"
    src.write_text("x")
    torch.save(
        {"tok_embeddings.weight": torch.zeros(4, 64), "x": _Payload(src, marker)},
        meta / "consolidated.00.pth",
    )
    assert "not a weights-only torch checkpoint" in _error([str(meta), *out], capsys)
    assert not marker.exists()
    torch.load(meta / "consolidated.00.pth", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
