"""A Llama-architecture HF model dir -> one GGUF file (llama.cpp's LLM_ARCH_LLAMA), written tensor by tensor.

Tensor names come from gguf-py's map for MODEL_ARCH.LLAMA (`model.layers.3.self_attn.q_proj.weight` ->
`blk.3.attn_q.weight`). Types: norms (1-D) stay F32; 2-D weights are F16, Q8_0 or Q4_0 (gguf-py's quantizers,
blocks of 32 along a row); with q4_0 the output projection (the embedding, when tied) is Q8_0, as llama-quantize
keeps it above 4 bits.

Q/K permutation. Meta's Llama code applies RoPE to interleaved pairs (x0,x1),(x2,x3)...; transformers' Llama
rotates halves (x_i, x_{i+d/2}), so its Meta->HF converter permutes the rows of wq/wk within each head. llama.cpp
runs the Meta layout, so its convert_hf_to_gguf.py (LlamaModel.permute) undoes that permutation on q_proj and
k_proj (with the KV head count for k_proj), and transformers' GGUF reader redoes it on load
(LlamaTensorProcessor._reverse_permute_weights). `to_meta_order` is that step.

Only one tensor is in memory at a time (plus its quantized copy): tensor infos are written first, then the data.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail

if TYPE_CHECKING:
    import gguf
    import numpy as np

QK = 32  # weights per Q8_0 / Q4_0 block


@dataclass(frozen=True)
class Entry:
    name: str  # GGUF tensor name
    source: str  # HF tensor name ('' for a generated tensor)
    file: Path | None
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: Any  # gguf.GGMLQuantizationType


def read_config(src: Path) -> dict[str, Any]:
    """config.json of a Llama model; anything else is one error line (before any weight is read)."""
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    kind = config.get("model_type")
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if kind != "llama" or archs != ["LlamaForCausalLM"]:
        fail(
            f"{src} is a {kind or 'unknown'} model ({', '.join(archs)}); GGUF export covers Llama-architecture "
            "models (Llama 2/3, SmolLM, TinyLlama, ...); convert others with llama.cpp's convert_hf_to_gguf.py"
        )
    if config.get("quantization_config"):
        fail(f"{src} is already quantized (quantization_config); export its full-precision source instead")
    if config.get("mlp_bias"):
        fail(f"{src} has MLP biases (mlp_bias=true), which llama.cpp's Llama graph does not load")
    return config


def rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers >= 5 `rope_parameters`, else the older `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def to_meta_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows of q_proj/k_proj (weight or bias) -> Meta's interleaved rows, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params: dict[str, Any], dim: int) -> np.ndarray:
    """`rope_freqs.weight` for rope_type llama3: llama.cpp divides each RoPE frequency by its factor."""
    import numpy as np

    freqs = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, old_ctx = params["factor"], params["original_max_position_embeddings"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def weight_files(src: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        fail(f"{src} has no .safetensors weights; GGUF export reads safetensors (save_pretrained's default)")
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            where.update(dict.fromkeys(st.keys(), f))
    return where


def _qtype(name: str, shape: tuple[int, ...], kind: str, tied: bool) -> Any:
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    if kind == "f16" or shape[-1] % QK:
        return T.F16
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    return T.Q8_0 if kind == "q8_0" or head else T.Q4_0


def plan(src: Path, config: dict[str, Any], kind: str) -> list[Entry]:
    """Every tensor of the file, in writing order; a tensor with no GGUF name is one error line."""
    import gguf
    from safetensors import safe_open

    n_layers, tied = config["num_hidden_layers"], bool(config.get("tie_word_embeddings"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    entries = []
    for hf_name, f in weight_files(src).items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the embedding itself
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            fail(f"{src}: tensor {hf_name} has no place in a llama GGUF file; is this a plain Llama model?")
        with safe_open(str(f), "pt") as st:
            shape = tuple(st.get_slice(hf_name).get_shape())
        entries.append(Entry(name, hf_name, f, shape, _qtype(name, shape, kind, tied)))
    if not tied and not any(e.name == "output.weight" for e in entries):
        fail(f"{src} has no lm_head.weight and tie_word_embeddings=false; the checkpoint is incomplete")
    params = rope(config)
    if params["rope_type"] == "llama3":
        dim = head_dim(config)
        entries.append(Entry("rope_freqs.weight", "", None, (dim // 2,), gguf.GGMLQuantizationType.F32))

    def order(e: Entry) -> tuple[int, str]:
        block = e.name.split(".")[1] if e.name.startswith("blk.") else ""
        return (int(block) + 1 if block else (0 if e.name.startswith("token_embd") else n_layers + 1), e.name)

    return sorted(entries, key=order)


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], ftype: int, name: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    params = rope(config)
    writer.add_rope_freq_base(params["rope_theta"])
    kind = params["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(params["factor"])
        if kind == "yarn":
            old = params.get("original_max_position_embeddings", config["max_position_embeddings"])
            writer.add_rope_scaling_orig_ctx_len(old)
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor
        fail(f"rope_type {kind!r} has no GGUF form here (default, linear, yarn and llama3 do)")
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _data(e: Entry, handles: dict[Path, Any], config: dict[str, Any]) -> np.ndarray:
    """The tensor as written: read (one at a time), Q/K rows to Meta order, quantized or cast."""
    import gguf

    if not e.source:
        return llama3_rope_factors(rope(config), head_dim(config))
    w = handles[e.file].get_tensor(e.source).float().numpy()
    heads = config["num_attention_heads"]
    if e.name.startswith("blk.") and ".attn_q." in e.name:
        w = to_meta_order(w, heads)
    elif e.name.startswith("blk.") and ".attn_k." in e.name:
        w = to_meta_order(w, config.get("num_key_value_heads") or heads)
    return gguf.quants.quantize(w, e.qtype)


def write_gguf(src: Path, out: Path, kind: str, vocab: Any, name: str) -> dict[str, Any]:
    """Write `src` as the GGUF file `out` (a path the caller stages); returns what was written."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from hpml_ft.export.gguf_vocab import add_vocab

    config = read_config(src)
    entries = plan(src, config, kind)
    ftypes = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_hparams(writer, config, gguf.LlamaFileType[ftypes[kind]], name)
    add_vocab(writer, vocab)
    for e in entries:
        byte_shape = gguf.quant_shape_to_byte_shape(e.shape, e.qtype)  # F32 / F16 too: 4 / 2 bytes a value
        writer.add_tensor_info(
            e.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=e.qtype
        )
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with ExitStack() as stack:
        handles = {
            f: stack.enter_context(safe_open(str(f), "pt")) for f in {e.file for e in entries if e.file}
        }
        for e in entries:
            writer.write_tensor_data(_data(e, handles, config))
    writer.close()
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.qtype.name] = counts.get(e.qtype.name, 0) + 1
    return {"tensors": len(entries), "types": counts, "pre_tokenizer": vocab.pre}
