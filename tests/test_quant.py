"""Low-bit weights (hpml_ft.quant, torchao): PTQ error bounds, QAT forward/backward, distillation, save/reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hpml_ft.config import load_config
from hpml_ft.errors import UserError

pytest.importorskip("torchao")


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def _quant_cfg(tiny_model_dir, method="full", extra=()):
    return load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"peft.method={method}",
            "train.max_steps=1",
            "quant.bits=2",
            *extra,
        ],
    )


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantize_dequantize_error_within_half_a_step(tiny_model_dir, bits):
    """Round-to-nearest: every weight is within half a quantization step of its group's grid."""
    from torchao.quantization import quantize_

    from hpml_ft.quant.ptq import weight_config

    fp = _tiny(tiny_model_dir)
    q = copy.deepcopy(fp)
    quantize_(q, weight_config(bits, 32, symmetric=False))
    w = fp.model.layers[0].mlp.down_proj.weight.detach()
    qw = q.model.layers[0].mlp.down_proj.weight
    assert type(qw).__name__ == "IntxUnpackedToInt8Tensor"  # really stored as int codes + scales
    deq = qw.dequantize()
    groups, dgroups = w.reshape(w.shape[0], -1, 32), deq.reshape(w.shape[0], -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    err = (groups - dgroups).abs().amax(-1)
    assert torch.all(err <= step / 2 + 1e-5)
    assert err.mean() > 0  # it did round
    assert qw.qdata.min() >= -(2 ** (bits - 1)) and qw.qdata.max() <= 2 ** (bits - 1) - 1


def test_fake_quant_forward_differs_and_gradients_reach_every_weight(tiny_model_dir):
    from hpml_ft.quant.qat import prepare_qat

    fp = _tiny(tiny_model_dir)
    student, teacher = prepare_qat(copy.deepcopy(fp), _quant_cfg(tiny_model_dir))
    assert teacher is None  # no distillation by default: no second model in memory
    names = [type(m).__name__ for m in student.modules()]
    assert names.count("FakeQuantizedLinear") == 2 * 7  # q k v o gate up down per layer, not the LM head
    x = torch.randint(0, 300, (2, 12))
    assert not torch.allclose(student(x).logits, fp(x).logits, atol=1e-3)
    student(x, labels=x).loss.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # straight-through: nothing is cut off


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qat_rounds_exactly_like_the_saved_low_bit_model(tiny_model_dir, bits, symmetric):
    """Training must see the quantizer that is saved: each fake-quantized weight equals the PTQ model's
    dequantized weight (torchao 0.18's own asymmetric fake quantizer fails this: wrong zero-point range)."""
    from hpml_ft.quant.ptq import quantize_model
    from hpml_ft.quant.qat import prepare_qat

    cfg = _quant_cfg(tiny_model_dir, extra=[f"quant.bits={bits}", f"quant.symmetric={symmetric}"])
    student, _ = prepare_qat(_tiny(tiny_model_dir), cfg)
    ptq = dict(quantize_model(tiny_model_dir, bits, cfg.quant.group_size, symmetric).named_modules())
    checked = 0
    for name, mod in student.named_modules():
        if type(mod).__name__ == "FakeQuantizedLinear":
            with torch.no_grad():
                trained_view = mod.weight_fake_quantizer(mod.weight)
            torch.testing.assert_close(trained_view, ptq[name].weight.dequantize(), rtol=0, atol=1e-6)
            checked += 1
    assert checked == 2 * 7


def test_rounding_once_for_eval_gives_the_same_logits_and_restores_training(tiny_model_dir):
    from hpml_ft.quant.qat import prepare_qat, rounded_once

    student, _ = prepare_qat(_tiny(tiny_model_dir), _quant_cfg(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        fake = student(x).logits
        with rounded_once(student) as n:
            assert n == 2 * 7
            assert not any(m.weight_fake_quantizer.enabled for m in _fake_layers(student))
            frozen = student(x).logits
        after = student(x).logits
    torch.testing.assert_close(frozen, fake, atol=1e-5, rtol=1e-5)  # eval sees exactly the QAT forward
    torch.testing.assert_close(after, fake)
    assert all(m.weight_fake_quantizer.enabled for m in _fake_layers(student))
    for n, p in student.named_parameters():  # the trained full-precision weights are back, not rounded ones
        assert torch.equal(p, before[n]), n


def _fake_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "FakeQuantizedLinear"]


def test_fake_quant_base_under_lora_passes_gradients_to_the_adapter(tiny_model_dir):
    from hpml_ft.model import wrap_peft
    from hpml_ft.quant.qat import prepare_qat

    cfg = _quant_cfg(tiny_model_dir, "lora")
    model, _ = prepare_qat(_tiny(tiny_model_dir), cfg)
    model = wrap_peft(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, which would zero A's gradient: give it a value
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, 300, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    bases = [m for n, m in model.named_modules() if n.endswith("base_layer")]
    assert bases and all(type(m).__name__ == "FakeQuantizedLinear" for m in bases)


def test_distillation_loss_is_zero_for_identical_student_and_teacher(tiny_model_dir):
    from hpml_ft.quant.distill import DistillLoss, kl_loss

    logits = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))
    labels[:, :2] = -100
    assert kl_loss(logits, logits.clone(), labels, 2.0).abs() < 1e-6
    assert kl_loss(logits, torch.randn(2, 6, 50), labels, 2.0) > 0.01
    student = _tiny(tiny_model_dir)
    loss = DistillLoss(student, copy.deepcopy(student), weight=1.0, temperature=2.0)
    x = torch.randint(0, 300, (2, 10))
    assert loss(student(input_ids=x), x).abs() < 1e-5  # pure distillation against itself
    mixed = DistillLoss(student, copy.deepcopy(student), weight=0.5, temperature=2.0)
    ce = student(input_ids=x, labels=x).loss
    assert torch.allclose(mixed(student(input_ids=x), x), 0.5 * ce, atol=1e-5)


@pytest.mark.parametrize("embeddings", [False, True])
def test_saved_low_bit_model_reloads_and_generates_the_same_tokens(tiny_model_dir, tmp_path, embeddings):
    from hpml_ft.model import load_causal_lm
    from hpml_ft.quant.ptq import quantize_model, record, save_quantized

    model = quantize_model(tiny_model_dir, 2, 32, quantize_embeddings=embeddings)
    out = tmp_path / "int2"
    save_quantized(model, tiny_model_dir, out, record(2, 32, False, embeddings, str(tiny_model_dir)))
    again = load_causal_lm(str(out))
    assert type(again.model.layers[1].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    head = type(again.lm_head.weight).__name__
    assert (head == "IntxUnpackedToInt8Tensor") == embeddings  # the stated LM-head policy is what was saved
    x = torch.randint(0, 300, (1, 8))
    kw = {"max_new_tokens": 12, "do_sample": False, "min_new_tokens": 12}
    assert torch.equal(model.generate(x, **kw), again.generate(x, **kw))
    rec = json.loads((out / "hpml_ft.json").read_text())["quantization"]
    assert rec["bits"] == 2 and rec["group_size"] == 32 and "IntxWeightOnly" in rec["method"]


def test_qat_run_saves_low_bit_merged_and_full_precision_copy(tiny_model_dir, alpaca_file, tmp_path):
    from test_train import _overrides, _recipe  # noqa: I001 - a sibling test module

    from hpml_ft.model import load_causal_lm
    from hpml_ft.train import main as train_main

    extra = ("quant.bits=4", "quant.distill.weight=0.5")
    ov = _overrides(tiny_model_dir, alpaca_file, tmp_path / "out", "lora", 2, extra)
    assert train_main([str(_recipe(tmp_path)), *ov]) == 0
    run = tmp_path / "out" / "t"
    rec = json.loads((run / "merged" / "hpml_ft.json").read_text())
    assert rec["quantization"]["bits"] == 4 and rec["qat"]["distill"]["weight"] == 0.5
    model = load_causal_lm(str(run / "merged"))
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    fp = load_causal_lm(str(run / "merged-fp"))
    assert type(fp.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    assert json.loads((run / "run.json").read_text())["artifacts"]["merged_fp"] == "merged-fp"


def test_qat_config_cross_checks(tiny_model_dir):
    with pytest.raises(UserError, match="quant.*bitsandbytes"):
        _quant_cfg(tiny_model_dir, "qlora")
    with pytest.raises(UserError, match="quant.bits"):
        load_config(None, ["quant.bits=5"])
    with pytest.raises(UserError, match="train.merge"):
        _quant_cfg(tiny_model_dir, "lora", ["train.merge=false"])
    assert load_config(None, ["train.max_steps=1"]).quant.bits is None  # off by default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embedded", "--bits", "5", "--out", "x"], "--bits 5 is not supported"),
        (["no/such/model/dir", "--bits", "4", "--out", "x"], "model path not found"),
        (["MODEL", "--bits", "8", "--group-size", "48", "--out", "x"], "does not divide"),
    ],
)
def test_quantize_cli_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    from hpml_ft.errors import run_cli
    from hpml_ft.quant.cli import main

    argv = [str(tiny_model_dir) if a == "MODEL" else a for a in argv]
    argv[argv.index("--out") + 1] = str(tmp_path / "q")
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "q").exists()


