"""Evaluation: `python -m hpml_ft.eval` answers eval prompts with one or more models, scores them and writes a
result folder. Modules (open the one that owns what you want to change):

- `cli`: the command line (options, order of steps); `__main__` only runs it
- `tasks`: what is evaluated (QA samples, IFEval or safety rows) and which models (named as `hpml_ft.runs`
  resolves them)
- `answers`: each model loaded once, batched generation, answers scored per task
- `scoring`: exact match / token F1, TAT-QA with the official semantics
- `report`: markdown tables and the result folder (results.json, results.md, predictions/)
- `judge` (+ `judge_prompt`, `judge_http`): LLM-as-judge by a local model or an OpenAI-compatible endpoint
  (`python -m hpml_ft.eval.judge`); `judge_prompt`: the prompt, score parsing, `JudgeSpec`; `judge_http`: the
  endpoint through the `openai` client (concurrency, time-outs, retries, what headers are sent)
- `ifeval`: instruction following, IFEval / IFBench (`python -m hpml_ft.eval.ifeval`)
- `safety`: safe/unsafe classification on ToxicChat-format files
- `tatqa/`: the official TAT-QA metric (`metric`, `normalize`) and the derivation executor (`executor`)

Importing this package imports nothing heavy; torch and transformers load when a model does.
"""


def __getattr__(name: str) -> object:
    """`from hpml_ft.eval import main` without importing the CLI (and what it imports) with the package."""
    if name == "main":
        from hpml_ft.eval.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
