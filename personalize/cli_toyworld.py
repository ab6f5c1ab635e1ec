"""``personalize toyworld ...``: the toy world's concepts, renders, measurers and base-model recipe."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .errors import BadInputError

app = typer.Typer(help="The toy world: a procedural image world, its held-out concepts, measurers and base model.",
                  no_args_is_help=True, rich_markup_mode="rich")


def _console():
    from .cli import out_console

    return out_console


def _concept_name(name: str) -> str:
    import difflib

    from .datasets.toyworld import CONCEPTS

    if name not in CONCEPTS:
        close = difflib.get_close_matches(name, list(CONCEPTS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BadInputError(f"unknown toy-world concept '{name}'; {hint}see 'personalize toyworld concepts'")
    return name


@app.command()
def concepts(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the held-out concepts (never seen by the toy base) with their superclass words.

    [bold]Examples[/bold]

      personalize toyworld concepts

      personalize toyworld concepts --json
    """
    from .datasets.toyworld import list_concepts

    rows = list_concepts()
    if as_json:
        _console().print_json(json.dumps(rows))
        return
    table = Table("name", "superclass", "description")
    for row in rows:
        table.add_row(row["name"], row["superclass"], row["description"])
    _console().print(table)


@app.command()
def render(
    name: str = typer.Argument(..., help="Concept name (see 'personalize toyworld concepts')."),
    out: Path = typer.Option(..., "--out", help="Folder for the example PNGs (an ordinary --images folder)."),
    n: int = typer.Option(5, "--n", min=1, max=12, help="How many examples."),
    seed: int = typer.Option(0, "--seed", help="Layout seed."),
    captions: bool = typer.Option(True, "--captions/--no-captions",
                                  help="Write IMAGE.txt beside each image: its position and background, the "
                                       "concept as {} (the trainer's per-image captions)."),
):
    """Render a concept's example images (and their captions).

    [bold]Examples[/bold]

      personalize toyworld render striped_star --out photos/

      personalize toyworld render striped_star --out photos/ && personalize train --base toy --images photos/ --superclass star --token "<s>" --out s.safetensors

      personalize toyworld render split_triangle --out more/ --n 12 --seed 1   # other layouts
    """
    from .datasets.toyworld import render_concept_examples
    from .paths import check_output

    check_output(out, folder=True)
    paths = render_concept_examples(_concept_name(name), out, n=n, seed=seed, captions=captions)
    _console().print(f"wrote {len(paths)} images{' and captions' if captions else ''} to [bold]{out}[/bold]")


@app.command()
def score(
    samples: Path = typer.Option(..., "--samples", help="Folder of PNGs + prompts.json (stem -> prompt), as 'generate' writes."),
    concept: Optional[str] = typer.Option(None, "--concept", help="Toy concept the placeholder stands for (enables fidelity)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Same stems generated without the concept (enables leakage)."),
    per_image: bool = typer.Option(False, "--per-image", help="Include every image's checks."),
):
    """Score generated images against the toy world's ground truth; prints JSON (alignment, fidelity, leakage).

    [bold]Examples[/bold]

      personalize toyworld score --samples samples/

      personalize toyworld score --samples samples/ --concept striped_star --reference base_samples/ --per-image
    """
    from .datasets.toyworld import score_folder

    if not (samples / "prompts.json").is_file():
        raise BadInputError(f"'{samples}' has no prompts.json; point --samples at a folder written by 'personalize generate'")
    if reference is not None and not reference.is_dir():
        raise BadInputError(f"--reference '{reference}' is not a folder")
    result = score_folder(samples, concept=_concept_name(concept) if concept else None, reference=reference)
    if not per_image:
        result.pop("per_image", None)
    _console().print_json(json.dumps(result))


@contextlib.contextmanager
def _one_line_argparse(command: str):
    """The toy-world scripts parse their own options (argparse): a bad one is our one-line error, not argparse's
    usage block."""
    import argparse
    from unittest import mock

    def error(parser, message):
        raise BadInputError(f"{message}; see 'personalize toyworld {command} --help'")

    with mock.patch.object(argparse.ArgumentParser, "error", error):
        yield


@app.command("train-base", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_base(ctx: typer.Context):
    """Train the toy base model from scratch (VAE, then text encoder + UNet); resumable. Options: see --help of
    'python -m personalize.toybase.train'.

    [bold]Examples[/bold]

      personalize toyworld train-base --out runs/toybase --workers 8          # the shipped recipe (~7 min on a GPU)

      personalize toyworld train-base --out runs/toybase --device cpu --minutes 90 --threads 2   # fit a CPU budget

      personalize toyworld train-base --out runs/toybase --resume --export weights/   # continue, then export
    """
    from .toybase.train import main as run

    with _one_line_argparse("train-base"):
        run(list(ctx.args))


@app.command("evaluate-base", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate_base(ctx: typer.Context):
    """Sample the base on held-out captions and score them; export weights from a run. Options: see
    'python -m personalize.toybase.evaluate --help'.

    [bold]Examples[/bold]

      personalize toyworld evaluate-base --n 200 --grid grid.png

      personalize toyworld evaluate-base --pipeline runs/toybase/pipeline --json scores.json
    """
    from .toybase.evaluate import main as run

    with _one_line_argparse("evaluate-base"):
        result = run(list(ctx.args))
    _console().print_json(json.dumps(result, default=str))

