"""The ``personalize`` command line: thin — it parses, calls the API, prints with rich.

The typer app, its commands (one module per group: :mod:`.train`, :mod:`.generate`, :mod:`.concepts`,
:mod:`.evaluate`, :mod:`.toyworld`, :mod:`.benchmark`; all on :mod:`.console`) and :func:`main`, where every user
error becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Optional

import typer

from ..errors import PersonalizeError
from . import benchmark, concepts, evaluate, generate, toyworld, train, ui
from .console import _error, err_console

app = typer.Typer(
    help="Teach a text-to-image model your own concepts, generate them anywhere, and measure how well it worked.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
app.command()(train.train)
app.command()(generate.generate)
app.command()(concepts.inspect)
app.command("export")(concepts.export_concept)
app.command("import")(concepts.import_concept)
app.command()(concepts.covariance)
app.command("methods")(concepts.list_methods)
app.command()(toyworld.demo)
app.command()(evaluate.evaluate)
app.command()(ui.ui)
app.add_typer(toyworld.app, name="toyworld")
app.add_typer(benchmark.app, name="benchmark")


def _quiet_libraries() -> None:
    """Library warnings (hub retries, deprecations) and loading bars would bury our one-line errors.

    diffusers and transformers are quieted as they are imported, not imported to be quieted: a command that
    needs them imports them in its body, and ``--help`` never does (it loads no torch)."""
    import logging
    import warnings

    for name in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch's weights-only reader warns (2 lines) about a plain pickle's protocol before we refuse or read it
    warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        _after_import(module, _quiet)


def _quiet(logging_module) -> None:
    """diffusers' or transformers' ``utils.logging``: errors only, no progress bars."""
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action(module)`` once module ``name`` has been imported (a one-shot post-import hook)."""

    def __init__(self, name: str, action):
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; and the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                self.action(module)

            spec.loader.exec_module = exec_module
        return spec


def _after_import(name: str, action) -> None:
    """``action(module)`` now if ``name`` is imported, else right after its import."""
    if name in sys.modules:
        action(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


def _usage_error(exc) -> str:
    """A usage error's message, plus where to read the usage (``personalize train --help``)."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "personalize"
    return f"{message}; see '{command} --help'"


def _click_errors() -> tuple:
    """(usage-error base class, no-command error class, abort class) of the click typer runs on.

    typer >= 0.2x bundles its own click (``typer._click``), whose exceptions are not ``click``'s; older typer
    used ``click`` itself."""
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        return ClickException, NoArgsIsHelpError, typer.Abort
    except ImportError:  # pragma: no cover - older typer
        import click

        return (click.exceptions.ClickException, getattr(click.exceptions, "NoArgsIsHelpError", ()),
                click.exceptions.Abort)


def main(argv: Optional[list[str]] = None) -> None:
    """The console script: exit 0 on success, 2 with one ``error:`` line on stderr for any bad input or usage
    (unknown option, missing or malformed value, no command), 1 when a benchmark run ends with failed rows."""
    usage_error, no_command, abort = _click_errors()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="personalize")
    except PersonalizeError as exc:
        _error(str(exc))
        sys.exit(2)
    except no_command as exc:  # bare 'personalize' (or 'personalize benchmark'): the help is on stdout
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "personalize"
        _error(f"no command given; pick one of the commands above ('{command} COMMAND --help' for its options)")
        sys.exit(2)
    except usage_error as exc:  # unknown option or command, bad or missing value
        _error(_usage_error(exc))
        sys.exit(2)
    except abort:
        _error("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    # in non-standalone mode typer returns the code of a typer.Exit (a benchmark run with failed rows: 1) and turns
    # Ctrl-C into 130
    if code == 130:
        err_console.print("interrupted; 'personalize train ... --resume' continues from the last checkpoint")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
