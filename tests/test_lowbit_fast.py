"""The int4 kernel formats (hpml_ft.lowbit_kernels, quantize --target/--format): the CPU int4pack repack computes
the portable int4 model's weights, a cpu-int4pack dir loads repacked in bf16 and generates, bad combinations of
--bits / --target / --format / --group-size are one error line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hpml_ft.errors import UserError

pytest.importorskip("torchao")


def _portable(tiny_model_dir):
    from hpml_ft.quant.ptq import quantize_model

    return quantize_model(tiny_model_dir, 4, 32).eval()  # the tiny Llama's layers: rows % 16, cols % 32


def _weight_types(model) -> set[str]:
    return {type(m.weight).__name__ for m in model.model.modules() if isinstance(m, torch.nn.Linear)}


def test_int4pack_repack_is_the_portable_int4_model_up_to_rounding(tiny_model_dir):
    """Same codes, scales and zero points on the fused kernel: fp32 logits match the portable model's to float
    rounding, and bf16 (the dtype the format runs in) stays close."""
    from hpml_ft.lowbit_kernels import repack_int4_for_cpu

    portable = _portable(tiny_model_dir)
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        ref = portable(x).logits
        fp32 = copy.deepcopy(portable)
        assert repack_int4_for_cpu(fp32, torch.float32) == (14, 0)  # 7 linear layers x 2, LM head not int4
        assert _weight_types(fp32) == {"Int4OpaqueTensor"}
        assert torch.allclose(fp32(x).logits, ref, atol=1e-4, rtol=1e-4)
        bf16 = copy.deepcopy(portable).to(torch.bfloat16)
        repack_int4_for_cpu(bf16, torch.bfloat16)
        err = (bf16(x).logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 int4pack logits are {err:.3f} (relative) from the portable int4 model's"


def test_a_layer_the_kernel_cannot_take_keeps_its_portable_weights():
    from torchao.quantization import quantize_

    from hpml_ft.lowbit_kernels import int4pack_fits, repack_int4_for_cpu
    from hpml_ft.quant.ptq import weight_config

    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 48, bias=False))
    quantize_(model[0], weight_config(4, 32, False))  # the second layer stays a plain float linear
    assert not int4pack_fits(model[0].weight)  # 40 output rows: the CPU packing needs a multiple of 16
    assert repack_int4_for_cpu(model, torch.float32) == (0, 1)
    assert type(model[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert model(torch.randn(2, 64)).shape == (2, 48)


def test_cpu_int4pack_dir_loads_repacked_in_bf16_and_generates(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import hpml_ft.lowbit_kernels as lk
    from hpml_ft.config import ModelConfig
    from hpml_ft.model import load_causal_lm
    from hpml_ft.quant.ptq import packed_size_mib, quantize_dir

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "int4"
    rec = quantize_dir(tiny_model_dir, out, 4, 32, fmt=lk.CPU_INT4PACK)["quantization"]
    saved = json.loads((out / "hpml_ft.json").read_text())["quantization"]
    assert saved["format"] == rec["format"] == "cpu-int4pack" and saved["compute_dtype"] == "bfloat16"
    assert "_weight_int4pack_mm_for_cpu" in saved["kernel"]
    model = load_causal_lm(str(out))
    assert _weight_types(model) == {"Int4OpaqueTensor"} and model.lm_head.weight.dtype == torch.bfloat16
    assert packed_size_mib(model) < packed_size_mib(_portable(tiny_model_dir))  # bf16 head, codes 2 a byte
    x = torch.randint(0, 300, (1, 8))
    new = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert new.shape == (1, 14)
    with torch.no_grad():
        ref = _portable(tiny_model_dir)(x).logits
        err = (model(x).logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05  # the loaded fast model computes the portable model, in bf16
    capsys.readouterr()
    fp32 = load_causal_lm(str(out), ModelConfig(dtype="float32"))  # asked for fp32: no bf16 kernel
    assert _weight_types(fp32) == {"IntxUnpackedToInt8Tensor"}
    assert "runs its portable int4 weights" in capsys.readouterr().err


def test_portable_format_is_kept_when_asked_and_for_other_bit_widths(tiny_model_dir, tmp_path, monkeypatch):
    from hpml_ft.quant.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, fmt in [
        (["--bits", "4"], "cpu-int4pack"),  # the default target here is cpu
        (["--bits", "4", "--target", "cpu", "--format", "portable"], "portable"),
        (["--bits", "8", "--target", "cpu"], "portable"),
    ]:
        out = tmp_path / "-".join(argv).replace("--", "")
        assert main([str(tiny_model_dir), *argv, "--out", str(out), "--no-measure"]) == 0
        assert json.loads((out / "hpml_ft.json").read_text())["quantization"]["format"] == fmt


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "2", "--format", "fast"], "--format fast is the int4 kernels only"),
        (["--bits", "4", "--group-size", "16"], "the int4 kernels take 32, 64, 128, 256"),
        (["--bits", "4", "--target", "cuda", "--symmetric"], "--symmetric does not fit --target cuda"),
        (["--bits", "4", "--target", "tpu"], "invalid choice: 'tpu'"),
        (["--bits", "4", "--format", "packed"], "invalid choice: 'packed'"),
    ],
)
def test_bad_target_format_combinations_are_one_error_line(tiny_model_dir, tmp_path, capsys, argv, message):
    from hpml_ft.errors import run_cli
    from hpml_ft.quant.cli import main

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(tiny_model_dir), *argv, "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "q").exists()


def test_target_cuda_without_a_gpu_says_where_to_quantize(monkeypatch):
    from hpml_ft.quant.ptq import resolve_format

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="this machine has none"):
        resolve_format(4, 32, "cuda", None)
    assert resolve_format(4, 32, "cuda", "portable") == "portable"  # portable is made anywhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tinygemm format is packed on a GPU")
def test_cuda_tinygemm_dir_loads_and_generates_on_the_gpu(tiny_model_dir, tmp_path):
    from hpml_ft.model import load_causal_lm
    from hpml_ft.quant.ptq import quantize_dir

    out = tmp_path / "int4"
    quantize_dir(tiny_model_dir, out, 4, 32, fmt="cuda-tinygemm")
    model = load_causal_lm(str(out))
    assert _weight_types(model) == {"Int4TilePackedTo4dTensor"}
    x = torch.randint(0, 300, (1, 8), device="cuda")
    assert model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False).shape == (1, 14)
