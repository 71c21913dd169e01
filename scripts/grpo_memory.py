"""Peak memory of GRPO steps phase by phase (generation, policy update) beside the planner's estimate (CPU).

    python scripts/grpo_memory.py MODEL_DIR [--prompt-tokens N] [--out FILE] [overrides ...]

Writes prompts of exactly N tokens (default: train.max_length - grpo.max_completion_length, the longest a
recipe keeps) and a reward module to a temporary dir, runs `python -m hpml_ft.train` in this process on a recipe
with the shape of recipes/grpo_tatqa_embedded.yaml (full FT, 1 completion per micro-batch, 2 prompts x 4
generations a step) plus the overrides, and samples resident memory every 5 ms: the peak while `generate` runs
and the peak the rest of training. A random-weight model (scripts/random_model.py) never stops early, so the
completions are as long as allowed: the worst case the planner plans for. Prints (and appends to FILE) a markdown
row: measured and planned GiB of both phases. One configuration per process, so its peaks are its own.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpml_ft.config import Config

RECIPE = """name: grpo_memory
model: {{name_or_path: {model}}}
data: {{path: {data}, format: chat, eval_fraction: 0.0}}
peft: {{method: full}}
train: {{stage: grpo, max_steps: 2, per_device_batch_size: 1, effective_batch_size: 8, max_length: 1280,
        eval_generate: 0, save_steps: null, merge: false, output_dir: {out}, learning_rate: 1.0e-6,
        lr_scheduler: constant, warmup_ratio: 0.0}}
grpo: {{rewards: ["grpo_memory_reward:length"], num_generations: 4, max_completion_length: 48}}
"""
REWARD = "def length(completions, **kwargs):\n    return [float(len(str(c)) % 7) for c in completions]\n"
GIB = 2**30


class PhaseSampler:
    """Peak RSS per phase ('gen' while generate runs, 'train' otherwise inside Trainer.train), sampled every 5 ms."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.peaks = {"gen": 0.0, "train": 0.0}
        self.gen_growth = 0.0  # largest rise of RSS within one generate call
        self._gen_start = 0.0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        from hpml_ft.system.measure import rss_mib

        while True:
            ph = self.phase
            if ph:
                rss = rss_mib()
                self.peaks[ph] = max(self.peaks[ph], rss)
                if ph == "gen":
                    self.gen_growth = max(self.gen_growth, rss - self._gen_start)
            time.sleep(0.005)

    def patch(self) -> None:
        import transformers

        from hpml_ft.system.measure import rss_mib

        generate, train = transformers.GenerationMixin.generate, transformers.Trainer.train

        def gen(model, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            prev, self.phase, self._gen_start = self.phase, "gen", rss_mib()
            try:
                return generate(model, *a, **k)
            finally:
                self.phase = prev

        def fit(trainer, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.phase = "train"
            try:
                return train(trainer, *a, **k)
            finally:
                self.phase = None

        transformers.GenerationMixin.generate, transformers.Trainer.train = gen, fit


def write_recipe(tmp: Path, model: str) -> Path:
    (tmp / "grpo_memory_reward.py").write_text(REWARD)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=tmp / "data.jsonl", out=tmp / "out"))
    return recipe


def write_prompts(tmp: Path, model: str, tokens: int) -> None:
    """Chat records whose prompt is exactly `tokens` tokens under the model's chat template ("7 7 7 ...")."""
    from transformers import AutoTokenizer

    from hpml_ft.errors import fail

    tok = AutoTokenizer.from_pretrained(model)

    def count(n: int) -> int:
        msgs = [{"role": "user", "content": " ".join(["7"] * n)}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    n = tokens - count(0)
    if n < 1:
        fail(f"--prompt-tokens {tokens} is shorter than the chat template alone ({count(0)}); raise it")
    while count(n) > tokens:  # "7" is one token, but the template may merge a boundary
        n -= 1
    rec = {
        "messages": [{"role": "user", "content": " ".join(["7"] * n)}, {"role": "assistant", "content": "7"}]
    }
    (tmp / "data.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(32)) + "\n")


def planned(cfg: Config, model: str) -> dict[str, float]:
    """The planner's training and generation peaks for this CPU run, and the generation phase's own bytes."""
    from hpml_ft.plan import estimate, phase_peaks, phases, setup_for, shape_for

    sh, _ = shape_for(cfg, model)
    rows = estimate(sh, setup_for(cfg, 1, gpu=False))
    train, gen = phase_peaks(rows)
    return {"train": train / GIB, "gen": gen / GIB, "gen_growth": phases(rows)["gen"] / GIB}


def main(argv: list[str] | None = None) -> int:
    from hpml_ft.errors import ArgumentParser, fail

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a local model dir (e.g. a scripts/random_model.py output)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.effective_batch_size=16")
    p.add_argument(
        "--prompt-tokens", type=int, help="prompt length (default: max_length - max_completion_length)"
    )
    p.add_argument("--out", help="append the markdown row to this file")
    a = p.parse_args(argv)
    if not Path(a.model, "config.json").is_file():
        fail(f"{a.model} is not a model dir (no config.json); make one with scripts/random_model.py")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sys.path.insert(0, d)
        from hpml_ft.config import load_config

        recipe = write_recipe(tmp, a.model)
        cfg = load_config(str(recipe), a.overrides)
        tokens = a.prompt_tokens or cfg.train.max_length - cfg.grpo.max_completion_length
        write_prompts(tmp, a.model, tokens)
        sampler = PhaseSampler()
        sampler.patch()
        from hpml_ft.train.cli import main as train_main

        if train_main([str(recipe), *a.overrides]) != 0:
            return 1
        plan = planned(cfg, a.model)
    got = {k: v / 1024 for k, v in sampler.peaks.items()} | {"gen_growth": sampler.gen_growth / 1024}
    cells = [f"{got[k]:.2f} / {plan[k]:.2f}" for k in ("train", "gen", "gen_growth")]
    config = " ".join(a.overrides) or "defaults"
    row = f"| {config} | {tokens} | " + " | ".join(cells) + f" | {platform.machine()} |"
    print(row)
    if a.out:
        with open(a.out, "a") as f:
            f.write(row + "\n")
    return 0


if __name__ == "__main__":
    from hpml_ft.errors import run_cli

    run_cli(main)
