"""The bottom of the CLI: the consoles, one-line stderr messages, the step progress bar, and the small helpers
every command shares (the --base help, --set/--config parsing). Imports nothing from the other cli modules."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from ..errors import BadInputError

out_console = Console()
err_console = Console(stderr=True)

BASE_HELP = ("Base model: 'toy' (the toy world's), 'tiny' / 'tiny-sd2' / 'tiny-sdxl' (built-in random test models, "
             "SD 1.x / SD 2.x / SDXL shapes), or an SD 1.x, SD 2.x or SDXL pipeline as a local diffusers folder, a "
             "hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a single-file checkpoint (model.safetensors, "
             "as AUTOMATIC1111 and ComfyUI use; read offline).")


def _stderr_line(label: str, message: str) -> None:
    """One line on stderr: ``LABEL: MESSAGE`` (line breaks folded, rich markup in MESSAGE shown as typed)."""
    from rich.markup import escape

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

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
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
