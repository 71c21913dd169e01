"""`python -m hpml_ft.infer`: answer eval samples (--sid), free-form prompts (--prompt) or chat (--chat).

Defaults: the eval split of the latest finished run under outputs/, answered by the base model and every
finished run that holds out the same split (e.g. a LoRA and a full-FT run of one data set); without a run, the
embedded model. `--compare base,outputs/run_a,...` answers with several models side by side.

Over 300 lines: three modes (--sid, --prompt, --chat) share one argument set and one output layout; model
resolution lives in runs.py, generation in generation.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import DTYPE_CHOICES, DataConfig, load_config
from hpml_ft.config import runtime as rt
from hpml_ft.data import load_samples, load_splits
from hpml_ft.errors import ArgumentParser, UserError, fail, finite_float, run_cli
from hpml_ft.generation import generate
from hpml_ft.outputs import finished_runs, latest_finished_run
from hpml_ft.runs import ModelSpec, load, model_config, resolve, run_config, run_of, with_adapter
from hpml_ft.scoring import score_samples
from hpml_ft.system.threads import apply_cpu_threads
from hpml_ft.tatqa.render import render_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.infer", description=__doc__.splitlines()[0])
    what = p.add_argument_group("what to answer (default: --sid 0)")
    what.add_argument("--sid", type=int, nargs="+", help="eval-set index(es), e.g. --sid 100 500 900")
    what.add_argument("--prompt", action="extend", nargs="+", help="free-form prompt(s); repeatable")
    what.add_argument("--chat", action="store_true", help="interactive chat, streamed (/reset, /exit)")
    what.add_argument("--system-prompt", help="system message (replaces a sample's own)")
    model = p.add_argument_group(
        "models (default: the base and every finished run under outputs/ sharing the latest run's eval split)"
    )
    model.add_argument("--model_name_or_path", "--model", help="'embedded', a run dir, model dir or hub id")
    model.add_argument("--adapter", help="LoRA adapter dir (or run dir) applied to the base, unmerged")
    model.add_argument("--compare", help="comma-separated models: base|embedded|RUN_DIR|MODEL_DIR")
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in a model dir (config.json auto_map); never taken from a run's "
        "record: only for models you trust",
    )
    data = p.add_argument_group("eval set (default: the eval split of the run's recipe)")
    data.add_argument("--data", help=".json/.jsonl file: all of it is the eval set unless --recipe is given")
    data.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat", "tatqa"])
    data.add_argument("--recipe", help="recipe YAML whose eval split to use (with --data: split that file)")
    gen = p.add_argument_group("generation (greedy unless --temperature > 0)")
    gen.add_argument("--max-new-tokens", type=int, default=rt.INFER_MAX_NEW_TOKENS)
    gen.add_argument(
        "--batch-size", type=int, default=rt.INFER_BATCH_SIZE, help="prompts per generate call (left padded)"
    )
    gen.add_argument("--temperature", type=finite_float, default=rt.TEMPERATURE)
    gen.add_argument("--top-p", type=finite_float, default=rt.TOP_P)
    gen.add_argument("--seed", type=int, default=rt.SEED, help="sampling seed")
    gen.add_argument("--no-cache", action="store_true", help="use_cache=False: KV cache off (benchmarking)")
    gen.add_argument("--prompt-lookup", type=int, metavar="N", help="prompt lookup decoding, N tokens")
    gen.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return check_args(p.parse_args(argv))


def check_args(a: argparse.Namespace) -> argparse.Namespace:
    """Conflicts and ranges, checked before anything heavy is imported."""
    if sum(bool(x) for x in (a.sid, a.prompt, a.chat)) > 1:
        fail("pick one of --sid, --prompt and --chat")
    if a.compare and (a.model_name_or_path or a.adapter):
        fail("--compare names every model itself; drop --model_name_or_path/--adapter or drop --compare")
    if a.chat and (a.compare or a.json):
        fail("--chat talks to one model in plain text; drop --compare/--json")
    if a.max_new_tokens < 1 or a.batch_size < 1 or (a.prompt_lookup is not None and a.prompt_lookup < 1):
        fail("--max-new-tokens, --batch-size and --prompt-lookup must be positive")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        fail("--temperature must be >= 0 and --top-p in (0, 1]")
    a.compare = [e.strip() for e in a.compare.split(",") if e.strip()] if a.compare else None
    a.sid = a.sid or ([] if a.prompt or a.chat else [0])
    return a


# ---------------------------------------------------------------- which models


def model_specs(a: argparse.Namespace) -> tuple[list[ModelSpec], Path | None]:
    """The models to answer with (resolved by `hpml_ft.runs`), and the run their data/base come from: the run
    of the first named model that has one, else the latest finished run, else None."""
    named = a.compare or [x for x in (a.model_name_or_path, a.adapter) if x]
    ref_run = next((r for r in map(run_of, named) if r), None) or latest_finished_run(rt.RUNS_DIR)
    if a.compare:
        return [resolve(e, ref_run) for e in a.compare], ref_run
    if a.adapter:
        return [with_adapter(a.adapter, a.model_name_or_path, ref_run)], ref_run
    if a.model_name_or_path:
        return [resolve(a.model_name_or_path, ref_run)], ref_run
    if ref_run is None:
        return [resolve(EMBEDDED_MODEL)], None
    if a.chat:  # a chat talks to one model: the latest run's
        return [resolve(str(ref_run))], ref_run
    return [resolve("base", ref_run), *map(resolve, sibling_runs(ref_run))], ref_run


def sibling_runs(ref_run: Path) -> list[str]:
    """No model named: the finished runs under outputs/ that hold out the same eval split as `ref_run` (the
    same data section: file, format, fraction, seed), oldest first, so that `--sid N` shows the base and, e.g.,
    the LoRA and the full-FT run of one data set side by side. A run whose recipe no longer loads is passed
    over."""
    want = run_config(ref_run).data
    runs = []
    for run in finished_runs(rt.RUNS_DIR):
        try:
            same = run == ref_run or run_config(run).data == want
        except UserError:
            same = False
        if same:
            runs.append(str(run))
    return runs


# ---------------------------------------------------------------- which samples


def eval_set(a: argparse.Namespace, ref_run: Path | None) -> tuple[list[dict], str, str]:
    """(samples, format, where they come from)."""
    if a.data and not a.recipe:
        samples, fmt = load_samples(a.data, a.format)
        return samples, fmt, f"file {a.data}"
    if a.recipe:
        extra = [f"data.path={a.data}", f"data.format={a.format}", "data.eval_path=null"] if a.data else []
        data, source = load_config(a.recipe, extra).data, a.recipe
    elif ref_run:
        data, source = run_config(ref_run).data, str(ref_run)
    else:
        data, source = DataConfig(), "the default data config"
    splits = load_splits(data)
    return splits.eval, splits.format, f"eval split of {source} (data {data.path})"


def pick(samples: list[dict], sids: list[int], source: str) -> list[dict]:
    n = len(samples)
    if not n:
        fail(f"the {source} is empty; pass --data FILE or a recipe with data.eval_fraction > 0")
    bad = [s for s in sids if not 0 <= s < n]
    if bad:
        fail(f"--sid {bad[0]} is out of range: the {source} has {n} samples (valid: 0-{n - 1})")
    return [samples[s] for s in sids]


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if not system:
        return messages
    return [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]


# ---------------------------------------------------------------- generation


def gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"use_cache": not a.no_cache}
    if a.temperature > 0:
        kw.update(do_sample=True, temperature=a.temperature, top_p=a.top_p)
    if a.prompt_lookup:
        kw["prompt_lookup_num_tokens"] = a.prompt_lookup
    return kw


def answer_all(specs: list[ModelSpec], prompts: list[list[dict]], a: argparse.Namespace) -> list[tuple]:
    """Each model loaded once and answering every prompt: [(texts, speed)] in model order."""
    from transformers import set_seed

    batch = 1 if a.prompt_lookup else a.batch_size  # prompt lookup = assisted decoding: batches of one only
    results = []
    for spec in specs:
        model, tok = load(spec, model_config(None, a.trust_remote_code, a.dtype))
        generate(model, tok, prompts[:1], 1, 1)  # warm-up: one-off kernel setup is not generation speed
        set_seed(a.seed)
        results.append(generate(model, tok, prompts, a.max_new_tokens, batch, **gen_kwargs(a)))
        del model  # before the next model loads
    return results


# ---------------------------------------------------------------- output


def answer_rows(
    specs: list[ModelSpec], results: list[tuple], j: int, sample: dict | None = None, fmt: str = ""
) -> list[dict]:
    """Every model's answer to prompt j; marked correct (exact match) or not when there is a gold answer."""
    rows = []
    for spec, (texts, speed) in zip(specs, results, strict=True):
        row = {"model": spec.label, "path": spec.path, "adapter": spec.adapter, "answer": texts[j]}
        if sample is not None:
            scored = score_samples([sample], [texts[j]], fmt)[0][0]  # the one scoring path (eval's too)
            row["correct"] = scored["em"] == 1
            if scored.get("executed"):  # a derivation is shown next to what the executor computed
                scale = scored["pred_scale"]
                unit = "%" if scale == "percent" else f" {scale}" if scale else ""
                row["computed"] = f"{scored['pred_answer']}{unit}"
        rows.append({**row, "tokens_per_s": round(speed["tokens_per_s"], 2)})
    return rows


