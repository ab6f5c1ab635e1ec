"""The ``personalize`` command line: thin — it parses, calls the API, prints with rich.

Every user error becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .demo import STEPS as DEMO_STEPS
from .errors import BadInputError, PersonalizeError
from .settings import check_options

app = typer.Typer(
    help="Teach a text-to-image model your own concepts, generate them anywhere, and measure how well it worked.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
out_console = Console()
err_console = Console(stderr=True)

BASE_HELP = "Base model: 'tiny' (built-in test model), a local diffusers folder, or a hub id."
METHOD_HELP = ("perfusion | residuals | textual-inversion | dreambooth | dreambooth-lora | custom-diffusion; each "
               "defaults to its paper's recipe ('personalize methods' lists them all).")


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


@app.command()
def train(
    images: List[Path] = typer.Option([], "--images", help="Folder with 3-15 photos of the concept (png/jpg/webp...); an optional caption beside a photo (photo.txt, the concept written as {} or as the token, e.g. 'a {} on a beach') replaces the neutral training prompts for it. Repeat with --token/--superclass for a multi-concept run (custom-diffusion)."),
    superclass: List[str] = typer.Option([], "--superclass", help="One-token word for what it is: 'teddy', 'teapot', 'dog'."),
    token: List[str] = typer.Option([], "--token", help="New placeholder word to use in prompts, e.g. '<my-teddy>'."),
    out: Path = typer.Option(..., "--out", help="Concept file to write (.safetensors)."),
    method: str = typer.Option("perfusion", "--method", help=METHOD_HELP),
    base: str = typer.Option("tiny", "--base", help=BASE_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps [default: the method's paper: perfusion 250, residuals 150]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step [default: perfusion 16, residuals 4]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for batches, flips, noise [default: 0]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in OUT.ckpt/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (without it an existing concept file is refused; --resume continues it instead)."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | fp16 (GPU) | bf16."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory."),
    compile_unet: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the UNet: minutes of compiling first, faster steps after (long GPU runs)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save a resumable checkpoint every N steps [default: 50]."),
    preview_every: Optional[int] = typer.Option(None, "--preview-every", help="Write a preview image to OUT.previews/ every N steps (0 = never)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of foreground masks named like the images: weights the loss."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (trainer and method); flags win."),
    set_: List[str] = typer.Option([], "--set", help="Method or trainer setting KEY=VALUE, e.g. --set lock=trained --set lr_value=0.02."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Residuals: the same LoRA rank in every proj_out [default: use --rank-fraction]; dreambooth-lora: LoRA rank (default 4)."),
    rank_fraction: Optional[float] = typer.Option(None, "--rank-fraction", help="Residuals: rank = round(F x channels) per proj_out [default: 0.05]."),
    train_token: Optional[bool] = typer.Option(None, "--train-token/--no-train-token", help="Residuals: also train the token's vector (the paper's ablation; overfits) [default: off]."),
    num_vectors: Optional[int] = typer.Option(None, "--num-vectors", help="Textual inversion: vectors per token (default 1)."),
    init_word: Optional[str] = typer.Option(None, "--init-word", help="Textual inversion: word the vectors start from (default: the superclass)."),
    class_images: List[str] = typer.Option([], "--class-images", help="DreamBooth / Custom Diffusion: your folder of class images (one per concept) instead of generating them with the base."),
    prior_loss_weight: Optional[float] = typer.Option(None, "--prior-loss-weight", help="DreamBooth / Custom Diffusion: weight of the class-image loss, 0 = off (default 1; dreambooth-lora 0)."),
    num_class_images: Optional[int] = typer.Option(None, "--num-class-images", help="Class images to generate per concept (cached per base and prompt; default 200)."),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder/--no-train-text-encoder", help="DreamBooth (-LoRA): also train the text encoder (default: off)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda [default: cuda if available]."),
    validate_every: int = typer.Option(0, "--validate-every", min=0, help="Best-step selection: every N steps (and at the last) sample a few images, score them and keep the step with the best harmonic mean (0 = off: keep the last step)."),
    evaluator: Optional[str] = typer.Option(None, "--evaluator", help="What --validate-every scores: clip (CLIP-I vs. the photos, CLIP-T) or toyworld:NAME (the toy world's fidelity and alignment for concept NAME) \\[default: clip]."),
    validation_prompt: List[str] = typer.Option([], "--validation-prompt", help="Prompt to validate with, {} = the concept; repeatable \\[default: 'a photo of a {}', 'a {} on the beach'; toyworld: a toy-world scene]."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="Local CLIP ViT-B-32 weights file for --evaluator clip \\[default: open_clip's 'openai' weights from the hub]."),
):
    """Train a concept from a folder of photos and write one .safetensors file.

    [bold]Examples[/bold]

      personalize train --method perfusion --base tiny --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors

      personalize train ... --steps 400 --batch-size 8 --set lock=trained   # the paper's trained-K ablation

      personalize train ... --resume        # continue an interrupted run from OUT.ckpt/

      torchrun --nproc_per_node 4 -m personalize.cli train ... --batch-size 16   # data parallel: 4 processes (GPUs, or CPU cores), 4 rows each

      personalize train ... --mixed-precision bf16 --compile   # GPU: bf16, and torch.compile the UNet (minutes to compile)

      personalize train --method residuals --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors

      personalize train --method textual-inversion --num-vectors 2 ...     # also: dreambooth, dreambooth-lora

      personalize train --method custom-diffusion --images cat/ --token "<cat>" --superclass cat --images chair/ --token "<chair>" --superclass chair --out both.safetensors

      (or list them in --config as concepts: a list of images / token / superclass mappings)

      personalize train ... --steps 400 --validate-every 50 --clip-weights clip-vit-b-32.safetensors   # keep the best step

      personalize train --base toy ... --validate-every 25 --evaluator toyworld:split_triangle   # toy world: ground-truth scores

    [bold]Method defaults[/bold] (each paper's or reference recipe; flags and --set override)

      perfusion: 250 steps, batch 16, lr 0.006 token / 0.03 o*_V, beta 0.75 / tau 0.10

      residuals: 150 steps, batch 4, lr 1e-3, LoRA rank 5% of channels on every proj_out, token frozen

      textual-inversion: 3000 steps, batch 4, lr 5e-4, 1 vector initialised from the superclass

      dreambooth: 800 steps, batch 1, lr 5e-6, prior weight 1 on 200 generated class images; writes OUT.pipeline/

      dreambooth-lora: 500 steps, batch 1, lr 1e-4, LoRA rank 4 on every attention projection, no prior

      custom-diffusion: 250 steps, batch 2, lr 2e-5, K/V deltas + token, prior weight 1 on 200 class images
    """
    from .paths import check_output
    from .training import train as run_train

    check_output(out, overwrite=overwrite or resume)  # before minutes of training, not after
    check_options(steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                  preview_every=preview_every)  # the method's own flags are checked as its settings
    settings = _load_settings(config, set_)
    flags = dict(steps=steps, batch_size=batch_size, seed=seed, mixed_precision=mixed_precision,
                 gradient_checkpointing=gradient_checkpointing, compile=compile_unet, checkpoint_every=checkpoint_every,
                 preview_every=preview_every)
    settings.update({k: v for k, v in flags.items() if v is not None})
    method_flags = dict(rank=rank, rank_fraction=rank_fraction, train_token=train_token)
    method_flags.update(num_vectors=num_vectors, init_word=init_word, prior_loss_weight=prior_loss_weight,
                        num_class_images=num_class_images, train_text_encoder=train_text_encoder,
                        class_images=(class_images[0] if len(class_images) == 1 else class_images) or None)
    settings.update({k: v for k, v in method_flags.items() if v is not None})
    images, token, superclass = _concept_args(images, token, superclass, settings.pop("concepts", None))
    validation = _validation(validate_every, evaluator, validation_prompt, clip_weights, images, device)
    path = run_train(base, images, token=token, superclass=superclass, out=out, method=method, masks=masks,
                     resume=resume, settings=settings, progress=True, device=device, validation=validation)
    if os.environ.get("RANK", "0") == "0":  # data parallel (accelerate launch / torchrun): the main process says it
        out_console.print(f"wrote concept [bold]{path}[/bold] ({path.stat().st_size:,} bytes)")


def _validation(every: int, evaluator: Optional[str], prompts: List[str], clip_weights: Optional[Path], images,
                device: Optional[str]):
    """The --validate-every validator (None when off); the other validation flags need it."""
    if not every:
        if evaluator or prompts or clip_weights:
            raise BadInputError("--evaluator, --validation-prompt and --clip-weights need --validate-every N (N > 0)")
        return None
    if clip_weights is not None and not clip_weights.is_file():
        raise BadInputError(f"--clip-weights '{clip_weights}' is not a file; pass a CLIP ViT-B-32 state dict (.safetensors)")
    import torch

    from .evaluation.validation import make_validator

    return make_validator(evaluator or "clip", every, images, prompts=prompts or None, clip_weights=clip_weights,
                          device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _concept_args(images: list, tokens: list, superclasses: list, listed) -> tuple:
    """--images/--token/--superclass (each once, or repeated per concept), or the YAML ``concepts:`` list."""
    if listed is not None:
        if images or tokens or superclasses:
            raise BadInputError("give the concepts either as --images/--token/--superclass or as 'concepts:' in --config, not both")
        if not isinstance(listed, list) or not all(isinstance(c, dict) and {"images", "token", "superclass"} <= set(c)
                                                   for c in listed):
            raise BadInputError("'concepts:' in --config must be a list of {images: DIR, token: <tok>, superclass: word}")
        images, tokens, superclasses = ([c[k] for c in listed] for k in ("images", "token", "superclass"))
    missing = [flag for flag, v in (("--images", images), ("--token", tokens), ("--superclass", superclasses)) if not v]
    if missing:
        raise BadInputError(f"missing {', '.join(missing)}: train needs the photos folder, the new token and its superclass")
    one = lambda v: v[0] if len(v) == 1 else list(v)  # noqa: E731
    return one(images), one(tokens), one(superclasses)


def _parse_concept_arg(text: str) -> tuple[str, dict]:
    path, _, rest = text.partition(":")
    knobs = {}
    if rest:
        for part in rest.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise BadInputError(f"--concept '{text}': knobs must look like FILE:beta=0.6,tau=0.15")
            knobs[key.strip()] = _parse_value(value.strip())
    return path, knobs


@app.command()
def generate(
    concept: List[str] = typer.Option([], "--concept", help="Concept file, optionally with its own knobs: FILE:beta=0.6,tau=0.15,lag=1,token=<new>. Repeat to compose concepts of any composable methods. Leave it out to render the base alone (before/after comparisons)."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt using the concepts' tokens, e.g. 'a <my-teddy> on the beach'. At most 75 CLIP tokens (the text encoder reads 77 with its start and end markers): a longer prompt is refused, never cut. A prompt without an attached concept's token gets a warning."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and prompts.json."),
    base: str = typer.Option("tiny", "--base", help=BASE_HELP),
    num_images: int = typer.Option(4, "--num-images", min=1, help="Images to generate."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps (paper: 50)."),
    guidance: float = typer.Option(6.0, "--guidance", help="Classifier-free guidance scale (paper: 6)."),
    seed: int = typer.Option(0, "--seed", help="Image k uses seed SEED+k."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Perfusion gate threshold: higher = weaker concept, better prompt alignment [concept default, 0.7]."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Perfusion gate temperature [concept default, 0.15]."),
    lag: bool = typer.Option(False, "--lag", help="Residuals: localized attention-guided sampling, the residuals apply only where the concept is attended."),
    lock: Optional[str] = typer.Option(None, "--lock", help="Perfusion key-locking: local, or global (K reads the prompt with each concept word replaced by its superclass; default beta then 0.5) [local]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace PNGs of the same prompt and seeds already in OUT (without it they are refused)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda [default: cuda if available]."),
):
    """Generate images of one or several trained concepts in new scenes (or of the base alone, without --concept).

    [bold]Examples[/bold]

      personalize generate --base tiny --concept teddy.safetensors --prompt "a <my-teddy> in the snow" --out samples/

      personalize generate --base tiny --prompt "a teddy in the snow" --out before/    # the base alone, to compare

      personalize generate ... --beta 0.8        # favour the prompt over the concept's look

      personalize generate --concept teddy.safetensors --prompt "a photo of a <my-teddy> teddy on the moon" --lag --out samples/

      personalize generate --concept teddy.safetensors:beta=0.6 --concept teapot.safetensors:lag=1 --concept style.safetensors \
          --prompt "a <teddy> pouring tea from a <teapot> teapot, in <watercolor> style" --lock global --out samples/
    """
    import torch

    from .base import load_base
    from .generation import generate as run_generate
    from .generation import write_images
    from .prompts import check_prompt_length

    check_options(num_images=num_images, steps=steps, guidance=guidance, seed=seed, beta=beta, tau=tau)
    _check_generate_out(out, prompt, seed, num_images, overwrite)
    attachment = _attachment(concept, prompt, dict(beta=beta, tau=tau, lag=lag, lock=lock))
    pipe = load_base(base, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with attachment(pipe):
        check_prompt_length(pipe, prompt)  # the concepts' tokens are in the tokenizer now
        with _step_bar(f"generating {num_images} image(s)", steps) as on_step:
            images = run_generate(pipe, prompt, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                                  on_step=on_step)
    paths = write_images(images, prompt, out, seed)
    out_console.print(f"wrote {len(paths)} image(s) to [bold]{out}[/bold]")


def _check_generate_out(out: Path, prompt: str, seed: int, num_images: int, overwrite: bool) -> None:
    """Before the base loads: a usable prompt, a writable --out folder, no PNG replaced without --overwrite."""
    from .generation import image_paths
    from .paths import check_output, refuse_existing
    from .prompts import check_prompt_text, read_prompts

    check_prompt_text(prompt)
    check_output(out, folder=True)
    if (out / "prompts.json").is_file():
        read_prompts(out / "prompts.json")  # merged after sampling: refuse a broken one now
    if not overwrite:
        refuse_existing(image_paths(prompt, out, seed, num_images))


def _attachment(concept_args: List[str], prompt: str, shared: dict):
    """``attachment(pipe)``: a context attaching the --concept files (checked now, before the base loads), or
    nothing for the base alone. Warns on stderr when the prompt leaves out a concept's token."""
    from .compose import attach, concept_tokens, prepare
    from .prompts import missing_tokens

    if not concept_args:
        used = [f"--{k}" for k, v in shared.items() if v not in (None, False)]
        if used:
            raise BadInputError(f"{', '.join(used)} set a concept's knobs, but no --concept is given; add --concept FILE")
        return lambda pipe: contextlib.nullcontext()
    items = [_parse_concept_arg(c) for c in concept_args]
    parts = prepare(items, **shared)  # refuse a bad composition before loading the base
    missing = missing_tokens(prompt, [t for p in parts for t in concept_tokens(p.concept)])
    if missing:
        _warn(f"the prompt does not contain {', '.join(missing)}, so that concept will not show; "
              "write its token where it belongs, e.g. 'a photo of a " + missing[0] + "'")
    return lambda pipe: attach(pipe, items, **shared)


@contextlib.contextmanager
def _step_bar(description: str, total: int):
    """A per-step progress bar on stderr; yields the ``on_step(n)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, completed=n)


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A concept .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """Show a concept file's header, tensors and size.

    [bold]Example[/bold]:  personalize inspect teddy.safetensors --json
    """
    from .concept import file_summary

    summary = file_summary(file)
    if as_json:
        out_console.print_json(json.dumps(summary))
        return
    header = summary["header"]
    out_console.print(f"[bold]{file}[/bold]: {header['method']} concept {header['token']!r} "
                      f"(superclass {header['superclass']!r}), {summary['file_bytes']:,} bytes")
    out_console.print(f"base fingerprint {header['base_fingerprint'].get('digest')}  "
                      f"inference defaults {header.get('inference_defaults')}")
    prov = header.get("provenance", {})
    out_console.print(f"trained {prov.get('steps')} steps, seed {prov.get('seed')}, on {prov.get('base')}, "
                      f"{len(prov.get('images', []))} images, personalize {prov.get('package_version')}")
    if "tokens" in header:
        out_console.print(f"concepts: {', '.join(f'{t} ({s})' for t, s in zip(header['tokens'], header['superclasses']))}")
    if header.get("composable") is False:
        out_console.print(f"[bold]not composable[/bold]: a new base (the fine-tuned pipeline in '{header.get('pipeline')}/' "
                          f"beside this file); attach it alone, or use that folder as --base and write "
                          f"'{header.get('config', {}).get('identifier', 'sks')}' for the token")
    table = Table("tensor", "shape", "dtype", "bytes")
    for name, t in summary["tensors"].items():
        table.add_row(name, "x".join(map(str, t["shape"])), t["dtype"], f"{t['bytes']:,}")
    out_console.print(table)


@app.command("export")
def export_concept(
    file: Path = typer.Argument(..., help="A concept .safetensors file."),
    fmt: Optional[str] = typer.Option(None, "--format", help="residuals: diffusers-lora; textual-inversion: diffusers | a1111; dreambooth-lora: diffusers-lora | kohya; custom-diffusion: diffusers (default: the first)."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    base: Optional[str] = typer.Option(None, "--base", help="The concept's base; needed by custom-diffusion, whose format stores full K/V weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an OUT folder that is not empty (without it, refused)."),
):
    """Write a concept in the format its community's tools load (export.json in the folder says how).

    [bold]Examples[/bold]

      personalize export teddy.safetensors --format diffusers-lora --out teddy-lora/     # residuals, dreambooth-lora

      then, without personalize:  pipe.load_lora_weights("teddy-lora"); pipe.load_textual_inversion("teddy-lora/token.safetensors")

      personalize export ti.safetensors --format diffusers --out ti/       # learned_embeds.safetensors

      personalize export ti.safetensors --format a1111 --out embeddings/  # <token>.pt (string_to_param)

      personalize export lora.safetensors --format kohya --out kohya/     # lora_kohya.safetensors

      personalize export cd.safetensors --base tiny --out cd/             # pytorch_custom_diffusion_weights.safetensors + <token>.safetensors

    DreamBooth (full) needs no export: its OUT.pipeline/ folder is a diffusers pipeline.
    """
    from .interop import export_concept
    from .paths import check_output

    check_output(out, folder=True, overwrite=overwrite)
    folder = export_concept(file, out, fmt, base)
    names = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")))
    out_console.print(f"wrote [bold]{folder}[/bold] ({names})")


@app.command("import")
def import_concept(
    file: Path = typer.Argument(..., help="The foreign weights file (.safetensors; .bin/.pt only with --allow-pickle)."),
    method: str = typer.Option(..., "--method", help="textual-inversion | dreambooth-lora | custom-diffusion."),
    out: Path = typer.Option(..., "--out", help="Concept file to write (.safetensors)."),
    superclass: List[str] = typer.Option(..., "--superclass", help="One-token word for what the concept is; custom-diffusion: one per --embeddings file, in the same order (or one for all)."),
    token: Optional[str] = typer.Option(None, "--token", help="Token to use (default: the one the file names)."),
    base: str = typer.Option("tiny", "--base", help=BASE_HELP),
    embeddings: List[Path] = typer.Option([], "--embeddings", help="custom-diffusion: the modifier token file(s), <token>.safetensors."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read a .bin/.pt pickle (weights only: torch.load(weights_only=True))."),
    set_: List[str] = typer.Option([], "--set", help="Method setting KEY=VALUE, e.g. --set identifier=ohwx."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT concept file (without it, refused)."),
):
    """Turn another tool's file into a concept file for this base.

    [bold]Examples[/bold]

      personalize import learned_embeds.safetensors --method textual-inversion --superclass cat --base tiny --out cat.safetensors

      personalize import my_lora.safetensors --method dreambooth-lora --superclass dog --token "<dog>" --set identifier=sks --out dog.safetensors

      personalize import pytorch_custom_diffusion_weights.safetensors --embeddings "<new1>.safetensors" --method custom-diffusion --superclass cat --out cat.safetensors

      personalize import pytorch_custom_diffusion_weights.safetensors --embeddings "<new1>.safetensors" --superclass cat --embeddings "<new2>.safetensors" --superclass chair --method custom-diffusion --out two.safetensors
    """
    from .interop import import_file
    from .paths import check_output

    check_output(out, overwrite=overwrite)
    path = import_file(base, file, method=method, out=out, token=token, superclass=superclass, embeddings=embeddings,
                       allow_pickle=allow_pickle, settings=_load_settings(None, set_))
    out_console.print(f"wrote concept [bold]{path}[/bold] ({path.stat().st_size:,} bytes)")


@app.command()
def covariance(
    base: str = typer.Option("tiny", "--base", help=BASE_HELP),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Text file, one caption per line [default: the base's own captions.txt if it ships one (the toy base does), else the built-in corpus]."),
    recompute: bool = typer.Option(False, "--recompute", help="Ignore the cache and compute again."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda."),
):
    """Compute and cache C, the text-encoder covariance Perfusion needs (once per base).

    The built-in corpus is 32 neutral templates x 261 nouns (8,352 captions).
    Training and generation compute it on first use; run this to do it ahead.

    [bold]Example[/bold]:  personalize covariance --base runwayml/stable-diffusion-v1-5
    """
    from rich.progress import Progress

    from .base import load_base
    from .covariance import base_captions, builtin_captions, covariance_path, corpus_id, load_or_compute_covariance

    lines = None
    if captions is not None:
        if not captions.is_file():
            raise BadInputError(f"--captions '{captions}' does not exist; pass a text file with one caption per line")
        lines = [line.strip() for line in captions.read_text().splitlines() if line.strip()]
        if not lines:
            raise BadInputError(f"--captions '{captions}' has no captions; put one caption per line")
    pipe = load_base(base, device=device)
    lines = lines if lines is not None else base_captions(pipe)
    total = len(lines if lines is not None else builtin_captions())
    with Progress(console=err_console) as progress:
        task = progress.add_task("encoding captions", total=total)
        C = load_or_compute_covariance(pipe, lines, on_batch=lambda n: progress.advance(task, n), recompute=recompute)
    out_console.print(f"C {tuple(C.shape)} for corpus {corpus_id(lines)} ({total:,} captions): "
                      f"{covariance_path(pipe, corpus_id(lines))}")


@app.command("methods")
def list_methods():
    """List the registered personalization methods and their defaults.

    [bold]Examples[/bold]

      personalize methods

      personalize train --method residuals --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors   # then train one
    """
    import dataclasses

    from . import methods as registry

    table = Table("method", "description", "sites", "defaults")
    for name in registry.names():
        cls = registry.get(name)
        trainer = [f"{k}={v}" for k, v in cls.train_defaults.items()]
        defaults = ", ".join(trainer + [f"{f.name}={f.default}" for f in dataclasses.fields(cls.Config)])
        table.add_row(name, cls.description, ", ".join(cls.sites), defaults)
    out_console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo's photos, concept, samples and index.html."),
    steps: int = typer.Option(DEMO_STEPS, "--steps", min=1, help="Training steps (x batch 8)."),
):
    """Run the whole flow on the toy world's base on the CPU: a held-out concept's photos -> Perfusion concept ->
    new scenes at several beta -> ground-truth scores -> index.html.

    [bold]Example[/bold]:  personalize demo --out demo_out
    """
    from .demo import run_demo
    from .paths import check_output

    check_output(out, folder=True)
    index = run_demo(out, steps=steps, log=lambda s: out_console.print(s))
    out_console.print(f"open [bold]{index.resolve()}[/bold]")


def _add_commands() -> None:
    from .cli_evaluate import evaluate

    app.command()(evaluate)


_add_commands()


def _add_subapps() -> None:
    from .cli_benchmark import app as benchmark_app
    from .cli_toyworld import app as toyworld_app

    app.add_typer(toyworld_app, name="toyworld")
    app.add_typer(benchmark_app, name="benchmark")


_add_subapps()


def _quiet_libraries() -> None:
    """Library warnings (hub retries, deprecations) would bury our one-line errors."""
    import logging
    import warnings

    for name in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch's weights-only reader warns (2 lines) about a plain pickle's protocol before we refuse or read it
    warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


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
