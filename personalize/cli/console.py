"""The bottom of the CLI: the consoles, one-line stderr messages, the step progress bar, and the small helpers
every command shares (the --base help, --set/--config parsing, ``--json`` output). Imports nothing from the other
cli modules.

Every string a user gave (a path, token, class phrase, prompt, a header value read from a file) reaches rich
through :func:`say` (or :func:`escaped` for table cells), which escapes it: ``[/]`` or ``[bold]`` in it is shown
as typed, never read as markup. Output that is not a terminal (a pipe, a file) is not wrapped at 80 columns.
"""
from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from typing import Any, List, Optional

from rich.console import Console
from rich.markup import escape

from ..errors import BadInputError

#: the width of output that is not a terminal: rich's default there is 80 columns, which would break a path or
#: a table row of a script's input across lines
PIPE_WIDTH = 1_000_000


def _console(stderr: bool = False) -> Console:
    """A terminal's width on a terminal; on a pipe or file, lines as long as they are."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


out_console = _console()
err_console = _console(stderr=True)

BASE_HELP = ("Base model: 'toy' (the toy world's), 'tiny' / 'tiny-sd2' / 'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux' "
             "(built-in random test models, SD 1.x / SD 2.x / SDXL / SD3 / Flux.1 shapes), or an SD 1.x, SD 2.x, "
             "SDXL, SD3 or Flux.1 pipeline as a local diffusers folder or a hub id (e.g. "
             "stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev), or an SD 1.x, SD 2.x or "
             "SDXL single-file checkpoint (model.safetensors, as AUTOMATIC1111 and ComfyUI use; read offline).")
JSON_HELP = "Print one JSON object on stdout instead (progress stays on stderr); keys in README 'Scripting'."


class _EscapingFormatter(string.Formatter):
    """``str.format`` whose replacement fields are escaped for rich markup (the template's own markup stays)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        return escape(super().format_field(value, format_spec))


_FORMATTER = _EscapingFormatter()


def markup(template: str, *values: Any, **named: Any) -> str:
    """``template.format(*values, **named)`` with every field escaped: rich markup of ours around user strings
    shown exactly as given."""
    return _FORMATTER.format(template, *values, **named)


def say(template: str, *values: Any, **named: Any) -> None:
    """Print ``template`` (rich markup) on stdout, its ``{}`` fields filled with ``values`` escaped, e.g.
    ``say("wrote concept [bold]{}[/bold]", path)``: a path like ``a[/]b`` is shown as typed."""
    out_console.print(markup(template, *values, **named))


def escaped(*values: Any) -> list[str]:
    """Table cells (or titles) of user data: ``table.add_row(*escaped(name, phrase))``."""
    return [escape(str(v)) for v in values]


def print_json(data: Any) -> None:
    """``--json``: ``data`` as one JSON object on stdout (nothing else is printed there)."""
    out_console.print_json(json.dumps(data, default=str))


def wrote_concept(path: Path, as_json: bool, run: bool = False) -> None:
    """What ``train`` and ``import`` print once the concept file is written: one line, or with ``--json`` one
    object read back from the file's header: ``concept``, ``bytes``, ``method``, ``tokens``, ``superclasses``,
    ``base``, ``steps``, ``seed``, ``batch_size``, ``resolution`` (``null`` where the file records none, e.g.
    an import), and, for a training ``run``, the folders written beside it: ``pipeline`` (DreamBooth's
    fine-tuned pipeline), ``checkpoint`` (``OUT.ckpt/``, for --resume), ``previews`` (``OUT.previews/``), each
    ``null`` when absent."""
    path = Path(path)
    if not as_json:
        say("wrote concept [bold]{}[/bold] ({:,} bytes)", path, path.stat().st_size)
        return
    from ..concept import load_concept

    header = load_concept(path).header
    prov = header.get("provenance", {})
    data = {"concept": str(path), "bytes": path.stat().st_size, "method": header["method"],
            "tokens": list(header.get("tokens") or [header["token"]]),
            "superclasses": list(header.get("superclasses") or [header["superclass"]]),
            **{key: prov.get(key) for key in ("base", "steps", "seed", "batch_size", "resolution")}}
    if run:
        from ..checkpoints import checkpoint_dir
        from ..training.loop import preview_dir

        pipeline = path.parent / header["pipeline"] if header.get("pipeline") else None
        data.update({key: str(folder) if folder is not None and folder.exists() else None for key, folder in
                     (("pipeline", pipeline), ("checkpoint", checkpoint_dir(path)), ("previews", preview_dir(path)))})
    print_json(data)


def _stderr_line(label: str, message: str) -> None:
    """One line on stderr: ``LABEL: MESSAGE`` (line breaks folded, rich markup in MESSAGE shown as typed)."""
    line = " ".join(str(message).split())
    err_console.print(f"{label} {escape(line)}", highlight=False, soft_wrap=True)


def _warn(message: str) -> None:
    """``warning: MESSAGE`` on stderr: not an error, the command goes on."""
    _stderr_line("[yellow]warning:[/yellow]", message)


def _error(message: str) -> None:
    """``error: MESSAGE`` on stderr."""
    _stderr_line("[red]error:[/red]", message)


@contextlib.contextmanager
def _step_bar(description: str, total: int):
    """A per-step progress bar on stderr; yields the ``on_step(n)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, completed=n)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_settings(config: Optional[Path], sets: List[str]) -> dict:
    settings: dict = {}
    if config is not None:
        import yaml

        if not config.is_file():
            raise BadInputError(f"--config '{config}' does not exist; pass a YAML file of settings")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadInputError(f"--config '{config}' is not valid YAML ({exc.__class__.__name__}); fix the file") from exc
        if not isinstance(data, dict):
            raise BadInputError(f"--config '{config}' must be a mapping of setting: value")
        settings.update(data)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--set '{item}' must look like KEY=VALUE, e.g. --set lock=trained")
        settings[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return settings