def sample_record(sid: int, s: dict, fmt: str, answers: list[dict]) -> dict:
    meta = s["meta"]
    ctx = {"table": meta["table"], "paragraphs": meta.get("paragraphs", [])} if "table" in meta else None
    return {
        "sid": sid,
        "id": s["id"],
        "format": fmt,
        "question": meta.get("question", ""),
        "context": ctx,
        "gold": s["messages"][-1]["content"],
        "answers": answers,
    }


def indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line if line else "" for line in str(text).splitlines() or [""])


def record_text(rec: dict, j: int) -> str:
    """A sample (question, context, gold) or a prompt, then one row per model: label, mark, answer."""
    if "sid" not in rec:
        parts = [f"=== prompt {j} ===", indent(rec["prompt"]), "Answers:"]
    else:
        head = f"=== sample {rec['sid']} (id {rec['id']}, {rec['format']}) ==="
        parts = [head, "Question:", indent(rec["question"])]
        if rec["context"]:
            paras = "\n".join(f"[{i + 1}] {t}" for i, t in enumerate(rec["context"]["paragraphs"]))
            table = render_table(rec["context"]["table"])
            parts += ["Context:", indent(f"Table:\n{table}\n\nParagraphs:\n{paras}")]
        many = len(rec["answers"]) > 1
        parts += ["Gold answer:", indent(rec["gold"]), "Model answers:" if many else "Model answer:"]
    width = max(len(r["model"]) for r in rec["answers"])
    for r in rec["answers"]:
        mark = f"{'correct' if r['correct'] else 'incorrect':<11}" if "correct" in r else ""
        lines = (r["answer"] or "(empty)").splitlines()
        if "computed" in r:
            lines[-1] += f"   => {r['computed']}"
        parts.append(f"  {r['model']:<{width}}  {mark}{lines[0]}")
        parts += [" " * (width + 4 + len(mark)) + line for line in lines[1:]]
    return "\n".join(parts) + "\n"


