"""``personalize evaluate``: CustomConcept101's CLIP-T / CLIP-I / DINO-I for a folder of generated images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import BadInputError
from ..samples import read_samples
from .console import markup, out_console, print_json


def _weights(flag: str, path: Optional[Path]) -> Optional[Path]:
    if path is not None and not path.is_file():
        raise BadInputError(f"{flag} '{path}' is not a file; pass a local weights file (.safetensors)")
    return path


def _samples(folder: Path) -> tuple[list[Path], list[str]]:
    """The generated images of ``folder`` and their prompts (``prompts.json``: stem -> prompt)."""
    found = read_samples(folder, flag="--samples", need_images=True)
    return [p for p, _ in found], [t for _, t in found]


def evaluate(
    samples: Path = typer.Option(..., "--samples", help="Folder of generated PNGs + prompts.json, as 'personalize generate' writes."),
    reference: Path = typer.Option(..., "--reference", help="Folder of the concept's real photos (the training images)."),
    token: Optional[str] = typer.Option(None, "--token", help="The learned word to drop from prompts for CLIP-T \\[default: every <...> word]."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="Local OpenAI CLIP ViT-B/32 weights file (open_clip state dict; run with QuickGELU) \\[default: open_clip's 'openai' weights from the hub]."),
    dino_weights: Optional[Path] = typer.Option(None, "--dino-weights", help="Local DINO ViT-S/16 weights file \\[default: timm's vit_small_patch16_224.dino from the hub]."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps; a device this machine lacks is refused \\[default: cuda if available]."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes that decode and resize the image files, each file once for both CLIP and DINO (decoding and resizing, ~11 ms a 512-px PNG on one core, is what bounds the evaluator's rate; docs/PERFORMANCE.md); 0 decodes in this process \\[default: the usable cores - 1, at most 8, with a GPU; 0 on the CPU, where the two networks take the time and every core]."),
):
    """Score generated images the CustomConcept101 way: CLIP-T (2.5 x max(cos, 0) with the prompt minus the token),
    CLIP-I and DINO-I (all-pairs mean cosine against the reference photos).

    [bold]Examples[/bold]

      personalize evaluate --samples samples/ --reference photos/ --token "<my-teddy>"

      personalize evaluate --samples samples/ --reference photos/ --clip-weights clip.safetensors --dino-weights dino.safetensors --json   # offline
    """
    from ..devices import resolve_device
    from ..evaluation import ClipEncoder, DinoEncoder, list_images, score_concept

    from ..evaluation.decode import default_workers
    from ..settings import check_options

    check_options(workers=workers)
    device = str(resolve_device(device))  # a device this machine lacks: one line, before any work
    workers = default_workers(device) if workers is None else workers
    images, prompts = _samples(samples)
    if not reference.is_dir():
        raise BadInputError(f"--reference '{reference}' is not a folder; pass the folder of the concept's photos")
    references = list_images(reference)
    if not references:
        raise BadInputError(f"--reference '{reference}' has no images CustomConcept101 scores (.png .jpg .jpeg .tiff .JPG); pass the concept's photos")
    clip_weights, dino_weights = _weights("--clip-weights", clip_weights), _weights("--dino-weights", dino_weights)
    clip = ClipEncoder(weights=clip_weights, device=device)
    dino = DinoEncoder(weights=dino_weights, device=device)
    scores = score_concept(clip, dino, images, prompts, references, token=token,
                           workers=workers)
    if as_json:
        print_json({**scores, "samples": str(samples), "reference": str(reference)})
        return
    from rich.table import Table

    table = Table("score", "value", title=markup("{}: {} images vs. {} photos", samples, scores["n_images"],
                                                 len(references)))
    for key, name in (("clip_text", "CLIP-T"), ("clip_image", "CLIP-I"), ("dino_image", "DINO-I")):
        table.add_row(name, f"{scores[key]:.4f}")
    out_console.print(table)
