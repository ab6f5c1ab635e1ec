"""A fast command line (issue 25 item 6, item 9's packaging): ``--help`` of the app and of every subcommand
imports neither torch nor diffusers, transformers or open_clip (the CPU time is measured by
``benchmarks/cli_startup.py``, not here); ``python -m personalize`` works; the package ships ``py.typed``;
every built-in method's card is what its class declares."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import personalize

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "peft", "accelerate")

# Runs ``personalize ARGS`` for each JSON list of args in argv[1:], in this one process, one after the other;
# after each, prints on stderr the heavy modules imported so far. sys.modules only grows, so the first command
# after which one appears is the one that imported it.
HARNESS = """
import json, sys
from personalize.cli.app import main
for args in map(json.loads, sys.argv[1:]):
    try:
        main(args)
    except SystemExit:
        pass
    print("LOADED " + json.dumps([args, [m for m in %r if m in sys.modules]]), file=sys.stderr, flush=True)
""" % (HEAVY,)


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _loaded_after_each(commands: list[list[str]]) -> list[tuple[list[str], list[str]]]:
    proc = subprocess.run([sys.executable, "-c", HARNESS, *map(json.dumps, commands)], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=300)
    found = [json.loads(line[len("LOADED "):]) for line in proc.stderr.splitlines() if line.startswith("LOADED ")]
    assert len(found) == len(commands), proc.stderr[-2000:]
    return [(args, loaded) for args, loaded in found]


def _command_paths() -> list[list[str]]:
    """Every command of the app, read from typer's click group: [], ["train"], ..., ["benchmark", "run"], ..."""
    import typer

    from personalize.cli.app import app

    def walk(command, path):
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, path + [name])

    return list(walk(typer.main.get_command(app), []))


def test_every_help_imports_no_torch_diffusers_transformers_or_open_clip(tmp_path):
    paths = _command_paths()
    assert {"train", "generate", "export", "import", "methods", "inspect"} <= {p[0] for p in paths if p}
    assert ["benchmark", "run"] in paths and ["toyworld", "train-base"] in paths
    # the checker sees imports: the last command's body loads a concept file, which imports torch
    results = _loaded_after_each([[*p, "--help"] for p in paths] + [["inspect", str(tmp_path / "no.safetensors")]])
    heavy = [(args, loaded) for args, loaded in results[:-1] if loaded]
    assert not heavy, f"--help imported heavy modules (first: {heavy[0]})"
    assert "torch" in results[-1][1]


def test_import_personalize_is_lazy_and_the_api_is_there():
    code = ("import sys, personalize\n"
            "assert not [m for m in %r if m in sys.modules], 'import personalize loaded a heavy module'\n"
            "assert set(personalize.__all__) <= set(dir(personalize))\n"
            "from personalize import PersonalizeError\n"  # a light name: no torch either
            "assert 'torch' not in sys.modules\n"
            "print('ok')") % (HEAVY,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    with pytest.raises(AttributeError):
        personalize.no_such_name  # noqa: B018
    assert personalize.train is __import__("personalize.training", fromlist=["train"]).train


def test_python_dash_m_personalize(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "personalize", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: personalize" in proc.stdout and "train" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "personalize", "no-such-command"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_py_typed_is_shipped():
    package = Path(personalize.__file__).parent
    assert (package / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["personalize"]


def test_every_card_is_its_methods_declaration():
    """``registry.card`` (what --help and 'personalize methods' read, torch-free) is the class's own declaration."""
    from personalize import methods as registry
    from personalize.methods.cards import CARDS, MethodCard

    assert sorted(CARDS) == registry.names()
    for name in registry.names():
        card, cls = registry.card(name), registry.get(name)
        assert issubclass(cls, card) and issubclass(card, MethodCard) and card.name == cls.name == name
        for attr in ("description", "sites", "Config", "Knobs", "knobs", "train_defaults", "recipe"):
            assert getattr(cls, attr) == getattr(card, attr), (name, attr)


def test_libraries_are_quieted_as_they_are_imported(tmp_path, monkeypatch):
    """main() no longer imports diffusers/transformers to quiet them: a one-shot post-import hook quiets each as
    it is imported (here on a stand-in module; ``_quiet_libraries`` hooks diffusers' and transformers' logging)."""
    import importlib
    import inspect

    app = importlib.import_module("personalize.cli.app")  # the module (personalize.cli.app is also the Typer app)

    (tmp_path / "fake_logging_mod.py").write_text("level = 'warning'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    app._after_import("fake_logging_mod", lambda m: seen.append(m.level))
    assert seen == [] and any(isinstance(f, app._AfterImport) for f in sys.meta_path)
    import fake_logging_mod  # noqa: F401

    assert seen == ["warning"] and not any(getattr(f, "name", "") == "fake_logging_mod" for f in sys.meta_path)
    app._after_import("fake_logging_mod", lambda m: seen.append("again"))  # already imported: at once
    assert seen == ["warning", "again"]
    source = inspect.getsource(app._quiet_libraries)
    assert "diffusers.utils.logging" in source and "transformers.utils.logging" in source
