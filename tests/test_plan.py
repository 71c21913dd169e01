"""The memory planner: ZeRO-paper arithmetic on real model shapes, orderings that must hold, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from hpml_ft.config import load_config
from hpml_ft.errors import run_cli
from hpml_ft.plan import (
    GIB,
    Setup,
    Shape,
    largest_batch,
    load_model_config,
    main,
    model_shape,
    plan_text_for_config,
    setup_for,
    total_bytes,
)

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
FFT_8B = "recipes/fft_llama3_8b_tatqa.yaml"


@pytest.fixture(scope="module")
def shapes():
    """Llama-3-8B from the built-in config (no weights, no network), full and with a r=16 all-linear LoRA."""
    mcfg, source = load_model_config(LLAMA3_8B)
    assert source.startswith("built-in") or "cache" in source
    return {"full": model_shape(mcfg, "full"), "lora": model_shape(mcfg, "lora", 16, "all-linear")}


def _states(rows) -> float:
    return sum(dev for name, dev, _, _ in rows if name in ("weights", "gradients", "optimizer states"))


def test_parameter_counts_match_the_public_model_cards(shapes):
    assert shapes["full"].total == 8_030_261_248
    assert shapes["lora"].lora == 41_943_040  # r * (in + out) over q,k,v,o,gate,up,down x 32 layers
    one_b = model_shape(load_model_config("meta-llama/Llama-3.2-1B-Instruct")[0])
    assert one_b.total == 1_235_814_400  # tied embeddings counted once


def test_full_ft_zero3_model_states_are_16_psi_over_n(shapes):
    """ZeRO paper: bf16 weights + grads (2 + 2) + fp32 master, m, v (12) = 16 bytes per parameter, / N GPUs."""
    from hpml_ft.plan import estimate

    sh = shapes["full"]
    for gpus in (1, 4, 16):
        rows = estimate(sh, Setup(method="full", zero=3, gpus=gpus))
        assert _states(rows) == pytest.approx(
            16 * sh.total / gpus, rel=1e-6
        )  # exact arithmetic, 1e-6 tolerance


def test_lora_needs_less_than_full_and_qlora_less_than_lora(shapes):
    base = Setup(batch=1, seq=2048, checkpointing=True)
    full = total_bytes(shapes["full"], replace(base, method="full"))
    lora = total_bytes(shapes["lora"], replace(base, method="lora"))
    qlora = total_bytes(shapes["lora"], replace(base, method="qlora", weights="nf4"))
    assert qlora < lora < full
    assert 4.5 * GIB < qlora < 12 * GIB  # ~0.52 B/param for 7B of linear weights + 1 GiB bf16 embeddings
    assert lora > 16 * GIB  # 8.03B bf16 weights alone are 15 GiB


def test_zero_stages_shard_more_and_more(shapes):
    sh, peak = shapes["full"], {}
    for zero in (0, 1, 2, 3):
        peak[zero] = total_bytes(sh, Setup(method="full", zero=zero, gpus=4, checkpointing=True))
    assert peak[3] < peak[2] < peak[1]
    assert peak[1] < total_bytes(sh, Setup(method="full", zero=1, gpus=1, checkpointing=True))


def test_offload_moves_states_to_cpu_ram(shapes):
    from hpml_ft.plan import estimate, peak

    on_gpu = Setup(method="full", zero=3, gpus=4, checkpointing=True)
    offloaded = replace(on_gpu, offload=True)
    assert total_bytes(shapes["full"], offloaded) < total_bytes(shapes["full"], on_gpu) - 25 * GIB
    cpu = peak(estimate(shapes["full"], offloaded), column=2)
    assert cpu > (12 + 4) * shapes["full"].total / 4 * 0.99  # optimizer + fp32 grads per rank on the host


def test_suggested_batch_is_monotone(shapes):
    st = Setup(method="full", zero=3, gpus=4, seq=2048, checkpointing=True)
    by_memory = [largest_batch(shapes["full"], st, g * GIB) for g in (24, 40, 80, 141)]
    assert by_memory == sorted(by_memory) and by_memory[0] == 0 and by_memory[-1] > by_memory[1]
    by_gpus = [largest_batch(shapes["full"], replace(st, gpus=n), 80 * GIB) for n in (2, 4, 8)]
    assert by_gpus == sorted(by_gpus)
    no_ckpt = largest_batch(shapes["full"], replace(st, checkpointing=False), 80 * GIB)
    assert no_ckpt < by_memory[2]
    assert total_bytes(shapes["full"], replace(st, batch=by_memory[2] + 1)) > 0.95 * 80 * GIB


def test_the_8b_recipe_fits_4_a100_40gb_at_its_batch():
    cfg = load_config(FFT_8B)
    st = setup_for(cfg, gpus=4, gpu=True)
    assert (st.zero, st.batch, st.seq, st.checkpointing) == (3, 1, 2048, True)
    sh = model_shape(load_model_config(LLAMA3_8B)[0], "full")
    assert largest_batch(sh, st, 0.95 * 40 * GIB) == cfg.train.per_device_batch_size


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_shape_counts_match_torch_and_peft_on_a_real_model(tiny_model_dir, method):
    """Counts from the meta-device build equal a real model's parameters (torch) and PEFT's trainable ones."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hpml_ft.model import lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sh = model_shape(load_model_config(str(tiny_model_dir))[0], method, 4, "all-linear")
    assert sh.total == sum(p.numel() for p in model.parameters())
    assert sh.head == model.lm_head.weight.numel() and sh.layers == model.config.num_hidden_layers
    assert sh.layer == sum(p.numel() for p in model.model.layers[0].parameters())
    if method == "full":
        assert sh.lora == 0
        return
    cfg = load_config(
        None,
        [f"model.name_or_path={tiny_model_dir}", "peft.r=4", f"peft.method={method}", "train.max_steps=1"],
    )
    peft_model = get_peft_model(model, lora_config(cfg.peft))
    assert sh.lora == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# A made-up shape small enough to do the arithmetic by hand in the comments below.
