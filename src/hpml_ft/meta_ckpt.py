"""Meta-format Llama checkpoints in: a dir of params.json + consolidated.NN.pth (+ tokenizer.model) is converted
once to a Hugging Face model dir under hpml_ft's cache, which every command then loads like any model dir.

The conversion is the one transformers' convert_llama_weights_to_hf.py does:
- renames: tok_embeddings -> model.embed_tokens; layers.N.attention.wq/wk/wv/wo -> model.layers.N.self_attn.
  q/k/v/o_proj; feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj; attention_norm -> input_layernorm; ffn_norm ->
  post_attention_layernorm; norm -> model.norm; output -> lm_head (absent: tied embeddings, as in Llama 3.2 1B/3B);
- the rotary permutation of wq/wk (`permute`): Meta's RoPE rotates interleaved pairs of each head, transformers'
  rotates its two halves, so the rows of each head are reordered (for wk with the KV head count);
- model-parallel shards (consolidated.00.pth, .01, ...): column-parallel weights (wq, wk, wv, w1, w3, output)
  are concatenated along rows, row-parallel ones (wo, w2) along columns, the embedding along rows (Llama 3's
  vocab-parallel) or columns (Llama 2's), as its shard shape says; norms are replicated (shard 0's is taken);
- params.json gives dim, n_layers, n_heads, n_kv_heads, norm_eps, rope_theta and use_scaled_rope (Llama 3.1+'s
  "llama3" RoPE scaling: factor 8, or 32 for the Llama 3.2 1B/3B shapes, as transformers' converter sets it);
  the vocab and FFN sizes are read off the weights and the FFN size is checked against multiple_of and
  ffn_dim_multiplier. Defaults where params.json is silent follow the tokenizer: Llama 3 (tiktoken) rope_theta
  500000 and 8192 positions (131072 with scaled RoPE), Llama 2 (sentencepiece) 10000 and 4096.
Shards are read with torch.load(weights_only=True, mmap=True): a pickle holding anything but tensors is refused,
never run. Output is written in safetensors shards of about 2 GiB, one in memory at a time. The cache entry is
keyed by the source path and each file's size and mtime, so a changed checkpoint converts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail

if TYPE_CHECKING:
    import torch

SHARD_BYTES = 2 * 2**30
_LAYER = {  # Meta name in layers.N. -> (HF name in model.layers.N., concat dim of model-parallel shards or None)
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


def is_meta_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (
        (p / "params.json").is_file()
        and any(p.glob("consolidated.*.pth"))
        and not (p / "config.json").exists()
    )


def shard_files(src: Path) -> list[Path]:
    return sorted(src.glob("consolidated.*.pth"))


def cache_key(src: Path) -> str:
    """The source path and every input file's name, size and mtime: any change gives a new key."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted([src / "params.json", src / "tokenizer.model", *shard_files(src)]):
        if f.is_file():
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def converted_dir(src: str | Path, cache_root: Path) -> Path:
    """The cached HF dir of the Meta checkpoint `src`, converted now when missing or out of date."""
    src = Path(src).expanduser()
    target = cache_root / "meta" / f"{'-'.join(src.resolve().parts[-2:])}-{cache_key(src)}"
    if (target / "config.json").is_file():
        return target
    print(f"[hpml_ft] converting the Meta checkpoint {src} to a Hugging Face model in {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        convert(src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def read_params(src: Path) -> dict[str, Any]:
    path = src / "params.json"
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        fail(f"{path} is not valid JSON ({str(err)[:80]})")
    missing = [k for k in ("dim", "n_layers", "n_heads") if not isinstance(params.get(k), int)]
    if not isinstance(params, dict) or missing:
        fail(f"{path} lacks {', '.join(missing) or 'its fields'}; is {src} a Meta Llama checkpoint?")
    return params


def load_shards(src: Path) -> list[dict[str, torch.Tensor]]:
    """Every consolidated.NN.pth, memory-mapped; anything but plain tensors is one error line, never unpickled."""
    import pickle

    import torch

    shards = []
    for f in shard_files(src):
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            fail(f"{f}: not a weights-only torch checkpoint, refused without running it ({why})")
        if not isinstance(shards[-1], dict):
            fail(f"{f} holds a {type(shards[-1]).__name__}, not a dict of tensors")
    return shards


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows of wq/wk -> transformers' rotate-half rows, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _cat(shards: list[dict[str, torch.Tensor]], key: str, dim: int | None) -> torch.Tensor:
    import torch

    if key not in shards[0]:
        fail(f"the checkpoint has no tensor {key}; is it a complete Meta Llama checkpoint?")
    if dim is None or len(shards) == 1:
        return shards[0][key]
    return torch.cat([s[key] for s in shards], dim=dim)


def hf_tensors(shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) of the whole model, one at a time, renamed, concatenated and permuted."""
    dim, heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    emb = shards[0].get("tok_embeddings.weight")
    emb_dim = 0 if emb is not None and emb.shape[1] == dim else 1  # Llama 3 splits the vocab, Llama 2 the dim
    yield "model.embed_tokens.weight", _cat(shards, "tok_embeddings.weight", emb_dim)
    for i in range(params["n_layers"]):
        for meta, (hf, cat_dim) in _LAYER.items():
            w = _cat(shards, f"layers.{i}.{meta}", cat_dim)
            if meta == "attention.wq.weight":
                w = permute(w, heads)
            elif meta == "attention.wk.weight":
                w = permute(w, kv)
            yield f"model.layers.{i}.{hf}", w
    yield "model.norm.weight", _cat(shards, "norm.weight", None)
    if "output.weight" in shards[0]:
        yield "lm_head.weight", _cat(shards, "output.weight", 0)


def _check_keys(shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> None:
    known = {"tok_embeddings.weight", "norm.weight", "output.weight", "rope.freqs"}
    known |= {f"layers.{i}.{k}" for i in range(params["n_layers"]) for k in _LAYER}
    extra = sorted(set(shards[0]) - known)
    if extra:
        fail(
            f"unexpected tensor {extra[0]} in the checkpoint ({len(extra)} in all): not a plain Llama text model?"
        )


def ffn_size(params: dict[str, Any]) -> int | None:
    """The SwiGLU width Meta's FeedForward derives from params.json (None without multiple_of)."""
    multiple = params.get("multiple_of")
    if not multiple:
        return None
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return multiple * ((hidden + multiple - 1) // multiple)


def write_weights(tensors: Iterator[tuple[str, Any]], out: Path) -> dict[str, tuple[int, ...]]:
    """Stream tensors into model-NNNNN-of-NNNNN.safetensors shards (+ index); returns every tensor's shape."""
    from safetensors.torch import save_file

    shapes, pending, names, size, files = {}, {}, {}, 0, []

    def flush() -> None:
        nonlocal pending, size
        files.append(out / f"model-{len(files) + 1:05d}.safetensors")
        save_file(pending, str(files[-1]), metadata={"format": "pt"})
        names.update(dict.fromkeys(pending, files[-1]))
        pending, size = {}, 0

    for name, t in tensors:
        # a copy with its own storage: a view of a mmap'd shard may share storage with another tensor
        pending[name] = t.clone()
        shapes[name], size = tuple(t.shape), size + t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if pending or not files:
        flush()
    if len(files) == 1:
        files[0].rename(out / "model.safetensors")
        return shapes
    final = {f: f.with_name(f"{f.stem}-of-{len(files):05d}.safetensors") for f in files}
    for old, new in final.items():
        old.rename(new)
    index = {"metadata": {}, "weight_map": {n: final[f].name for n, f in names.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return shapes


def _rope(params: dict[str, Any], kind: str | None) -> tuple[dict[str, Any], int]:
    """(rope_parameters, max_position_embeddings) from params.json and the tokenizer family."""
    llama3 = kind == "tiktoken"
    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": params.get("rope_theta", 5e5 if llama3 else 1e4),
    }
    if not params.get("use_scaled_rope"):
        return rope, 8192 if llama3 else 4096
    small_32 = (params["dim"], params["n_layers"]) in ((2048, 16), (3072, 28))  # Llama 3.2 1B / 3B
    rope |= {
        "rope_type": "llama3",
        "factor": float(params.get("rope_scaling_factor") or (32.0 if small_32 else 8.0)),
        "low_freq_factor": 1.0,
        "high_freq_factor": float(params.get("high_freq_factor") or 4.0),
        "original_max_position_embeddings": 8192,
    }
    return rope, 131072


def convert(src: Path, out: Path) -> None:
    """Write the HF dir of the Meta checkpoint `src` into the empty dir `out`."""
    from transformers import GenerationConfig, LlamaConfig

    from hpml_ft.meta_tokenizer import save_tokenizer, tokenizer_kind

    params = read_params(src)
    kind = tokenizer_kind(src)  # no usable tokenizer: one error line before any weight is read
    shards = load_shards(src)
    _check_keys(shards, params)
    dtype = str(shards[0]["norm.weight"].dtype).removeprefix("torch.")
    shapes = write_weights(hf_tensors(shards, params), out)
    vocab, ffn = shapes["model.embed_tokens.weight"][0], shapes["model.layers.0.mlp.gate_proj.weight"][0]
    if ffn_size(params) not in (None, ffn):
        fail(
            f"params.json gives an FFN width of {ffn_size(params)} but the weights have {ffn}; mismatched files?"
        )
    ids = save_tokenizer(src, kind, vocab, bool(params.get("use_scaled_rope")), out)
    rope, positions = _rope(params, kind)
    stops = ids.pop("stop_ids")
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=params["dim"],
        intermediate_size=ffn,
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        max_position_embeddings=positions,
        rope_parameters=rope,
        tie_word_embeddings="lm_head.weight" not in shapes,
        dtype=dtype,
        **ids,
    ).save_pretrained(out)
    eos = stops[0] if len(stops) == 1 else stops
    GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=eos).save_pretrained(out)
    record = {"source": str(src.resolve()), "key": cache_key(src), "tokenizer": kind}
    (out / "meta_checkpoint.json").write_text(json.dumps(record, indent=2) + "\n")
