"""The recipe schema: every section, every default, and the checks across sections (loading is in load.py).

Over 300 lines: the one home of every recipe key and its default, with the checks that span sections; a
section could move to its own module (with its checks) if this grows much further.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config.extras import check_extra

Method = Literal["none", "lora", "qlora", "dora", "full"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ADAPTER_METHODS: tuple[str, ...] = (
    "lora",
    "qlora",
    "dora",
)  # methods that train an adapter (merged at the end)
TRAIN_METHODS: tuple[str, ...] = (*ADAPTER_METHODS, "full")  # methods a run or a bench row can train with
DTYPE_CHOICES: tuple[str, ...] = get_args(
    Dtype
)  # --dtype of every CLI; auto: bf16 on capable GPUs, fp32 on CPU
# One plain file/directory name, never a path (no separators, no '..', nothing hidden): run names inside
# train.output_dir, eval labels (predictions/<label>.jsonl).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Section(BaseModel):
    # nan/inf pass every gt/ge bound check (all comparisons with nan are False): refuse them everywhere
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = EMBEDDED_MODEL  # "embedded", a local HF directory, or a hub id
    dtype: Dtype = "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    load_in_4bit: bool = False  # implied by peft.method=qlora
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_quantization(self) -> ModelConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; pick one")
        return self


class DataConfig(_Section):
    # "demo" = the generated offline demo set; else a .json/.jsonl path or a hub dataset id.
    path: str = "demo"
    format: Literal["auto", "alpaca", "chat", "tatqa"] = "auto"
    split: str = "train"  # split to read when `path` is a hub id
    eval_path: str | None = None  # a separate eval file/hub id; else `eval_fraction` of `path` is held out
    eval_split: str | None = (
        None  # a named split (e.g. "test") of eval_path, or of path when eval_path is unset
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_samples: int | None = Field(None, gt=0)  # cap after loading, for quick runs
    max_eval_samples: int | None = Field(None, gt=0)
    system_prompt: str | None = None
    tatqa_multi_turn: bool = False  # all questions of one context in one conversation (table read once)
    # TAT-QA assistant turns: the plain answer; or, for arithmetic/count, the derivation the executor computes
    # (`(44.1 - 56.7) / 56.7 * 100 | percent`, `count: a | b`); `extract` adds the labelled values first
    tatqa_target: Literal["answer", "derivation", "extract"] = "answer"
    tatqa_table: Literal["pipe", "cells"] = "pipe"  # cells: one `row label, column: value` line per cell
    demo_size: int = Field(800, gt=10)
    seed: int = 0  # split/shuffle seed, separate from the training seed


class PeftConfig(_Section):
    method: Method = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r, so high ranks keep learning (axolotl
    # `peft_use_rslora`, LLaMA-Factory `use_rslora`)
    use_rslora: bool = False
    # How A and B start: true = B zero (plain LoRA); gaussian; pissa / pissa_niter_<n> (principal singular
    # vectors of W, fast randomized SVD with n iterations); olora (QR of W). pissa/olora move part of W into the
    # adapter: the saved adapter is converted back to plain LoRA on the original base (rank 2r)
    init_lora_weights: bool | str = True
    # LoRA+: lora_B learns at ratio x train.learning_rate (paper: 16); None = off (axolotl `loraplus_lr_ratio`)
    loraplus_lr_ratio: float | None = Field(None, ge=1.0)
    # modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = {}  # any other peft.LoraConfig field, e.g. {bias: lora_only}

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, v: bool | str) -> bool | str:
        if isinstance(v, bool) or v in ("gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        raise ValueError(
            f"peft.init_lora_weights={v!r} is not supported; use true, false, gaussian, pissa, pissa_niter_<n> "
            "(e.g. pissa_niter_4) or olora"
        )

    @field_validator("extra")
    @classmethod
    def _lora_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_extra("peft.extra", v)

    @property
    def moves_base_weights(self) -> bool:
        """PiSSA/OLoRA subtract the adapter's start from W: saving must convert the adapter back."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith(
            ("pissa", "olora")
        )


