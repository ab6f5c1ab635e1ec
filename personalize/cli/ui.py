"""``personalize ui``: the local web app (:mod:`personalize.ui`), served on 127.0.0.1 unless asked otherwise."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .console import BASE_HELP, say


def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on: 127.0.0.1 (this machine only) by default; 0.0.0.0 opens it to your network (there is no login)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to serve on (gradio's default, 7860)."),
    base: str = typer.Option("toy", "--base", help=BASE_HELP + " \\[default: toy, the toy world's small model shipped in the package: works offline on a CPU]."),
    folder: Optional[Path] = typer.Option(None, "--folder", help="The app's folder: uploaded photos (runs/), concept files (concepts/), the gallery and compare grids; nothing is written outside it \\[default: $XDG_DATA_HOME/personalize/ui, i.e. ~/.local/share/personalize/ui]."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="Local OpenAI CLIP ViT-B/32 weights (open_clip state dict, .safetensors) for the Compare tab's CLIP-T / CLIP-I scores \\[default: open_clip's 'openai' weights from the hub, fetched when first asked for]."),
    dino_weights: Optional[Path] = typer.Option(None, "--dino-weights", help="Local DINO ViT-S/16 weights for the Compare tab's DINO-I score \\[default: timm's vit_small_patch16_224.dino from the hub, fetched when first asked for]."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps; one job at a time runs on it (a queue) [default: cuda if available]."),
):
    """Start the web app: train from photos, compose concepts with knob sliders, compare them side by side.

    gradio serves it (pip install 'personalize\\[ui]'); no share link and no analytics.

    [bold]Examples[/bold]

      personalize ui                                   # the toy base, http://127.0.0.1:7860

      personalize ui --base stable-diffusion-v1-5/stable-diffusion-v1-5 --folder ~/concepts-app --port 8080
    """
    from ..ui.app import import_gradio

    import_gradio()  # not installed: one line naming the extra, before any work
    from ..paths import check_output
    from ..ui.app import launch
    from ..ui.studio import Studio, default_folder

    folder = folder if folder is not None else default_folder()
    check_output(folder, folder=True, flag="--folder")
    for flag, given, what in (("--clip-weights", clip_weights, "an OpenAI CLIP ViT-B/32 state dict"),
                              ("--dino-weights", dino_weights, "a DINO ViT-S/16 state dict")):
        if given is not None and not given.is_file():
            from ..errors import BadInputError

            raise BadInputError(f"{flag} '{given}' is not a file; pass {what} (.safetensors)")
    studio = Studio(folder, base=base, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
    demo, _ = launch(studio, host=host, port=port, block=False)
    say("serving the web app at [bold]http://{}:{}[/bold] (folder {}); Ctrl-C stops it", host, port, folder)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        demo.close()
        say("stopped; a training run that was going resumes from its last checkpoint (Train tab, Resume)")
