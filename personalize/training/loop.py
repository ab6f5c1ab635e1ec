"""The one trainer every method uses.

It owns everything that is not method-specific: reading the photos, caching
their VAE latents once (the images never change during a run), sampling
batches, flips, noise, timesteps and prompt templates from one seeded
generator, the denoising loss (optionally mask-weighted), accelerate's mixed
precision, gradient checkpointing, progress, checkpoints with exact resume,
and RNG-isolated preview images. A method only supplies its trainable state
(see :class:`personalize.methods.base.Method`).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .. import methods as method_registry
from ..base import fingerprint, load_base
from ..checkpoints import checkpoint_dir, has_checkpoint, load_checkpoint, save_checkpoint
from ..concept import Concept, save_concept
from ..errors import BadInputError, CheckpointError
from ..images import file_sha256, list_images, load_captions, load_images, load_masks
from ..parallel import DataParallel
from ..transfer import to_device
from ..paths import atomic_path
from ..templates import NEUTRAL_TEMPLATES, check_new_token, check_token, fill, single_token_id


@dataclass
class TrainConfig:
    """Settings shared by every method (the method's own live in its Config)."""

    steps: int = 250  # Perfusion paper: 210 on average, 400 at most (a method may default otherwise)
    batch_size: int = 16  # Perfusion paper (Method.train_defaults overrides per method)
    seed: int = 0
    flip_p: float = 0.5  # paper: horizontal flips with p = 0.5 (set 0 for asymmetric objects)
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    preview_every: int = 0  # 0 = no previews
    preview_prompt: str = "a photo of a {}"
    max_grad_norm: float = 1.0
    compile: bool = False  # torch.compile the UNet for this run (minutes of compiling; pays off on long GPU runs)


def split_overrides(method_cls, overrides: dict[str, Any] | None) -> tuple[dict, dict]:
    """Split a flat settings dict (e.g. from --config YAML) into trainer and method settings."""
    overrides = dict(overrides or {})
    method_settings = overrides.pop(method_cls.name, {}) or {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    train, unknown = {}, []
    for key, value in overrides.items():
        if key in train_fields:
            train[key] = value
        elif key in method_fields:
            method_settings[key] = value
        else:
            unknown.append(key)
    if unknown:
        known = sorted(train_fields | method_fields)
        raise BadInputError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return train, method_settings


def resolve_settings(method_cls, settings: dict[str, Any] | None) -> tuple[TrainConfig, Any]:
    """The trainer's and the method's configs: TrainConfig defaults < the method's ``train_defaults`` < ``settings``."""
    from ..settings import coerce_fields

    train_over, method_over = split_overrides(method_cls, settings)
    train_cfg = TrainConfig(**coerce_fields(TrainConfig, {**method_cls.train_defaults, **train_over}))
    return train_cfg, method_cls.make_config(method_over)


def preview_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".previews")


# ----------------------------------------------------------------------------- data
@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image, already scaled by the VAE's scaling factor."""
    means, stds = [], []
    scale = vae.config.scaling_factor
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start : start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """VAE latents of the training images and their mirror images, computed once per run."""

    def __init__(self, vae, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor | None = None,
                 captions: Sequence[str | None] | None = None):
        both = torch.cat([images, images.flip(-1)])
        self.mean, self.std = encode_latents(vae, both)
        self.n = images.shape[0]
        # per-image caption templates (``IMAGE.txt``), None where the method's templates apply
        self.captions = list(captions) if captions is not None and any(c is not None for c in captions) else None
        # which concept (multi-concept runs) or class prompt (prior images) each image belongs to
        self.labels = labels if labels is not None else torch.zeros(self.n, dtype=torch.long)
        self.masks = None
        if masks is not None:
            size = self.mean.shape[-1]
            m = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
            self.masks = torch.cat([m, m.flip(-1)])

    def sample(self, idx: torch.Tensor, flip: torch.Tensor, generator: torch.Generator):
        rows = idx + flip.long() * self.n
        eps = torch.randn((rows.shape[0], *self.mean.shape[1:]), generator=generator)
        at = to_device(rows, self.mean.device)
        latents = self.mean[at] + self.std[at] * to_device(eps, self.mean.device)
        return latents, (self.masks[rows] if self.masks is not None else None)


# ----------------------------------------------------------------------------- the loop
LOSS_EVERY = 10  # steps between reads of the loss value (each read is a host-device sync)


def _adamw(groups: list[dict], device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel when every parameter is a floating tensor on a GPU."""
    params = [p for g in groups for p in g["params"]]
    fused = torch.device(device).type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, weight_decay=0.0, **({"fused": True} if fused else {}))


class TextCache:
    """Text-encoder outputs per prompt, for runs where nothing trained acts on the text path (the prompts come
    from a few templates, so after the first steps the text encoder no longer runs)."""

    def __init__(self):
        self.rows: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, text_encoder, prompts: list[str], ids: torch.Tensor) -> torch.Tensor:
        missing = [i for i, p in enumerate(prompts) if p not in self.rows]
        if missing:
            first = {}
            for i in missing:
                first.setdefault(prompts[i], i)
            order = list(first.values())
            hidden = text_encoder(ids[order])[0]
            for row, i in zip(hidden, order):
                self.rows[prompts[i]] = row
        return torch.stack([self.rows[p] for p in prompts])


class FrozenInComputeDtype:
    """Under mixed precision, the frozen weights of the pipeline held in the compute dtype while training.

    Autocast would otherwise cast every frozen fp32 weight at every use (memory traffic, and a second copy
    of each weight kept for the backward pass). Trainable parameters stay as they are (fp32 master
    weights). :meth:`restore` puts back the original tensors themselves, so the pipeline is bit-identical
    after training; the originals wait in CPU memory meanwhile."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, pipe, trainable: Sequence[torch.Tensor], mixed_precision: str):
        self.dtype = self.DTYPES.get(mixed_precision)
        keep = {id(p) for p in trainable}
        modules = [m for m in (pipe.unet, pipe.text_encoder, pipe.vae) if m is not None]
        seen: set[int] = set()
        self.frozen = []
        for module in modules:
            for p in module.parameters():
                if id(p) in keep or id(p) in seen or p.requires_grad or not p.is_floating_point():
                    continue
                seen.add(id(p))
                self.frozen.append(p)
        self.saved: list[torch.Tensor] | None = None

    def cast(self) -> None:
        if self.dtype is None or self.saved is not None:
            return
        self.saved = []
        for p in self.frozen:
            original = p.data
            p.data = original.to(self.dtype)
            self.saved.append(original.to("cpu", non_blocking=True) if original.is_cuda else original)

    def restore(self) -> None:
        if self.saved is None:
            return
        for p, original in zip(self.frozen, self.saved):
            p.data = original.to(p.device)
        self.saved = None
def _validate_words(pipe, token: str, superclass: str) -> None:
    from ..edits.tokens import base_tokenizer

    tok = base_tokenizer(pipe)
    single_token_id(tok, superclass)
    check_new_token(tok, token)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)


def train(
    base,
    images: str | Path | Sequence[str | Path],
    *,
    token: str | Sequence[str],
    superclass: str | Sequence[str],
    out: str | Path,
    method: str = "perfusion",
    masks: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    callbacks: Iterable[Callable[[int, float, Any], None]] = (),
    device: str | torch.device | None = None,
    validation=None,
) -> Path:
    """Train one concept and write its file to ``out``; returns the path.

    ``base`` is a spec (``"tiny"``, a folder, a hub id) or a loaded pipeline.
    ``settings`` holds :class:`TrainConfig` fields and the method's Config
    fields (flat, or the latter nested under the method's name).
    ``callbacks`` are called as ``cb(step, loss, method)`` after every step
    (after that step's checkpoint), with the live method object; ``loss`` is a
    0-dim tensor on the training device (``float(loss)`` waits for the device,
    so the loop itself only reads it every ``LOSS_EVERY`` steps).
    A ``multi_concept`` method (Custom Diffusion) takes lists: one image
    folder, token and superclass per concept, trained jointly into one file.
    ``validation`` (a :class:`personalize.evaluation.validation.Validator`)
    selects the best step: it is called every ``validation.every`` steps and
    at the last step, and the state with the highest ``h`` (the earliest on
    ties) is what the concept file gets; the header's provenance records
    ``best_step`` and every ``validation`` result. A resumed run tracks the
    best only from the steps it validates after resuming.
    """
    from diffusers import DDPMScheduler

    method_cls = method_registry.get(method)
    cfg, mcfg = resolve_settings(method_cls, settings)
    out = Path(out)
    _check_run(cfg, out, resume, validation)
    folders, tokens, superclasses = _concepts(method_cls, images, token, superclass)
    per_concept = [list_images(f) for f in folders]
    image_paths = [p for paths in per_concept for p in paths]
    if len(folders) == 1:
        token, superclass = tokens[0], superclasses[0]
    else:
        token, superclass = tuple(tokens), tuple(superclasses)
        if masks:
            raise BadInputError("--masks works with one concept per run; train with masks one concept at a time")

    accelerator = _accelerator(cfg.mixed_precision, cpu=(str(device) == "cpu"))
    device = accelerator.device
    parallel = DataParallel(accelerator, cfg.batch_size)
    progress = progress and parallel.main
    pipe = load_base(base) if isinstance(base, (str, Path)) else base
    pipe.to(device)
    for tok, sc in zip(tokens, superclasses):
        _validate_words(pipe, tok, sc)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    captions = load_captions(image_paths, tokens)
    pixels = load_images(image_paths, size)
    mask_tensor = load_masks(masks, image_paths, size) if masks else None

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    labels = torch.tensor([i for i, paths in enumerate(per_concept) for _ in paths])
    cache = LatentCache(pipe.vae, pixels, mask_tensor, labels, captions)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    trainable = method_cls.for_training(pipe, token, superclass, mcfg)
    try:
        with parallel.main_first():  # class images are sampled (and cached) once
            prior = _prior_data(pipe, trainable, superclasses, size, progress)
        groups = [{k: v for k, v in g.items() if k != "name"} for g in trainable.param_groups()]
        optimizer = accelerator.prepare(_adamw(groups, device))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        frozen = FrozenInComputeDtype(pipe, params, cfg.mixed_precision)
        texts = TextCache() if trainable.text_path_frozen() else None
        unet = torch.compile(pipe.unet) if cfg.compile else pipe.unet  # the pipeline keeps its own module
        generator = torch.Generator().manual_seed(cfg.seed)
        base_fp = fingerprint(pipe)
        image_hashes = [file_sha256(p) for p in image_paths]
        run_id = {
            "method": method, "token": _json_words(token), "superclass": _json_words(superclass), "base": base_fp.digest,
            "images": image_hashes, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "config": dataclasses.asdict(mcfg),
            **({"captions": captions} if any(c is not None for c in captions) else {}),
        }
        ckpt = checkpoint_dir(out)
        start = load_checkpoint(ckpt, run_id, trainable, optimizer, generator) if resume else 0
        bar = _Progress(progress, cfg.steps, start, f"training {method} {' '.join(tokens)}", validation is not None)
        best = _BestKeeper(validation) if validation is not None else None
        began = time.time()
        try:
            frozen.cast()
            for step in range(start + 1, cfg.steps + 1):
                batch = draw_batch(cache, cfg.batch_size, cfg.flip_p, scheduler.config.num_train_timesteps,
                                   trainable.placeholders(), generator, device, trainable.templates())
                prior_batch = None if prior is None else draw_batch(
                    prior.cache, cfg.batch_size, cfg.flip_p, scheduler.config.num_train_timesteps, prior.prompts,
                    generator, device, ("{}",))
                with accelerator.autocast():
                    loss = denoising_step(pipe, scheduler, trainable, batch, prior_batch,
                                          prior.weight if prior else 0.0, unet=unet, texts=texts,
                                          rows=parallel.rows)
                accelerator.backward(loss)
                parallel.average_gradients(params)
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                # reading the loss waits for the device: only every LOSS_EVERY steps (and the last); data
                # parallel: the whole batch's loss (every process takes part)
                read = step % LOSS_EVERY == 0 or step == cfg.steps
                bar.update(step, float(parallel.mean(loss)) if read else None)
                if parallel.main and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    save_checkpoint(ckpt, step, run_id, trainable, optimizer, generator)
                if parallel.main and cfg.preview_every and step % cfg.preview_every == 0:
                    with accelerator.autocast():
                        write_preview(pipe, preview_dir(out) / f"step_{step:06d}.png",
                                      cfg.preview_prompt.format(trainable.placeholder()), cfg.seed)
                if parallel.main and best is not None and step % validation.every == 0:
                    with accelerator.autocast():
                        bar.show_h(best.validate(pipe, trainable, step))
                for cb in callbacks:
                    cb(step, loss, trainable)
            if parallel.main and best is not None:
                with accelerator.autocast():
                    best.finish(pipe, trainable, cfg.steps)
        finally:
            bar.close()
            frozen.restore()
        provenance = {
            "base": str(base) if isinstance(base, (str, Path)) else type(base).__name__,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "mixed_precision": cfg.mixed_precision, "images": image_hashes,
            "package_version": _version(), "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - began, 1),
            **(best.provenance() if best is not None else {}),
        }
        header = concept_header(method, token, superclass, mcfg, trainable.inference_defaults(), base_fp,
                                trainable.header_fields(), provenance)
        concept = Concept(header=header, tensors=trainable.concept_tensors())
    finally:
        trainable.remove()
        if cfg.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
    if not parallel.main:  # the main process writes the concept (and its artifacts)
        parallel.wait()
        return out
    concept.header.update(trainable.write_artifacts(out))
    path = save_concept(out, concept)
    parallel.wait()
    return path


def _json_words(words):
    return words if isinstance(words, str) else list(words)


def concept_header(method: str, token, superclass, config, defaults: dict, base_fp, extra: dict,
                   provenance: dict) -> dict[str, Any]:
    """A concept file's header (multi-concept files name their first token here, all of them in ``extra``)."""
    first = lambda v: v if isinstance(v, str) else v[0]  # noqa: E731
    return {
        "method": method, "token": first(token), "superclass": first(superclass),
        "config": dataclasses.asdict(config), "inference_defaults": defaults,
        "base_fingerprint": dict(base_fp.to_dict(), digest=base_fp.digest),
        **extra, "provenance": provenance,
    }


def _concepts(method_cls, images, token, superclass) -> tuple[list, list[str], list[str]]:
    """One (folder, token, superclass) per concept; several only for a multi-concept method."""
    from ..methods.shared import as_list, single_tokens, words_of

    folders = as_list(images)
    tokens, superclasses = words_of(token, superclass)
    if len(superclasses) == 1 and len(folders) > 1:
        superclasses = superclasses * len(folders)
    if not (len(folders) == len(tokens) == len(superclasses)):
        raise BadInputError(f"{len(folders)} image folders for {len(tokens)} tokens and {len(superclasses)} "
                            "superclasses; give one --token and --superclass per --images")
    if len(folders) > 1 and not method_cls.multi_concept:
        multi = [n for n in method_registry.names() if method_registry.get(n).multi_concept]
        raise BadInputError(f"{method_cls.name} trains one concept per run; train several jointly with "
                            f"{', '.join(multi) or 'a multi-concept method'}, or run once per concept")
    for tok in tokens:
        check_token(tok)
    single_tokens(tokens)
    return folders, tokens, superclasses


@dataclass
class PriorData:
    cache: "LatentCache"
    prompts: list[str]  # the class prompt of each label
    weight: float


def _prior_data(pipe, trainable, superclasses: list[str], size: int, progress: bool) -> PriorData | None:
    """The run's class images (generated by the base and cached, or the user's), encoded once.

    Called once the method is built (so its settings are checked before minutes of sampling); its edits are
    taken out meanwhile, so the images are the base model's."""
    spec = type(trainable).prior_spec(trainable.config, list(superclasses))
    if spec is None:
        return None
    trainable.remove()
    try:
        return _class_images(pipe, spec, size, progress)
    finally:
        trainable.install()


def _class_images(pipe, spec, size: int, progress: bool) -> PriorData:
    from .. import prior as prior_images

    todo = prior_images.missing_count(pipe, spec)
    bar = _Progress(progress and todo > 0, todo, 0, "class images", with_loss=False)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        bar.update(done[0])

    try:
        paths, labels = prior_images.resolve(pipe, spec, on_image=tick)
    finally:
        bar.close()
    cache = LatentCache(pipe.vae, load_images(paths, size), None, torch.tensor(labels))
    return PriorData(cache, spec.prompts, spec.weight)


def _check_run(cfg: TrainConfig, out: Path, resume: bool, validation=None) -> None:
    """Refuse bad settings before anything is loaded or written."""
    if validation is not None and not (isinstance(validation.every, int) and validation.every >= 1):
        raise BadInputError(f"validation every {validation.every!r} steps: use a positive whole number of steps")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise BadInputError(f"--mixed-precision must be no, fp16 or bf16, not '{cfg.mixed_precision}'")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise BadInputError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 (or no) on a CPU")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise BadInputError("--steps and --batch-size must be at least 1")
    if out.is_dir():
        raise BadInputError(f"--out '{out}' is a folder; pass a file path ending in .safetensors")
    if out.suffix != ".safetensors":
        raise BadInputError(f"--out '{out}' must end in .safetensors")
    if resume and not has_checkpoint(out):
        raise CheckpointError(f"--resume: no checkpoint in '{checkpoint_dir(out)}'; run without --resume to start training")


@dataclass
class Batch:
    latents: torch.Tensor
    mask: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]


