"""Defaults of the command-line tools (generation, evaluation, judge, bench): one place, imported by every CLI.

Recipe settings live in `hpml_ft.config` (the pydantic schema); these are the knobs of commands that run
without a recipe. Pure constants: no heavy imports.
"""

from __future__ import annotations

# --- generation, evaluation, judge, serve, bench (owner: eval/runs refactor) ---
# Answer lengths, one per use: generation stops earlier at the end-of-turn token, so a cap only bounds a
# model that rambles; each is the shortest that does not cut a normal answer of that kind.
INFER_MAX_NEW_TOKENS = 128  # infer --prompt/--sid/--chat: a free-form reply of a few sentences
EVAL_MAX_NEW_TOKENS = 64  # eval QA: short answers (TAT-QA spans/numbers/derivations, Alpaca one-liners)
IFEVAL_MAX_NEW_TOKENS = 512  # eval --ifeval: instructions ask for paragraphs, word counts, lists
SAFETY_MAX_NEW_TOKENS = 10  # eval --safety: "safe" / "unsafe" (+ a category code) on the first line
JUDGE_MAX_NEW_TOKENS = 256  # the judge's feedback paragraph and its `[RESULT] N` line
# Batches: prompts per generate call (left padded). 8 keeps a 135M-1B model busy without padding waste.
INFER_BATCH_SIZE = 8
EVAL_BATCH_SIZE = 8
JUDGE_BATCH_SIZE = 4  # a local judge reads long prompts (instruction + answer + rubric): half the batch
# Sampling (infer): greedy unless a temperature > 0 is asked for.
TEMPERATURE = 0.0
TOP_P = 1.0
SEED = 0
# Voting (eval --samples K): K sampled outputs per question vote on their executed answers; the usual
# self-consistency temperature (high enough for distinct derivations, low enough to stay on task).
VOTE_SAMPLES = 1  # 1 = greedy only
VOTE_TEMPERATURE = 0.7
# Judge over HTTP (an OpenAI-compatible endpoint)
JUDGE_TIMEOUT_S = 120.0  # per request: a long judge reply on a busy server
JUDGE_PROBE_TIMEOUT_S = 10.0  # the GET /models pre-check: a server that never answers fails fast
JUDGE_CONCURRENCY = 4  # requests in flight at once; servers batch them (vLLM, transformers serve)
# extra tries of a failed request (connection error, time-out, HTTP 408/409/429/5xx) before it counts as an
# error; the `openai` client waits 0.5 s * 2**k (at most 8 s) before retry k, or the server's Retry-After
JUDGE_RETRIES = 2
# Serve
SERVE_HOST = "127.0.0.1"  # this machine only; 0.0.0.0 exposes the model without authentication
SERVE_PORT = 8000
# Where finished runs and results are looked up / written
RUNS_DIR = "outputs"
# Bench (`python -m hpml_ft.bench`): the CPU-sized defaults behind the README Performance tables
BENCH_REPEATS = 3  # generate: timed repeats, the median is reported
BENCH_STEPS = 3  # train: timed optimizer steps (median)
BENCH_WARMUP = 1  # train: untimed steps first (allocator, kernel selection)
BENCH_BATCHES = "1,16"  # generate: single-stream latency and a batched throughput point
BENCH_IN_TOKENS = 256  # generate: synthetic prompt length
BENCH_OUT_TOKENS = 32  # generate: forced answer length
PROMPT_LOOKUP_TOKENS = 10  # n-gram length of prompt lookup decoding (bench generate, bench lowbit)
# Low-bit (`quantize`, `bench lowbit`)
LOWBIT_BITS = 2  # bench lowbit: the PTQ/QAT rows compared
LOWBIT_GROUP_SIZE = 32  # weights per scale
LOWBIT_LIMIT = 64  # bench lowbit: eval samples
LOWBIT_MAX_NEW_TOKENS = 32  # bench lowbit: answer length


# --- planner (owner: plan refactor) ---
PLAN_GPU_MEM_GIB = 80.0  # `plan --gpu-mem-gib` default: one 80 GB A100/H100
PLAN_USABLE_FRACTION = 0.95  # of device memory; the rest absorbs allocator fragmentation spikes
PLAN_OVERHEAD_GIB_GPU = 2.0  # CUDA context, cuBLAS workspaces, NCCL buffers, fragmentation
PLAN_OVERHEAD_GIB_CPU = 0.75  # resident size of a Python process with torch + transformers imported
PLAN_LM_HEAD_TILES_GPU = 2  # loss tiles alive at once on a GPU
PLAN_LM_HEAD_TILES_CPU = 8  # the CPU fallback makes temporary copies (measured)
PLAN_MAX_BATCH = 4096  # upper bound of the largest-batch search
