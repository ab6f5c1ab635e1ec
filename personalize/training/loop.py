"""``train()``: the training loop of every method (the package docstring says what the trainer owns)."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import methods as method_registry
from .. import families, text_stack
from ..base import MAX_RESOLUTION, base_name, declared_families, fingerprint, load_base, resolution
from ..checkpoints import checkpoint_dir, has_checkpoint, load_checkpoint, save_checkpoint
from ..concept import Concept, save_concept
from ..errors import BadInputError, CheckpointError
from ..images import file_sha256, list_images, load_captions, load_images, stack_masks
from ..devices import resolve_device
from ..parallel import DataParallel, join
from ..segment import mask_files
from ..paths import atomic_path, check_output
from ..prompts import check_captions, check_prompt_length, check_prompt_text
from ..templates import check_new_token, check_phrases_without_tokens, check_template, check_token, phrase_ids
from .best import _BestKeeper, _Progress
from .buckets import bucket_sizes, bucketed_cache
from .buckets import settings as bucket_settings
from .cache import CaptionOptions, LatentCache, PriorData, draw_batch
from .compiled import check_mode, compile_mode, mark_step_begin, training_denoiser
from .config import TrainConfig, resolve_settings
from .fast_path import FrozenInComputeDtype, TextCache, _adamw
from .lr_schedule import check_schedule, make_lr_scheduler
from .snapshots import sample_prompts, step_concept, write_samples
from .step import denoising_step
from .trackers import Tracker, check_report_to, hyperparameters, logs_dir


def preview_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".previews")


LOSS_EVERY = 10  # steps between reads of the loss value (each read is a host-device sync)


def _validate_words(pipe, token: str, superclass: str) -> None:
    from ..edits.tokens import base_tokenizer

    tok = base_tokenizer(pipe)
    phrase_ids(tok, superclass)  # a class phrase of one or more tokens ("dog", "penguin plushie")
    check_new_token(tok, token)


def train(
    base,
    images: str | Path | Sequence[str | Path],
    *,
    token: str | Sequence[str],
    superclass: str | Sequence[str],
    out: str | Path,
    method: str = "perfusion",
    masks: str | Path | None = "default",
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
    ``masks`` weights the loss: ``"auto"`` (zero-shot masks, :mod:`personalize.segment`; the segmenter is the
    ``segmenter`` setting), ``"none"``/None, or a folder of masks named like the photos; ``"default"`` takes
    the ``masks`` setting, else the method's default (Perfusion: auto, its paper's choice; the others: none).
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
    Watching a run (settings, see :class:`TrainConfig`): ``report_to`` logs loss, learning rate, gradient norm,
    step time and the sample images to a tracker (:mod:`.trackers`); ``validation_every`` writes one sample per
    ``validation_prompt`` (default: the validator's prompts, else ``preview_prompt``) to ``OUT.samples/`` every
    N steps and at the last; ``save_every`` writes a complete concept to ``OUT.steps/`` every N steps;
    ``lr_scheduler``/``lr_warmup_steps`` schedule the learning rate with diffusers' ``get_scheduler``.
    """
    method_cls = method_registry.get(method)
    device = resolve_device(device)  # a device this machine lacks is refused before any work
    if not (isinstance(masks, str) and masks == "default"):  # the argument wins over settings and the method
        settings = {**(settings or {}), "masks": "none" if masks is None else masks}
    masks = (settings or {}).get("masks")
    cfg, mcfg = resolve_settings(method_cls, {k: v for k, v in (settings or {}).items() if k != "masks"}
                                 if isinstance(masks, os.PathLike) else settings)
    masks = masks if isinstance(masks, os.PathLike) else cfg.masks
    out = Path(out)
    templates = _check_run(cfg, out, resume, validation)
    folders, tokens, superclasses = _concepts(method_cls, images, token, superclass)
    check_phrases_without_tokens(tokens, superclasses)  # before any work
    repeats = _check_data(cfg, method_cls, len(folders))
    per_concept = [list_images(f) for f in folders]
    image_paths = [p for paths in per_concept for p in paths]
    if len(folders) == 1:
        token, superclass = tokens[0], superclasses[0]
    else:
        token, superclass = tuple(tokens), tuple(superclasses)
        if isinstance(masks, os.PathLike) or masks not in ("none", "auto"):
            raise BadInputError("--masks DIR works with one concept per run; use --masks auto or none, or train "
                                "one concept at a time")
    if isinstance(base, (str, Path)):  # a method the base's family lacks: refused before masks or weights load
        declared = declared_families(base)
        if declared and all(method_registry.refusal(method_cls.name, f) for f in declared):
            method_cls.check_family(declared[0])
    # before any training work: an unreachable segmenter stops the run here (masks are segmented once, cached)
    phrases = [sc for sc, paths in zip(superclasses, per_concept) for _ in paths]
    mask_paths, mask_source = mask_files(masks, image_paths, phrases, cfg.segmenter, device)

    if join(device, cfg.init_timeout) is None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # one process on cuda:N (a launcher gives each process its own GPU)
    # cpu=True on a CPU device: under a launcher accelerate then trains data-parallel with gloo (MULTI_CPU)
    accelerator = _accelerator(cfg.mixed_precision, cpu=(device.type == "cpu"))
    device = accelerator.device
    parallel = DataParallel(accelerator, cfg.batch_size)
    progress = progress and parallel.main
    pipe = load_base(base) if isinstance(base, (str, Path)) else base
    pipe.to(device)
    method_cls.check_base(pipe)  # a family without this method's sites: refused before any work
    for tok, sc in zip(tokens, superclasses):
        _validate_words(pipe, tok, sc)
    size = resolution(pipe, cfg.resolution)
    frames = bucket_sizes(size, *bucket_settings(pipe, size, cfg.bucket_step, cfg.bucket_min, cfg.bucket_max)) \
        if cfg.buckets else None
    captions = load_captions(image_paths, tokens)

    family = families.of(pipe)
    for module in (family.denoiser_of(pipe), pipe.vae, *text_stack.encoders(pipe)):
        module.requires_grad_(False)
        module.eval()
    if cfg.gradient_checkpointing:
        family.denoiser_of(pipe).enable_gradient_checkpointing()
    labels = torch.tensor([i for i, paths in enumerate(per_concept) for _ in paths])
    weights = torch.tensor([float(repeats[label]) for label in labels.tolist()])
    if frames is None:
        mask_tensor = stack_masks(mask_paths, size) if mask_paths is not None else None
        cache = LatentCache(pipe.vae, load_images(image_paths, size), mask_tensor, labels, captions, weights)
    else:
        cache = bucketed_cache(pipe.vae, image_paths, frames, mask_paths=mask_paths, labels=labels,
                               captions=captions, weights=weights)
        mask_tensor = None if mask_paths is None else torch.cat([c.masks.flatten() for c in cache.caches])
    data = _data_settings(cfg, repeats)
    caption_options = CaptionOptions(cfg.caption_dropout, cfg.shuffle_tags, cfg.keep_tags) \
        if cfg.caption_dropout or cfg.shuffle_tags else None
    scheduler = family.noise_schedule(pipe)  # training's: DDPM or flow matching, whatever samples

    trainable = method_cls.for_training(pipe, token, superclass, mcfg)
    try:
        check_captions(pipe, captions, image_paths, trainable.placeholders(), labels.tolist(),  # tokens added now
                       (*trainable.templates(), *([cfg.preview_prompt] if cfg.preview_every else [])))
        with parallel.main_first():  # class images are sampled (and cached) once
            prior = _prior_data(pipe, trainable, superclasses, size, progress, frames)
        named = trainable.param_groups()
        group_names = [g.get("name", str(i)) for i, g in enumerate(named)]
        groups = [{k: v for k, v in g.items() if k != "name"} for g in named]
        optimizer = accelerator.prepare(_adamw(groups, device))
        lr_scheduler = make_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.steps)
        prompts = sample_prompts(templates, trainable.placeholders()) if cfg.validation_every else []
        for prompt in prompts:  # a prompt the text encoder would cut is refused before training, not at step N
            check_prompt_length(pipe, prompt, "--validation-prompt")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        frozen = FrozenInComputeDtype(pipe, params, cfg.mixed_precision)
        texts = TextCache() if trainable.text_path_frozen() else None
        denoiser = family.denoiser_of(pipe)  # DreamBooth's trained copy once installed
        mode = compile_mode(cfg.compile, cfg.compile_mode, device, static_shapes=frames is None)
        unet = training_denoiser(denoiser, mode)  # the pipeline keeps its own (eager) module
        generator = torch.Generator().manual_seed(cfg.seed)
        base_fp = fingerprint(pipe)
        image_hashes = [file_sha256(p) for p in image_paths]
        run_id = {
            "method": method, "token": _json_words(token), "superclass": _json_words(superclass), "base": base_fp.digest,
            "images": image_hashes, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "config": dataclasses.asdict(mcfg),
            **({"captions": captions} if any(c is not None for c in captions) else {}),
            **({"masks": _tensor_sha256(mask_tensor)} if mask_tensor is not None else {}),
            **({"resolution": size} if cfg.resolution else {}),
            **({"lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps}
               if (cfg.lr_scheduler, cfg.lr_warmup_steps) != ("constant", 0) else {}),
            **({"data": data} if data else {}),
        }
        ckpt = checkpoint_dir(out)
        start = load_checkpoint(ckpt, run_id, trainable, optimizer, generator, lr_scheduler) if resume else 0
        best = _BestKeeper(validation) if validation is not None else None
        logging = cfg.report_to != "none"  # the same in every process (the loss is averaged by all of them)
        began = time.time()

        def concept_at(step: int, final: bool = False) -> Concept:
            """The concept file of the live state after ``step`` steps (``final``: with the best-step record)."""
            provenance = {
                "base": base_name(base),
                "steps": step, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "mixed_precision": cfg.mixed_precision, "images": image_hashes, "resolution": size,
                "package_version": _version(), "torch": torch.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - began, 1), **mask_source,
                **({"data": data} if data else {}),
                **({"buckets": cache.sizes()} if frames is not None else {}),
                **(best.provenance() if best is not None and final else {}),
            }
            header = concept_header(method, token, superclass, mcfg, trainable.inference_defaults(), base_fp,
                                    trainable.header_fields(), provenance, text_stack.widths(pipe))
            return Concept(header=header, tensors=trainable.concept_tensors())

        def save_step(step: int) -> None:
            """``OUT.steps/step-NNNNNN.safetensors`` (and its artifacts), as the final concept is written:
            frozen weights back in their own dtype and the method's edits out, then both put back."""
            frozen.restore()
            try:
                concept = concept_at(step)
                path = step_concept(out, step)
                path.parent.mkdir(parents=True, exist_ok=True)
                trainable.remove()
                try:
                    concept.header.update(trainable.write_artifacts(path))
                    save_concept(path, concept)
                finally:
                    trainable.install()
            finally:
                frozen.cast()

        bar = _Progress(progress, cfg.steps, start, f"training {method} {' '.join(tokens)}", validation is not None)
        tracker = None
        try:
            tracker = Tracker(cfg.report_to, out, {"method": method, **hyperparameters(cfg, mcfg)},
                              enabled=parallel.main)
            frozen.cast()
            for step in range(start + 1, cfg.steps + 1):
                began_step = time.perf_counter()
                batch = draw_batch(cache, cfg.batch_size, cfg.flip_p, family.num_train_steps(scheduler),
                                   trainable.placeholders(), generator, device, trainable.templates(),
                                   caption_options)
                prior_batch = None if prior is None else draw_batch(
                    prior.cache, cfg.batch_size, cfg.flip_p, family.num_train_steps(scheduler), prior.prompts,
                    generator, device, ("{}",))
                mark_step_begin(mode)
                with accelerator.autocast():
                    loss = denoising_step(pipe, scheduler, trainable, batch, prior_batch,
                                          prior.weight if prior else 0.0, unet=unet, texts=texts,
                                          rows=parallel.rows)
                accelerator.backward(loss)
                parallel.average_gradients(params)
                grad_norm = None
                if cfg.max_grad_norm:  # 0 / None: no clipping (the method's reference does not clip)
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                elif logging:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                lrs = [g["lr"] for g in optimizer.param_groups]  # the rates this step trains with
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                # reading the loss waits for the device: only every LOSS_EVERY steps (and the last, and every step
                # for a tracker); data parallel: the whole batch's loss (every process takes part)
                read = step % LOSS_EVERY == 0 or step == cfg.steps or logging
                mean_loss = float(parallel.mean(loss)) if read else None
                bar.update(step, mean_loss)
                if tracker.active:
                    tracker.log({"loss": mean_loss, "grad_norm": float(grad_norm), "lr": lrs[0],
                                 "step_time": time.perf_counter() - began_step,
                                 **({f"lr/{n}": lr for n, lr in zip(group_names, lrs)} if len(lrs) > 1 else {})},
                                step)
                if parallel.main and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    save_checkpoint(ckpt, step, run_id, trainable, optimizer, generator, lr_scheduler)
                if parallel.main and cfg.preview_every and step % cfg.preview_every == 0:
                    with accelerator.autocast():
                        image = write_preview(pipe, preview_dir(out) / f"step_{step:06d}.png",
                                              cfg.preview_prompt.format(trainable.placeholder()), cfg.seed)
                    tracker.log_images({"preview": image}, step)
                if parallel.main and cfg.validation_every and (step % cfg.validation_every == 0 or step == cfg.steps):
                    with accelerator.autocast():
                        tracker.log_images(write_samples(pipe, out, step, prompts, cfg.seed), step)
                if parallel.main and cfg.save_every and step % cfg.save_every == 0:
                    save_step(step)
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
            if tracker is not None:
                tracker.finish()
            frozen.restore()
        concept = concept_at(cfg.steps, final=True)
    finally:
        trainable.remove()
        if cfg.gradient_checkpointing:
            family.denoiser_of(pipe).disable_gradient_checkpointing()
    if not parallel.main:  # the main process writes the concept (and its artifacts)
        parallel.wait()
        return out
    concept.header.update(trainable.write_artifacts(out))
    path = save_concept(out, concept)
    parallel.wait()
    return path


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _json_words(words):
    return words if isinstance(words, str) else list(words)


