"""GGUF export (hpml_ft.export): the file reads back through transformers' GGUF reader as the same model.

A tiny random Llama (dims multiples of 32, the Q8_0/Q4_0 block) with the test tokenizer is exported as f16, q8_0
and q4_0 and loaded back with `from_pretrained(dir, gguf_file=name)`: f16 gives the same greedy tokens and close
logits (its weights are exact in f16, so any difference is a bug: a missing or wrong Q/K permutation garbles
RoPE), q8_0 close logits, q4_0 loads and runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["What was the revenue in 2019?", "Table: year | value", "million thousand billion percent"]


def _tiny_llama(path, tied: bool):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(
        tok, max_positions=256, rope_theta=10000.0, initializer_range=0.1, tie_word_embeddings=tied
    )
    # fp32 weights that f16 holds exactly: an f16 export is then lossless and must give the same logits
    model.half().float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _export(src, out, *extra):
    from hpml_ft.export.__main__ import main

    assert main([str(src), "--gguf", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The untied tiny model and its f16 / q8_0 / q4_0 exports, each in its own folder."""
    root = tmp_path_factory.mktemp("export")
    src = _tiny_llama(root / "model", tied=False)
    return src, {t: _export(src, root / t / f"tiny-{t}.gguf", "--type", t) for t in ("f16", "q8_0", "q4_0")}


def _load(src, gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    return ref, got, tok


def _ids(tok, prompt):
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def _compare(ref, got, tok):
    """(max |logit difference| over every position of every prompt, greedy tokens equal on all prompts)."""
    worst, same = 0.0, True
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        worst = max(worst, float((ref(ids).logits - got(ids).logits).abs().max()))
        a = ref.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        b = got.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        same &= a.tolist() == b.tolist()
    return worst, same


@pytest.mark.parametrize("tied", [False, True])
def test_f16_gguf_reads_back_with_the_same_greedy_tokens_and_tokenizer(exported, tmp_path, tied):
    from transformers import AutoTokenizer

    src, files = exported
    if tied:  # SmolLM's layout: no output.weight in the file, llama.cpp reuses the embedding
        src = _tiny_llama(tmp_path / "tied", tied=True)
        gguf = _export(src, tmp_path / "out" / "tied.gguf")
    else:
        gguf = files["f16"]
    ref, got, tok = _load(src, gguf)
    worst, same = _compare(ref, got, tok)
    assert same, "greedy tokens differ between the model and its f16 GGUF"
    assert worst < 1e-5, (
        f"f16 logits differ by {worst} (the weights are exact in f16: any difference is a bug)"
    )
    back = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for prompt in PROMPTS:  # plain text, and chat text whose <|im_start|> must stay one (control) token
        assert back(prompt)["input_ids"] == tok(prompt)["input_ids"]
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
        assert (
            back(chat, add_special_tokens=False)["input_ids"]
            == tok(chat, add_special_tokens=False)["input_ids"]
        )
    special = [sorted(a.content for a in t.added_tokens_decoder.values() if a.special) for t in (back, tok)]
    assert special[0] == special[1], "control tokens lost their special (CONTROL) type"
    assert back.chat_template == tok.chat_template
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)


def test_gguf_metadata_and_tensor_types(exported):
    from gguf import GGUFReader

    src, files = exported
    cfg = json.loads((src / "config.json").read_text())
    types = {}
    for kind, path in files.items():
        reader = GGUFReader(str(path))
        types[kind] = {t.name: t.tensor_type.name for t in reader.tensors}
        meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
        assert meta["llama.context_length"] == cfg["max_position_embeddings"]
        assert meta["llama.embedding_length"] == 64 and meta["llama.feed_forward_length"] == 128
        assert meta["llama.block_count"] == 2 and meta["llama.vocab_size"] == cfg["vocab_size"]
        assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
        assert meta["llama.rope.freq_base"] == 10000.0
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
        assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the test tokenizer: GPT-2's regex
    assert types["f16"]["blk.0.attn_q.weight"] == "F16" and types["f16"]["blk.0.attn_norm.weight"] == "F32"
    assert set(types["q8_0"].values()) == {"Q8_0", "F32"}
    assert types["q4_0"]["blk.1.ffn_down.weight"] == "Q4_0" and types["q4_0"]["output.weight"] == "Q8_0"