TOY = Shape(
    total=1000,
    head=100,
    layer=400,
    layers=2,
    linear=800,
    lora=0,
    hidden=8,
    kv_hidden=4,
    inter=16,
    heads=2,
    vocab=100,
)


def _row(rows, name: str) -> float:
    return next(dev for n, dev, _, _ in rows if n == name)


def test_model_state_bytes_by_hand():
    from hpml_ft.plan import estimate

    # full FT, bf16, plain torch AdamW (m, v in bf16, no master copy): 2 + 2 + 2*2 bytes per parameter
    rows = estimate(TOY, Setup(method="full", weights="bfloat16"))
    assert (_row(rows, "weights"), _row(rows, "gradients"), _row(rows, "optimizer states")) == (
        2000,
        2000,
        4000,
    )
    # LoRA on a bf16 base: base 2 B/param + fp32 adapters 4 B/param; only the 50 adapter params train, in fp32
    rows = estimate(replace(TOY, lora=50), Setup(method="lora", weights="bfloat16"))
    assert (_row(rows, "weights"), _row(rows, "gradients"), _row(rows, "optimizer states")) == (
        2200,
        200,
        400,
    )
    # NF4 + double quant: 800 linear weights at 0.5 B + absmax 1 B per 64 + fp32 per 64*256; 200 others at 2 B
    rows = estimate(replace(TOY, lora=50), Setup(method="qlora", weights="nf4"))
    assert _row(rows, "weights") == pytest.approx(800 * (0.5 + 1 / 64 + 4 / (64 * 256)) + 200 * 2 + 50 * 4)
    # ZeRO-2 on 4 GPUs, 8-bit Adam: fp32 master (4) + 2 one-byte states over 4; grads over 4; weights whole
    rows = estimate(TOY, Setup(method="full", zero=2, gpus=4, optimizer="adamw_8bit"))
    assert (_row(rows, "weights"), _row(rows, "gradients"), _row(rows, "optimizer states")) == (
        2000,
        500,
        1500,
    )


def test_activation_bytes_by_hand():
    from hpml_ft.plan import estimate

    st = Setup(method="full", seq=4, batch=2, act_bytes=2, lora_dropout=False)
    # per token per layer (8h + 2h_kv + 4i) * B = (64 + 8 + 64) * 2 = 272 B; 8 tokens -> 2176 B per layer;
    # 2 layers + embedding output and final norm (2 * 8 tokens * 8 * 2 B = 256) = 4608
    assert _row(estimate(TOY, st), "activations") == 4608
    # checkpointing keeps one hidden state per layer (8 tokens * 8 * 2 B = 128) + one layer recomputed
    assert _row(estimate(TOY, replace(st, checkpointing=True)), "activations") == 2 * 128 + 2176 + 256
    # eager attention adds the a*s scores per token: 2 * 2 heads * 4 * 2 B = 32 B -> 8 * 32 * 2 layers
    assert _row(estimate(TOY, replace(st, eager=True)), "activations") == 4608 + 8 * 32 * 2


def test_grpo_generation_phase_by_hand():
    """GRPO: one generation batch (batch x accum sequences) holds its KV cache and one layer's prefill; the
    gradients (plain torch, freed after each step) are not alive then; the peak is the larger phase."""
    from hpml_ft.plan import estimate, peak

    st = Setup(method="full", seq=4, batch=2, accum=3, act_bytes=2, lora_dropout=False, grpo=True)
    rows = estimate(TOY, st)
    # 6 sequences x 4 tokens x 2 layers x (k + v) x kv_hidden 4 x 2 B
    assert _row(rows, "KV cache") == 6 * 4 * 2 * 2 * 4 * 2
    # 24 tokens x (4h + 2h_kv + 3i) * B = (32 + 8 + 48) * 2 = 176 B
    assert _row(rows, "prefill transients") == 24 * 176
    # eager attention adds two s*s score tensors per head: 2 * 6 sequences * 2 heads * 16 * 2 B
    eager = estimate(TOY, replace(st, eager=True))
    assert _row(eager, "prefill transients") == 24 * 176 + 2 * 6 * 2 * 16 * 2
    phases = {ph: sum(d for _, d, _, p in rows if p == ph) for ph in ("all", "train", "fwd", "step", "gen")}
    assert (
        phases["train"] == _row(rows, "gradients") == 2000
    )  # accumulation: alive all step, not while generating
    assert peak(rows) == phases["all"] + max(
        phases["train"] + max(phases["fwd"], phases["step"]), phases["gen"]
    )
    # a generation batch large enough makes generation the peak, and the gradients then do not count
    big = estimate(TOY, replace(st, accum=10**5))
    gen = sum(d for _, d, _, p in big if p == "gen")
    assert peak(big) == sum(d for _, d, _, p in big if p == "all") + gen
    # SFT rows are untouched: no generation rows, same peak as before the GRPO phases existed
    sft = estimate(TOY, replace(st, grpo=False))
    assert not [r for r in sft if r[3] == "gen"]
    assert peak(sft) == peak(rows) == phases["all"] + phases["train"] + max(phases["fwd"], phases["step"])


