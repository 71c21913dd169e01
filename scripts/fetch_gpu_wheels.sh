#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on an offline GPU machine whose image has only torch,
# transformers, peft and accelerate (plus their dependencies): run here, with PyPI access.
#   .whl/core/   trl, datasets + pyarrow, deepspeed + its small deps, pydantic          (~61 MiB)
#   .whl/extra/  pandas (datasets imports it), bitsandbytes (QLoRA cases only)           (~53 MiB)
# Two folders because one device call carries at most 64 MiB: send .whl/core with one call and .whl/extra
# with the next (ignored paths stay on the warm machine between calls); gpu_check.sh installs .whl/*/*.whl.
# Versions are pinned to the CPU-tested stack. DeepSpeed is published as an sdist only: it is built here into a
# pure-Python wheel (DS_BUILD_OPS=0: no CUDA compiled, ops JIT-build on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
PYVER=${PYVER:-3.12}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
CORE=(trl==1.16.0 datasets==5.2.0 pyarrow dill multiprocess xxhash hjson msgpack ninja py-cpuinfo einops
      pydantic pydantic-core annotated-types typing-inspection)
EXTRA=(pandas python-dateutil tzdata bitsandbytes==0.50.2)
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}

mkdir -p .whl/core .whl/extra
fetch() {  # $1 = folder, rest = requirements; binary wheels for CPython $PYVER on x86-64 Linux, no deps
    local dir=$1; shift
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$@"
}
fetch .whl/core "${CORE[@]}"
fetch .whl/extra "${EXTRA[@]}"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl/core "$DEEPSPEED"
ls -l .whl/core .whl/extra
for d in .whl/core .whl/extra; do
    mib=$(( $(du -sb "$d" | cut -f1) / 1048576 ))
    echo "$d: ${mib} MiB$([[ $mib -gt 64 ]] && echo ' (over the 64 MiB one device call carries)' || true)"
done
