#!/usr/bin/env bash
# Prepared GPU check (<= 8 min on one H100, no network): LoRA / QLoRA / full (ZeRO-3) steps of randomly
# initialised Llama-3.2-1B and Llama-3-8B shapes, measured peak memory / step time / tokens/s next to
# hpml_ft.plan's estimate, written to $OUT/gpu_check.{json,md}.
#
#   bash scripts/fetch_gpu_wheels.sh          # here, with PyPI: fills .whl/core and .whl/extra
#   device call 1: carry [".whl/core"], command "true"            (each call carries at most 64 MiB)
#   device call 2: carry [".whl/extra"], command "bash scripts/gpu_check.sh", timeout 540
#   bash scripts/gpu_check.sh --cpu-smoke     # anywhere: the same code on a tiny config, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python && "${1:-}" == --cpu-smoke ]] && PY=.venv/bin/python

shopt -s nullglob
wheels=(.whl/*/*.whl .whl/*.whl)
if (( ${#wheels[@]} )) && ! $PY -c 'import trl, datasets, deepspeed, bitsandbytes' >/dev/null 2>&1; then
    # The GPU image has torch, transformers, peft and accelerate only; the rest comes from the carried wheels.
    # The target sits under sys.prefix: dill (datasets' fingerprints) pickles modules from anywhere else by
    # value, and pyarrow's types cannot be, so a --target of /tmp/site breaks Dataset.from_dict.
    SITE="$($PY -c 'import sys; print(sys.prefix)')/hpml_site"
    mkdir -p "$SITE" 2>/dev/null && [[ -w "$SITE" ]] || SITE=/tmp/site
    $PY -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY - <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "deepspeed", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - report and go on: the check marks the cases that need it
        print(name, "MISSING", type(err).__name__, str(err)[:120])
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
# Deadline: no new case after 6.5 min, each case at most 4 min, so the whole call stays under 8 min.
$PY scripts/gpu_check.py --out "$OUT" --deadline-s "${DEADLINE_S:-390}" --case-timeout-s 240 "$@" \
    2>&1 | tee "$OUT/gpu_check.log"
