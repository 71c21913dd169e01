"""`python -m hpml_ft.consolidate CHECKPOINT_DIR --out DIR [--tokenizer DIR]`: ZeRO checkpoint -> HF model.

A DeepSpeed checkpoint (`checkpoint-N/global_stepN/`, written by the Trainer under ZeRO-1/2/3, on any number of
ranks) holds the fp32 master weights split over the ranks' optimizer files. DeepSpeed's own `zero_to_fp32`
reassembles them; this wraps it: the model is built from the checkpoint's config.json on the meta device (no
second copy of the weights), the state dict is loaded into it, saved as safetensors with the tokenizer, chat
template and generation config into a temporary directory that is renamed to --out when complete, and then
loaded back with transformers to check every tensor. Host RAM: ~(4 + 2 x dtype bytes) x params (8B in bf16:
~64 GB; --no-verify saves a third).

Untrusted checkpoints: DeepSpeed's shard files are Python pickles, and unpickling a crafted one runs code. They
are loaded with torch's `weights_only` unpickler, which accepts tensors, plain containers and the few DeepSpeed
types listed in SAFE_DEEPSPEED_TYPES; a file that needs anything else is refused. --trust-checkpoint restores
DeepSpeed's unrestricted loading, for checkpoints you wrote yourself or whose source you trust.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import DTYPE_CHOICES
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.merge import set_generation_eos
from hpml_ft.model import pretrained
from hpml_ft.outputs import atomic_dir, check_output_target

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def find_tag(ckpt: Path) -> str:
    """The global_stepN folder to read: the one named in `latest`, else the highest step."""
    if not ckpt.is_dir():
        fail(f"checkpoint not found or not a directory: {ckpt} (pass a checkpoint-N directory)")
    steps = sorted(
        (p for p in ckpt.glob("global_step*") if p.is_dir()),
        key=lambda p: int(re.sub(r"\D", "", p.name) or 0),
    )
    latest = ckpt / "latest"
    if latest.is_file() and (ckpt / latest.read_text().strip()).is_dir():
        return latest.read_text().strip()
    if steps:
        return steps[-1].name
    if ckpt.name.startswith("global_step"):
        fail(f"{ckpt} is the ZeRO shard folder itself; pass its parent checkpoint directory ({ckpt.parent})")
    inner = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    hint = f"; the latest checkpoint here is {inner[-1]}" if inner else ""
    fail(f"{ckpt} holds no ZeRO checkpoint (no global_step*/ folder written by DeepSpeed){hint}")


def check_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        fail("consolidating a ZeRO checkpoint needs DeepSpeed: pip install deepspeed")


# Non-tensor objects a DeepSpeed ZeRO-1/2/3 checkpoint pickles besides containers, numbers and strings
# ("module:qualname"); each is a plain value or enum whose unpickling runs no code of the file's choosing.
SAFE_DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def _safe_types() -> list[Any]:
    import importlib

    found = []
    for entry in SAFE_DEEPSPEED_TYPES:
        module, name = entry.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # not in this DeepSpeed version: nothing to allow
            continue
    return found


@contextmanager
def weights_only_loading(trust: bool) -> Iterator[None]:
    """While active, every torch.load (DeepSpeed's included) uses the weights_only unpickler + our allow-list."""
    import torch

    if trust:
        yield
        return
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_types()):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _refuse_unsafe(ckpt: Path, tag: str, err: Exception) -> None:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors"
    fail(
        f"{ckpt / tag} needs {what} to load, which could run code from the file; it is not a checkpoint type "
        "consolidate knows as safe. If you trust where this checkpoint came from, rerun with --trust-checkpoint"
    )


def fp32_state_dict(ckpt: Path, tag: str, trust: bool = False) -> dict[str, Any]:
    """DeepSpeed's consolidation, lazily where the installed version can (tensors materialise one by one)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = "lazy_mode" in inspect.signature(get_fp32_state_dict_from_zero_checkpoint).parameters
    try:
        kwargs = {"lazy_mode": True} if lazy else {}
        with weights_only_loading(trust):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, **kwargs)
    except pickle.UnpicklingError as err:
        _refuse_unsafe(ckpt, tag, err)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        fail(f"could not read the ZeRO checkpoint in {ckpt / tag}: {first}")


def build_model(ckpt: Path, state: dict[str, Any], dtype: str) -> tuple[PreTrainedModel, torch.dtype]:
    """Model skeleton from the checkpoint's config on the meta device, then the consolidated tensors assigned."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (ckpt / "config.json").is_file():
        fail(
            f"{ckpt} has no config.json, so the model architecture is unknown; it must be a Trainer checkpoint"
        )
    config = pretrained(AutoConfig, ckpt)  # consolidate never runs model code
    target = getattr(torch, dtype) if dtype != "auto" else (getattr(config, "dtype", None) or torch.float32)
    target = getattr(torch, target) if isinstance(target, str) else target
    with torch.device("meta"):
        model = pretrained(AutoModelForCausalLM, config, dtype=target)
    tensors = {k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in state.items()}
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]  # tied weights are filled by now
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[:3]
        what = "lacks" if missing else "has tensors the model does not know,"
        fail(
            f"the checkpoint {what} {', '.join(bad)} (config.json and the ZeRO shards disagree; an adapter "
            "checkpoint? PEFT runs save adapter/ directly and need no consolidation)"
        )
    return model, target