class TrainConfig(_Section):
    # sft: supervised fine-tuning on the answers (SFTTrainer); grpo: reward fine-tuning on the prompts with
    # sampled answers scored by grpo.rewards (GRPOTrainer), usually from a finished SFT run
    stage: Literal["sft", "grpo"] = "sft"
    output_dir: str = "outputs"
    run_name: str | None = None  # default: the recipe's `name`
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal[
        "cosine",
        "linear",
        "constant",
        "constant_with_warmup",
        "cosine_with_min_lr",
        "cosine_with_restarts",
        "polynomial",
    ] = "cosine"
    # scheduler arguments, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr, {num_cycles: 2} for cosine_with_restarts
    lr_scheduler_kwargs: dict[str, Any] = {}
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    num_epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    per_device_batch_size: int = Field(8, gt=0)  # also the eval-loss batch
    effective_batch_size: int = Field(8, gt=0)  # accumulation = effective / (per-device x processes)
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_length: int = Field(512, gt=8)
    # bfd packing: samples packed into max_length rows before batching (per_device_batch_size then counts rows)
    packing: bool = False
    padding_free: bool = False  # a micro-batch's samples packed into rows, no padding (train/packing.py)
    logging_steps: int = Field(5, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # None: evaluate at the end only
    save_steps: int | None = Field(None, gt=0)  # None: no intermediate checkpoints
    save_total_limit: int = Field(2, gt=0)
    seed: int = 42
    deepspeed: str | None = None  # path to a deepspeed/*.json
    resume: str | None = None  # "auto" (latest checkpoint in the run dir) or a checkpoint path
    overwrite: bool = False  # replace a finished run in the same directory
    merge: bool = True  # write a merged standalone model next to the adapter
    eval_generate: int = Field(64, ge=0)  # held-out samples answered before/after training (0 = skip)
    max_new_tokens: int = Field(64, gt=0)
    generate_batch_size: int | None = Field(
        None, gt=0
    )  # before/after answers; None: 2 x per_device_batch_size
    cpu_threads: int | None = Field(
        None, gt=0
    )  # torch threads per process on CPU; None = cores / local processes
    # pin glibc's mmap threshold so freed tensors go back to the OS (system/allocator.py): TAT-QA LoRA peak RSS
    # 4.18 -> 2.63 GB but +35% step time on CPU (page faults on every large allocation). Off = glibc's default
    release_host_memory: bool = False
    sample_every: int = Field(
        25, ge=0
    )  # every N steps answer a few fixed eval prompts -> samples.jsonl (0 = off)
    sample_prompts: int = Field(3, gt=0)  # how many fixed eval prompts each sampling answers
    # NEFTune: uniform noise of scale alpha/sqrt(length x hidden) on the input embeddings while training
    # (paper: 5); None = off (axolotl/LLaMA-Factory `neftune_noise_alpha`)
    neftune_noise_alpha: float | None = Field(None, gt=0)
    use_liger_kernel: bool = (
        False  # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, CE): pip install liger-kernel
    )
    dataloader_num_workers: int = Field(0, ge=0)  # processes that prepare batches; 0 = the training process
    sft_extra: dict[
        str, Any
    ] = {}  # any other trl.SFTConfig field, e.g. {adam_beta2: 0.95, torch_compile: true}

    @field_validator("sft_extra")
    @classmethod
    def _sft_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_extra("train.sft_extra", v)


class GrpoConfig(_Section):
    """train.stage=grpo (TRL GRPOTrainer). Optimizer, schedule, steps, checkpoints and the quick eval are train.*;
    train.per_device_batch_size / effective_batch_size count completions: effective / num_generations prompts
    per optimizer step. train.max_length bounds prompt + completion (longer prompts are left out)."""

    # names from train/rewards.py (tatqa_correct, tatqa_f1, tatqa_scale, tatqa_format) or module:function
    rewards: list[str] = []
    reward_weights: list[float] | None = None  # one per reward, summed before the advantage; None = all 1.0
    num_generations: int = Field(4, ge=2)  # completions per prompt: advantages compare a prompt's completions
    max_completion_length: int = Field(64, gt=0)  # tokens sampled per completion
    temperature: float = Field(1.0, gt=0)  # sampling temperature: too low and a group's completions are equal
    top_p: float = Field(1.0, gt=0, le=1)
    # KL penalty to the starting model; 0 = no reference model (TRL's default: no second forward pass)
    beta: float = Field(0.0, ge=0)
    num_iterations: int = Field(1, gt=0)  # optimizer passes over each generated batch (mu in the GRPO paper)
    epsilon: float = Field(0.2, gt=0)  # clip range of the policy ratio
    # dapo (TRL's default): token-level mean over the batch; grpo: per-sequence mean; dr_grpo: fixed normalizer
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo"
    # advantages divided by the reward std of the prompt's group, of the batch, or not at all (Dr. GRPO)
    scale_rewards: Literal["group", "batch", "none"] = "group"

    @model_validator(mode="after")
    def _weights_match(self) -> GrpoConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"grpo.reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} grpo.rewards; "
                "give one weight per reward (or drop reward_weights for all 1.0)"
            )
        return self


