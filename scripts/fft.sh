#!/usr/bin/env bash
# Full fine-tuning end to end: accelerate launch (DeepSpeed ZeRO) -> ZeRO checkpoint -> consolidated HF model
# -> loads with transformers -> the path to give `python -m hpml_ft.infer`. `make fft` runs this.
#
# Environment (all optional):
#   RECIPE             GPU: recipes/fft_llama3_8b_tatqa.yaml; no GPU: recipes/fft_embedded.yaml
#   NUM_GPUS           processes to launch (GPU: all visible GPUs; no GPU: 1, or CPU_PROCS)
#   ACCELERATE_CONFIG  default: the recipe's accelerate_config, else accelerate_configs/deepspeed_zero3.yaml
#   ARGS               extra recipe overrides, e.g. ARGS="train.max_steps=20 train.overwrite=true"
#   SAVE_STEPS         checkpoint interval when the recipe sets none (the last step is always saved)
#   CPU_PROCS          DeepSpeed ranks on a machine without a GPU (default 1; 2 works with train.overwrite=true)
# Without a GPU the same path runs on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then export PATH="$PWD/.venv/bin:$PATH"; fi
PY=${PYTHON:-python}
start=$(date +%s)
say() { echo "[fft] $*"; }

if [[ "$($PY -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" == "True" ]]; then
    RECIPE=${RECIPE:-recipes/fft_llama3_8b_tatqa.yaml}
    NUM_GPUS=${NUM_GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
else
    if [[ -z "${RECIPE:-}" || "$RECIPE" == recipes/fft_llama3_8b_tatqa.yaml ]]; then
        RECIPE=recipes/fft_embedded.yaml
    fi
    NUM_GPUS=${CPU_PROCS:-1}
    export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator: gloo collectives, no CUDA ops
    say "no CUDA GPU here: running $RECIPE on DeepSpeed's CPU accelerator, $NUM_GPUS process(es)"
fi
if ! $PY -c 'import deepspeed' >/dev/null 2>&1; then
    echo "error: DeepSpeed is not installed: pip install deepspeed (or pip install -e '.[deepspeed]')" >&2
    exit 2
fi

# What the recipe resolves to, with the same overrides train will see (so output_dir/run_name overrides count).
read -r RUN_DIR RECIPE_SAVE RECIPE_ACCEL < <($PY - "$RECIPE" ${ARGS:-} <<'EOF'
import sys
from hpml_ft.config import load_config
from hpml_ft.errors import UserError
try:
    cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a])
except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
print(cfg.run_dir, cfg.train.save_steps or "none", cfg.accelerate_config or "none")
EOF
) || exit 2
if [[ "$RECIPE_ACCEL" == none ]]; then RECIPE_ACCEL=accelerate_configs/deepspeed_zero3.yaml; fi
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$RECIPE_ACCEL}
SAVE_ARG=()
if [[ "$RECIPE_SAVE" == none || -n "${SAVE_STEPS:-}" ]]; then SAVE_ARG=("train.save_steps=${SAVE_STEPS:-200}"); fi

say "accelerate launch --config_file $ACCELERATE_CONFIG --num_processes $NUM_GPUS -m hpml_ft.train $RECIPE ${SAVE_ARG[*]} ${ARGS:-}"
# shellcheck disable=SC2086  # ARGS is a list of overrides
accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
    -m hpml_ft.train "$RECIPE" "${SAVE_ARG[@]}" ${ARGS:-}

CKPT=$(ls -d "$RUN_DIR"/checkpoints/checkpoint-* 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$CKPT" || -z "$(ls -d "$CKPT"/global_step* 2>/dev/null)" ]]; then
    say "no ZeRO checkpoint under $RUN_DIR/checkpoints (not a DeepSpeed run?): using $RUN_DIR/merged"
    OUT="$RUN_DIR/merged"
else
    OUT="$RUN_DIR/consolidated"
    say "consolidating $CKPT -> $OUT"
    $PY -m hpml_ft.consolidate "$CKPT" --out "$OUT" --overwrite
fi

# The consolidated fp32 master weights must equal what train saved as merged/ (16-bit gathered on GPUs).
$PY - "$OUT" "$RUN_DIR/merged" "$CKPT" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

out, merged, ckpt = (Path(p) for p in sys.argv[1:4])
model = AutoModelForCausalLM.from_pretrained(out)
print(f"[fft] {out} loads with transformers: {sum(p.numel() for p in model.parameters()):,} parameters")
if out != merged and (merged / "config.json").is_file():
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    final = json.loads((merged.parent / "metrics.json").read_text()).get("global_step")
    ref = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    diff = max((v.float() - ref[k].float()).abs().max().item() for k, v in model.state_dict().items())
    same = "identical to" if diff == 0 else f"max |diff| {diff:.2e} vs"
    print(f"[fft] checkpoint step {step} (final step {final}): weights {same} {merged}")
EOF
say "done in $(( $(date +%s) - start )) s. Use the model:"
say "  python -m hpml_ft.infer --model_name_or_path $OUT"
