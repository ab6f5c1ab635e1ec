"""The import rule of docs/ARCHITECTURE.md, checked on the source: a module imports only from its own layer or
the layers below it, and every module of the package has a layer (a new module must be placed)."""
from __future__ import annotations

import ast
from pathlib import Path

import personalize

ROOT = Path(personalize.__file__).parent

#: bottom to top; a module's layer is that of its top-level module or sub-package
LAYERS = [
    ("foundation", {"errors", "settings", "knobs", "paths", "transfer", "tokenizer", "sd_shapes", "dit_shapes",
                    "parallel", "devices", "images", "templates", "text_stack", "schedulers", "families"}),
    ("seams and data", {"edits", "fingerprint", "prompts", "samples", "datasets"}),
    ("base model", {"base", "single_file", "covariance", "prior", "generation", "checkpoints", "segment"}),
    ("methods", {"methods"}),
    ("flow", {"concept", "compose", "training", "interop", "evaluation"}),
    ("tools", {"__init__", "benchmark", "toybase", "claims", "demo"}),
    ("cli", {"cli", "__main__", "ui"}),  # the web app sits beside the command line: both call the API
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}
LEAVES = {"datasets": {"errors", "images", "samples", "prompts", "templates", "paths", "datasets"}}


def _unit(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def _imports(path: Path):
    """The package units ``path`` imports (top-level and function-local imports alike)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from . import x, y
                    for alias in node.names:
                        yield _unit(base + [alias.name])
                    continue
            elif node.module and node.module.split(".")[0] == "personalize":
                target = node.module.split(".")[1:]
            else:
                continue
            yield _unit(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "personalize":
                    yield _unit(alias.name.split(".")[1:])


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, _unit(list(path.relative_to(ROOT).with_suffix("").parts))


def test_every_module_has_a_layer():
    missing = sorted({unit for _, unit in _modules() if unit not in LAYER_OF})
    assert not missing, f"place these in LAYERS (and docs/ARCHITECTURE.md): {missing}"


def test_imports_go_down_only():
    wrong = []
    for path, unit in _modules():
        for target in _imports(path):
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[unit]:
                wrong.append(f"{path.relative_to(ROOT)} ({LAYERS[LAYER_OF[unit]][0]}) imports {target} "
                             f"({LAYERS[LAYER_OF[target]][0]})")
    assert not wrong, "\n".join(wrong)


def test_datasets_is_a_leaf():
    wrong = [f"{path.relative_to(ROOT)} imports {target}" for path, unit in _modules() if unit in LEAVES
             for target in _imports(path) if target not in LEAVES[unit]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports():
    """The rule cannot pass vacuously: the checker finds known imports of every kind."""
    found = {t for path, unit in _modules() if unit == "compose" for t in _imports(path)}
    assert {"concept", "methods", "knobs", "errors"} <= found
    found = {t for path, unit in _modules() if path.name == "residuals.py" for t in _imports(path)}
    assert "edits" in found  # relative imports two levels up, and function-local ones


def _cli_siblings(path: Path) -> set[str]:
    """The other ``cli/`` modules ``path`` imports (``from .x import``, ``from . import x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return names


def test_the_cli_package_has_console_at_the_bottom_and_no_circles():
    graph = {p.stem: _cli_siblings(p) - {p.stem} for p in (ROOT / "cli").glob("*.py")}
    assert graph["console"] == set()
    assert "app" not in set().union(*(deps for name, deps in graph.items() if name != "__main__"
                                     and name != "__init__"))
    done: set[str] = set()

    def visit(node, path):
        assert node not in path, f"import circle in personalize/cli: {' -> '.join([*path, node])}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])
        done.add(node)

    for node in graph:
        visit(node, [])