def speed_text(specs: list[ModelSpec], results: list[tuple]) -> str:
    return "Generation speed:\n" + "\n".join(
        f"  {spec.label}: {s['new_tokens']} tokens in {s['seconds']:.2f} s = {s['tokens_per_s']:.1f} tokens/s"
        for spec, (_, s) in zip(specs, results, strict=True)
    )


def chat(spec: ModelSpec, a: argparse.Namespace) -> None:
    """Interactive loop: the whole conversation is the prompt; answers stream as they are generated."""
    from transformers import TextStreamer, set_seed

    model, tok = load(spec, model_config(None, a.trust_remote_code, a.dtype))
    set_seed(a.seed)
    system = [{"role": "system", "content": a.system_prompt}] if a.system_prompt else []
    history: list[dict] = []
    print(f"[hpml_ft] chatting with {spec.label}; /reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            user = input("\nyou> ").strip()
        except EOFError:
            user = "/exit"
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            history = []
            print("[conversation cleared]")
        if not user or user == "/reset":
            continue
        history.append({"role": "user", "content": user})
        print("bot> ", end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        texts, _ = generate(
            model, tok, [system + history], a.max_new_tokens, 1, streamer=streamer, **gen_kwargs(a)
        )
        history.append({"role": "assistant", "content": texts[0]})


def quiet() -> None:
    """Generation-config notices, load bars and bitsandbytes' CPU-kernel notice would drown the answers."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    quiet()
    apply_cpu_threads(log=False)  # every core this process owns, also under accelerate launch
    specs, ref_run = model_specs(a)
    if a.chat:
        chat(specs[0], a)
        return 0
    if a.prompt:
        prompts = [with_system([{"role": "user", "content": p}], a.system_prompt) for p in a.prompt]
        results = answer_all(specs, prompts, a)
        recs = [
            {"prompt": p, "system": a.system_prompt, "answers": answer_rows(specs, results, j)}
            for j, p in enumerate(a.prompt)
        ]
    else:
        samples, fmt, source = eval_set(a, ref_run)
        chosen = pick(samples, a.sid, source)
        results = answer_all(specs, [with_system(s["messages"][:-1], a.system_prompt) for s in chosen], a)
        recs = [
            sample_record(sid, s, fmt, answer_rows(specs, results, j, s, fmt))
            for j, (sid, s) in enumerate(zip(a.sid, chosen, strict=True))
        ]
        if not a.json:
            print(f"[hpml_ft] {len(chosen)} sample(s) from the {source}; correct = exact match with gold\n")
    for j, rec in enumerate(recs):
        print(json.dumps(rec) if a.json else record_text(rec, j))
    if not a.json:
        print(speed_text(specs, results))
    return 0


if __name__ == "__main__":
    run_cli(main)
