"""Executing one unit of work: train a concept, generate one prompt x seed x setting, or score.

A :class:`Worker` holds what a process loads once (the base pipeline, the
evaluator's models) and keeps the last attached concept while consecutive rows
use it. Every output is written atomically before the row is marked done.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..concept import load_concept
from ..errors import BadInputError
from ..paths import atomic_dir, atomic_path, inside
from .plan import BASE, ConceptEntry, concept_from_payload


class Worker:
    def __init__(self, spec, root: Path, device: str, db):
        self.spec, self.root, self.device, self.db = spec, Path(root), device, db
        self._pipe = None
        self._attached: Optional[tuple] = None  # (key, Attachment)
        self._encoders: Optional[tuple] = None
        self.base_fingerprint: Optional[str] = db.meta().get("base_fingerprint")

    # ------------------------------------------------------------------ shared state
    @property
    def pipe(self):
        if self._pipe is None:
            from ..base import fingerprint, load_base

            self._pipe = load_base(self.spec.base, scheduler=self.spec.sampler["scheduler"])  # the spec pins it
            self._pipe.to(self.device)
            self._pipe.set_progress_bar_config(disable=True)
            self.base_fingerprint = fingerprint(self._pipe).digest
            self.db.set_meta(base_fingerprint=self.base_fingerprint)
        return self._pipe

    def detach(self) -> None:
        if self._attached is not None:
            self._attached[1].detach()
            self._attached = None

    def _attach_members(self, members: list[dict]) -> None:
        """A composition: every member file attached together (each with its ``token=`` and knobs)."""
        from ..compose import attach

        key = ("compose", json.dumps(members, sort_keys=True))
        if self._attached is not None and self._attached[0] == key:
            return
        self.detach()
        items = [(inside(self.root, m["concept_file"]), {**m["knobs"], **({"token": m["token"]} if m["token"] else {})})
                 for m in members]
        self._attached = (key, attach(self.pipe, items))

    def _attach(self, concept_file: Path, setting: dict) -> None:
        """The concept attached with ``setting``; a sweep over one concept attaches it once and changes its
        knobs in place (``Attachment.set``; knobs of the previous setting that this one lacks go back to
        their defaults)."""
        from ..compose import attach

        if self._attached is not None and self._attached[0][0] == str(concept_file):
            previous = dict(self._attached[0][1])
            handle = self._attached[1].set(**{**{k: None for k in previous if k not in setting}, **setting})
        else:
            self.detach()
            handle = attach(self.pipe, concept_file, **setting)
        self._attached = ((str(concept_file), tuple(sorted(setting.items()))), handle)

    def encoders(self):
        if self._encoders is None:
            from ..evaluation import ClipEncoder, DinoEncoder

            ev = self.spec.evaluator
            random = bool(ev.get("random_weights"))
            self._encoders = (
                FeatureCache(ClipEncoder(weights=ev.get("clip_weights"), random_weights=random, device=self.device)),
                FeatureCache(DinoEncoder(weights=ev.get("dino_weights"), random_weights=random, device=self.device)))
        return self._encoders

    def photos(self, concept: ConceptEntry) -> Path:
        if concept.photos:
            return Path(concept.photos)
        return self._toy_render(concept)[0]

    def _toy_render(self, concept: ConceptEntry) -> tuple[Path, Path]:
        """A toy-world concept's rendered photos and the renderer's exact masks of it (rendered once)."""
        from ..datasets.toyworld.concepts import render_concept_examples

        folders = inside(self.root, "data", concept.name, "photos"), inside(self.root, "data", concept.name, "masks")
        if not all(f.is_dir() for f in folders):
            with atomic_dir(folders[0], replace=False) as photos, atomic_dir(folders[1], replace=False) as masks:
                render_concept_examples(concept.name, photos, masks_dir=masks)  # two processes may render at once
        return folders

    def masks(self, concept: ConceptEntry, cfg):
        """The run's ``masks``: a toy-world concept is its own exact segmenter, so ``auto`` (Perfusion's default)
        becomes the renderer's masks; everything else is the setting as resolved."""
        if cfg.masks == "auto" and not concept.photos:
            return self._toy_render(concept)[1]
        return cfg.masks

    # ------------------------------------------------------------------ units
    def run(self, row: dict) -> dict:
        return {"train": self.train, "generate": self.generate, "score": self.score}[row["kind"]](row)

    def train(self, row: dict) -> dict:
        from .. import methods as registry
        from ..checkpoints import checkpoint_dir, has_checkpoint
        from ..training import resolve_settings, train

        if "concepts" in row["payload"]:
            return self.train_joint(row)
        concept = concept_from_payload(row["payload"])
        out = inside(self.root, row["outputs"][0])
        settings = {**({} if concept.mirror_symmetric else {"flip_p": 0.0}), **row["payload"]["train"]}
        method_cls = registry.get(row["method_type"])
        cfg, mcfg = resolve_settings(method_cls, settings)
        resume = has_checkpoint(out)
        clock = TrainClock(checkpoint_dir(out), cfg.checkpoint_every, cfg.steps, resume)
        counted: dict = {}

        def on_step(step, loss, method) -> None:
            counted.setdefault("n", trainable_params(method))
            clock.tick(step)

        self.detach()
        path = train(self.pipe, self.photos(concept), token=concept.token, superclass=concept.superclass, out=out,
                     method=row["method_type"], settings=settings, masks=self.masks(concept, cfg), resume=resume,
                     progress=False,
                     callbacks=[on_step], device="cpu" if self.device == "cpu" else None)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
        if "n" not in counted:  # resumed at the last step: no step ran, so count on a fresh build of the method
            method = method_cls.for_training(self.pipe, concept.token, concept.superclass, mcfg)
            try:
                counted["n"] = trainable_params(method)
            finally:
                method.remove()
        return {"file_bytes": path.stat().st_size, "trainable_params": counted["n"], "steps": cfg.steps,
                **({"earlier_seconds": round(clock.earlier, 3)} if clock.earlier else {})}

    def train_joint(self, row: dict) -> dict:
        """A multi-concept method (Custom Diffusion) trains a composition pair into one file."""
        from ..checkpoints import checkpoint_dir, has_checkpoint
        from ..training import train

        concepts = [ConceptEntry(**{**c, "templates": tuple(c["templates"])}) for c in row["payload"]["concepts"]]
        out = inside(self.root, row["outputs"][0])
        counted: dict = {}
        self.detach()
        path = train(self.pipe, [self.photos(c) for c in concepts], token=[c.token for c in concepts],
                     superclass=[c.superclass for c in concepts], out=out, method=row["method_type"],
                     settings=row["payload"]["train"], progress=False, resume=has_checkpoint(out),
                     callbacks=[lambda step, loss, method: counted.setdefault("n", trainable_params(method))],
                     device="cpu" if self.device == "cpu" else None)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
        return {"file_bytes": path.stat().st_size, "trainable_params": counted.get("n", 0),
                "steps": load_concept(path).header.get("config", {}).get("steps")}

    def generate(self, row: dict) -> dict:
        from ..generation import generate

        if row["method"] == BASE:
            self.detach()
        elif "members" in row["payload"]:
            self._attach_members(row["payload"]["members"])
        else:
            self._attach(inside(self.root, row["payload"]["concept_file"]), row["setting"])
        sampler = row["payload"]["sampler"]
        images = generate(self.pipe, row["prompt"], num_images=row["payload"]["samples"], steps=sampler["steps"],
                          guidance=sampler["guidance"], seed=row["seed"])
        for image, rel in zip(images, row["outputs"]):
            with atomic_path(inside(self.root, rel)) as tmp:
                image.save(tmp, format="PNG")
        return {"n_images": len(images)}

    def score(self, row: dict) -> dict:
        from .scoring import score_row

        self.detach()
        return score_row(self, row)


