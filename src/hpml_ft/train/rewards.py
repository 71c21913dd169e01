"""`grpo.rewards` names -> reward functions: the built-in TAT-QA rewards (tatqa/rewards.py), or a user's own
function named by a dotted path (`my_rewards:brevity` or `my_rewards.brevity`), imported only when a recipe
names it. Resolved by the train command's preflight, so a bad name is one error line before any model loads.

A user function is called as TRL calls every reward function: `f(prompts=..., completions=..., completion_ids=...,
**dataset_columns, trainer_state=..., log_extra=..., log_metric=...)` and returns one float (or None) per
completion; it must therefore take `**kwargs`. Importing the module runs its code: name only your own modules.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from hpml_ft.errors import fail
from hpml_ft.tatqa.rewards import REWARDS

RewardFunc = Callable[..., list[float | None]]
BUILTIN: dict[str, RewardFunc] = dict(REWARDS)
TATQA_REWARDS = frozenset(REWARDS)  # need TAT-QA data: they read the `gold` column


def _split_path(name: str) -> tuple[str, str]:
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        known = ", ".join(sorted(BUILTIN))
        fail(
            f"grpo.rewards: unknown reward {name!r}; use a built-in one ({known}) or your own function as "
            "module:function (e.g. my_rewards:brevity, importable from the working directory or PYTHONPATH)"
        )
    return module, attr


def load_reward(name: str) -> RewardFunc:
    """A built-in reward by name, or a user's function by dotted path (imported now)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, attr = _split_path(name)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError, or anything the user's module raises at import
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        fail(
            f"grpo.rewards: cannot import {module_name!r} for reward {name!r} ({type(err).__name__}: {why}); "
            "check the module name and run from the directory that holds it (or add it to PYTHONPATH)"
        )
    func = getattr(module, attr, None)
    if not callable(func):
        fail(f"grpo.rewards: {module_name!r} has no function {attr!r} (reward {name!r}); check the name")
    check_signature(func, name)
    return func


def check_signature(func: Any, name: str) -> None:
    """TRL passes prompts, completion_ids, every dataset column and its own keywords: the function needs **kwargs."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let TRL call it
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        fail(
            f"grpo.rewards: reward {name!r} must accept **kwargs (TRL calls it with completions=, prompts= and "
            "every dataset column as keywords); define it as def f(completions, **kwargs) -> list[float]"
        )


def reward_functions(names: list[str] | tuple[str, ...]) -> list[RewardFunc]:
    """Every reward the recipe names, in order (the order of grpo.reward_weights)."""
    return [load_reward(n) for n in names]