def test_q8_0_logits_stay_close_and_q4_0_loads_and_generates(exported):
    src, files = exported
    ref, got8, tok = _load(src, files["q8_0"])
    _, f16, _ = _load(src, files["f16"])
    worst8, _ = _compare(ref, got8, tok)
    worst16, _ = _compare(ref, f16, tok)
    assert worst8 < 0.2, f"q8_0 logits differ by {worst8} (logits std ~0.8; Q8_0 weights are within ~0.5%)"
    assert worst8 > worst16, "q8_0 is no further from the source than f16: was it quantized at all?"
    _, got4, _ = _load(src, files["q4_0"])
    out = got4.generate(
        _ids(tok, PROMPTS[0]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape[1] == _ids(tok, PROMPTS[0]).shape[1] + 8


def test_q_k_rows_go_to_meta_order_and_back():
    """The export step is the inverse of both transformers' GGUF reader and the Meta->HF permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from hpml_ft.export.gguf_file import to_meta_order
    from hpml_ft.meta_ckpt import permute

    w = torch.randn(2 * 16, 64)  # 2 heads of 16
    meta = to_meta_order(w.numpy(), 2)
    assert not (meta == w.numpy()).all()
    back = LlamaTensorProcessor()._reverse_permute_weights(meta, 2, 2)
    assert (back == w.numpy()).all()
    assert torch.equal(permute(torch.from_numpy(meta), 2), w)


def test_modelfile_maps_chatml_llama3_and_a_default_system_prompt(exported):
    from transformers import AutoTokenizer

    from hpml_ft.export.modelfile import modelfile_text
    from hpml_ft.meta_tokenizer import LLAMA3_CHAT

    src, files = exported
    text = (files["f16"].parent / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf\n" in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text and "SYSTEM" not in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
        + tok.chat_template
    )
    assert 'SYSTEM """Be brief."""' in modelfile_text("m.gguf", tok)
    tok.chat_template = LLAMA3_CHAT
    llama3 = modelfile_text("m.gguf", tok)
    assert (
        "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3
        and 'PARAMETER stop "<|eot_id|>"' in llama3
    )
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert "{{ .Prompt }}" in modelfile_text("m.gguf", tok)


def _error(argv, capsys) -> str:
    from hpml_ft.errors import run_cli
    from hpml_ft.export.__main__ import main

    capsys.readouterr()  # drop what setting up printed
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_error_line(exported, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src, files = exported
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    build_tiny_tokenizer().save_pretrained(gpt2)
    assert "is a gpt2 model" in _error([str(gpt2), "--gguf", "--out", str(tmp_path / "g.gguf")], capsys)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(src)}))
    err = _error([str(adapter), "--gguf", "--out", str(tmp_path / "a.gguf")], capsys)
    assert "LoRA adapter" in err and "python -m hpml_ft.merge --adapter" in err
    err = _error([str(src), "--gguf", "--out", str(files["f16"])], capsys)
    assert "already exists; pass --overwrite" in err
    assert "--gguf" in _error([str(src), "--out", str(tmp_path / "x.gguf")], capsys)
    assert not list(tmp_path.glob("*.gguf")), "a refused export wrote a file"


def test_overwrite_replaces_the_file_and_its_modelfile(exported, tmp_path):
    src, _ = exported
    out = _export(src, tmp_path / "m.gguf", "--type", "q4_0")
    small = out.stat().st_size
    _export(src, out, "--overwrite")
    assert out.stat().st_size > small  # f16 now
    assert "FROM ./m.gguf" in (tmp_path / "Modelfile").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left


def test_llama3_rope_scaling_is_written_as_the_rope_freqs_llama_cpp_divides_by(tmp_path):
    """Llama 3.1's RoPE scaling: llama.cpp divides each frequency by rope_freqs; transformers' own llama3
    frequencies must come out."""
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,  # head dim 32: 16 frequencies, some scaled, some smoothed, some kept
        max_position_embeddings=4096,
        rope_parameters=rope,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = _export(tmp_path / "m", tmp_path / "out" / "m.gguf")
    freqs = next(t for t in GGUFReader(str(out)).tensors if t.name == "rope_freqs.weight")
    base = 1.0 / (500000.0 ** (torch.arange(0, 32, 2).float() / 32))
    want = base / ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]
    assert torch.allclose(torch.from_numpy(freqs.data.copy()), want, rtol=1e-4)
    assert want.min() == 1.0 and want.max() == 8.0 and ((want > 1) & (want < 8)).any()


def test_llama_cpp_pre_tokenizer_names_follow_the_pre_tokenizer():
    from tokenizers import pre_tokenizers

    from hpml_ft.export.gguf_vocab import pre_tokenizer_name
    from hpml_ft.meta_tokenizer import tiktoken_tokenizer

    def name(pre) -> str:
        return pre_tokenizer_name({"pre_tokenizer": json.loads(pre.__getstate__())})

    llama3 = tiktoken_tokenizer({bytes([b]): b for b in range(256)}, 512, scaled_rope=True)
    assert pre_tokenizer_name(json.loads(llama3.backend_tokenizer.to_str())) == "llama-bpe"
    assert name(pre_tokenizers.ByteLevel(add_prefix_space=False)) == "gpt-2"
    digits = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]
    )
    assert name(digits) == "smollm"
    assert name(pre_tokenizers.Whitespace()) == "default"
