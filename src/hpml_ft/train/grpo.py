"""train.stage=grpo: the prompt dataset, GRPOConfig from the recipe, the GRPOTrainer, and what a GRPO run reports
(rewards in metrics.json, the dry-run numbers). The run itself is the SFT run's flow (runner.py); only the
trainer differs.

A GRPO step samples grpo.num_generations completions for each of effective_batch_size / num_generations
prompts, scores every completion with grpo.rewards (weighted sum), and moves the policy towards the completions
that beat their group's mean reward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import Config
from hpml_ft.errors import fail
from hpml_ft.lora import loraplus_optimizer
from hpml_ft.train.rewards import TATQA_REWARDS, reward_functions
from hpml_ft.train.trainer import InterruptCallback, sft_arguments

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import GRPOConfig, GRPOTrainer

    from hpml_ft.data import Splits

# SFTConfig arguments sft_arguments sets that GRPOConfig does not have (no answers to tokenize or pack)
SFT_ONLY = ("max_length", "packing", "dataset_kwargs")


def prompt_dataset(cfg: Config, tok: PreTrainedTokenizerBase, splits: Splits) -> Dataset:
    """The training prompts (every turn but the gold answer), with the gold kept as columns for the rewards:
    `answer` (the reference text) and, for TAT-QA, `gold` (the question's gold dict as JSON). Prompts longer than
    train.max_length - grpo.max_completion_length tokens are left out, as SFT leaves out cut-off answers."""
    from datasets import Dataset

    tatqa_named = sorted(TATQA_REWARDS & set(cfg.grpo.rewards))
    if tatqa_named and splits.format != "tatqa":
        fail(
            f"grpo.rewards {', '.join(tatqa_named)} score TAT-QA answers, but {cfg.data.path} is {splits.format} data; "
            "use a TAT-QA file or your own reward (module:function)"
        )
    budget = cfg.train.max_length - cfg.grpo.max_completion_length
    if budget <= 0:
        fail(
            f"train.max_length={cfg.train.max_length} leaves no room for prompts after "
            f"grpo.max_completion_length={cfg.grpo.max_completion_length}; raise train.max_length"
        )
    rows = [prompt_row(s, tok, splits.format) for s in splits.train]
    kept = [r for r in rows if r["prompt_tokens"] <= budget]
    if not kept:
        fail(
            f"every training prompt is longer than train.max_length - grpo.max_completion_length = {budget} "
            f"tokens (shortest {min(r['prompt_tokens'] for r in rows)}); raise train.max_length"
        )
    per_step = cfg.train.effective_batch_size // cfg.grpo.num_generations
    if len(kept) < per_step:
        fail(
            f"{len(kept)} training prompts, fewer than the {per_step} one GRPO step takes "
            "(train.effective_batch_size / grpo.num_generations); lower effective_batch_size or use more data"
        )
    if len(kept) < len(rows):
        print(
            f"[hpml_ft] {len(rows) - len(kept)} of {len(rows)} prompts left out: longer than {budget} tokens "
            f"(train.max_length - grpo.max_completion_length); raise train.max_length to keep them",
            file=sys.stderr,
        )
    return Dataset.from_list(kept)


def prompt_row(sample: dict, tok: PreTrainedTokenizerBase, fmt: str) -> dict[str, Any]:
    prompt = sample["messages"][:-1]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    row = {
        "prompt": prompt,
        "answer": sample["messages"][-1]["content"],
        "prompt_tokens": len(tok(text, add_special_tokens=False)["input_ids"]),
    }
    if fmt == "tatqa":  # JSON: answers are strings, numbers or lists, which one Arrow column cannot mix
        row["gold"] = json.dumps(sample["meta"]["gold"], ensure_ascii=False)
    return row


def grpo_arguments(cfg: Config, accum: int, run_dir: Path | None = None) -> dict[str, Any]:
    """The SFT run's training arguments (optimizer, schedule, batch, checkpoints, precision, tracking) without
    the SFT-only ones, plus grpo.*. Every name is a trl.GRPOConfig field (a test checks them against TRL)."""
    g = cfg.grpo
    shared = {k: v for k, v in sft_arguments(cfg, accum, run_dir).items() if k not in SFT_ONLY}
    return {
        **shared,
        # GRPO batches are lists of prompts, not token tensors: the Trainer cannot count input tokens
        "include_num_input_tokens_seen": "no",
        "eval_strategy": "no",  # no held-out loss: the quick eval scores held-out answers before/after
        "num_generations": g.num_generations,
        "max_completion_length": g.max_completion_length,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "beta": g.beta,
        "num_iterations": g.num_iterations,
        "epsilon": g.epsilon,
        "loss_type": g.loss_type,
        "scale_rewards": g.scale_rewards,
        "reward_weights": list(g.reward_weights) if g.reward_weights is not None else None,
    }


def grpo_config(cfg: Config, accum: int, run_dir: Path | None = None) -> GRPOConfig:
    from trl import GRPOConfig

    try:
        return GRPOConfig(**grpo_arguments(cfg, accum, run_dir))
    except (ValueError, TypeError) as err:
        why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        fail(f"trl.GRPOConfig refused the training arguments ({why}); fix the train: or grpo: keys")


def build_grpo_trainer(
    cfg: Config,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    train_ds: Dataset,
    args: GRPOConfig,
) -> GRPOTrainer:
    """GRPOTrainer over the wrapped model (LoRA/full as for SFT); LoRA+ replaces the stock optimizer."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(cfg.grpo.rewards),
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
        callbacks=[InterruptCallback()],
    )
    trainer.optimizer_cls_and_kwargs = loraplus_optimizer(cfg, args)  # read when the optimizer is created
    return trainer


