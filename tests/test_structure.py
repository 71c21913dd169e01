"""The shape of the package: layers that only import downwards, no import cycles (lazy imports included), every
module on the README's map, and modules kept small (a longer one states why at its top)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "hpml_ft"
MAX_LINES = 300
REASON = "Over 300 lines:"  # a module allowed to be longer says why in its docstring, after these words

# The pipeline as layers, lowest first (config -> data/tatqa -> model -> train -> merge/quantize -> commands):
# a module may import its own layer and the ones below, never one above. Keyed by the first name under hpml_ft.
LAYERS = [
    ("foundations", {"hpml_ft", "errors", "config", "demo", "system"}),
    ("task and data", {"tatqa", "scoring", "data"}),
    ("models", {"model", "lowbit_kernels", "lora", "outputs", "runs", "generation", "meta_ckpt", "meta_tokenizer"}),
    ("model transforms", {"plan", "merge", "consolidate", "quant"}),
    ("training", {"train"}),
    ("commands", {"eval", "infer", "serve", "bench", "export", "quantize", "env", "__main__"}),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imported(tree: ast.Module, mods: dict[str, Path]) -> set[str]:
    """Every hpml_ft module a file imports, at the top or inside functions; `if TYPE_CHECKING:` blocks excluded."""
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    names = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in mods else n.module for a in n.names}
    found = set()
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for m, f in mods.items():
        deps = _imported(ast.parse(f.read_text()), mods)
        # a submodule importing its own package (hpml_ft, hpml_ft.eval) is how Python runs packages, not a cycle
        graph[m] = {d for d in deps if d != m and not m.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return next(i for i, (_, names) in enumerate(LAYERS) if top in names)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'a (layer) -> b (layer)'."""
    return sorted(
        f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
        for m, deps in graph.items()
        for d in deps
        if layer(d) > layer(m)
    )


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if not any((m.split(".") + [""])[1] in n or m == "hpml_ft" for _, n in LAYERS)]
    assert unplaced == [], "add these modules' packages to LAYERS"


def test_layers_only_import_downwards():
    assert upward_imports(_graph()) == []


def test_layer_check_catches_a_planted_upward_import():
    """A TAT-QA module that imported the eval CLI (even lazily) would be reported."""
    mods = _modules()
    tree = ast.parse((PKG / "tatqa" / "render.py").read_text() + "\ndef f():\n    from hpml_ft.eval.cli import main\n")
    graph = {**_graph(), "hpml_ft.tatqa.render": _imported(tree, mods) - {"hpml_ft.tatqa.render"}}
    assert upward_imports(graph) == ["hpml_ft.tatqa.render (task and data) -> hpml_ft.eval.cli (commands)"]


def test_cycle_finder_sees_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from hpml_ft.train.cli import main\n")
    assert _imported(tree, {"hpml_ft.train.cli": Path("x")}) == {"hpml_ft.train.cli"}  # local imports count


def test_no_import_cycles():
    graph = _graph()
    assert "hpml_ft.train.runner" in graph and graph["hpml_ft.train"], "the graph must see the package"
    assert _cycles(graph) == []


def test_every_module_is_on_the_readme_map():
    text = (ROOT / "README.md").read_text()
    dev = text[text.index("## Development") :]
    named = set(re.findall(r"`(?:[\w/]+/)?(\w+\.py)`", dev)) - {"__init__.py", "__main__.py"}
    files = {f.name for f in PKG.rglob("*.py") if f.name not in ("__init__.py", "__main__.py")}
    assert files - named == set(), "modules missing from the README's Development map"
    assert named - files - {"test_structure.py"} == set(), "the map names modules that do not exist"


def test_modules_stay_small_or_say_why():
    long = {}
    for f in PKG.rglob("*.py"):
        lines = len(f.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        if lines > MAX_LINES and REASON not in doc:
            long[str(f.relative_to(PKG))] = lines
    assert long == {}