class DistillConfig(_Section):
    # loss = (1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T); 0 = no teacher loaded
    weight: float = Field(0.0, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)


class QuantConfig(_Section):
    """Low-bit weights (hpml_ft.quant): bits=null is off; else QAT during training (qat) and the real low-bit
    model written at save (merged/ holds it, merged-fp/ the full-precision weights)."""

    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int = Field(32, gt=0)  # one scale (and zero point) per group of input weights
    symmetric: bool = False  # asymmetric (with zero point) keeps more range at 2 bits (BitDistiller)
    qat: bool = True  # fake-quantized linear weights in the forward pass, straight-through gradients
    quantize_embeddings: bool = False  # also the input embeddings / LM head at save (they stay fp by default)
    distill: DistillConfig = DistillConfig()


class TrackingConfig(_Section):
    report_to: list[Literal["none", "wandb", "tensorboard", "trackio"]] = ["none"]
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline by default: no network needed
    project: str = "hpml_ft"


class Config(_Section):
    name: str = "run"
    accelerate_config: str | None = None  # documentation/launch hint: accelerate_configs/*.yaml
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    quant: QuantConfig = QuantConfig()
    grpo: GrpoConfig = GrpoConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        t, p = self.train, self.peft
        if not SAFE_NAME.fullmatch(self.run_name):
            key = "train.run_name" if t.run_name is not None else "name"
            raise ValueError(
                f"{key}={self.run_name!r} must be one plain directory name (letters, digits, '.', '_', '-', "
                "starting with a letter or digit), not a path: runs always live inside train.output_dir"
            )
        if (t.num_epochs is None) == (t.max_steps is None):
            raise ValueError(
                "set exactly one of train.num_epochs and train.max_steps "
                "(override the other with =null, e.g. train.num_epochs=null train.max_steps=50)"
            )
        if t.effective_batch_size % t.per_device_batch_size:
            raise ValueError(
                f"train.effective_batch_size={t.effective_batch_size} is not a multiple of "
                f"train.per_device_batch_size={t.per_device_batch_size}; make it one"
            )
        if p.method == "qlora" and self.model.load_in_8bit:
            raise ValueError("peft.method=qlora loads the base in 4-bit; drop model.load_in_8bit")
        if p.method == "full" and (self.model.load_in_4bit or self.model.load_in_8bit):
            raise ValueError(
                "full fine-tuning cannot train quantized weights; use peft.method=qlora or unset load_in_*"
            )
        if p.method == "dora" and self.model.load_in_8bit:
            raise ValueError("DoRA with 8-bit weights is not supported by PEFT; use 4-bit (qlora) or none")
        if (p.method == "qlora" or self.model.load_in_4bit) and t.deepspeed and "3" in Path(t.deepspeed).stem:
            raise ValueError(
                "QLoRA (4-bit) with DeepSpeed ZeRO-3 is not supported here; use deepspeed/zero2.json or no DeepSpeed"
            )
        if self.quant.bits is not None and (self.quantized_4bit or self.model.load_in_8bit):
            raise ValueError(
                "quant (QAT / low-bit save) needs full-precision base weights: it cannot train on a bitsandbytes "
                "4/8-bit base; use peft.method=lora (or full) and unset model.load_in_*"
            )
        if self.quant.bits is not None and p.method not in ("full", "none") and not t.merge:
            raise ValueError("quant writes the low-bit model from merged/; set train.merge=true")
        if self.quant.bits is not None and self.quant.distill.weight > 0 and t.deepspeed:
            raise ValueError("quant.distill with DeepSpeed is not supported; set quant.distill.weight=0")
        self._check_lora_options()
        self._check_grpo()
        return self

    def _check_grpo(self) -> None:
        t, g = self.train, self.grpo
        if t.stage != "grpo":
            return
        if not g.rewards:
            raise ValueError(
                "train.stage=grpo needs grpo.rewards, e.g. grpo.rewards=[tatqa_correct,tatqa_format] (built-in names "
                "or module:function)"
            )
        if t.effective_batch_size % g.num_generations:
            raise ValueError(
                f"train.effective_batch_size={t.effective_batch_size} counts completions and must be a multiple of "
                f"grpo.num_generations={g.num_generations} (whole groups per step)"
            )
        sft_only = {
            "train.packing": t.packing,
            "train.padding_free": t.padding_free,
            "train.neftune_noise_alpha": t.neftune_noise_alpha is not None,
            "train.sft_extra": bool(t.sft_extra),
            "train.eval_steps": t.eval_steps is not None,  # no held-out loss: the quick eval scores answers
            "data.tatqa_multi_turn": self.data.tatqa_multi_turn,  # GRPO prompts are one question each
            "quant.bits": self.quant.bits is not None,
        }
        if set_keys := [k for k, on in sft_only.items() if on]:
            raise ValueError(
                f"{', '.join(set_keys)} apply to train.stage=sft, not grpo; unset them (GRPO runs take train.* "
                "optimizer/batch/checkpoint keys and grpo.*)"
            )

    def _check_lora_options(self) -> None:
        p, t = self.peft, self.train
        init = p.init_lora_weights
        if p.method in ("full", "none") and (p.loraplus_lr_ratio or init is not True):
            raise ValueError(
                f"peft.loraplus_lr_ratio / peft.init_lora_weights apply to LoRA adapters, not peft.method={p.method}; "
                "unset them or use peft.method=lora"
            )
        if (
            isinstance(init, str)
            and init.startswith("pissa")
            and (self.quantized_4bit or self.model.load_in_8bit)
        ):
            raise ValueError(
                "PiSSA needs full-precision base weights (PEFT cannot take the SVD of a bitsandbytes 4/8-bit base); "
                "use peft.method=lora, or peft.init_lora_weights=olora which works with qlora"
            )
        if p.moves_base_weights and t.deepspeed and "3" in Path(t.deepspeed).stem:
            raise ValueError(
                f"peft.init_lora_weights={init} reads the whole weights, which ZeRO-3 shards; use deepspeed/zero2.json"
            )
        if p.moves_base_weights and self.quant.bits is not None:
            raise ValueError(
                f"peft.init_lora_weights={init} with quant (QAT) is not supported; use true or gaussian"
            )

    @property
    def quantized_4bit(self) -> bool:
        return self.peft.method == "qlora" or self.model.load_in_4bit

    @property
    def run_name(self) -> str:
        return self.train.run_name if self.train.run_name is not None else self.name

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.run_name
