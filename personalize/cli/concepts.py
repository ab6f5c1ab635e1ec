"""Commands on concept files and the method registry: ``inspect``, ``export``, ``import``, ``covariance``,
``methods``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import BadInputError
from .console import BASE_HELP, JSON_HELP, _load_settings, err_console, escaped, out_console, print_json, say, wrote_concept


def inspect(
    file: Path = typer.Argument(..., help="A concept .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """Show a concept file's header, tensors and size.

    [bold]Example[/bold]:  personalize inspect teddy.safetensors --json
    """
    from ..concept import file_summary
    from ..text_stack import FAMILIES

    summary = file_summary(file)
    if as_json:
        print_json(summary)
        return
    header = summary["header"]
    show = _shown
    out_console.print(f"[bold]{show(file)}[/bold]: {show(header['method'])} concept {show(repr(header['token']))} "
                      f"(superclass {show(repr(header['superclass']))}), {summary['file_bytes']:,} bytes")
    family = FAMILIES.get(header["base_fingerprint"].get("family"), "family not recorded")
    out_console.print(f"base fingerprint {show(header['base_fingerprint'].get('digest'))} ({show(family)})  "
                      f"inference defaults {show(header.get('inference_defaults'))}")
    prov = header.get("provenance", {})
    out_console.print(f"trained {show(prov.get('steps'))} steps, seed {show(prov.get('seed'))}, on "
                      f"{show(prov.get('base'))}, {len(prov.get('images', []))} images, personalize "
                      f"{show(prov.get('package_version'))}")
    if "tokens" in header:
        out_console.print(f"concepts: {show(', '.join(f'{t} ({s})' for t, s in zip(header['tokens'], header['superclasses'])))}")
    if header.get("composable") is False:
        out_console.print(f"[bold]not composable[/bold]: a new base (the fine-tuned pipeline in "
                          f"'{show(header.get('pipeline'))}/' beside this file); attach it alone, or use that folder "
                          f"as --base and write '{show(header.get('config', {}).get('identifier', 'sks'))}' for the token")
    table = Table("tensor", "shape", "dtype", "bytes")
    for name, t in summary["tensors"].items():
        table.add_row(show(name), "x".join(map(str, t["shape"])), t["dtype"], f"{t['bytes']:,}")
    out_console.print(table)


#: the longest header value ``inspect`` prints whole (a forged header may hold strings of up to 1 MiB, which
#: rich's highlighting and wrapping take minutes to lay out); ``--json`` prints everything
SHOWN_MAX = 200


def _shown(value, limit: int = SHOWN_MAX) -> str:
    """A header value as ``inspect`` prints it: cut to ``limit`` characters (saying how long it was) and escaped,
    so that it is shown as written, never read as rich markup."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} characters)"
    return escape(text)


