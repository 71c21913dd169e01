"""An Ollama Modelfile for an exported GGUF: FROM the file, TEMPLATE (Ollama's Go template), SYSTEM, stop tokens.

The model's chat template is Jinja; Ollama's is a Go template over `.Messages`. The two formats hpml_ft's models
use are mapped by their markers: ChatML (`<|im_start|>role ... <|im_end|>`: SmolLM, Qwen, the test tokenizer)
and Llama 3 (`<|start_header_id|>role<|end_header_id|> ... <|eot_id|>`). A default system prompt that the Jinja
template inserts (SmolLM2's "You are a helpful AI assistant named SmolLM, ...") is read off a rendering and
becomes SYSTEM. Any other template gets a plain `{{ .Prompt }}` TEMPLATE, marked as such: edit it before use.
BOS is not in the templates: llama.cpp adds it from the GGUF's tokenizer.ggml.add_bos_token.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ["<|im_start|>", "<|im_end|>"],
    r"^<\|im_start\|>system\n(.*?)<\|im_end\|>",
)
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
)
PLAIN = "{{- if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
PROBE = "\x01probe\x01"


def _default_system(tok: PreTrainedTokenizerBase, pattern: str) -> str | None:
    """The system prompt the Jinja template adds to a conversation that has none, if it adds one."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than one user turn: no default to find
        return None
    found = re.search(pattern, str(text), re.DOTALL)
    return found[1] if found and PROBE not in found[1] else None


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, tok: PreTrainedTokenizerBase) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder) and the model's tokenizer."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    fmt = CHATML if "<|im_start|>" in template else LLAMA3 if "<|start_header_id|>" in template else None
    lines = [
        "# Ollama Modelfile written by hpml_ft.export; in this folder: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if fmt is None:
        stops = [tok.eos_token] if tok.eos_token else []
        lines += [
            "# the chat template has no Ollama form here: a plain prompt template; edit TEMPLATE to use chat"
        ]
        lines += [f"TEMPLATE {_quoted(PLAIN)}"]
    else:
        go, stops, system_pattern = fmt
        lines += [f"TEMPLATE {_quoted(go)}"]
        system = _default_system(tok, system_pattern)
        if system:
            lines += [f"SYSTEM {_quoted(system)}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