class FeatureCache:
    """An image encoder that encodes each image file once per process: a score row encodes its images for
    CLIP-T and CLIP-I, and the concept's photos and the base's leakage images serve every method and setting.
    Keyed by path, size and modification time (rows write their images atomically, never in place); other
    inputs (PIL images, arrays) are encoded every time. Everything else is the wrapped encoder's."""

    def __init__(self, encoder):
        self.encoder = encoder
        self._features: dict = {}

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    @staticmethod
    def _key(item):
        if isinstance(item, (str, Path)):
            st = Path(item).stat()
            return str(Path(item).resolve()), st.st_size, st.st_mtime_ns
        return None

    def cached(self, item):
        """``item``'s features if this process encoded that file already, else None (``score_concept``'s file
        path asks before it decodes)."""
        key = self._key(item)
        return None if key is None else self._features.get(key)

    def remember(self, item, features) -> None:
        key = self._key(item)
        if key is not None:
            self._features[key] = features

    def encode_images(self, images):
        import numpy as np

        images = list(images)
        if not images:
            return self.encoder.encode_images([])
        keys = [self._key(i) for i in images]
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._features]
        fresh = dict(zip(todo, self.encoder.encode_images([images[i] for i in todo]))) if todo else {}
        for i, f in fresh.items():
            if keys[i] is not None:
                self._features[keys[i]] = f
        return np.stack([fresh[i] if i in fresh else self._features[k] for i, k in enumerate(keys)])


def trainable_params(method) -> int:
    """How many numbers ``method`` trains (its param groups' parameters that take gradients)."""
    return sum(p.numel() for g in method.param_groups() for p in g["params"] if p.requires_grad)


class TrainClock:
    """Training time across a killed run and its resumes.

    Each time the trainer writes a checkpoint (every ``every`` steps and at the last) the time so far is saved
    beside it (``OUT.ckpt/seconds.json``); a resumed run starts from the time saved with the checkpoint it
    resumes from (``earlier``), which the runner adds to the row's time."""

    FILE = "seconds.json"

    def __init__(self, ckpt: Path, every: int, steps: int, resume: bool):
        self.file, self.every, self.steps = Path(ckpt) / self.FILE, every, steps
        self.earlier = self._saved() if resume else 0.0
        self.began = time.perf_counter()

    def _saved(self) -> float:
        try:
            return max(float(json.loads(self.file.read_text())["seconds"]), 0.0)
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def tick(self, step: int) -> None:
        if self.every and (step % self.every == 0 or step == self.steps):
            with atomic_path(self.file) as tmp:
                tmp.write_text(json.dumps({"step": step, "seconds": self.earlier + time.perf_counter() - self.began}))


def pick_device(spec_device: str, local_rank: int = 0) -> str:
    """The spec's device; on a GPU machine process ``local_rank`` takes GPU ``local_rank`` (and makes it current,
    so the trainer's Accelerator lands there too)."""
    if spec_device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    if spec_device == "cuda":
        raise BadInputError("the spec asks for device: cuda but no GPU is visible; use device: auto or cpu")
    return "cpu"


__all__ = ["FeatureCache", "TrainClock", "Worker", "pick_device", "trainable_params"]