def test_grpo_scored_tokens_reference_model_and_zero3_gather():
    from hpml_ft.plan import estimate

    st = Setup(method="full", seq=64, batch=1, act_bytes=2, lora_dropout=False, grpo=True, tile_copies=1)
    # the LM head tiles cover only the scored (completion) tokens: 64 -> 8 tokens of 100-word vocab at 2 B
    head = _row(estimate(TOY, st), "LM head + loss") - _row(
        estimate(TOY, replace(st, scored=8)), "LM head + loss"
    )
    assert head == (64 - 8) * 100 * 2 + (64 - 8) * 8 * 4.0  # tiles + fp32 grads of the hidden states
    # beta > 0 on full FT: a frozen copy of the (here ZeRO-3 sharded) weights
    z3 = replace(st, zero=3, gpus=4, ref_model=True)
    rows = estimate(TOY, z3)
    assert _row(rows, "reference model") == _row(rows, "weights") == 2000 / 4
    # ZeRO-3 gathers the other 3 shards to generate; offloaded, its own shard too
    assert _row(rows, "weights gathered to generate") == 3 * 500
    assert _row(estimate(TOY, replace(z3, offload=True)), "weights gathered to generate") == 4 * 500


def test_grpo_setup_from_a_recipe(tiny_model_dir):
    over = [f"model.name_or_path={tiny_model_dir}"]
    cfg = load_config("recipes/grpo_tatqa_embedded.yaml", over)
    gpu, cpu = setup_for(cfg, 1, gpu=True), setup_for(cfg, 1, gpu=False)
    assert (
        gpu.grpo and gpu.scored == cfg.grpo.max_completion_length and cpu.scored == 0
    )  # CPU: every position
    assert not gpu.ref_model  # beta 0: no reference model
    assert setup_for(
        load_config("recipes/grpo_tatqa_embedded.yaml", [*over, "grpo.beta=0.04"]), 1, True
    ).ref_model
    lora = load_config("recipes/grpo_tatqa_embedded.yaml", [*over, "grpo.beta=0.04", "peft.method=lora"])
    assert not setup_for(lora, 1, True).ref_model  # LoRA: the reference is the model with its adapter off
    text = plan_text_for_config(cfg, str(tiny_model_dir))
    assert "KV cache (generation)" in text and "resident + max(training, generation)" in text
    assert "GRPO: measured CPU peaks ran" in text  # the known gap is printed with the plan


def test_plan_text_for_the_dry_run(tiny_model_dir):
    cfg = load_config("recipes/fft_embedded.yaml", [f"model.name_or_path={tiny_model_dir}"])
    text = plan_text_for_config(cfg, str(tiny_model_dir))
    assert "| **peak**" in text and "ZeRO-3" in text and "largest per-device batch that fits" in text


def test_cli_prints_the_table(capsys):
    assert main([FFT_8B, "--gpus", "4", "--gpu-mem-gib", "40"]) == 0
    out = capsys.readouterr().out
    psi = 8_030_261_248  # Llama-3-8B parameters (model card); ZeRO-3 on 4 GPUs, bf16 + fp32 Adam states
    assert f"| weights | {2 * psi / 4 / GIB:.2f} GiB |" in out
    assert f"| optimizer states | {12 * psi / 4 / GIB:.2f} GiB |" in out and "fits" in out
    assert main([FFT_8B, "--gpus", "1", "--gpu-mem-gib", "80"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([FFT_8B, "--gpus", "0"], "--gpus must be at least 1"),
        ([FFT_8B, "--gpu-mem-gib", "-3"], "--gpu-mem-gib must be positive"),
        ([FFT_8B, "--zero", "0", "--offload"], "offload needs DeepSpeed ZeRO"),
        (["recipes/nope.yaml"], "recipe not found"),
        ([FFT_8B, "model.name_or_path=acme/unknown-model"], "no config for 'acme/unknown-model'"),
        (
            ["recipes/fft_embedded.yaml", "peft.method=qlora", "train.deepspeed=null", "--zero", "3"],
            "with ZeRO-3",
        ),
        ([FFT_8B, "--zero", "5"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_process_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "hpml_ft.plan", FFT_8B, "--gpus", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --gpus must be at least 1, got 0"
