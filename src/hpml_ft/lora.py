"""LoRA-family adapters from the recipe's `peft:` section: the LoraConfig (rsLoRA, PiSSA/OLoRA init,
modules_to_save, `peft.extra`), the PiSSA/OLoRA conversion at save, and the LoRA+ optimizer.

PiSSA and OLoRA start the adapter from W's principal directions and subtract that start from W, so a checkpoint
only fits the modified base. The run keeps the adapter as initialised (`checkpoints/adapter_init/`) and the saved adapter is
converted (PEFT `path_initial_model_for_weight_conversion`) into a plain rank-2r LoRA on the original base:
merge, infer and eval then load it like any other adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import PreTrainedModel, TrainingArguments

    from hpml_ft.config import Config, PeftConfig

# inside the run dir: the PiSSA/OLoRA adapter before training (beside the checkpoints; its name is PEFT's adapter name)
INIT_DIR = Path("checkpoints") / "adapter_init"


def lora_config(p: PeftConfig) -> LoraConfig:
    """peft.LoraConfig from the recipe; `peft.extra` names were checked against LoraConfig when it loaded."""
    from peft import LoraConfig

    try:
        return LoraConfig(
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=p.target_modules,
            use_dora=p.method == "dora",
            use_rslora=p.use_rslora,
            init_lora_weights=p.init_lora_weights,
            modules_to_save=p.modules_to_save,
            task_type="CAUSAL_LM",
            **p.extra,
        )
    except (ValueError, TypeError) as err:
        why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        fail(f"peft.LoraConfig refused the peft: section ({why}); fix peft.extra or the peft keys")


def save_initial_adapter(
    model: PreTrainedModel, cfg: Config, run_dir: Path, main_process: bool
) -> Path | None:
    """PiSSA/OLoRA: keep the adapter as initialised, to convert the trained one at save. None otherwise."""
    if not cfg.peft.moves_base_weights:
        return None
    init = run_dir / INIT_DIR
    if main_process:
        model.save_pretrained(str(init))
    return init


def convert_saved_adapter(model: PreTrainedModel, adapter_dir: Path, init: Path | None) -> None:
    """Rewrite adapter_dir as a plain LoRA on the original base (no-op unless PiSSA/OLoRA)."""
    if init is None:
        return
    model.save_pretrained(str(adapter_dir), path_initial_model_for_weight_conversion=str(init))
    print(
        "[hpml_ft] adapter: PiSSA/OLoRA start subtracted back; saved as a plain LoRA (rank 2r) on the original base"
    )


class LoraPlusOptimizer:
    """LoRA+ as a transformers optimizer factory: the Trainer calls LoraPlusOptimizer()(model, **kwargs) when it
    builds the optimizer (after any wrapping), so DeepSpeed/FSDP and resume work as with the stock optimizer."""

    def __call__(
        self,
        model: torch.nn.Module,
        *,
        optimizer_cls: type,
        lr: float,
        loraplus_lr_ratio: float,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, **kwargs
        )


def loraplus_optimizer(cfg: Config, args: TrainingArguments) -> tuple[Any, dict[str, Any]] | None:
    """(factory, kwargs) for SFTTrainer(optimizer_cls_and_kwargs=...): train.optimizer with lora_B at ratio x lr."""
    ratio = cfg.peft.loraplus_lr_ratio
    if not ratio:
        return None
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    kwargs = {**kwargs, "optimizer_cls": optimizer_cls, "loraplus_lr_ratio": ratio}
    return LoraPlusOptimizer, {**kwargs, "loraplus_weight_decay": args.weight_decay}