def draw_batch(cache: "LatentCache", batch_size: int, flip_p: float, num_timesteps: int,
               placeholder: str | Sequence[str], generator: torch.Generator, device,
               templates: tuple[str, ...] = NEUTRAL_TEMPLATES) -> Batch:
    """Everything random about one step, drawn in a fixed order from ``generator``.

    ``placeholder`` may be a list: the words of each label (concept) of ``cache``."""
    idx = torch.randint(cache.n, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < flip_p
    if cache.captions is not None:  # a captioned image is never mirrored: its caption may say "left"
        flip &= torch.tensor([cache.captions[i] is None for i in idx.tolist()])
    latents, mask = cache.sample(idx, flip, generator)
    noise = to_device(torch.randn(latents.shape, generator=generator), device)
    timesteps = to_device(torch.randint(num_timesteps, (batch_size,), generator=generator), device)
    which = torch.randint(len(templates), (batch_size,), generator=generator)
    words = [placeholder] if isinstance(placeholder, str) else list(placeholder)
    labels = cache.labels[idx].tolist() if len(words) > 1 else [0] * batch_size
    prompts = [fill(templates[i], words[label]) for i, label in zip(which.tolist(), labels)]
    if cache.captions is not None:
        prompts = [p if cache.captions[i] is None else fill(cache.captions[i], words[label])
                   for p, i, label in zip(prompts, idx.tolist(), labels)]
    return Batch(to_device(latents, device), None if mask is None else to_device(mask, device), noise, timesteps,
                 prompts)


def denoising_step(pipe, scheduler, method, batch: Batch, prior: Batch | None = None,
                   prior_weight: float = 0.0, unet=None, texts: "TextCache | None" = None,
                   rows: Callable[[int], slice] | None = None) -> torch.Tensor:
    """Encode the prompts (method hook), noise the latents, predict, and return the loss.

    With a ``prior`` batch (class images, prior preservation) both go through one UNet pass and the loss is
    ``loss(batch) + prior_weight * loss(prior)``. ``unet``: the module to call instead of ``pipe.unet`` (its
    compiled form); ``texts``: encodings kept per prompt (when nothing trained acts on the text path);
    ``rows(n)``: the slice of an n-row batch part this process trains on (data parallel: the prompts of the whole
    batch are still encoded, so the method's text hook sees the same rows in every process)."""
    n = batch.latents.shape[0]
    if prior is not None:
        batch = Batch(torch.cat([batch.latents, prior.latents]), batch.mask, torch.cat([batch.noise, prior.noise]),
                      torch.cat([batch.timesteps, prior.timesteps]), batch.prompts + prior.prompts)
    tok = pipe.tokenizer
    ids = to_device(tok(batch.prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids, batch.latents.device)
    hidden = pipe.text_encoder(ids)[0] if texts is None else texts.encode(pipe.text_encoder, batch.prompts, ids)
    method.on_text_encoded(ids, hidden)
    mask = batch.mask
    if rows is not None and rows(n) != slice(0, n):  # this process's rows of the photos (and of the class images)
        mine = torch.arange(batch.latents.shape[0])
        mine = torch.cat([mine[:n][rows(n)], mine[n:][rows(n)]]) if prior is not None else mine[rows(n)]
        mine = to_device(mine, batch.latents.device)
        batch = Batch(batch.latents[mine], None, batch.noise[mine], batch.timesteps[mine], [])
        hidden = hidden[mine]
        mask = None if mask is None else mask[rows(n)]
        n = len(range(n)[rows(n)])
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = (pipe.unet if unet is None else unet)(noisy, batch.timesteps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        target = batch.noise
    if prior is None:
        return denoising_loss(pred, target, mask)
    return denoising_loss(pred[:n], target[:n], mask) + prior_weight * denoising_loss(pred[n:], target[n:], None)


def _accelerator(mixed_precision: str, cpu: bool):
    """An Accelerator; accelerate keeps process-wide state, so a second run in one process with other
    settings (e.g. bf16 after fp32, from Python) resets it first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("personalize")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


@torch.no_grad()
def write_preview(pipe, path: Path, prompt: str, seed: int) -> None:
    """One preview image from its own generator; the training RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        image = pipe(
            prompt, num_inference_steps=25, guidance_scale=6.0,
            generator=torch.Generator().manual_seed(seed), output_type="pil",
        ).images[0]
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


class _BestKeeper:
    """Best-step selection: each validation result, and a detached copy of the state with the best ``h``."""

    def __init__(self, validator):
        self.validator = validator
        self.results: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_h = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None

    def validate(self, pipe, trainable, step: int) -> float | None:
        scores = self.validator(pipe, trainable, step)
        finite = lambda v: None if v is None or not math.isfinite(float(v)) else float(v)  # noqa: E731
        result = {"step": step, **{k: finite(v) for k, v in scores.items()}}  # the header is strict JSON
        self.results.append(result)
        h = float("-inf") if result["h"] is None else result["h"]  # a failed (NaN) validation is never the best
        if self.best_state is None or h > self.best_h:  # ties keep the earlier step
            self.best_step, self.best_h = step, h
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainable.state_tensors().items()}
        return result["h"]

    def finish(self, pipe, trainable, last_step: int) -> None:
        """Validate the last step (if not done yet) and put the best state back into ``trainable``."""
        if not self.results or self.results[-1]["step"] != last_step:
            self.validate(pipe, trainable, last_step)
        if self.best_step != last_step:
            trainable.load_state_tensors(self.best_state)

    def provenance(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "validation": self.results}


class _Progress:
    """A rich progress bar on stderr with loss (``with_loss``) and ETA (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str, with_h: bool = False,
                 with_loss: bool = True):
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            *([TextColumn("loss {task.fields[loss]}")] if with_loss else []),
            *([TextColumn("h {task.fields[h]}")] if with_h else []),
            TimeRemainingColumn(), transient=False, console=Console(stderr=True),
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, loss="-", h="-")

    def update(self, step: int, loss: float | None = None) -> None:
        """Show ``step`` done, and ``loss`` when given (else the last one shown stays)."""
        if self.progress is None:
            return
        if loss is None:
            self.progress.update(self.task, completed=step)
        else:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def show_h(self, h: float | None) -> None:
        """The last validation's harmonic mean."""
        if self.progress is not None:
            self.progress.update(self.task, h="-" if h is None else f"{h:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