def save(model: PreTrainedModel, out: Path, ckpt: Path, tokenizer: Path, record: dict[str, Any]) -> None:
    """Weights, tokenizer + chat template, generation config: all land in `out` together or not at all."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tok = pretrained(AutoTokenizer, tokenizer)
    except (OSError, ValueError) as err:
        fail(f"no tokenizer in {tokenizer} ({str(err).splitlines()[0][:120]}); pass --tokenizer MODEL_DIR")
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied: once
    with atomic_dir(out, record, need=sum(sizes.values())) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        if (ckpt / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(ckpt).save_pretrained(tmp)
        set_generation_eos(tmp, tok)


def verify(out: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Load the saved model with transformers and compare every consolidated tensor; returns the count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = pretrained(AutoModelForCausalLM, out, dtype=dtype).state_dict()
    bad = [
        k for k, v in state.items() if k not in loaded or not torch.equal(loaded[k], v.to(loaded[k].dtype))
    ]
    if bad or not pretrained(AutoTokenizer, out).chat_template:
        shutil.rmtree(out)  # a model that does not reload as written must not look complete
        what = (
            f"tensor {bad[0]} differs after reloading" if bad else "the saved tokenizer has no chat template"
        )
        fail(f"verification failed: {what}; {out} was removed")
    return len(state)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.consolidate",
        description=__doc__.splitlines()[0],
        epilog="Safety: shard files are pickles, which can run code. They are loaded with torch's weights_only "
        "unpickler (tensors and known DeepSpeed types); a checkpoint needing anything else is refused unless "
        "you pass --trust-checkpoint.",
    )
    p.add_argument(
        "checkpoint", help="a checkpoint-N directory holding global_stepN/ (DeepSpeed ZeRO shards)"
    )
    p.add_argument("--out", required=True, help="where to write the HF model directory")
    p.add_argument("--tokenizer", help="tokenizer source (default: the checkpoint directory)")
    p.add_argument("--tag", help="global_stepN folder to read (default: the one named in `latest`)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="saved weight dtype (default: the training dtype recorded in config.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    p.add_argument(
        "--no-verify", action="store_true", help="skip loading the result back (saves RAM and time)"
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load the shard files with full pickle, which can run code stored in them: only for checkpoints "
        "you trust (default: tensors and known-safe DeepSpeed types only; anything else is refused)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt = Path(args.checkpoint)
    out = check_output_target(args.out, "--out", [ckpt, args.tokenizer], args.overwrite)
    tag = args.tag or find_tag(ckpt)
    if args.tag and not (ckpt / args.tag).is_dir():
        fail(f"--tag {args.tag}: no such folder in {ckpt}")
    tokenizer = Path(args.tokenizer) if args.tokenizer else ckpt
    check_deepspeed()
    state = fp32_state_dict(ckpt, tag, args.trust_checkpoint)
    model, dtype = build_model(ckpt, state, args.dtype)
    tensors = {k: v for k, v in model.state_dict().items() if k in state}
    ranks = len(list((ckpt / tag).glob("*optim_states.pt")))
    record = {
        "source_checkpoint": str(ckpt.resolve()),
        "tag": tag,
        "ranks": ranks,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()),
    }
    save(model, out, ckpt, tokenizer, record)
    del model
    if not args.no_verify:
        n = verify(out, tensors, dtype)
        print(f"[hpml_ft] verified: {n} tensors reload identically with transformers")
    print(
        f"[hpml_ft] consolidated {ckpt / tag} ({ranks} rank(s), {record['params']:,} params, {dtype}) -> {out}"
    )
    print(f"use it: python -m hpml_ft.infer --model_name_or_path {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