def concept_header(method: str, token, superclass, config, defaults: dict, base_fp, extra: dict,
                   provenance: dict, text_widths: list[int] = ()) -> dict[str, Any]:
    """A concept file's header (multi-concept files name their first token here, all of them in ``extra``).

    ``text_widths``: each text encoder's width (``text_stack.widths``); recorded for two encoders (SDXL), where
    exports split the token vectors into clip_l and clip_g (``methods/token_files.py``)."""
    first = lambda v: v if isinstance(v, str) else v[0]  # noqa: E731
    return {
        "method": method, "token": first(token), "superclass": first(superclass),
        "config": dataclasses.asdict(config), "inference_defaults": defaults,
        "base_fingerprint": dict(base_fp.to_dict(), digest=base_fp.digest),
        **({"text_widths": list(text_widths)} if len(text_widths) > 1 else {}),
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


def _prior_data(pipe, trainable, superclasses: list[str], size: int, progress: bool,
                frames: list[tuple[int, int]] | None = None) -> PriorData | None:
    """The run's class images (generated by the base and cached, or the user's), encoded once (in ``frames``,
    the run's aspect-ratio buckets, when it has them).

    Called once the method is built (so its settings are checked before minutes of sampling); its edits are
    taken out meanwhile, so the images are the base model's."""
    spec = type(trainable).prior_spec(trainable.config, list(superclasses))
    if spec is None:
        return None
    trainable.remove()
    try:
        return _class_images(pipe, spec, size, progress, frames)
    finally:
        trainable.install()


def _class_images(pipe, spec, size: int, progress: bool, frames: list[tuple[int, int]] | None = None) -> PriorData:
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
    if frames is None:
        cache = LatentCache(pipe.vae, load_images(paths, size), None, torch.tensor(labels))
    else:
        cache = bucketed_cache(pipe.vae, paths, frames, labels=torch.tensor(labels))
    return PriorData(cache, spec.prompts, spec.weight)


def _check_data(cfg: TrainConfig, method_cls, concepts: int) -> list[int]:
    """The data settings checked before anything is loaded; returns the repeats of each concept."""
    given = cfg.repeats if isinstance(cfg.repeats, (list, tuple)) else [] if cfg.repeats is None else [cfg.repeats]
    repeats = []
    for value in given:
        try:
            number = int(str(value).strip())
        except ValueError:
            number = 0
        if isinstance(value, bool) or not 1 <= number <= 10_000:
            raise BadInputError(f"--repeats {value!r}: give a whole number of repeats from 1 to 10000")
        repeats.append(number)
    if len(repeats) not in (0, 1, concepts):
        raise BadInputError(f"{len(repeats)} --repeats values for {concepts} image folders; give one value, or one "
                            "per --images in order")
    repeats = repeats * concepts if len(repeats) == 1 else repeats or [1] * concepts
    if cfg.caption_dropout >= 1:
        raise BadInputError(f"--caption-dropout {cfg.caption_dropout}: every prompt would be empty and the concept "
                            "never named; give a probability below 1, e.g. 0.1")
    if cfg.caption_dropout and tuple(method_cls.sites) == ("tokens",):
        raise BadInputError(f"--caption-dropout does not fit {method_cls.name}: it trains only the token's vector, "
                            "and a row whose prompt is dropped has no token (no gradient) while the unconditional "
                            "prediction it would train cannot change; leave it at 0")
    if cfg.keep_tags and not cfg.shuffle_tags:
        raise BadInputError("--keep-tags only acts with --shuffle-tags (the tags kept in place while the rest "
                            "are shuffled); add --shuffle-tags or drop --keep-tags")
    if not cfg.buckets and (cfg.bucket_step or cfg.bucket_min or cfg.bucket_max):
        raise BadInputError("bucket_step / bucket_min / bucket_max only act with --buckets; add --buckets")
    return repeats


def _data_settings(cfg: TrainConfig, repeats: list[int]) -> dict[str, Any]:
    """The data settings that differ from the defaults (recorded in the checkpoint key and the provenance)."""
    found = {"repeats": repeats if len(set(repeats)) > 1 else None, "caption_dropout": cfg.caption_dropout or None,
             "shuffle_tags": cfg.shuffle_tags or None, "keep_tags": cfg.keep_tags or None,
             "buckets": cfg.buckets or None, "bucket_step": cfg.bucket_step or None,
             "bucket_min": cfg.bucket_min or None, "bucket_max": cfg.bucket_max or None}
    return {k: v for k, v in found.items() if v is not None}


def _check_run(cfg: TrainConfig, out: Path, resume: bool, validation=None) -> tuple[str, ...]:
    """Refuse bad settings before anything is loaded or written; returns the sample images' prompt templates."""
    if validation is not None and not (isinstance(validation.every, int) and validation.every >= 1):
        raise BadInputError(f"validation every {validation.every!r} steps: use a positive whole number of steps")
    for name in ("validation_every", "save_every"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadInputError(f"--{name.replace('_', '-')} must be a whole number >= 0, not {value!r}")
    templates = _validation_prompts(cfg.validation_prompt)
    if templates and not cfg.validation_every:
        raise BadInputError("--validation-prompt needs --validation-every N (N > 0): the steps to sample at")
    check_report_to(cfg.report_to)
    check_schedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.steps)
    if cfg.report_to != "none":
        check_output(logs_dir(out), folder=True, flag="--report-to")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise BadInputError(f"--mixed-precision must be no, fp16 or bf16, not '{cfg.mixed_precision}'")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise BadInputError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 (or no) on a CPU")
    check_mode(cfg.compile_mode)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise BadInputError("--steps and --batch-size must be at least 1")
    check_template(cfg.preview_prompt, "setting 'preview_prompt'")  # formatted at every preview, after training began
    if not 0 <= cfg.resolution <= MAX_RESOLUTION:  # the base's own stride is checked once it is loaded
        raise BadInputError(f"--resolution {cfg.resolution} is out of range: give a size up to {MAX_RESOLUTION} "
                            "pixels, or 0 for the base's native size")
    if out.is_dir():
        raise BadInputError(f"--out '{out}' is a folder; pass a file path ending in .safetensors")
    if out.suffix != ".safetensors":
        raise BadInputError(f"--out '{out}' must end in .safetensors")
    if resume and not has_checkpoint(out):
        raise CheckpointError(f"--resume: no checkpoint in '{checkpoint_dir(out)}'; run without --resume to start training")
    return templates or tuple(getattr(validation, "prompts", None) or ()) or (cfg.preview_prompt,)


def _validation_prompts(value) -> tuple[str, ...]:
    """The ``validation_prompt`` setting (one prompt or a list) as a tuple, each a non-empty text."""
    if value is None:
        return ()
    prompts = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise BadInputError(f"--validation-prompt must be text (one or a list), not {value!r}")
    for p in prompts:
        check_prompt_text(p, "--validation-prompt")
    return prompts


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
def write_preview(pipe, path: Path, prompt: str, seed: int):
    """One preview image from its own generator (returned, and written to ``path``); the training RNG is
    untouched."""
    with torch.random.fork_rng(devices=[]):
        image = pipe(
            prompt, num_inference_steps=25, guidance_scale=6.0,
            generator=torch.Generator().manual_seed(seed), output_type="pil",
        ).images[0]
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image
