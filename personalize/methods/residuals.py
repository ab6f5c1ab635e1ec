"""Personalized Residuals: low-rank residuals on every transformer block's ``proj_out``.

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
prompt: "a photo of a V* <macro class>"; no regularisation images.

The LoRA layers are made by peft (``inject_adapter_in_model``) on a *mirror*
of the UNet's ``proj_out`` layers (stand-ins sharing the frozen weights), so
the UNet's modules, ``state_dict`` and ``requires_grad`` flags are never
touched; one :class:`ResidualSite` per ``proj_out`` adds every attached
concept's masked delta. Concept tensors are peft's state dict with a
``unet.`` prefix: the diffusers LoRA layout (``personalize/export.py``).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..edits.attention_maps import attention_maps, transformer_blocks
from ..edits.sites import occupy, site_occupant, vacate
from ..edits.tokens import base_tokenizer, token_site
from ..errors import BadInputError, ConceptFileError
from .base import Method
from .shared import check_knobs

ADAPTER = "residual"
PREFIX = "unet."


# ----------------------------------------------------------------------------- the LoRA layers
def layer_ranks(unet: nn.Module, rank_fraction: float = 0.05, rank: int = 0) -> dict[str, int]:
    """``{proj_out name: r_i}`` for every transformer block: ``rank`` if > 0, else round(fraction * m_i), >= 1."""
    ranks = {}
    for name, block in transformer_blocks(unet):
        m = block.proj_out.weight.shape[0]
        r = rank if rank > 0 else max(1, round(rank_fraction * m))
        ranks[f"{name}.proj_out"] = min(r, m)
    if not ranks:
        raise BadInputError("this UNet has no transformer blocks with a proj_out; residuals need an SD-style UNet")
    return ranks


def _stand_in(layer: nn.Module) -> nn.Module:
    """A frozen copy of ``layer``'s shape whose weight shares storage with it (no memory, no side effects)."""
    if isinstance(layer, nn.Conv2d):
        stand_in = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             layer.padding, layer.dilation, layer.groups, bias=False, device="meta")
    elif isinstance(layer, nn.Linear):
        stand_in = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    else:
        raise BadInputError(f"a {type(layer).__name__} layer; LoRA layers go on Conv2d and Linear layers only")
    stand_in.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
    return stand_in


def lora_config(ranks: dict[str, int]):
    """The peft LoraConfig for ``ranks`` (alpha = rank everywhere, i.e. scale 1; no dropout, no bias)."""
    from peft import LoraConfig

    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=dict(ranks),
                      alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none")


