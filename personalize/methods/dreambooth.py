"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the whole UNet (optionally the text encoder).

    [V]        the identifier: the concept's token is a *frozen* copy of a rare
               word's embedding (``identifier``, default "sks"), so "a photo of a
               <tok> dog" here is "a photo of a sks dog" in any stock pipeline
    L          ||eps - eps(x_t, c)||^2 + lambda ||eps' - eps(x'_t, c_pr)||^2,
               x' the class images (``personalize/prior.py``), lambda = prior_loss_weight

The trained UNet is a *copy* swapped into the pipeline (the base's stays
untouched and comes back on ``remove``). ``train_text_encoder`` trains a copy of
every text encoder of the base -- SDXL's two, as diffusers'
``train_dreambooth_lora_sdxl.py`` does with ``--train_text_encoder`` (the full
``train_dreambooth.py`` is SD-only and has one) -- everything except their
embedding tables (the frozen-table rule).

The result is a new base, not a small file: training writes a diffusers
pipeline folder ``OUT.pipeline/`` of the base's own class
(``StableDiffusionPipeline``, or ``StableDiffusionXLPipeline`` with both
tokenizers and text encoders on SDXL; load it with ``from_pretrained`` and
prompt with the identifier) and a concept file holding only the header, which names
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
from ..text_stack import family, pairs
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
    train_text_encoder: bool = field(default=False, metadata={
        "help": "also train the text encoder (SDXL: both, as train_dreambooth_lora_sdxl.py)", "flag": True})
    lr_text_encoder: float = field(default=5e-6, metadata={
        "help": "learning rate of the text encoder (train_dreambooth.py: the same --learning_rate)"})
    identifier: str = field(default="sks", metadata={
        "help": "one rare token of the base vocabulary; the concept token copies its embedding"})


# the stock diffusers class of the folder DreamBooth writes, per base family (``text_stack.family``)
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline"}


class DreamBooth(IdentifierToken, Method):
    name = "dreambooth"
    description = "Full UNet fine-tune with prior preservation (Ruiz et al. 2023); a new base (3.4 GB UNet), not composable"
    sites = ("tokens", "unet", "text_encoder")  # SDXL: text_encoder_2 too
    Config = DreamBoothConfig
    composable = False
    no_export_reason = ("the pipeline folder beside it already is a diffusers pipeline (StableDiffusionPipeline, "
                        "on SDXL StableDiffusionXLPipeline .from_pretrained), nothing to export")
    train_defaults = {"steps": 800, "batch_size": 1, "checkpoint_every": 200, "max_grad_norm": 1.0}
    recipe = ("diffusers train_dreambooth README (prior preservation): batch 1, lr 5e-6 without --scale_lr = 5e-6 "
              "effective, 800 steps, 200 class images, lambda 1, AdamW weight decay 1e-2, gradients clipped at 1.0 "
              "(--max_grad_norm)")

    def __init__(self, pipe, token, superclass, config: DreamBoothConfig, unet=None, text_encoders=None):
        """``text_encoders``: ``{pipeline attribute: trained encoder}`` (``text_encoder``, and ``text_encoder_2``
        on SDXL); None with ``train_text_encoder``: copies of the base's."""
        super().__init__(pipe, token, superclass, config)
        check_composable(pipe, type(self))
        self._init_identifier()
        self.unet = unet if unet is not None else copy.deepcopy(pipe.unet)
        if text_encoders is None and config.train_text_encoder:
            text_encoders = {name: copy.deepcopy(getattr(pipe, name)) for _, name in pairs(pipe)}
        self.text_encoders: dict[str, Any] = dict(text_encoders or {})
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
        tes = {}
        if config.train_text_encoder:
            for _, name in pairs(pipe):
                base = getattr(pipe, name)
                tes[name] = type(base).from_pretrained(folder, subfolder=name, torch_dtype=dtype).to(base.device)
        if not _same_digest(concept.header.get("pipeline_digest"), unet, tes):
            raise ConceptFileError(f"the pipeline folder '{folder}' is not the one this concept file was written with; "
                                   "re-train, or copy the file and its folder together")
        return cls(pipe, concept.token, concept.superclass, config, unet=unet, text_encoders=tes)

    # -- training
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        for name, te in self.text_encoders.items():
            params.update({f"{name}.{n}": p for n, p in te.named_parameters() if ".embeddings." not in f".{n}"})
        return params

    def text_path_frozen(self) -> bool:
        return not self.config.train_text_encoder

    def param_groups(self) -> list[dict]:
        params = self._trainable()
        lrs = {"unet": self.config.lr, **{name: self.config.lr_text_encoder for name in self.text_encoders}}
        return [{"params": [p for n, p in params.items() if n.startswith(f"{part}.")], "lr": lr,
                 "weight_decay": self.config.weight_decay, "name": part} for part, lr in lrs.items()]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return cpu_float(self._trainable())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self._trainable(), tensors, self.name)

    def concept_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # the weights live in the pipeline folder

    def write_artifacts(self, out) -> dict[str, Any]:
        """The trained pipeline as a diffusers folder beside ``out`` (atomically replaced), of the base's family:
        ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline`` (both tokenizers and text
        encoders), each loadable with the stock class's ``from_pretrained``."""
        from ..base import _assemble
        from ..paths import atomic_dir

        folder = pipeline_dir(out)
        parts = {"vae": self.pipe.vae, "unet": self.unet, "scheduler": self.pipe.scheduler}
        for tok, te in pairs(self.pipe):
            parts[tok] = getattr(self.pipe, tok)
            parts[te] = self.text_encoders.get(te, getattr(self.pipe, te))
        if "force_zeros_for_empty_prompt" in self.pipe.config:  # SDXL's own setting, kept as the base has it
            parts["force_zeros_for_empty_prompt"] = self.pipe.config.force_zeros_for_empty_prompt
        pipeline = _assemble(PIPELINE_CLASSES[family(self.pipe)], parts)
        with atomic_dir(folder) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
        return {"pipeline": folder.name, "pipeline_digest": _digest(self.unet, self.text_encoders),
                "composable": False}

    # -- the pipeline
    def install(self) -> None:
        """Swap the trained UNet (and text encoders) in, then add the identifier token (``Method.install``)."""
        if self.installed:
            return
        check_composable(self.pipe, type(self))
        self.replaced = {}
        for name, module in {"unet": self.unet, **self.text_encoders}.items():
            self.replaced[name] = getattr(self.pipe, name)
            setattr(self.pipe, name, module)
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


def _digest(unet, text_encoders: dict) -> str:
    """The UNet's and the trained text encoders' weights (in pipeline order), hashed at fp16 and at bf16
    (``fingerprint.weights_digest``): an fp16 or bf16 copy of the pipeline, which loads the folder in its own dtype,
    reproduces it."""
    from ..fingerprint import weights_digest as rounded_digest

    return rounded_digest([unet, *text_encoders.values()])


def _same_digest(recorded, unet, text_encoders: dict) -> bool:
    """The folder's weights are the ones the concept file was written with (in whatever dtype they were loaded)."""
    from ..fingerprint import same_weights

    if isinstance(recorded, str) and not recorded.startswith("v2:"):  # older files: sums at the saved dtype
        return recorded == "+".join([weights_digest(unet), *(weights_digest(te) for te in text_encoders.values())])
    return isinstance(recorded, str) and same_weights(recorded, _digest(unet, text_encoders))