def export_concept(
    file: Path = typer.Argument(..., help="A concept .safetensors file."),
    fmt: Optional[str] = typer.Option(None, "--format", help="residuals: diffusers-lora; textual-inversion: diffusers | a1111; dreambooth-lora: diffusers-lora | kohya; custom-diffusion: diffusers; dreambooth: single-file (default: the first)."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    base: Optional[str] = typer.Option(None, "--base", help="The concept's base, used by custom-diffusion (its format stores full K/V weights) \\[default: the base the concept's header records]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an OUT folder that is not empty (without it, refused)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Write a concept in the format its community's tools load (export.json in the folder says how).

    [bold]Examples[/bold]

      personalize export teddy.safetensors --format diffusers-lora --out teddy-lora/     # residuals, dreambooth-lora

      then, without personalize:  pipe.load_lora_weights("teddy-lora"); pipe.load_textual_inversion("teddy-lora/token.safetensors")

      personalize export ti.safetensors --format diffusers --out ti/       # learned_embeds.safetensors (SDXL: clip_l + clip_g)

      personalize export ti.safetensors --format a1111 --out embeddings/  # <token>.pt (string_to_param; SDXL: <token>.safetensors)

      personalize export lora.safetensors --format kohya --out kohya/     # lora_kohya.safetensors (SDXL: lora_te1_/lora_te2_)

      personalize export db.safetensors --format single-file --out ckpt/  # DreamBooth: checkpoint.safetensors for A1111 / ComfyUI / --base FILE

      personalize export cd.safetensors --out cd/             # pytorch_custom_diffusion_weights.safetensors + <token>.safetensors (on the base cd's header records)

    DreamBooth (full) needs no export: its OUT.pipeline/ folder is a diffusers pipeline.
    """
    from ..interop import export_concept
    from ..paths import check_output

    check_output(out, folder=True, overwrite=overwrite)
    folder = export_concept(file, out, fmt, base)
    if as_json:  # export.json as written, its file names as paths, and the folder
        info = json.loads((folder / "export.json").read_text())
        print_json({**info, "out": str(folder), "files": [str(folder / name) for name in info["files"]],
                    "export_json": str(folder / "export.json")})
        return
    names = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")))
    say("wrote [bold]{}[/bold] ({})", folder, names)


def import_concept(
    file: Path = typer.Argument(..., help="The foreign weights file (.safetensors; .bin/.pt only with --allow-pickle)."),
    method: str = typer.Option(..., "--method", help="textual-inversion | dreambooth-lora | custom-diffusion."),
    out: Path = typer.Option(..., "--out", help="Concept file to write (.safetensors)."),
    superclass: List[str] = typer.Option(..., "--superclass", help="What the concept is, a word or class phrase ('dog', 'penguin plushie'); custom-diffusion: one per --embeddings file, in the same order (or one for all)."),
    token: Optional[str] = typer.Option(None, "--token", help="Token to use (default: the one the file names; an SDXL clip_l + clip_g embedding names none)."),
    base: str = typer.Option(..., "--base", help=BASE_HELP + " Required: the concept is made for (and records) this base."),
    embeddings: List[Path] = typer.Option([], "--embeddings", help="custom-diffusion: the modifier token file(s), <token>.safetensors; textual-inversion on SDXL: the second encoder's learned_embeds_2.safetensors (diffusers' textual_inversion_sdxl.py writes a pair)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read a .bin/.pt pickle (weights only: torch.load(weights_only=True))."),
    set_: List[str] = typer.Option([], "--set", help="Method setting KEY=VALUE, e.g. --set identifier=ohwx."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT concept file (without it, refused)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Turn another tool's file into a concept file for this base.

    [bold]Examples[/bold]

      personalize import learned_embeds.safetensors --method textual-inversion --superclass cat --base stable-diffusion-v1-5/stable-diffusion-v1-5 --out cat.safetensors

      personalize import learned_embeds.safetensors --embeddings learned_embeds_2.safetensors --method textual-inversion --superclass cat --base stabilityai/stable-diffusion-xl-base-1.0 --out cat.safetensors   # diffusers' SDXL pair

      personalize import my_lora.safetensors --method dreambooth-lora --base stable-diffusion-v1-5/stable-diffusion-v1-5 --superclass dog --token "<dog>" --set identifier=sks --out dog.safetensors

      personalize import pytorch_custom_diffusion_weights.safetensors --embeddings "<new1>.safetensors" --method custom-diffusion --base stable-diffusion-v1-5/stable-diffusion-v1-5 --superclass cat --out cat.safetensors

      personalize import pytorch_custom_diffusion_weights.safetensors --embeddings "<new1>.safetensors" --superclass cat --embeddings "<new2>.safetensors" --superclass chair --method custom-diffusion --base stable-diffusion-v1-5/stable-diffusion-v1-5 --out two.safetensors
    """
    from ..interop import import_file
    from ..paths import check_output

    check_output(out, overwrite=overwrite)
    path = import_file(base, file, method=method, out=out, token=token, superclass=superclass, embeddings=embeddings,
                       allow_pickle=allow_pickle, settings=_load_settings(None, set_))
    wrote_concept(path, as_json)


def covariance(
    base: str = typer.Option(..., "--base", help=BASE_HELP + " Required."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Text file, one caption per line [default: the base's own captions.txt if it ships one (the toy base does), else the built-in corpus]."),
    recompute: bool = typer.Option(False, "--recompute", help="Ignore the cache and compute again."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps; a device this machine lacks is refused [default: cuda if available]."),
):
    """Compute and cache C, the text-encoder covariance Perfusion needs (once per base).

    The built-in corpus is 32 neutral templates x 261 nouns (8,352 captions).
    Training and generation compute it on first use; run this to do it ahead.

    [bold]Example[/bold]:  personalize covariance --base stable-diffusion-v1-5/stable-diffusion-v1-5
    """
    from rich.progress import Progress

    from ..base import load_base
    from ..covariance import base_captions, builtin_captions, covariance_path, corpus_id, load_or_compute_covariance

    from ..devices import resolve_device

    device = resolve_device(device)
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
    say("C {} for corpus {} ({:,} captions): {}", tuple(C.shape), corpus_id(lines), total,
        covariance_path(pipe, corpus_id(lines)))


def list_methods(
    name: Optional[str] = typer.Argument(None, help="A method: list its settings (--set KEY=VALUE, or the flag where "
                                                    "there is one) with defaults and help, and its inference knobs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead: {\"methods\": [...]}, "
                                 "or with NAME that method's: name, description, recipe, sites, train_defaults, "
                                 "settings (name, default, flag, help, scope), knobs."),
):
    """List the registered personalization methods and their defaults; with NAME, that method's settings and knobs.

    [bold]Examples[/bold]

      personalize methods

      personalize methods residuals     # every setting of one method: default, flag, what it does; its knobs

      personalize methods residuals --json | jq '.settings[] | select(.flag) | .flag'   # for scripts

      personalize train --method residuals --images photos/ --superclass teddy --token "<my-teddy>" --out teddy.safetensors   # then train one
    """
    from .. import methods as registry
    from .flags import fmt, method_fields, trainer_defaults

    if name is not None:
        cls = registry.card(name)
        print_json(_method_json(cls)) if as_json else _method_settings(cls)
        return
    if as_json:
        print_json({"methods": [_method_json(registry.card(n)) for n in registry.names()]})
        return
    table = Table("method", "description (recipe: where the defaults come from)", "sites", "defaults")
    for name in registry.names():
        cls = registry.card(name)
        shown = {**cls.train_defaults, "masks": trainer_defaults(cls)["masks"]}  # every method's loss masks
        trainer = [f"{k}={fmt(v)}" for k, v in shown.items()]
        defaults = ", ".join(trainer + [f"{f.name}={fmt(f.default)}" for f in method_fields(cls)])
        table.add_row(*escaped(name, _described(cls), ", ".join(cls.sites), defaults))
    out_console.print(table)


def _described(cls) -> str:
    """The method's description and, on the next line, its recipe (the source of its defaults)."""
    return f"{cls.description}\nrecipe: {cls.recipe}" if cls.recipe else cls.description


def _settings(cls) -> list[dict]:
    """Every setting of a method, its Config's then the trainer's: name, default (this method's), flag (None:
    ``--set NAME=VALUE`` only), help, scope (method | trainer)."""
    import dataclasses

    from ..training.config import TrainConfig
    from .flags import method_fields, trainer_defaults

    defaults = trainer_defaults(cls)
    rows = [(f, f.default, "method") for f in method_fields(cls)]
    rows += [(f, defaults[f.name], "trainer") for f in dataclasses.fields(TrainConfig)]
    return [{"name": f.name, "default": default,
             "flag": "--" + f.name.replace("_", "-") if f.metadata.get("flag") else None,
             "help": f.metadata.get("help", ""), "scope": scope} for f, default, scope in rows]


def _method_json(cls) -> dict:
    """``personalize methods [NAME] --json``: one method's card and settings."""
    return {"name": cls.name, "description": cls.description, "recipe": cls.recipe, "sites": list(cls.sites),
            "train_defaults": dict(cls.train_defaults), "settings": _settings(cls), "knobs": dict(cls.knobs)}


def _method_settings(cls) -> None:
    """``personalize methods NAME``: the method's and the trainer's settings, then its inference knobs."""
    from .flags import fmt

    table = Table("setting", "default", "flag", "help", title=escape(f"{cls.name}: {cls.description}"))
    for row in _settings(cls):
        table.add_row(*escaped(row["name"], fmt(row["default"]), row["flag"] or "--set", row["help"]))
    out_console.print(table)
    if cls.recipe:
        say("recipe: {}", cls.recipe)
    if cls.knobs:
        knobs = Table("knob", "help", title="inference knobs: generate --concept FILE:KNOB=VALUE,...")
        for knob, text in cls.knobs.items():
            knobs.add_row(*escaped(knob, text))
        out_console.print(knobs)
