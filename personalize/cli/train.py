"""``personalize train``: a folder of photos -> one concept file. The trainer's and the methods' own flags are
derived from their Config dataclasses (:mod:`.flags`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from .. import methods as registry
from ..errors import BadInputError
from ..settings import check_options
from . import flags as derived
from .console import BASE_HELP, JSON_HELP, _load_settings, wrote_concept

METHOD_HELP = (f"{' | '.join(registry.names())}; each defaults to its paper's or reference recipe "
               "('personalize methods' lists them all, 'personalize methods NAME' a method's settings).")
TRAINER_FLAGS = derived.trainer_flags()
METHOD_FLAGS = derived.method_flags()


def train(
    images: List[Path] = typer.Option([], "--images", help="Folder with 3-15 photos of the concept (png/jpg/webp...); an optional caption beside a photo (photo.txt, the concept written as {} or as the token, e.g. 'a {} on a beach') replaces the neutral training prompts for it. Repeat with --token/--superclass for a multi-concept run (custom-diffusion)."),
    superclass: List[str] = typer.Option([], "--superclass", help="What it is, a word or class phrase: 'teapot', 'dog', 'penguin plushie' (the one-token concept word is --token)."),
    token: List[str] = typer.Option([], "--token", help="New placeholder word to use in prompts, e.g. '<my-teddy>'."),
    out: Path = typer.Option(..., "--out", help="Concept file to write (.safetensors)."),
    method: str = typer.Option("perfusion", "--method", help=METHOD_HELP),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP + " Required (or 'base:' in --config): there is no default, so a forgotten flag never trains on random weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in OUT.ckpt/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (without it an existing concept file is refused; --resume continues it instead)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (trainer and method); flags win."),
    set_: List[str] = typer.Option([], "--set", help="Method or trainer setting KEY=VALUE, e.g. --set lock=trained --set lr_value=0.02."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps; a device this machine lacks is refused [default: cuda if available]."),
    validate_every: Optional[int] = typer.Option(None, "--validate-every", min=0, help="Best-step selection every N steps, the older spelling: --validation-every N with --evaluator clip unless another --evaluator is given (0 = off: keep the last step)."),
    evaluator: Optional[str] = typer.Option(None, "--evaluator", help="Best-step selection: at each --validation-every step also score samples and keep the step with the best harmonic mean (Perfusion §4.4): clip (CLIP-I vs. the photos, CLIP-T) or toyworld:NAME (the toy world's fidelity and alignment for concept NAME); its prompts are --validation-prompt \\[default: none: samples only; clip's 8 prompts as Perfusion §4.4 ('a photo of a {}', 'a {} on the beach', ...), toyworld's toy-world scenes]."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="Local OpenAI CLIP ViT-B/32 weights file (open_clip state dict; run with QuickGELU) for --evaluator clip (given alone, it means --evaluator clip) \\[default: open_clip's 'openai' weights from the hub]."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    **flags,
):
    """Train a concept from a folder of photos and write one .safetensors file.

    [bold]Examples[/bold]

      personalize train --method perfusion --base stable-diffusion-v1-5/stable-diffusion-v1-5 --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors

      personalize train ... --steps 400 --batch-size 8 --set lock=trained   # the paper's trained-K ablation

      personalize train ... --resume        # continue an interrupted run from OUT.ckpt/

      torchrun --nproc_per_node 4 -m personalize.cli train ... --batch-size 16   # data parallel: 4 processes (GPUs, or CPU cores), 4 rows each

      personalize train ... --mixed-precision bf16   # GPU: bf16; the step compiled with CUDA graphs (--no-compile: eager)

      personalize train --method residuals --base ./my-sd15/ --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors

      personalize train --method textual-inversion --num-vectors 2 ...     # also: dreambooth, dreambooth-lora

      personalize train --method custom-diffusion --base stabilityai/stable-diffusion-xl-base-1.0 --images cat/ --token "<cat>" --superclass cat --images chair/ --token "<chair>" --superclass chair --out both.safetensors

      (or list them in --config as concepts: a list of images / token / superclass mappings, and the model as base:)

      personalize train ... --report-to tensorboard --validation-prompt "a {} on the beach" --validation-every 50   # loss curves in OUT.logs/, samples in OUT.samples/

      personalize train ... --lr-scheduler cosine --lr-warmup-steps 50 --save-every 100   # diffusers' schedules; a concept every 100 steps in OUT.steps/

      personalize train ... --clip-weights clip-vit-b-32.safetensors   # keep the best step (validated every 25 steps)

      personalize train --base toy ... --validation-every 25 --evaluator toyworld:split_triangle   # toy world: ground-truth scores

    [bold]Method defaults[/bold] (each paper's or reference recipe; flags and --set override)

METHOD_DEFAULTS
    """
    from ..paths import check_output
    from ..training import train as run_train

    from ..devices import resolve_device

    resolve_device(device)  # a device this machine lacks: one line, before any work
    check_output(out, overwrite=overwrite or resume)  # before minutes of training, not after
    trainer = derived.given(TRAINER_FLAGS, flags)
    check_options(**{k: v for k, v in trainer.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    # the method's own flags are checked as its settings
    settings = _load_settings(config, set_)
    base = _base(base, settings.pop("base", None))
    settings.update(trainer)
    settings.update(derived.given(METHOD_FLAGS, flags))
    images, token, superclass = _concept_args(images, token, superclass, settings.pop("concepts", None))
    validation = _validation(settings, validate_every, evaluator, clip_weights, images, device)
    path = run_train(base, images, token=token, superclass=superclass, out=out, method=method,
                     resume=resume, settings=settings, progress=True, device=device, validation=validation)
    if os.environ.get("RANK", "0") == "0":  # data parallel (accelerate launch / torchrun): the main process says it
        wrote_concept(path, as_json, run=True)


train.__doc__ = train.__doc__.replace("METHOD_DEFAULTS", derived.defaults_summary(indent="      "))
derived.with_flags(train, {"base": TRAINER_FLAGS, "set_": METHOD_FLAGS})


def _base(flag: Optional[str], configured) -> str:
    """--base, else ``base:`` from --config; neither is a one-line usage error (no silent default)."""
    base = flag if flag is not None else configured
    if base is None:
        raise BadInputError("train needs a base model: pass --base (e.g. --base stable-diffusion-v1-5/stable-diffusion-v1-5, "
                            "a local diffusers folder, or 'toy' / 'tiny') or put 'base: ...' in --config")
    if not isinstance(base, str) or not base.strip():
        raise BadInputError(f"'base:' in --config must be a model name or path, not {base!r}")
    return base


def _validation(settings: dict, validate_every: Optional[int], evaluator: Optional[str],
                clip_weights: Optional[Path], images, device: Optional[str]):
    """Sets ``validation_every`` in ``settings`` and returns the best-step validator (None without an evaluator).

    One cadence, --validation-every N (diffusers' --validation_steps): samples of --validation-prompt every N
    steps, scored too when an evaluator is given (--evaluator, or --clip-weights meaning clip). Unset, it is
    Perfusion's 25 when prompts or an evaluator are given. --validate-every N is its older spelling, which
    selects the best step with clip unless another --evaluator is given."""
    from ..evaluation.validation import VALIDATE_EVERY

    from ..settings import coerce

    every = settings.get("validation_every")
    every = None if every is None else coerce("validation_every", every, int, "--validation-every")
    if validate_every is not None:
        if every is not None and every != validate_every:
            raise BadInputError(f"--validate-every {validate_every} and --validation-every {every} disagree; "
                                "give --validation-every only")
        every = validate_every
        if validate_every and evaluator is None:
            evaluator = "clip"
    prompts = settings.get("validation_prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    scoring = evaluator is not None or clip_weights is not None
    if every is None and (scoring or prompts):
        every = VALIDATE_EVERY
    if every is not None:
        settings["validation_every"] = every
    if not every:
        if scoring or prompts:
            flag = "--validate-every" if validate_every is not None else "--validation-every"
            raise BadInputError(f"{flag} 0 turns validation off: drop --evaluator, --validation-prompt and "
                                "--clip-weights, or give --validation-every N (N > 0)")
        return None
    if not scoring:
        return None
    if clip_weights is not None and not clip_weights.is_file():
        raise BadInputError(f"--clip-weights '{clip_weights}' is not a file; pass an OpenAI CLIP ViT-B/32 state dict (.safetensors)")
    from ..devices import resolve_device
    from ..evaluation.validation import make_validator

    return make_validator(evaluator or "clip", every, images, prompts=prompts or None, clip_weights=clip_weights,
                          device=resolve_device(device))


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
