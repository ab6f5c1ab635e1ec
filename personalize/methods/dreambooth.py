"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the whole UNet (optionally the text encoder).

    [V]        the identifier: the concept's token is a *frozen* copy of a rare
               word's embedding (``identifier``, default "sks"), so "a photo of a
               <tok> dog" here is "a photo of a sks dog" in any stock pipeline
    L          ||eps - eps(x_t, c)||^2 + lambda ||eps' - eps(x'_t, c_pr)||^2,
               x' the class images (``personalize/prior.py``), lambda = prior_loss_weight

The trained UNet is a *copy* swapped into the pipeline (the base's stays
untouched and comes back on ``remove``). The text encoder, when trained,
trains everything except its embedding tables (the frozen-table rule).

The result is a new base, not a small file: training writes a diffusers
pipeline folder ``OUT.pipeline/`` (load it with ``from_pretrained`` and prompt
with the identifier) and a concept file holding only the header, which names
the folder. Attaching swaps the folder's UNet in. It cannot be composed with
any other concept.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, ConceptFileError
from ..paths import inside
from ..prior import PriorConfig, weights_digest
from .base import Method
from .identifier import IdentifierToken
from .shared import check_composable, cpu_float, load_into, mark_replaced


@dataclass
class DreamBoothConfig(PriorConfig):
    """diffusers DreamBooth README with prior preservation: lr 5e-6 (800 steps at batch 1, no --scale_lr), 200 class
    images, lambda 1, AdamW weight decay 1e-2, clipping at 1.0; identifier 'sks'."""

    lr: float = field(default=5e-6, metadata={
        "help": "learning rate of the UNet (train_dreambooth README: 5e-6 at batch 1, not scaled)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (train_dreambooth.py)"})
    train_text_encoder: bool = field(default=False, metadata={"help": "also train the text encoder", "flag": True})
    lr_text_encoder: float = field(default=5e-6, metadata={
        "help": "learning rate of the text encoder (train_dreambooth.py: the same --learning_rate)"})
    identifier: str = field(default="sks", metadata={
        "help": "one rare token of the base vocabulary; the concept token copies its embedding"})


