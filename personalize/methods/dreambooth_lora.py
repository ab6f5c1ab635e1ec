"""DreamBooth-LoRA: DreamBooth's objective, with peft LoRA layers instead of a full fine-tune.

    sites    to_q, to_k, to_v, to_out.0 of every UNet attention (self and cross);
             with ``train_text_encoder`` also q/k/v/out_proj of every text-encoder layer (SDXL: of both
             text encoders, as diffusers' train_dreambooth_lora_sdxl.py does)
    dW       lora_B lora_A, rank r (default 4), alpha = r (scale 1), A kaiming-uniform, B = 0
    out      W x + scale * dW x                      (``scale`` knob at attach time, default 1)

The LoRA layers are peft's, built on stand-ins that share the frozen weights
(``edits/lora_bank.py``), so the UNet's modules and ``state_dict`` stay the base's;
one additive occupant per site adds the delta. The concept token is the
DreamBooth identifier (a frozen copy of "sks"). Tensor names are the diffusers
LoRA layout (``unet.<module>.lora_A.weight`` ...), which is also the export.
An imported LoRA (``lora_files.read_lora``) may cover any Linear/Conv2d layer
(kohya files also cover ``proj_in``/``proj_out`` and the feed-forward layers);
its alpha / r is folded into lora_B, so every concept has alpha = rank.
Recipe (diffusers ``train_dreambooth_lora`` README): rank 4, lr 1e-4 (not
scaled), 500 steps at batch 1, gradients clipped at 1.0, no prior preservation
unless ``prior_loss_weight`` > 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..edits.deltas import ADDITIVE_ORDER
from ..edits.lora_bank import ADAPTER, LoraBank
from ..edits.placement import site_names
from .. import families, text_stack
from ..errors import BadInputError
from ..knobs import KnobTensor
from .base import Method
from .cards import DreamBoothLoraCard, DreamBoothLoraConfig, DreamBoothLoraKnobs  # noqa: F401 (the method's declaration)
from .identifier import IdentifierToken
from .shared import load_into
from .token_files import family_of, is_sdxl

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def lora_sites(pipe, train_text_encoder: bool) -> dict[str, list[str]]:
    """``{"unet": [...], "text_encoder": [...], "text_encoder_2": [...]}``: the Linear layers LoRA goes on, in
    module order (the denoiser's part is ``transformer`` on a diffusion transformer); the text encoders only with
    ``train_text_encoder``, and only those the family's DreamBooth-LoRA script trains (``Family.lora_text_encoders``:
    SDXL and SD3 both CLIPs, Flux CLIP-L; never T5)."""
    family = families.of(pipe)
    sites = {family.denoiser: site_names(family.denoiser_of(pipe), "attention")}
    if train_text_encoder:
        for _, te in family.pairs(pipe):
            if te in family.lora_text_encoders:
                sites[te] = site_names(getattr(pipe, te), "text_attention")
    return sites


class _Bank:
    """peft LoRA layers for one pipeline part; tensor names carry the part as prefix (``unet.``/``text_encoder.``)."""

    def __init__(self, part: str, module, ranks: dict[str, int]):

        self.part = part
        with torch.random.fork_rng(devices=[]):  # the same initial A in every run
            torch.manual_seed(0)
            self.bank = LoraBank(module, ranks)

    def state(self) -> dict[str, torch.nn.Parameter]:
        """The live LoRA parameters by tensor name (peft's state-dict names with the part as prefix)."""

        return {f"{self.part}.{name}.{ab}.weight": getattr(layer, ab)[ADAPTER].weight
                for name, layer in self.bank.layers.items() for ab in ("lora_A", "lora_B")}


class _LoraSite:
    order = ADDITIVE_ORDER

    def __init__(self, method: "DreamBoothLora", bank: _Bank, name: str):
        self.method, self.bank, self.name = method, bank, name

    def __call__(self, wrapper, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # compiled: the scale as a tensor input, so handle.set(scale=...) never recompiles; eager: the float
        scale = self.method.scale_knob.traced(x.device) if torch.compiler.is_compiling() else self.method.scale
        return out + (scale * self.bank.bank.delta(self.name, x)).to(out.dtype)

    def prepare_compiled(self, dtypes, device) -> None:
        self.method.scale_knob.on(device)


class DreamBoothLora(DreamBoothLoraCard, IdentifierToken, Method):
    export_formats = {
        "diffusers-lora": f"{LORA_FILE}: pipe.load_lora_weights(DIR)",
        "kohya": f"{KOHYA_FILE} (kohya keys lora_unet_/lora_te_, SDXL lora_te1_/lora_te2_, written by diffusers' "
                 f"convert_state_dict_to_kohya): pipe.load_lora_weights(DIR, weight_name='{KOHYA_FILE}')",
    }

    @classmethod
    def make_config(cls, overrides=None) -> DreamBoothLoraConfig:
        config = super().make_config(overrides)
        if not isinstance(config.rank, int) or config.rank < 1:
            raise BadInputError(f"rank must be a whole number >= 1, not {config.rank!r}")
        return config

    def __init__(self, pipe, token, superclass, config: DreamBoothLoraConfig, ranks: dict[str, dict] | None = None):
        super().__init__(pipe, token, superclass, config)
        self._init_identifier()
        if ranks is None:
            ranks = {part: {n: config.rank for n in names}
                     for part, names in lora_sites(pipe, config.train_text_encoder).items()}
        self.banks = {part: _Bank(part, getattr(pipe, part), r) for part, r in ranks.items() if r}
        self.scale_knob = KnobTensor(1.0)  # the ``scale`` knob; its tensors are what a compiled UNet reads

    @property
    def scale(self) -> float:
        return self.scale_knob.value

    @scale.setter
    def scale(self, value: float) -> None:
        self.scale_knob.set(value)

    @classmethod
    def for_import(cls, pipe, found: dict, config) -> "DreamBoothLora":
        method = cls(pipe, found["token"], found["superclass"], config, found["ranks"])
        method.install()
        return method

    @classmethod
    def rebuild(cls, pipe, concept) -> "DreamBoothLora":
        method = cls(pipe, concept.token, concept.superclass, cls.make_config(concept.config), ranks_in(concept.tensors))
        method.load_state_tensors(concept.tensors)
        return method

    def knobs_changed(self, old) -> None:
        self.scale = self.knob_values.scale

    @staticmethod
    def concept_shapes(unet, rank: int = 4) -> dict[str, tuple[int, ...]]:
        """Names and shapes of a UNet-only concept's tensors for ``unet`` (works on the meta device)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name in site_names(unet, "attention"):
            layer = unet.get_submodule(name)
            shapes[f"unet.{name}.lora_A.weight"] = (rank, layer.in_features)
            shapes[f"unet.{name}.lora_B.weight"] = (layer.out_features, rank)
        return shapes

    # -- training
    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {k: v for bank in self.banks.values() for k, v in bank.state().items()}

    def text_path_frozen(self) -> bool:
        return not self.config.train_text_encoder

    def param_groups(self) -> list[dict]:
        return [{"params": list(self._params().values()), "lr": self.config.lr,
                 "weight_decay": self.config.weight_decay, "name": "lora"}]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self._params().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self._params(), tensors, self.name)

    # -- the pipeline
    def occupants(self) -> dict[str, dict]:
        return {part: {n: _LoraSite(self, bank, n) for n in bank.bank.layers} for part, bank in self.banks.items()}

    # -- interop
    @classmethod
    def export(cls, concept, fmt: str, folder: Path, pipe=None) -> list[Path]:
        from ..paths import inside, save_safetensors

        tensors = {k: v.float() for k, v in concept.tensors.items()}
        if fmt == "diffusers-lora":
            return [save_safetensors(inside(folder, LORA_FILE), text_model_names(tensors))]
        if family_of(concept) is families.get("flux"):
            kohya = kohya_flux_state(tensors)
        else:
            kohya = kohya_state(tensors, is_sdxl(concept))
        rank = max(int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight"))
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
        return [save_safetensors(inside(folder, KOHYA_FILE), kohya, meta)]

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        notes = super().export_notes(concept, fmt)
        if fmt == "kohya" and family_of(concept) is families.get("flux"):
            notes["how_to_load"] = (f"{KOHYA_FILE} (kohya sd-scripts' Flux names: lora_unet_double_blocks_N_img_attn_qkv "
                                    "..., lora_unet_single_blocks_N_linear1, lora_te1_ for CLIP-L): ComfyUI, or "
                                    f"FluxPipeline.load_lora_weights(DIR, weight_name='{KOHYA_FILE}')")
        return notes

    @classmethod
    def import_state(cls, pipe, state: dict, *, token: str | None, superclass: str, embeddings=None,
                     metadata: dict | None = None) -> dict[str, Any]:
        """A diffusers/peft LoRA (``unet.*.lora_A.weight``, alpha from the file's adapter metadata) or a kohya one
        (``lora_unet_*.lora_down.weight`` + ``.alpha``), read as ``pipe.load_lora_weights`` reads it
        (``lora_files.read_lora``): any Linear/Conv2d layers, each layer's alpha / r folded into lora_B."""
        from .lora_files import read_lora

        tensors = read_lora(pipe, state, metadata)
        ranks = ranks_in(tensors)
        config = {"train_text_encoder": any(ranks.get(te) for _, te in text_stack.pairs(pipe)),
                  "rank": max(r for part in ranks.values() for r in part.values())}
        return {"token": token, "superclass": superclass, "tensors": tensors, "config": config, "ranks": ranks}


def kohya_state(tensors: dict[str, torch.Tensor], sdxl: bool) -> dict[str, torch.Tensor]:
    """Our LoRA pairs (alpha = rank) in kohya's layout, converted by diffusers' ``convert_state_dict_to_kohya``
    (``lora_unet_*``, ``lora_te1_*``/``lora_te2_*``, ``.lora_down``/``.lora_up``, ``.alpha`` = rank). Text-encoder
    modules get the ``text_model.`` prefix kohya's names carry (transformers 5 flattens ``CLIPTextModel``; diffusers'
    loader drops the prefix again), and on SD 1.x/2.x the text encoder is ``lora_te_``, kohya sd-scripts' name for
    the only encoder (``lora_te1_``/``lora_te2_`` are its SDXL names)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(text_model_names(tensors))
    if not sdxl:
        kohya = {("lora_te_" + k[len("lora_te1_"):] if k.startswith("lora_te1_") else k): v for k, v in kohya.items()}
    return {k: v.float() if k.endswith(".alpha") else v for k, v in kohya.items()}


# kohya sd-scripts' Flux LoRA names (BFL module names) -> diffusers' modules, the table of diffusers'
# _convert_sd_scripts_to_ai_toolkit (lora_conversion_utils.py), inverted. Fused BFL layers list their parts in order.
_FLUX_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
                "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
                "txt_mlp_2": ("ff_context.net.2",), "txt_mod_lin": ("norm1_context.linear",)}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}
#: the widths diffusers' converter splits a single block's linear1 at (Flux.1's q, k, v, mlp), whatever the base
FLUX_LINEAR1_DIMS = (3072, 3072, 3072, 12288)


def kohya_flux_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Flux LoRA pairs (alpha = rank) in kohya sd-scripts' Flux layout, the inverse of diffusers'
    ``_convert_sd_scripts_to_ai_toolkit`` (diffusers has no writer: ``convert_state_dict_to_kohya`` keeps diffusers'
    module names, which no Flux loader reads). A fused BFL layer (a double block's ``img/txt_attn_qkv``, a single
    block's ``linear1`` = q, k, v, mlp) gets ``lora_down`` = its parts' A stacked and ``lora_up`` = their B
    block-diagonal (parts of lower rank padded with zeros; a fused layer the concept covers only in part is
    refused), alpha = that rank:
    diffusers' converter takes such an up matrix as "sparse" and recovers every part's pair exactly. CLIP-L is
    ``lora_te1_`` (diffusers' ``convert_state_dict_to_kohya``). diffusers splits ``linear1`` at Flux.1's widths
    (``FLUX_LINEAR1_DIMS``), so a single-block LoRA of another width is refused: no loader could read it."""
    text = {k: v for k, v in tensors.items() if not k.startswith("transformer.")}
    found = {key[len("transformer."): -len(".lora_A.weight")]: (down, tensors[key.replace(".lora_A.", ".lora_B.")])
             for key, down in tensors.items() if key.startswith("transformer.") and key.endswith(".lora_A.weight")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs, table in (("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
                                ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE)):
        indices = sorted({int(m.split(".")[1]) for m in found if m.startswith(ours + ".")})
        for i in indices:
            for name, parts in table.items():
                modules = [f"{ours}.{i}.{part}" for part in parts]
                if not any(m in found for m in modules):
                    continue
                if name == "linear1":
                    dims = tuple(int(found[m][1].shape[0]) if m in found else 0 for m in modules)
                    if any(d and d != want for d, want in zip(dims, FLUX_LINEAR1_DIMS)):
                        raise BadInputError(
                            f"the concept's LoRA covers {ours}.{i}'s q/k/v/mlp ({', '.join(map(str, dims))} wide); "
                            "kohya files fuse them into linear1, which diffusers' converter splits at Flux.1's "
                            f"{', '.join(map(str, FLUX_LINEAR1_DIMS))}, so no loader reads it on this base: export "
                            "diffusers-lora instead")
                down, up = _fused(found, modules)
                key = f"lora_unet_{theirs}_{i}_{name}"
                out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
                out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
                used.update(modules)
    left = sorted(set(found) - used)
    if left:
        raise BadInputError(f"the concept's LoRA covers transformer.{left[0]}, which kohya's Flux layout names no "
                            "block layer for; export diffusers-lora instead")
    if text:
        out.update(kohya_state(text, sdxl=True))  # CLIP-L: lora_te1_, as kohya sd-scripts' Flux files name it
    return out


def _fused(found: dict, modules: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair for a fused layer whose output is ``modules``' outputs stacked: A's stacked, B block-diagonal,
    each part at the largest rank (zero rows / columns pad a lower rank)."""
    rank = max(int(found[m][0].shape[0]) for m in modules if m in found)
    width = next(int(found[m][0].shape[1]) for m in modules if m in found)
    downs, ups = [], []
    for m in modules:
        if m not in found:  # its share of the fused output would need a width this file does not give
            raise BadInputError(f"the concept's LoRA covers {', '.join(x for x in modules if x in found)} but not "
                                f"{m}; kohya's fused layer needs all of them (export diffusers-lora instead)")
        down, up = found[m]
        r = int(down.shape[0])
        downs.append(torch.cat([down, down.new_zeros(rank - r, width)]))
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1))
    return torch.cat(downs).contiguous(), torch.block_diag(*ups).contiguous()


def text_model_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder modules named as ``CLIPTextModel`` names them before transformers 5 (``text_encoder.text_model.
    encoder.layers...``), the names ComfyUI, A1111 and older diffusers read; diffusers here drops the prefix again
    when it loads (transformers 5 flattens the model to ``text_encoder.encoder...``, our concept layout)."""
    named = {}
    for key, value in tensors.items():
        part, module = key.split(".", 1)
        if part.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module
        named[f"{part}.{module}"] = value
    return named


def ranks_in(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """``{part: {module: rank}}`` from a concept's (or diffusers file's) tensor names."""
    ranks: dict[str, dict[str, int]] = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            part, module = key[: -len(".lora_A.weight")].split(".", 1)
            ranks.setdefault(part, {})[module] = int(value.shape[0])
    return ranks
