"""Human-readable outputs: the dry-run summary and the run's model card."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpml_ft.config import ADAPTER_METHODS, Config, dump_config, world_size
from hpml_ft.data import token_stats
from hpml_ft.lora import lora_config
from hpml_ft.model import count_parameters, pretrained

if TYPE_CHECKING:
    from datasets import Dataset


def parameter_counts(cfg: Config, model_path: str) -> tuple[int, int]:
    """(trainable, total) from the model config alone: the model is built on the meta device, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = pretrained(AutoConfig, model_path, cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = pretrained(AutoModelForCausalLM, mcfg, cfg.model.trust_remote_code)
    if cfg.peft.method in ADAPTER_METHODS:
        from peft import get_peft_model

        plain = cfg.peft.model_copy(update={"init_lora_weights": True})  # same counts; no SVD on meta weights
        model = get_peft_model(model, lora_config(plain))
    return count_parameters(model)


def derived_numbers(cfg: Config, model_path: str, train_ds: Dataset, accum: int) -> dict[str, Any]:
    t, procs = cfg.train, world_size()
    trainable, total = parameter_counts(cfg, model_path)
    share = f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    if t.stage == "grpo":
        from hpml_ft.train.grpo import dry_run_numbers  # prompts, generations and completions per step

        return {**dry_run_numbers(cfg, train_ds, accum, procs), "trainable_params": share}
    stats = token_stats(train_ds, t.max_length)
    steps_per_epoch = -(-stats["samples"] // t.effective_batch_size)
    return {
        "processes": procs,
        "effective_batch": f"{t.per_device_batch_size} per device x {accum} accumulation x {procs} processes "
        f"= {t.effective_batch_size}",
        "train_samples": stats["samples"],
        "mean_tokens_per_sample": round(stats["mean_tokens"], 1),
        "truncated_samples": stats["truncated"],
        "tokens_per_step": f"~{round(stats['mean_tokens'] * t.effective_batch_size):,} "
        f"(at most {t.max_length * t.effective_batch_size:,})",
        "batch_layout": (
            f"bfd packing: rows of <= {t.max_length} tokens (per_device_batch_size counts rows)"
            if t.packing
            else f"padding-free: each micro-batch's samples packed into rows of <= {t.max_length} tokens"
            if t.padding_free
            else "padded to the longest sample of each micro-batch"
        ),
        "optimizer_steps": t.max_steps or int(steps_per_epoch * (t.num_epochs or 1)),
        "trainable_params": share,
    }


def print_dry_run(cfg: Config, model_path: str, train_ds: Dataset, accum: int) -> None:
    print("# resolved recipe")
    print(dump_config(cfg))
    print("# derived")
    for k, v in derived_numbers(cfg, model_path, train_ds, accum).items():
        print(f"{k}: {v}")
    try:
        from hpml_ft.plan import plan_text_for_config
    except ImportError:  # the planner is optional in the dry run
        return
    print("# memory estimate")
    print(plan_text_for_config(cfg, model_path))


def model_card(cfg: Config, metrics: dict[str, Any], artifacts: dict[str, str]) -> str:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    grpo = cfg.train.stage == "grpo"
    how = cfg.peft.method + (f", GRPO on rewards {', '.join(cfg.grpo.rewards)}" if grpo else "")
    reward = (
        f"mean reward {metrics['first_reward']} -> {metrics['final_reward']}, "
        if "final_reward" in metrics
        else ""
    )
    rows = [
        f"| {k} | {before.get(k, '-')} | {after.get(k, '-')} |" for k in ("eval_loss", "exact_match", "f1")
    ]
    return "\n".join(
        [
            f"# {cfg.run_name}",
            "",
            f"Fine-tuned from `{cfg.model.name_or_path}` with hpml_ft ({how}) on `{cfg.data.path}`.",
            "",
            "| metric (held-out split) | before | after |",
            "|---|---|---|",
            *rows,
            "",
            f"Steps: {metrics.get('global_step')}, final loss {metrics.get('final_loss')}, {reward}"
            f"runtime {metrics.get('train_runtime_s')} s.",
            "",
            "Artifacts: "
            + ", ".join(f"`{v}/`" for v in artifacts.values())
            + "; the resolved recipe is `recipe.yaml`.",
            "",
            # a run dir resolves to merged/, or to base + adapter when train.merge=false (runs.py)
            'Use it: `python -m hpml_ft.infer --model <this dir> --prompt "..."`',
            "",
        ]
    )