class ResidualBank:
    """peft LoRA layers for the layers in ``ranks`` (``proj_out`` here; any Linear/Conv2d for DreamBooth-LoRA), kept
    outside the model; ``config`` (default: :func:`lora_config`, scale 1) is the peft ``LoraConfig`` to inject."""

    def __init__(self, unet: nn.Module, ranks: dict[str, int], config=None):
        from peft import inject_adapter_in_model

        from ..edits.sites import inner_layer

        self.ranks = dict(ranks)
        self.root = nn.Module()
        for name in self.ranks:
            parent = self.root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, _stand_in(inner_layer(unet.get_submodule(name))))
        self.config = config if config is not None else lora_config(self.ranks)
        inject_adapter_in_model(self.config, self.root, adapter_name=ADAPTER)
        self.layers = {name: self.root.get_submodule(name) for name in self.ranks}
        for p in self.parameters():  # trainables stay fp32 whatever the base's dtype
            p.data = p.data.float()

    def parameters(self) -> list[nn.Parameter]:
        pairs = [(layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]) for layer in self.layers.values()]
        return [p for pair in pairs for module in pair for p in module.parameters()]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """dW_i x for the ``proj_out`` called ``name`` (same layout as x; computed in fp32)."""
        layer = self.layers[name]
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        return b(a(x.to(a.weight.dtype))) * layer.scaling[ADAPTER]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(self.root, adapter_name=ADAPTER)
        return {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.state_dict())
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise ConceptFileError(f"residual tensors do not match this base's proj_out layers "
                                   f"(missing {missing[:2]}, unexpected {extra[:2]}); use the base it was trained on")
        device = self.parameters()[0].device
        state = {k[len(PREFIX):]: v.to(device, torch.float32) for k, v in tensors.items()}
        with torch.no_grad():
            set_peft_model_state_dict(self.root, state, adapter_name=ADAPTER)

    @staticmethod
    def ranks_in(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        """The per-layer ranks stored in a concept's tensors."""
        suffix = ".lora_A.weight"
        return {k[len(PREFIX):-len(suffix)]: v.shape[0] for k, v in tensors.items()
                if k.startswith(PREFIX) and k.endswith(suffix)}


# ----------------------------------------------------------------------------- the proj_out site
class ResidualGroup:
    """All residual concepts attached to one UNet."""

    KEY = "residuals"

    def __init__(self, pipe):
        self.pipe = pipe
        self.concepts: list["Residuals"] = []


class ResidualSite:
    """Occupant of one ``proj_out``: ``out + sum_c M_c * delta_c(x)`` (M_c = 1 for a concept without LAG)."""

    order = 20  # additive: after any edit that replaces the base output

    def __init__(self, group: ResidualGroup, block: str):
        self.group, self.block, self.layer = group, block, f"{block}.proj_out"

    def __call__(self, wrapper: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from ..lag import block_masks

        concepts = sorted(self.group.concepts, key=lambda c: c.token)  # attach order never matters
        lagged = [c.key for c in concepts if c.lag]
        masks = block_masks(self.group.pipe, self.block, lagged, x) if lagged else {}
        for c in concepts:
            delta = c.bank.delta(self.layer, x).to(out.dtype)
            out = out + (delta * masks[c.key] if c.lag else delta)
        return out


# ----------------------------------------------------------------------------- the method
@dataclass
class ResidualsConfig:
    """Paper defaults (§4.1): r_i = 0.05 m_i, lr 1e-3 (150 steps at batch 4: ``train_defaults``), token frozen."""

    rank_fraction: float = field(default=0.05, metadata={
        "help": "rank = round(F x channels) per proj_out", "flag": True})
    rank: int = field(default=0, metadata={
        "help": "> 0: the same LoRA rank in every proj_out instead of --rank-fraction", "flag": True})
    train_token: bool = field(default=False, metadata={
        "help": "also train the token's vector V* (the paper's ablation; overfits)", "flag": True})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    init_token: str = field(default="httr", metadata={
        "help": "single token V* starts at (a late BPE merge, i.e. a rarely used token)"})


class Residuals(Method):
    name = "residuals"
    description = "Low-rank residuals on every transformer proj_out, optional LAG sampling (~5 MB per SD 1.5 concept)"
    sites = ("tokens", "proj_out")
    Config = ResidualsConfig
    knobs = {"lag": "localized attention-guided sampling: apply the residuals only where the concept is attended"}
    train_defaults = {"steps": 150, "batch_size": 4}

    @classmethod
    def make_config(cls, overrides=None) -> ResidualsConfig:
        config = super().make_config(overrides)
        if not 0 < config.rank_fraction <= 1 or config.rank < 0:
            raise BadInputError(f"rank_fraction must be in (0, 1] (got {config.rank_fraction}) and rank >= 0 "
                                f"(got {config.rank}; 0 = use rank_fraction)")
        return config

    def __init__(self, pipe, token, superclass, config: ResidualsConfig, ranks: dict[str, int] | None = None):
        super().__init__(pipe, token, superclass, config)
        from ..templates import single_token_id

        tokenizer = base_tokenizer(pipe)
        self.macro_id = single_token_id(tokenizer, superclass)
        unet = pipe.unet
        ranks = ranks or layer_ranks(unet, config.rank_fraction, config.rank)
        with torch.random.fork_rng(devices=[]):  # the same initial A_i in every run
            torch.manual_seed(0)
            self.bank = ResidualBank(unet, ranks)
        vector = rare_token_embedding(pipe, config.init_token).to(unet.device)
        self.embedding = nn.Parameter(vector.unsqueeze(0), requires_grad=config.train_token)
        self.lag = False

    # -- construction
    @classmethod
    def from_concept(cls, pipe, concept, **knobs) -> "Residuals":
        check_knobs(cls, knobs)
        config = cls.make_config(concept.config)
        ranks = ResidualBank.ranks_in(concept.tensors)
        expected = set(layer_ranks(pipe.unet))
        if set(ranks) != expected:
            raise ConceptFileError("concept's residual layers do not match this base's proj_out layers; "
                                   "use the base it was trained on")
        method = cls(pipe, concept.token, concept.superclass, config, ranks)
        method.load_state_tensors(concept.tensors)
        method.lag = bool(knobs.get("lag", concept.inference_defaults.get("lag", False)))
        method.install()
        return method

    # -- training hooks
    def placeholder(self) -> str:
        return f"{self.token} {self.superclass}"

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
        bank = ResidualBank(unet, layer_ranks(unet, rank_fraction, rank))
        return sum(p.numel() for p in bank.parameters())

    # -- the pipeline
    @property
    def key(self) -> str:
        return f"residuals:{self.token}"

    def lag_columns(self, ids: list[int]) -> list[int]:
        """Positions of V* in a prompt's token ids, each with the macro-class word right after it."""
        (token_id,) = token_site(self.pipe).ids(self.key)
        cols = []
        for p, i in enumerate(ids):
            if i == token_id:
                cols.append(p)
                if p + 1 < len(ids) and ids[p + 1] == self.macro_id:
                    cols.append(p + 1)
        return cols

    def install(self) -> None:
        if self.installed:
            return
        token_site(self.pipe).add(self.key, [self.token], self.embedding)
        unet = self.pipe.unet
        blocks = [name for name, _ in transformer_blocks(unet)]
        first = site_occupant(unet, f"{blocks[0]}.proj_out", ResidualGroup.KEY)
        if first is None:
            group = ResidualGroup(self.pipe)
            for block in blocks:
                occupy(unet, f"{block}.proj_out", ResidualGroup.KEY, ResidualSite(group, block))
        else:
            group = first.group
        group.concepts.append(self)
        self.group = group
        if self.lag:
            attention_maps(self.pipe).watch(self.key, self.lag_columns)
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        if self.lag:
            attention_maps(self.pipe).unwatch(self.key)
        self.group.concepts.remove(self)
        if not self.group.concepts:
            for block, _ in transformer_blocks(self.pipe.unet):
                vacate(self.pipe.unet, f"{block}.proj_out", ResidualGroup.KEY)
        token_site(self.pipe).remove(self.key)
        self.installed = False


@torch.no_grad()
def rare_token_embedding(pipe, word: str) -> torch.Tensor:
    """The input embedding of ``word``, which must be one token of the base tokenizer."""
    ids = base_tokenizer(pipe)(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise BadInputError(f"init_token '{word}' is {len(ids)} tokens; pick a single rarely used token such as 'httr'")
    table = pipe.text_encoder.get_input_embeddings()
    return table.weight[ids[0]].detach().float().clone()