class DreamBooth(IdentifierToken, Method):
    name = "dreambooth"
    description = "Full UNet fine-tune with prior preservation (Ruiz et al. 2023); a new base (3.4 GB UNet), not composable"
    sites = ("tokens", "unet", "text_encoder")
    Config = DreamBoothConfig
    composable = False
    no_export_reason = ("the pipeline folder beside it already is a diffusers pipeline "
                        "(StableDiffusionPipeline.from_pretrained), nothing to export")
    train_defaults = {"steps": 800, "batch_size": 1, "checkpoint_every": 200, "max_grad_norm": 1.0}
    recipe = ("diffusers train_dreambooth README (prior preservation): batch 1, lr 5e-6 without --scale_lr = 5e-6 "
              "effective, 800 steps, 200 class images, lambda 1, AdamW weight decay 1e-2, gradients clipped at 1.0 "
              "(--max_grad_norm)")

    def __init__(self, pipe, token, superclass, config: DreamBoothConfig, unet=None, text_encoder=None):
        super().__init__(pipe, token, superclass, config)
        check_composable(pipe, type(self))
        self._init_identifier()
        self.unet = unet if unet is not None else copy.deepcopy(pipe.unet)
        if text_encoder is None and config.train_text_encoder:
            text_encoder = copy.deepcopy(pipe.text_encoder)
        self.text_encoder = text_encoder
        self.replaced: dict[str, Any] = {}

    @classmethod
    def for_training(cls, pipe, token, superclass, config) -> "DreamBooth":
        method = cls(pipe, token, superclass, config)
        for p in method._trainable().values():
            p.requires_grad_(True)
        method.install()
        return method

    @classmethod
    def rebuild(cls, pipe, concept) -> "DreamBooth":
        config = cls.make_config(concept.config)
        folder = pipeline_folder(concept)
        dtype, device = pipe.unet.dtype, pipe.unet.device
        unet = type(pipe.unet).from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
        te = None
        if config.train_text_encoder:
            te = type(pipe.text_encoder).from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)
        if _digest(unet, te) != concept.header.get("pipeline_digest"):
            raise ConceptFileError(f"the pipeline folder '{folder}' is not the one this concept file was written with; "
                                   "re-train, or copy the file and its folder together")
        return cls(pipe, concept.token, concept.superclass, config, unet=unet, text_encoder=te)

    # -- training
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        if self.text_encoder is not None:
            params.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters()
                           if ".embeddings." not in f".{n}"})
        return params

    def text_path_frozen(self) -> bool:
        return not self.config.train_text_encoder

    def param_groups(self) -> list[dict]:
        params = self._trainable()
        groups = [{"params": [p for n, p in params.items() if n.startswith("unet.")], "lr": self.config.lr,
                   "weight_decay": self.config.weight_decay, "name": "unet"}]
        if self.text_encoder is not None:
            groups.append({"params": [p for n, p in params.items() if n.startswith("text_encoder.")],
                           "lr": self.config.lr_text_encoder, "weight_decay": self.config.weight_decay,
                           "name": "text_encoder"})
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return cpu_float(self._trainable())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self._trainable(), tensors, self.name)

    def concept_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # the weights live in the pipeline folder

    def write_artifacts(self, out) -> dict[str, Any]:
        """The trained pipeline as a diffusers folder beside ``out`` (atomically replaced)."""
        from diffusers import StableDiffusionPipeline

        from ..paths import atomic_dir

        folder = pipeline_dir(out)
        te = self.text_encoder if self.text_encoder is not None else self.pipe.text_encoder
        pipeline = StableDiffusionPipeline(vae=self.pipe.vae, text_encoder=te, tokenizer=self.pipe.tokenizer,
                                           unet=self.unet, scheduler=self.pipe.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        with atomic_dir(folder) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
        return {"pipeline": folder.name, "pipeline_digest": _digest(self.unet, self.text_encoder), "composable": False}

    # -- the pipeline
    def install(self) -> None:
        """Swap the trained UNet (and text encoder) in, then add the identifier token (``Method.install``)."""
        if self.installed:
            return
        check_composable(self.pipe, type(self))
        self.replaced = {"unet": self.pipe.unet}
        self.pipe.unet = self.unet
        if self.text_encoder is not None:
            self.replaced["text_encoder"] = self.pipe.text_encoder
            self.pipe.text_encoder = self.text_encoder
        try:
            super().install()
        except BaseException:
            self._put_back()
            raise
        mark_replaced(self.pipe, self.key)

    def remove(self) -> None:
        if self.installed:
            super().remove()
            self._put_back()
            mark_replaced(self.pipe, None)

    def _put_back(self) -> None:
        for name, module in self.replaced.items():
            setattr(self.pipe, name, module)


def pipeline_dir(out: str | Path) -> Path:
    """Where the pipeline folder of the concept file ``out`` goes: ``teddy.safetensors`` -> ``teddy.pipeline/``."""
    return Path(out).with_suffix(".pipeline")


def pipeline_folder(concept) -> Path:
    name = concept.header.get("pipeline")
    if concept.path is None or not name:
        raise ConceptFileError("a DreamBooth concept needs its pipeline folder; load it from its file with load_concept")
    try:
        folder = inside(Path(concept.path).parent, name)
    except BadInputError:
        raise ConceptFileError(f"'{concept.path.name}' names its pipeline folder {name!r}, which is not beside it; "
                               "re-train it") from None
    if not (folder / "model_index.json").is_file():
        raise ConceptFileError(f"the DreamBooth pipeline folder '{folder}' is missing; keep it beside '{concept.path.name}'")
    return folder


def _digest(unet, text_encoder) -> str:
    return weights_digest(unet) + ("" if text_encoder is None else "+" + weights_digest(text_encoder))