def test_train_cli_rejects_qat_with_qlora(tmp_path, capsys):
    from hpml_ft.errors import run_cli
    from hpml_ft.train import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nquant: {bits: 2}\npeft: {method: qlora}\ntrain: {max_steps: 1}\n")
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(recipe), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "bitsandbytes" in err, err


def test_quantize_cli_writes_a_model_dir_with_its_measurements(tiny_model_dir, tmp_path, capsys):
    from hpml_ft.quant.cli import main

    out = tmp_path / "q"
    assert main([str(tiny_model_dir), "--bits", "4", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bits"] == 4 and report["size_on_disk_mib"] > 0 and report["tokens_per_s"] > 0
    assert report["packed_weights_mib"] < report["source_size_mib"]
    assert report["cpu_peak_rss_mib"] > 0 and report["load_s"] > 0


def test_recovery_is_the_share_of_the_ptq_loss_that_qat_wins_back():
    """20 questions: fp32 right on 14, PTQ on 10 (a subset), QAT on 13 -> (13 - 10) / (14 - 10) = 0.75, with a
    paired interval that contains it and stays inside what the questions allow."""
    from hpml_ft.bench.lowbit import recovery

    fp32 = [1.0] * 14 + [0.0] * 6
    ptq = [1.0] * 10 + [0.0] * 10
    qat = [1.0] * 13 + [0.0] * 7
    rows = [
        {"name": "fp32", "accuracy": 70.0, "correct": fp32},
        {"name": "PTQ int4", "accuracy": 50.0, "correct": ptq},
        {"name": "QAT int4", "accuracy": 65.0, "correct": qat},
    ]
    rec = recovery(rows, 4)
    assert (
        rec["recovery"] == 0.75 and rec["low"] < 0.75 < rec["high"] and rec["low"] >= 0 and rec["high"] <= 1
    )
    assert recovery(rows[:2], 4) is None  # no QAT row
    assert recovery([{**rows[0], "correct": ptq}, *rows[1:]], 4) is None  # PTQ lost nothing
    perfect = recovery([*rows[:2], {**rows[2], "correct": fp32}], 4)  # QAT answers exactly as fp32: no spread
    assert perfect == {"recovery": 1.0, "low": 1.0, "high": 1.0}


@pytest.mark.slow
def test_bench_lowbit_writes_every_row_json_markdown_and_png(tiny_model_dir, tmp_path):
    from hpml_ft.bench.lowbit import main
    from hpml_ft.quant.ptq import quantize_dir

    qat = tmp_path / "qat"
    quantize_dir(tiny_model_dir, qat, 2, 32)  # stands in for a QAT run's low-bit merged/
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_model_dir), "--qat", str(qat), "--bits", "2", "--limit", "2"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    fast = "PTQ int4 cuda-tinygemm" if torch.cuda.is_available() else "PTQ int4 cpu-int4pack"
    assert names == [
        "fp32",
        "bf16",
        "PTQ int8",
        "PTQ int4",
        fast,
        "PTQ int2",
        "QAT int2",
        "QAT int2 + prompt lookup",
    ]
    for r in res["rows"]:
        assert r["ms_per_token"] > 0 and r["size_on_disk_mib"] > 0 and r["cpu_peak_rss_mib"] > 0
        assert ("tokens_per_s_b8" in r) == ("prompt lookup" not in r["name"])  # lookup runs at batch 1 only
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["fp32"]["speedup_b1"] == 1.0 and rows["bf16"]["dtype"] == "bfloat16"
    assert rows[fast]["dtype"] == "bfloat16" and rows["PTQ int4"]["dtype"] == "float32"
    packed = {r["name"]: r["packed_weights_mib"] for r in res["rows"]}
    assert packed["PTQ int2"] <= packed["PTQ int4"] < packed["PTQ int8"] < packed["fp32"]
    assert "recovery at int2" in (out / "results.md").read_text()
    assert all(len(r["correct"]) == 2 for r in res["rows"])  # per question, for the recovery's interval
    assert (out / "lowbit.png").stat().st_size > 1000
