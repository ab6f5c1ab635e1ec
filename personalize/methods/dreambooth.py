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
any other concept. ``personalize export --format single-file`` writes the
folder as one checkpoint in the original layout (``single_file.py``), for
AUTOMATIC1111, ComfyUI and ``from_single_file``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, ConceptFileError
from ..paths import inside
from ..prior import weights_digest
from .. import families
from .base import Method
from .cards import DreamBoothCard, DreamBoothConfig
from .identifier import IdentifierToken
from .shared import check_composable, cpu_float, load_into, mark_replaced


CHECKPOINT_FILE = "checkpoint.safetensors"  # the single-file export


class DreamBooth(DreamBoothCard, IdentifierToken, Method):
    composable = False
    export_formats = {
        "single-file": f"{CHECKPOINT_FILE} (one checkpoint in the original LDM layout, as AUTOMATIC1111, ComfyUI and "
                       "model sites share them): StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline)"
                       f".from_single_file('{CHECKPOINT_FILE}'), a checkpoints folder, or personalize --base FILE",
    }

    def __init__(self, pipe, token, superclass, config: DreamBoothConfig, unet=None, text_encoders=None):
        """``text_encoders``: ``{pipeline attribute: trained encoder}`` (``text_encoder``, and ``text_encoder_2``
        on SDXL); None with ``train_text_encoder``: copies of the base's."""
        super().__init__(pipe, token, superclass, config)
        check_composable(pipe, type(self))
        self._init_identifier()
        self.part = families.of(pipe).denoiser  # "unet", or "transformer" on a diffusion transformer
        self.unet = unet if unet is not None else copy.deepcopy(getattr(pipe, self.part))
        if text_encoders is None and config.train_text_encoder:
            text_encoders = {name: copy.deepcopy(getattr(pipe, name)) for name in trained_text_encoders(pipe)}
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
        family = families.of(pipe)
        base_denoiser = family.denoiser_of(pipe)
        dtype, device = base_denoiser.dtype, base_denoiser.device
        unet = type(base_denoiser).from_pretrained(folder, subfolder=family.denoiser, torch_dtype=dtype).to(device)
        tes = {}
        if config.train_text_encoder:
            for name in trained_text_encoders(pipe):
                base = getattr(pipe, name)
                tes[name] = type(base).from_pretrained(folder, subfolder=name, torch_dtype=dtype).to(base.device)
        if not _same_digest(concept.header.get("pipeline_digest"), unet, tes):
            raise ConceptFileError(f"the pipeline folder '{folder}' is not the one this concept file was written with; "
                                   "re-train, or copy the file and its folder together")
        return cls(pipe, concept.token, concept.superclass, config, unet=unet, text_encoders=tes)

    # -- training
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {f"{self.part}.{n}": p for n, p in self.unet.named_parameters()}
        for name, te in self.text_encoders.items():
            params.update({f"{name}.{n}": p for n, p in te.named_parameters() if ".embeddings." not in f".{n}"})
        return params

    def text_path_frozen(self) -> bool:
        return not self.config.train_text_encoder

    def param_groups(self) -> list[dict]:
        params = self._trainable()
        lrs = {self.part: self.config.lr, **{name: self.config.lr_text_encoder for name in self.text_encoders}}
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
        from .. import families
        from ..paths import atomic_dir

        folder = pipeline_dir(out)
        family = families.of(self.pipe)
        parts = {"vae": self.pipe.vae, family.denoiser: self.unet, "scheduler": self.pipe.scheduler}
        for tok, te in family.pairs(self.pipe):
            parts[tok] = getattr(self.pipe, tok)
            parts[te] = self.text_encoders.get(te, getattr(self.pipe, te))
        if "force_zeros_for_empty_prompt" in self.pipe.config:  # SDXL's own setting, kept as the base has it
            parts["force_zeros_for_empty_prompt"] = self.pipe.config.force_zeros_for_empty_prompt
        pipeline = family.assemble(parts)
        with atomic_dir(folder) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
        return {"pipeline": folder.name, "pipeline_digest": _digest(self.unet, self.text_encoders),
                "composable": False}

    # -- interop
    @classmethod
    def export(cls, concept, fmt: str, folder: Path, pipe=None) -> list[Path]:
        """The trained pipeline (its folder, checked against the concept's digest) as one single-file checkpoint
        (``personalize/single_file.py``): UNet, VAE and text encoder(s) under their original keys, in the dtype
        the folder holds."""
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as dlog

        from ..single_file import save_single_file

        source = pipeline_folder(concept)
        dlog.disable_progress_bar()
        trained = DiffusionPipeline.from_pretrained(str(source))
        tes = {name: getattr(trained, name) for name in trained_text_encoders(trained)} \
            if cls.make_config(concept.config).train_text_encoder else {}
        if not _same_digest(concept.header.get("pipeline_digest"), families.denoiser(trained), tes):
            raise ConceptFileError(f"the pipeline folder '{source}' is not the one this concept file was written "
                                   "with; re-train, or copy the file and its folder together")
        title = {"modelspec.title": f"DreamBooth {concept.token} ({concept.superclass})"}
        return [save_single_file(trained, inside(folder, CHECKPOINT_FILE), metadata=title)]

    # -- the pipeline
    def install(self) -> None:
        """Swap the trained UNet (and text encoders) in, then add the identifier token (``Method.install``)."""
        if self.installed:
            return
        check_composable(self.pipe, type(self))
        self.replaced = {}
        for name, module in {self.part: self.unet, **self.text_encoders}.items():
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


def trained_text_encoders(pipe) -> list[str]:
    """The text encoders ``train_text_encoder`` fine-tunes: those the family's diffusers script trains (SD 1.x/2.x
    its one, SDXL and SD3 both CLIPs, Flux CLIP-L; never T5)."""
    family = families.of(pipe)
    return [te for _, te in family.pairs(pipe) if te in family.lora_text_encoders]


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
