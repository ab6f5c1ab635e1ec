"""``personalize generate``: one or several concepts (``--concept FILE:knob=value,...``) in new scenes, or the
base alone."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from ..schedulers import HELP as SCHEDULER_HELP
from ..schedulers import scheduler_class
from ..errors import BadInputError
from ..settings import check_options
from .console import BASE_HELP, JSON_HELP, _parse_value, _step_bar, _warn, print_json, say


def _parse_concept_arg(text: str) -> tuple[str, dict]:
    """``FILE:beta=0.6,lag=1,token=<x>`` -> ``(FILE, {knob: value})`` (:func:`personalize.knobs.split_concept_arg`:
    a FILE holding ':' works too), each value JSON-parsed where it can be; the values are checked where they are
    used (:func:`personalize.compose.prepare`), not here."""
    from ..knobs import split_concept_arg

    path, knobs = split_concept_arg(text)
    return path, {key: _parse_value(value) for key, value in knobs.items()}


def generate(
    concept: List[str] = typer.Option([], "--concept", help="Concept file, optionally with its own knobs: FILE:beta=0.6,tau=0.15,lag=1,token=<new>. Repeat to compose concepts of any composable methods. Leave it out to render the base alone (before/after comparisons)."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt using the concepts' tokens, e.g. 'a <my-teddy> on the beach'. At most 75 CLIP tokens (the text encoder reads 77 with its start and end markers): a longer prompt is refused, never cut. A prompt without an attached concept's token gets a warning."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and prompts.json."),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP + " \\[default: the base the concepts record in their headers (all the same one); without --concept it is required]."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    num_images: int = typer.Option(4, "--num-images", min=1, help="Images to generate."),
    steps: int = typer.Option(50, "--steps", min=1, help="Sampling steps (Perfusion paper: 50 DDIM steps)."),
    guidance: float = typer.Option(6.0, "--guidance", help="Classifier-free guidance scale (paper: 6)."),
    seed: int = typer.Option(0, "--seed", help="Image k uses seed SEED+k."),
    resolution: int = typer.Option(0, "--resolution", min=0, max=4096, help="Image size in pixels, a multiple of the base's stride (0 = the base's native size: 512 SD 1.5, 768 SD 2.1, 1024 SDXL)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Perfusion gate threshold: higher = weaker concept, better prompt alignment [concept default, 0.7]."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Perfusion gate temperature [concept default, 0.15]."),
    lag: bool = typer.Option(False, "--lag", help="Residuals: localized attention-guided sampling, the residuals apply only where the concept is attended."),
    lock: Optional[str] = typer.Option(None, "--lock", help="Perfusion key-locking: local, or global (K reads the prompt with each concept word replaced by its superclass; default beta then 0.5) [local]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace PNGs of the same prompt and seeds already in OUT (without it they are refused)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet for sampling: minutes of compiling first (cached across runs under the package cache), faster steps after; knobs never recompile. For long GPU runs."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps; a device this machine lacks is refused [default: cuda if available]."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Generate images of one or several trained concepts in new scenes (or of the base alone, without --concept).

    [bold]Examples[/bold]

      personalize generate --concept teddy.safetensors --prompt "a <my-teddy> in the snow" --out samples/   # on the base teddy's header records

      personalize generate ... --scheduler euler --steps 30      # sample with another scheduler (default: the base's own)

      personalize generate --base tiny --prompt "a teddy in the snow" --out before/    # the base alone, to compare

      personalize generate ... --beta 0.8        # favour the prompt over the concept's look

      personalize generate ... --num-images 64 --compile   # GPU: compile the UNet once, then sample faster

      personalize generate --concept teddy.safetensors --prompt "a photo of a <my-teddy> teddy on the moon" --lag --out samples/

      personalize generate --concept teddy.safetensors:beta=0.6 --concept teapot.safetensors:lag=1 --concept style.safetensors \
          --prompt "a <teddy> pouring tea from a <teapot> teapot, in <watercolor> style" --lock global --out samples/
    """
    from ..base import resolution as resolution_of
    from ..generation import generate as run_generate
    from ..generation import check_steps, write_images
    from ..prompts import check_prompt_length

    from ..devices import resolve_device

    device = resolve_device(device)  # a device this machine lacks: one line, before any work
    check_options(num_images=num_images, steps=steps, guidance=guidance, seed=seed, beta=beta, tau=tau)
    _check_generate_out(out, prompt, seed, num_images, overwrite)
    if scheduler is not None:
        scheduler_class(scheduler)
    attachment, parts = _attachment(concept, prompt, dict(beta=beta, tau=tau, lag=lag, lock=lock))
    pipe = _load(base, parts, device=device, scheduler=scheduler)
    size = resolution_of(pipe, resolution)  # a size this base cannot make is refused before any work
    check_steps(pipe, steps)  # and so are more steps than its scheduler has
    with attachment(pipe):
        check_prompt_length(pipe, prompt)  # the concepts' tokens are in the tokenizer now
        with _step_bar(f"generating {num_images} image(s)", steps) as on_step:
            images = run_generate(pipe, prompt, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                                  on_step=on_step, resolution=resolution, compile=compile)
    paths = write_images(images, prompt, out, seed)
    if as_json:
        from ..compose import recorded_base

        print_json({"out": str(out), "prompts_json": str(out / "prompts.json"),
                    "base": str(base) if base is not None else recorded_base(parts),
                    "scheduler": type(pipe.scheduler).__name__,
                    "concepts": [dict(zip(("file", "knobs"), _parse_concept_arg(c))) for c in concept],
                    "prompt": prompt, "steps": steps, "guidance": guidance, "resolution": size,
                    "images": [{"path": str(path), "prompt": prompt, "seed": seed + k} for k, path in enumerate(paths)]})
        return
    say("wrote {} image(s) to [bold]{}[/bold]", len(paths), out)


