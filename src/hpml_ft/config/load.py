"""Recipe loading: YAML (duplicate keys refused) -> dotted overrides -> validate -> frozen Config, one-line errors."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hpml_ft.config.schema import Config
from hpml_ft.errors import UserError, fail


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise _DuplicateKeyError(f"key '{key}' appears twice (lines {seen[key]} and {line})")
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_error_where(err: Exception) -> str:
    """' at line L, column C' of a YAML error, when it knows; '' otherwise."""
    mark = getattr(err, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        fail(f"recipe not found: {p} (pass a path like recipes/lora_alpaca.yaml)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        fail(f"{p}: not UTF-8 text (byte {err.start}); a recipe is a YAML text file")
    except _DuplicateKeyError as err:
        fail(f"{p}: {err}; keep one of them")
    except yaml.YAMLError as err:
        fail(
            f"{p}: YAML syntax error{yaml_error_where(err)}: {getattr(err, 'problem', err)}; fix the recipe file"
        )
    if not isinstance(data, dict):
        fail(
            f"{p}: a recipe must be a YAML mapping of sections (model:, data:, peft:, train:), not {type(data).__name__}"
        )
    return data


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 1e-4, null, [a, b] work)."""
    if "=" not in override:
        fail(f"override '{override}' is not of the form section.key=value (e.g. train.learning_rate=1e-4)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            fail(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, f"{prefix}{name}."))
    return keys


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, with a 'did you mean' for unknown keys."""
    known = _known_keys(Config)
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
            hint = (
                f" (did you mean '{guess[0]}'?)"
                if guess
                else f"; known keys: {', '.join(k for k in known if '.' not in k)}"
            )
            lines.append(f"unknown key '{loc}'{hint}")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{loc or 'recipe'}: {e['msg']} (got {shown})")
    return "; ".join(lines)


def build_config(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid recipe: {format_validation_error(err)}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or defaults when `path` is None), apply dotted overrides, validate, freeze."""
    tree = _read_yaml(path) if path else {}
    for ov in overrides:
        apply_override(tree, ov)
    return build_config(tree)


def dump_config(cfg: Config) -> str:
    """The recipe as YAML, secrets (train.sft_extra.hub_token, ...) shown as ***: what recipe.yaml records."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


# ---------------------------------------------------------------- secrets never reach a record

REDACTED = "***"
# A key is secret when its last word is one of _SECRET_LAST (hub_token, api_key) or any word is in _SECRET_ANY
# (client_secret, password_file); a tokenizer's special tokens (eos_token, pad_token) and an IFEval prompt's
# `key` are not secrets, nor are counts (max_new_tokens) or ids (eos_token_id), which are not strings.
_SECRET_ANY = {"secret", "password", "passwd", "credential", "credentials", "apikey"}
_SECRET_LAST = {"token", "key", "auth", "authorization"} | _SECRET_ANY
_SPECIAL_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask"}
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.I)  # scheme://user:PASSWORD@
_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',]+", re.I)


def is_secret_key(name: str) -> bool:
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    special = len(words) > 1 and words[-1] == "token" and words[-2] in _SPECIAL_TOKENS
    if not words or words == ["key"] or special:
        return False
    return words[-1] in _SECRET_LAST or any(w in _SECRET_ANY for w in words)


def redact_text(text: str) -> str:
    """`scheme://user:PASSWORD@host` -> `scheme://user:***@host`, `Bearer KEY` -> `Bearer ***`."""
    return _BEARER.sub(rf"\g<1>{REDACTED}", _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text))


def redact(data: Any) -> Any:
    """A copy of `data` fit for a record: the string value of every secret key is ***, and every string has
    its URL passwords and bearer keys redacted. Every JSON/YAML/text record hpml_ft writes passes here."""
    if isinstance(data, dict):
        return {
            k: REDACTED if is_secret_key(k) and isinstance(v, str) and v else redact(v)
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return redact_text(data) if isinstance(data, str) else data


# ---------------------------------------------------------------- derived numbers


def world_size() -> int:
    """Processes in this launch (accelerate/torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(cfg: Config, processes: int | None = None) -> int:
    procs = processes or world_size()
    per_step = cfg.train.per_device_batch_size * procs
    if cfg.train.effective_batch_size % per_step:
        fail(
            f"train.effective_batch_size={cfg.train.effective_batch_size} is not divisible by "
            f"per_device_batch_size x processes = {cfg.train.per_device_batch_size} x {procs}; "
            "change the batch sizes or the number of processes"
        )
    return cfg.train.effective_batch_size // per_step
