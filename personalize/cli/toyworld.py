"""``personalize toyworld ...``: the toy world's concepts, renders, measurers and base-model recipe; and
``personalize demo``, the whole flow on the toy world."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..demo import STEPS as DEMO_STEPS
from ..errors import BadInputError
from .console import escaped, out_console, say

app = typer.Typer(help="The toy world: a procedural image world, its held-out concepts, measurers and base model.",
                  no_args_is_help=True, rich_markup_mode="rich")


def _concept_name(name: str) -> str:
    import difflib

    from ..datasets.toyworld import CONCEPTS

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
    from ..datasets.toyworld import list_concepts

    rows = list_concepts()
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    table = Table("name", "superclass", "description")
    for row in rows:
        table.add_row(*escaped(row["name"], row["superclass"], row["description"]))
    out_console.print(table)


@app.command()
def render(
    name: str = typer.Argument(..., help="Concept name (see 'personalize toyworld concepts')."),
    out: Path = typer.Option(..., "--out", help="Folder for the example PNGs (an ordinary --images folder)."),
    n: int = typer.Option(5, "--n", min=1, max=12, help="How many examples."),
    seed: int = typer.Option(0, "--seed", help="Layout seed."),
    captions: bool = typer.Option(True, "--captions/--no-captions",
                                  help="Write IMAGE.txt beside each image: its position and background, the "
                                       "concept as {} (the trainer's per-image captions)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Also write the renderer's exact mask of the concept "
                                         "in each image to this folder (same file names): train --masks DIR."),
):
    """Render a concept's example images (and their captions, and exact masks).

    [bold]Examples[/bold]

      personalize toyworld render striped_star --out photos/

      personalize toyworld render striped_star --out photos/ --masks masks/ && personalize train --base toy --images photos/ --masks masks/ --superclass star --token "<s>" --out s.safetensors

      personalize toyworld render split_triangle --out more/ --n 12 --seed 1   # other layouts
    """
    from ..datasets.toyworld import render_concept_examples
    from ..paths import check_output

    check_output(out, folder=True)
    if masks is not None:
        check_output(masks, folder=True)
    paths = render_concept_examples(_concept_name(name), out, n=n, seed=seed, captions=captions, masks_dir=masks)
    extra = (" and captions" if captions else "") + (f", masks to {masks}" if masks is not None else "")
    say("wrote {} images{} to [bold]{}[/bold]", len(paths), extra, out)


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
    from ..datasets.toyworld import score_folder
    from ..samples import prompt_table

    prompt_table(samples, flag="--samples")  # a folder with a readable prompts.json, or a one-line error now
    if reference is not None and not reference.is_dir():
        raise BadInputError(f"--reference '{reference}' is not a folder")
    result = score_folder(samples, concept=_concept_name(concept) if concept else None, reference=reference)
    if not per_image:
        result.pop("per_image", None)
    out_console.print_json(json.dumps(result))


def _train_base_signature():
    """train-base's options: the run's own (--out, --resume, ...) and one per recipe setting (BaseRecipe's fields,
    with their defaults and help)."""
    import dataclasses
    import inspect
    import typing

    from ..toybase.recipe import BaseRecipe

    def option(name, annotation, default, help):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, "--" + name.replace("_", "-"), help=help or None))

    params = [
        option("out", Path, ..., "Work folder (checkpoints, log, exported pipeline)."),
        option("resume", bool, False, "Continue from the work folder's checkpoint."),
        option("device", str, "auto", "cpu, cuda, or auto (cuda when available)."),
        option("workers", int, 0, "DataLoader processes rendering batches ahead (0 = in the training process); "
                                  "the data are the same either way."),
        option("export", Optional[Path], None, "Also export the fp16 pipeline here (e.g. the package weights dir)."),
    ]
    hints = typing.get_type_hints(BaseRecipe)
    params += [option(f.name, hints[f.name], f.default, f.metadata.get("help")) for f in dataclasses.fields(BaseRecipe)]
    return inspect.Signature(params)


RUN_OPTIONS = ("out", "resume", "device", "workers", "export")


def train_base(**options):
    """Train the toy base model from scratch (VAE, then text encoder + UNet); resumable.

    [bold]Examples[/bold]

      personalize toyworld train-base --out runs/toybase --workers 8          # the shipped recipe (~7 min on a GPU)

      personalize toyworld train-base --out runs/toybase --device cpu --minutes 90 --threads 2   # fit a CPU budget

      personalize toyworld train-base --out runs/toybase --resume --export weights/   # continue, then export
    """
    from ..toybase.recipe import BaseRecipe
    from ..toybase.train import train_base as run

    run_options = {k: options.pop(k) for k in RUN_OPTIONS}
    run(BaseRecipe(**options), **run_options, log=lambda line: out_console.print(line, markup=False, highlight=False))


train_base.__signature__ = _train_base_signature()
app.command("train-base")(train_base)


@app.command("evaluate-base")
def evaluate_base(
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Diffusers folder [default: the shipped weights]."),
    n: int = typer.Option(200, "--n", help="Held-out captions to sample."),
    steps: int = typer.Option(25, "--steps", help="Sampling steps."),
    guidance: float = typer.Option(4.0, "--guidance", help="Guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + i."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Keep the samples in this folder."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Save a truth|sample grid PNG here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the scores here."),
    threads: int = typer.Option(1, "--threads", help="torch.set_num_threads"),
    export_from: Optional[Path] = typer.Option(None, "--export-from", help="Training work folder: export its checkpoint instead."),
    to: Optional[Path] = typer.Option(None, "--to", help="Export destination [default: the package weights folder]."),
):
    """Sample the base on held-out captions and score them; or export weights from a run.

    [bold]Examples[/bold]

      personalize toyworld evaluate-base --n 200 --grid grid.png

      personalize toyworld evaluate-base --pipeline runs/toybase/pipeline --json scores.json

      personalize toyworld evaluate-base --export-from runs/toybase --to weights/   # an unfinished run's EMA weights
    """
    import torch

    from ..toybase import evaluate as E
    from ..toybase.model import folder_size_mb

    torch.set_num_threads(threads)
    if export_from is not None:
        dest = E.export_from_checkpoint(export_from, to if to is not None else E.WEIGHTS_DIR)
        say("exported to {} ({:.1f} MB)", dest, folder_size_mb(dest))
        out_console.print_json(json.dumps({"exported": str(dest)}))
        return
    res = E.evaluate_base(pipeline, n=n, out_dir=samples, steps=steps, guidance=guidance, seed=seed, grid=grid)
    summary = {k: v for k, v in res.items() if k != "per_image"}
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2) + "\n")
    out_console.print_json(json.dumps(summary, default=str))


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo's photos, concept, samples and index.html."),
    steps: int = typer.Option(DEMO_STEPS, "--steps", min=1, help="Training steps (x batch 8)."),
):
    """Run the whole flow on the toy world's base on the CPU: a held-out concept's photos -> Perfusion concept ->
    new scenes at several beta -> ground-truth scores -> index.html.

    [bold]Example[/bold]:  personalize demo --out demo_out
    """
    from ..demo import run_demo
    from ..paths import check_output

    check_output(out, folder=True)
    index = run_demo(out, steps=steps, log=lambda s: out_console.print(s, markup=False))
    say("open [bold]{}[/bold]", index.resolve())
