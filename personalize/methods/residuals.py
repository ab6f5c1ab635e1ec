"""Personalized Residuals: low-rank residuals on every transformer block's ``proj_out``.

On a diffusion transformer (SD3, Flux.1) the residual sits on each block's attention output projection, the
counterpart of ``proj_out`` (``edits/placement.py``: a joint block's image-stream ``attn.to_out.0``, a Flux single
block's ``proj_out``, where attention and MLP outputs are projected together), and LAG reads the joint attention's
image-to-text block (``edits/joint_maps.py``). docs/RESIDUALS_DIT.md says why these modules.

Notation (Ham et al. 2024, §3.2-3.3):

    W_i      frozen output projection of transformer block i, (m_i, m_i) (a 1x1
             Conv2d in SD 1.x, a Linear in SD 2.x/XL)
    r_i      round(0.05 * m_i) (``rank_fraction``) or a fixed ``rank``
    dW_i     A_i B_i, a peft LoRA pair: lora_A (r_i, m_i), lora_B (m_i, r_i),
             scale alpha_i / r_i = 1 (so dW_i = lora_B lora_A exactly)
    M_i      LAG mask of block i (``personalize/lag.py``), 1 without LAG
    out_i    W_i h + M_i * dW_i h                    (Eq. 3, delta computed once)

The token ``V*`` starts as a rarely used token's embedding and is frozen unless
``train_token`` (the paper's ablation shows training it overfits). Training
prompt: "a photo of a V* <macro class>", the macro class a phrase of any number
of tokens ("a photo of a V* penguin plushie", as the paper trains CustomConcept101);
no regularisation images. LAG sums the maps of V* and every macro-class token
right after it (:meth:`Residuals.lag_columns`).

The LoRA layers are made by peft (``inject_adapter_in_model``) on a *mirror*
of the UNet's ``proj_out`` layers (stand-ins sharing the frozen weights), so
the UNet's modules, ``state_dict`` and ``requires_grad`` flags are never
touched; one :class:`ResidualSite` per ``proj_out`` adds every attached
concept's masked delta. Concept tensors are peft's state dict with a
``unet.`` prefix: the diffusers LoRA layout, which is also the export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import families
from ..edits.attention_maps import attention_maps
from ..edits.groups import SiteGroup
from ..edits.lora_bank import PREFIX, LoraBank, lora_config
from ..edits.placement import site_names
from ..edits.tokens import base_tokenizer, token_site
from ..errors import BadInputError, ConceptFileError
from ..knobs import KnobTensor
from .base import Method
from .cards import ResidualsCard, ResidualsConfig, ResidualsKnobs  # noqa: F401 (the method's declaration)
from .shared import word_vector


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
TOKEN_FILE = "token.safetensors"


# ----------------------------------------------------------------------------- the LoRA layers
def layer_ranks(unet: nn.Module, rank_fraction: float = 0.05, rank: int = 0) -> dict[str, int]:
    """``{proj_out name: r_i}`` for every transformer block: ``rank`` if > 0, else round(fraction * m_i), >= 1
    (m_i: the layer's output width; a diffusion transformer's blocks all have the model's width)."""
    ranks = {}
    for name in site_names(unet, "proj_out"):
        m = unet.get_submodule(name).weight.shape[0]
        r = rank if rank > 0 else max(1, round(rank_fraction * m))
        ranks[name] = min(r, m)
    if not ranks:
        raise BadInputError("this denoiser has no transformer blocks with an output projection for residuals")
    return ranks


def prefix_of(tensors: dict[str, torch.Tensor]) -> str:
    """The part prefix of a concept's LoRA tensors: ``unet.`` (SD) or ``transformer.`` (SD3, Flux.1)."""
    return "transformer." if any(k.startswith("transformer.") for k in tensors) else PREFIX


# ----------------------------------------------------------------------------- the proj_out site
class ResidualGroup(SiteGroup):
    """All residual concepts attached to one UNet: one :class:`ResidualSite` per ``proj_out``."""

    KEY = "residuals"
    KIND = "proj_out"

    def occupant(self, site: str) -> "ResidualSite":
        blocks = site_names(families.denoiser(self.pipe), "transformer")
        block = max((b for b in blocks if site.startswith(b + ".")), key=len)
        return ResidualSite(self, block, site)


class ResidualSite:
    """Occupant of one ``proj_out``: ``out + sum_c M_c * delta_c(x)`` (M_c = 1 for a concept without LAG)."""

    order = 20  # additive: after any edit that replaces the base output

    def __init__(self, group: ResidualGroup, block: str, layer: str):
        self.group, self.block, self.layer = group, block, layer

    def __call__(self, wrapper: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from ..edits.lag import block_masks

        concepts = self.group.members  # sorted by token: attach order never matters
        if torch.compiler.is_compiling() and all(c.lag_switch.prepared(x.device, out.dtype) for c in concepts):
            return self._compiled(x, out, concepts)
        lagged = [c.key for c in concepts if c.lag]
        masks = block_masks(self.group.pipe, self.block, lagged, x) if lagged else {}
        for c in concepts:
            delta = c.bank.delta(self.layer, x).to(out.dtype)
            out = out + (delta * masks[c.key] if c.lag else delta)
        return out

    def _compiled(self, x: torch.Tensor, out: torch.Tensor, concepts: list) -> torch.Tensor:
        """The compiled form: every concept's map is captured and ``lag`` is a 0/1 tensor, so switching LAG never
        changes the graph. ``M_c * lag + (1 - lag)`` is M_c or exactly 1; a concept with LAG off takes part in no
        pixel contest (``active``), so the masks equal the eager path's bit for bit."""
        from ..edits.lag import block_masks

        switches = [c.lag_switch.on(x.device, out.dtype) for c in concepts]
        masks = block_masks(self.group.pipe, self.block, [c.key for c in concepts], x,
                            active=torch.stack(switches) > 0)
        for c, lag in zip(concepts, switches):
            delta = c.bank.delta(self.layer, x).to(out.dtype)
            out = out + delta * (masks[c.key] * lag + (1 - lag))
        return out

    def prepare_compiled(self, dtypes, device) -> None:
        for c in self.group.members:
            c.prepare_compiled(dtypes, device)

    def release_compiled(self) -> None:
        for c in self.group.members:
            c.release_compiled()


# ----------------------------------------------------------------------------- the method
class Residuals(ResidualsCard, Method):
    prompting = "modifier"  # §3: "a photo of a V* <macro class>"
    Group = ResidualGroup
    export_formats = {
        "diffusers-lora": f"{LORA_FILE} + {TOKEN_FILE}: pipe.load_lora_weights(DIR); "
                          f"pipe.load_textual_inversion(DIR/'{TOKEN_FILE}') (the residuals without LAG)",
    }

    @classmethod
    def make_config(cls, overrides=None) -> ResidualsConfig:
        config = super().make_config(overrides)
        if not 0 < config.rank_fraction <= 1 or config.rank < 0:
            raise BadInputError(f"rank_fraction must be in (0, 1] (got {config.rank_fraction}) and rank >= 0 "
                                f"(got {config.rank}; 0 = use rank_fraction)")
        return config

    def __init__(self, pipe, token, superclass, config: ResidualsConfig, ranks: dict[str, int] | None = None):
        super().__init__(pipe, token, superclass, config)
        from ..templates import phrase_ids

        family = families.of(pipe)
        # the macro class (one token or several) in each tokenizer whose ids the context's rows carry
        self.macro_ids = {tok: phrase_ids(base_tokenizer(pipe, tok), superclass)
                          for tok, _ in family.context_tokenizers if getattr(pipe, tok, None) is not None}
        unet = family.denoiser_of(pipe)
        ranks = ranks or layer_ranks(unet, config.rank_fraction, config.rank)
        with torch.random.fork_rng(devices=[]):  # the same initial A_i in every run
            torch.manual_seed(0)
            self.bank = LoraBank(unet, ranks, prefix=f"{family.denoiser}.")
        vector = word_vector(pipe, config.init_token, single=True, what="init_token", clip_only=True).to(unet.device)
        self.embedding = nn.Parameter(vector.unsqueeze(0), requires_grad=config.train_token)
        self.lag = False
        self.lag_switch = KnobTensor(0.0)  # lag as 0/1 tensors: what a compiled denoiser reads
        self.compiled_watch = False  # the maps captured for a compiled denoiser, whatever lag is

    # -- construction
    @classmethod
    def rebuild(cls, pipe, concept) -> "Residuals":
        config = cls.make_config(concept.config)
        ranks = LoraBank.ranks_in(concept.tensors, prefix_of(concept.tensors))
        expected = set(layer_ranks(families.denoiser(pipe)))
        if set(ranks) != expected:
            raise ConceptFileError("concept's residual layers do not match this base's proj_out layers; "
                                   "use the base it was trained on")
        method = cls(pipe, concept.token, concept.superclass, config, ranks)
        method.load_state_tensors(concept.tensors)
        return method

    def knobs_changed(self, old) -> None:
        """``lag`` on or off, also while attached (the attention-map capture starts or stops watching)."""
        lag = self.knob_values.lag
        lag = bool(self.concept_defaults.get("lag", False)) if lag is None else lag
        before = self.watched()
        self.lag = lag
        self.lag_switch.set(float(lag))
        if self.installed:
            self._follow_watch(before)

    def watched(self) -> bool:
        """Whether the attention maps this concept's LAG reads are captured: LAG on, or a compiled denoiser."""
        return self.lag or self.compiled_watch

    def _follow_watch(self, before: bool) -> None:
        if self.watched() and not before:
            attention_maps(self.pipe).watch(self.key, self.lag_columns)
        elif before and not self.watched():
            attention_maps(self.pipe).unwatch(self.key)

    def prepare_compiled(self, dtypes, device) -> None:
        """Before a compiled denoiser runs: the lag tensors, and the maps captured whatever lag is."""
        for dtype in dtypes:
            self.lag_switch.on(device, dtype)
        before, self.compiled_watch = self.watched(), True
        self._follow_watch(before)

    def release_compiled(self) -> None:
        """Back to eager: the maps captured only while LAG is on."""
        before, self.compiled_watch = self.watched(), False
        self._follow_watch(before)

    # -- training hooks
    def templates(self) -> tuple[str, ...]:
        return ("a photo of a {}",)

    def text_path_frozen(self) -> bool:
        return not self.config.train_token

    def param_groups(self) -> list[dict]:
        groups = [{"params": self.bank.parameters(), "lr": self.config.lr, "name": "residuals"}]
        if self.config.train_token:
            groups.append({"params": [self.embedding], "lr": self.config.lr, "name": "embedding"})
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding.detach().float().cpu().contiguous(), **self.bank.state_dict()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "embedding" not in tensors:
            raise ConceptFileError("residuals concept has no token embedding; re-train it")
        self.bank.load({k: v for k, v in tensors.items() if k != "embedding"})
        with torch.no_grad():
            self.embedding.copy_(tensors["embedding"].to(self.embedding.device))

    def inference_defaults(self) -> dict[str, Any]:
        return {"lag": False}

    @staticmethod
    def trainable_count(unet, rank_fraction: float = 0.05, rank: int = 0) -> int:
        """Trainable residual parameters for ``unet`` (works on the meta device)."""
        bank = LoraBank(unet, layer_ranks(unet, rank_fraction, rank))
        return sum(p.numel() for p in bank.parameters())

    # -- the pipeline

    def lag_columns(self, ids: list[int]) -> list[int]:
        """Positions of V* in a prompt's token ids, each with its macro-class phrase's positions when the whole
        phrase follows it (``edits.lag.concept_columns``; the paper sums V* and all macro-class tokens). Where the
        context joins several tokenizers' rows (SD3: CLIP's, then T5's) each run is read with its own ids."""
        from ..edits.lag import concept_columns

        site, cols = token_site(self.pipe), []
        for start, stop, tok in families.of(self.pipe).context_segments(self.pipe, len(ids)):
            (token_id,) = site.ids(self.key, tok)
            cols += [start + c for c in concept_columns(ids[start:stop], token_id, self.macro_ids[tok])]
        return cols

    def on_install(self) -> None:
        self._follow_watch(False)

    def on_remove(self) -> None:
        if self.watched():
            attention_maps(self.pipe).unwatch(self.key)
        self.compiled_watch = False


    # -- interop
    @classmethod
    def export(cls, concept, fmt: str, folder: Path, pipe=None) -> list[Path]:
        """diffusers' LoRA layout (the concept's own tensor names ``unet.<block>.proj_out.lora_A.weight``, the peft
        LoraConfig under ``lora_adapter_metadata``: per-layer rank, alpha = rank) and V* as a textual inversion."""
        from ..paths import inside, save_safetensors
        from .token_files import token_state

        prefix = prefix_of(concept.tensors)
        config = lora_config(LoraBank.ranks_in(concept.tensors, prefix)).to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        meta = {"lora_adapter_metadata": json.dumps({f"{prefix}{k}": v for k, v in config.items()}, sort_keys=True,
                                                    default=str)}
        lora = {k: v for k, v in concept.tensors.items() if k.startswith(prefix)}
        return [save_safetensors(inside(folder, LORA_FILE), lora, meta),
                save_safetensors(inside(folder, TOKEN_FILE),
                                 token_state(concept, concept.token, concept.tensors["embedding"]))]

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        from .token_files import family_of, multi_key_loading, token_keys

        family = family_of(concept)
        how = {}
        if token_keys(concept) and family.exports.get("textual-inversion") == ():  # no stock token loader
            how = {"how_to_load": f"pipe.load_lora_weights(DIR) (the residuals without LAG); "
                                  f"{family.export_refusals['textual-inversion']}: {TOKEN_FILE} "
                                  f"({'/'.join(family.token_keys)}) is for personalize import, and a stock "
                                  f"pipeline takes the prompt's embeddings made with the token added"}
        elif token_keys(concept):
            how = {"how_to_load": f"pipe.load_lora_weights(DIR); "
                                  f"{multi_key_loading(TOKEN_FILE, concept.token, family)} (the residuals without LAG)"}
        return {**how, "prompt": f"a photo of a {concept.token} {concept.superclass}",
                "token_trained": bool(concept.config.get("train_token", False)),
                "init_token": concept.config.get("init_token"),
                "base_fingerprint": concept.header.get("base_fingerprint", {}).get("digest")}