def drop_reference_adapter(model: Any) -> None:
    """With grpo.beta > 0 TRL keeps the starting LoRA as a second adapter, `ref`: not part of the trained model,
    so it is dropped before the adapter is saved (it would be written as adapter/ref/)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and "ref" in peft_config:
        model.delete_adapter("ref")


def reward_metrics(log_history: list[dict]) -> dict[str, Any]:
    """metrics.json's reward entries: the logged mean reward per log step, and each reward function's curve."""
    logs = [h for h in log_history if "reward" in h]
    if not logs:
        return {}
    names = sorted(
        {k.split("/")[1] for h in logs for k in h if k.startswith("rewards/") and k.endswith("/mean")}
    )
    return {
        "first_reward": logs[0]["reward"],
        "final_reward": logs[-1]["reward"],
        "reward_curve": [h["reward"] for h in logs],
        "rewards": {n: [h.get(f"rewards/{n}/mean") for h in logs] for n in names},
    }


def dry_run_numbers(cfg: Config, train_ds: Dataset, accum: int, procs: int) -> dict[str, Any]:
    """What one GRPO step does: prompts, generations, completions, tokens."""
    t, g = cfg.train, cfg.grpo
    lengths = train_ds["prompt_tokens"]
    prompts_per_step = t.effective_batch_size // g.num_generations
    steps_per_epoch = len(lengths) // prompts_per_step * g.num_iterations  # TRL drops a last partial batch
    return {
        "stage": f"grpo, rewards {', '.join(g.rewards)}"
        + (f" weighted {list(g.reward_weights)}" if g.reward_weights else ""),
        "processes": procs,
        "train_prompts": len(lengths),
        "mean_prompt_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
        "prompts_per_step": prompts_per_step,
        "generations_per_prompt": g.num_generations,
        "completions_per_step": f"{t.per_device_batch_size} per device x {accum} accumulation x {procs} "
        f"processes = {t.effective_batch_size}",
        "generated_tokens_per_step": f"at most {t.effective_batch_size * g.max_completion_length:,} "
        f"({t.effective_batch_size} x {g.max_completion_length})",
        "optimizer_steps": t.max_steps or int(steps_per_epoch * (t.num_epochs or 1)),
    }