def _load(base: Optional[str], parts: list, **options):
    """--base, else the base the concepts record (one line when they record none, or several)."""
    from ..base import load_base
    from ..compose import load_base_for

    if base is not None:
        return load_base(base, **options)
    if not parts:
        raise BadInputError("generate without --concept renders a base alone: pass --base (e.g. --base "
                            "stable-diffusion-v1-5/stable-diffusion-v1-5, or 'toy' / 'tiny')")
    return load_base_for(parts, **options)


def _check_generate_out(out: Path, prompt: str, seed: int, num_images: int, overwrite: bool) -> None:
    """Before the base loads: a usable prompt, a writable --out folder, no PNG replaced without --overwrite."""
    from ..generation import image_paths
    from ..paths import check_output, refuse_existing
    from ..prompts import check_prompt_text, read_prompts

    check_prompt_text(prompt)
    check_output(out, folder=True)
    if (out / "prompts.json").is_file():
        read_prompts(out / "prompts.json")  # merged after sampling: refuse a broken one now
    if not overwrite:
        refuse_existing(image_paths(prompt, out, seed, num_images))


def _attachment(concept_args: List[str], prompt: str, shared: dict):
    """``(attachment, parts)``: ``attachment(pipe)`` is a context attaching the --concept files (checked now,
    before the base loads; ``parts`` is what :func:`personalize.compose.prepare` made of them), or nothing for
    the base alone. Warns on stderr when the prompt leaves out a concept's token."""
    from ..compose import attach, concept_tokens, prepare
    from ..prompts import missing_tokens

    if not concept_args:
        used = [f"--{k}" for k, v in shared.items() if v not in (None, False)]
        if used:
            raise BadInputError(f"{', '.join(used)} set a concept's knobs, but no --concept is given; add --concept FILE")
        return (lambda pipe: contextlib.nullcontext()), []
    items = [_parse_concept_arg(c) for c in concept_args]
    parts = prepare(items, **shared)  # refuse a bad composition before loading the base
    missing = missing_tokens(prompt, [t for p in parts for t in concept_tokens(p.concept)])
    if missing:
        _warn(f"the prompt does not contain {', '.join(missing)}, so that concept will not show; "
              "write its token where it belongs, e.g. 'a photo of a " + missing[0] + "'")
    return (lambda pipe: attach(pipe, items, **shared)), parts
