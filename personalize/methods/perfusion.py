"""Perfusion: key-locked, gated rank-1 edits of cross-attention K and V.

Notation (``../shared/reference/perfusion-math.md``, paper Eq. 2-4):

    e        one text-encoder output vector, (..., d_in)
    W        a frozen projection to_k or to_v, (d_out, d_in)
    C^-1     inverse uncentered covariance of text-encoder outputs, (d_in, d_in)
    i*_j     concept j's target input, shared by all layers, (J, d_in)
    o*_j     concept j's target output in one layer, (J, d_out)
    s_j(e)   i*_j^T C^-1 e / i*_j^T C^-1 i*_j      (1 at e = i*_j)
    u_j      C^-1-orthonormal basis of span{i*_j}   (Cholesky of C^-1, then QR)
    e_perp   e - sum_j u_j (u_j^T C^-1 e)
    h(e)     W e_perp + sum_j gate_j(e) o*_j,  gate_j = sigmoid((s_j - beta_j) / tau_j)
             (ungated, beta=None: gate_j = s_j, which for J = 1 is ROME's update)

``W e_perp`` is computed as ``W e - (W U_b)(U_b^T C^-1 e)``: the base layer's
output plus one (d_out, J) product, never a second matmul over the sequence.

Key-locking: ``o*_K = W_K e_super`` (frozen); ``e_super`` is the mean text-encoder
output at the superclass over the neutral templates, so it is recomputed
from the base model and never stored. ``o*_V`` starts at ``W_V e_super`` and is
learned, with the concept's token vector. ``i*`` follows an EMA of the concept
token's encoding (no gradient).

Class phrases ("penguin plushie", "teddybear" = teddy + bear): the concept stays
one new token; (1) its vector starts at the mean of the phrase's input embeddings
(the paper: the superclass word's row, which the mean is for a one-token class);
(2) ``e_super`` is read at the phrase's *last* token: CLIP's text encoder is
causal, so only that position has attended to the whole phrase, and it is the
head noun of English class phrases ("penguin *plushie*"); (3) global key-locking
re-encodes the prompt with the token replaced by the whole phrase and gives K,
at the token's position, the phrase's last token (``edits/key_lock.py``). One-token
classes get exactly the single-word rules; the gate's i*/o* math is unchanged.

SDXL: the pooled text vector (``text_embeds``) conditions the whole UNet outside the K/V sites, so no gate or
key lock covers it; a row with a Perfusion token gets the superclass prompt's pooled vector, in training and
inference (``edits/pooled.py``, held by the group; SD3's two CLIP pooled vectors and Flux's CLIP-L one alike,
``Family.pooled_encoders``).

Diffusion transformers (SD3, Flux.1; the derivation and every departure in docs/PERFUSION_DIT.md): the sites are
each joint attention's text-stream ``add_k_proj`` / ``add_v_proj``, whose input x_l (the block's normed,
timestep-modulated text hidden state) depends on the image stream after the first block. Everything the SD edit
shares across layers is then per joint block l, and per context segment s (Flux: T5's rows; SD3: CLIP's, then
T5's, each with the concept token's own id): C_l (``covariance.compute_site_covariance``, stacked), i*_{l,s} (an
EMA of x_l at the token's first row of segment s, read by the sites during the training forward,
:meth:`Perfusion.observe`), e_super_{l,s} (the base's x_l at the superclass over the neutral templates at fixed
reference states, :func:`superclass_site_inputs`), o*_K = W_K e_super (stored: it costs transformer passes) and
o*_V. The gate reads the dual coordinates of x on the targets (``Rank1Projection.from_targets(dual=True)``), so
each target maps exactly to its o* (the paper's s_j for one target). Flux's single-stream blocks are not edited;
``lock=global`` is refused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..edits.groups import SiteGroup
from ..edits.key_lock import KeyLock
from ..edits.placement import cross_attention_layers, site_names
from ..edits.pooled import PooledSuperclass
from ..edits.tokens import base_tokenizer, token_site
from ..errors import BadInputError, ConceptFileError
from .. import families, text_stack
from ..templates import NEUTRAL_TEMPLATES, phrase_last_position
from .base import Method
from .cards import PerfusionCard, PerfusionConfig, PerfusionKnobs  # noqa: F401 (the method's declaration)
from .rank1 import Gate, Rank1Projection
from .shared import word_vector

# ----------------------------------------------------------------------------- the edit in the UNet
class PerfusionGroup(SiteGroup):
    """All Perfusion concepts attached to one UNet; they share one projection (Eq. 4).

    Members are kept sorted by token (``edits/groups.py``), so the projection (and so the output) does not
    depend on attach order. While any concept is globally key-locked, the group holds the pipeline's
    :class:`KeyLock`.
    """

    KEY = "perfusion"
    KIND = "kv"

    def __init__(self, pipe, C_inv: torch.Tensor):
        super().__init__(pipe)
        self.C_inv = C_inv.double()  # SD: (d, d); a diffusion transformer: (blocks, d, d), one per joint block
        self.per_site = families.of(pipe).denoiser == "transformer"
        self.layers = site_names(families.denoiser(pipe), "cross_attention")
        self._cache: dict = {}  # layer (None: every layer, SD) -> (key, projection)
        self._factors: dict = {}  # (device, layer) -> (C^-1, its Cholesky U)
        self._gate: tuple | None = None
        self._knob_gates: dict[tuple[str, torch.dtype], Gate] = {}  # (device, dtype) -> the compiled UNet's gate
        self.key_lock: KeyLock | None = None
        self.pooled: list[PooledSuperclass] = []  # the pooled text vectors read the superclass (SDXL, SD3, Flux)

    def occupant(self, site: str) -> "PerfusionSite":
        layer, _, proj = site.rpartition(".")
        return PerfusionSite(self, layer, "k" if proj in ("to_k", "add_k_proj") else "v")

    def admit(self, concept: "Perfusion") -> None:
        if not torch.allclose(self.C_inv, concept.C_inv.double().to(self.C_inv.device), rtol=1e-5, atol=0):
            raise ConceptFileError("Perfusion concepts attached together must share the same covariance C")

    def changed(self) -> None:
        """Install the key lock with the first globally locked concept, remove it with the last; on SDXL, the
        pooled-vector hook (``edits/pooled.py``) with the first concept, remove it with the last."""
        wanted = any(c.global_lock for c in self.members)
        if wanted and self.key_lock is None:
            unet = self.pipe.unet
            to_k = [unet.get_submodule(f"{layer}.to_k") for layer in site_names(unet, "cross_attention")]
            self.key_lock = KeyLock(self.pipe, to_k, self.lock_replacements).install()
        elif not wanted and self.key_lock is not None:
            self.key_lock.remove()
            self.key_lock = None
        if self.members and not self.pooled:
            self.pooled = [PooledSuperclass(self.pipe, self.superclass_replacements, pair).install()
                           for pair in families.of(self.pipe).pooled_encoders if getattr(self.pipe, pair[1], None)]
        elif not self.members:
            for hook in self.pooled:
                hook.remove()
            self.pooled = []
        self._sync_knob_gates()

    def lock_replacements(self) -> dict[int, list[int]]:
        """Token id -> the superclass phrase's token ids, for every globally locked concept."""
        return self.superclass_replacements(only_global=True)

    def superclass_replacements(self, only_global: bool = False) -> dict[int, list[int]]:
        """Token id -> the superclass phrase's token ids, for every concept (``only_global``: globally locked)."""
        from ..templates import phrase_ids

        out = {}
        for c in self.members:
            if c.global_lock or not only_global:
                (token_id,) = token_site(c.pipe).ids(c.key)
                out[token_id] = phrase_ids(base_tokenizer(c.pipe), c.superclass)
        return out

    def projection(self, dtype, device, layer: str | None = None) -> Rank1Projection:
        """The shared projection (of one joint block's site on a diffusion transformer: ``layer``), recomputed
        only when an i* changed (every step in training), where the i* live (no copy to the host and back), and
        written into the tensors it had (so a compiled training step, CUDA graphs included, reads the new values
        without recompiling or capturing again); C^-1's Cholesky factor is computed once per device.

        Traced (a compiled denoiser): no cache logic, which would recompile every step. On SD the projection
        refreshed eagerly by ``Perfusion.on_text_encoded``; on a diffusion transformer the projection of the i*
        this forward's :meth:`Perfusion.observe` just moved, computed in the graph (as eager training does)."""
        cached = self._cache.get(layer)
        if torch.compiler.is_compiling() and layer is not None:
            return self._computed(layer, dtype, device)
        if torch.compiler.is_compiling() and cached is not None:
            return cached[1]
        key = (tuple((id(c), c.version_of(layer)) for c in self.members), dtype, device)
        if cached is None or cached[0] != key:
            projection = self._computed(layer, dtype, device)
            if cached is not None and cached[0][1:] == key[1:] and cached[1].same_shapes(projection):
                projection = cached[1].copy_(projection)  # in place: a compiled step keeps reading the same tensors
            cached = self._cache[layer] = (key, projection)
        return cached[1]

    def _computed(self, layer: str | None, dtype, device) -> Rank1Projection:
        """The projection of every concept's targets now (J on SD; J x segments on a diffusion transformer, Eq. 4
        over all)."""
        i_stars = torch.cat([c.input_target(layer).detach().double().reshape(-1, c.width) for c in self.members])
        C_inv, upper = self.factors(i_stars.device, layer)
        return Rank1Projection.from_targets(i_stars, C_inv, upper, dual=self.per_site).to(dtype, device)

    def factors(self, device, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """C^-1 (of ``layer``'s block on a diffusion transformer) and its Cholesky factor, once per device."""
        where = (str(device), layer)
        if where not in self._factors:
            C_inv = (self.C_inv if layer is None else self.C_inv[self.layers.index(layer)]).to(device)
            self._factors[where] = (C_inv, torch.linalg.cholesky(C_inv).mT)
        return self._factors[where]

    def gate(self, dtype, device) -> Gate | None:
        """The concepts' gate (betas, taus; each concept's once per target row), rebuilt only when a knob
        changed. Compiled with :meth:`prepare_compiled` done: the tensor gate the knobs update in place."""
        if torch.compiler.is_compiling():
            knob_gate = self._knob_gates.get((str(device), dtype))
            if knob_gate is not None:
                return knob_gate
            if self._gate is not None:
                return self._gate[1]  # refreshed eagerly, like the projection (training: fixed knobs)
        beta, tau = self._gate_values()
        key = (beta, tau, dtype, device)
        if self._gate is None or self._gate[0] != key:
            self._gate = (key, None if all(b is None for b in beta) else Gate.of(list(beta), list(tau), dtype, device))
        return self._gate[1]

    def _gate_values(self) -> tuple[tuple, tuple]:
        beta = tuple(c.beta for c in self.members for _ in range(c.targets))
        tau = tuple(0.1 if c.tau is None else c.tau for c in self.members for _ in range(c.targets))
        return beta, tau

    def _knob_gate(self, dtype, device) -> Gate:
        """The gate as tensors a compiled UNet takes as inputs: beta, tau and which rows are ungated (gate off:
        ``where(ungated, s, sigmoid(..))`` gives s itself, as the eager path's missing gate does)."""
        beta, tau = self._gate_values()
        return Gate(torch.as_tensor([0.0 if b is None else b for b in beta], dtype=dtype).to(device),
                    torch.as_tensor(list(tau), dtype=dtype).to(device),
                    torch.tensor([b is None for b in beta]).to(device))

    def _sync_knob_gates(self) -> None:
        """After a knob change or a join/leave: the tensor gates take the new values in place (the compiled
        graph keeps reading the same tensors); a changed number of target rows makes new ones. The eager gate
        is dropped, so a UNet compiled without :meth:`prepare_compiled` retraces with the new values rather
        than keep reading the old gate."""
        self._gate = None
        for (device, dtype), old in list(self._knob_gates.items()):
            new = self._knob_gate(dtype, device)
            if new.beta.shape == old.beta.shape:
                for mine, value in zip((old.beta, old.tau, old.ungated), (new.beta, new.tau, new.ungated)):
                    mine.copy_(value)
            else:
                self._knob_gates[(device, dtype)] = new

    @torch.no_grad()
    def prepare_compiled(self, dtypes, device) -> None:
        """Eagerly, before the UNet runs compiled: the projection of every site and the tensor gate per dtype."""
        for dtype in dtypes:
            for layer in (self.layers if self.per_site else [None]):
                self.projection(dtype, device, layer)
            if (str(device), dtype) not in self._knob_gates:
                self._knob_gates[(str(device), dtype)] = self._knob_gate(dtype, device)


class PerfusionSite:
    """Occupant of one ``to_k``/``to_v`` site: the J-concept gated edit."""

    order = 0  # Perfusion replaces W e by W e_perp, so it runs before additive deltas

    def __init__(self, group: PerfusionGroup, layer: str, pathway: str):
        self.group, self.layer, self.pathway = group, layer, pathway
        self._w_basis: tuple | None = None  # (projection, W's identity, W U_b)
        self._o_star: tuple | None = None  # (versions of the o* tensors and dtype, stacked o*, the tensors)

    def __call__(self, wrapper: nn.Module, e: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layer = self.layer if self.group.per_site else None
        if layer is not None:
            for member in self.group.members:  # training: i* per block from the input this site reads
                member.observe(layer, e)
        proj = self.group.projection(e.dtype, e.device, layer)
        return proj.apply(e, out, self._weight_basis(wrapper, proj, e.dtype), self._targets(e.dtype),
                          self.group.gate(e.dtype, e.device))

    def prepare_compiled(self, dtypes, device) -> None:
        self.group.prepare_compiled(dtypes, device)

    def _weight_basis(self, wrapper: nn.Module, proj: Rank1Projection, dtype) -> torch.Tensor:
        """W U_b, kept while the projection and the (frozen) weight are the same."""
        weight = wrapper.base_layer.weight
        if torch.compiler.is_compiling():
            return weight.to(dtype) @ proj.basis.to(dtype)
        # the projection is rewritten in place when an i* moves (training): its version is part of the key
        ident = (weight.data_ptr(), weight._version, weight.dtype, proj.basis._version)
        if self._w_basis is None or self._w_basis[0] is not proj or self._w_basis[1] != ident:
            self._w_basis = (proj, ident, weight.to(dtype) @ proj.basis)
        return self._w_basis[2]

    def _targets(self, dtype) -> torch.Tensor:
        """The concepts' o* stacked (J, d_out); kept between calls unless autograd needs a fresh graph or
        a tensor changed (an optimizer step or an in-place load bumps its version)."""
        tensors = [c.target_output(self.layer, self.pathway) for c in self.group.members]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return _rows(tensors).to(dtype)
        key = (tuple((id(t), t._version) for t in tensors), dtype)
        if self._o_star is None or self._o_star[0] != key:
            # the tensors themselves are kept too, so no id in the key can be reused by a new tensor
            self._o_star = (key, _rows(tensors).detach().to(dtype), tensors)
        return self._o_star[1]


# ----------------------------------------------------------------------------- the method
class Perfusion(PerfusionCard, Method):
    Group = PerfusionGroup
    validate_every = 25

    def __init__(self, pipe, token, superclass, config: PerfusionConfig, C_inv: torch.Tensor, fresh: bool = True):
        """``fresh``: False when the state comes from a file next (``rebuild``): on a diffusion transformer the
        superclass inputs (reference-state forward passes) are then not computed, the file holds o*_K."""
        super().__init__(pipe, token, superclass, config)
        self.corpus = "builtin"  # id of the caption corpus C came from (recorded in the concept header)
        if config.lock not in ("local", "trained"):
            raise BadInputError(f"unknown lock '{config.lock}'; use 'local' or 'trained'")
        self.C_inv = C_inv
        den = families.denoiser(pipe)
        self.per_site = families.of(pipe).denoiser == "transformer"  # docs/PERFUSION_DIT.md
        self.layers = site_names(den, "cross_attention")
        self.proj_names = {"k": "add_k_proj", "v": "add_v_proj"} if self.per_site else {"k": "to_k", "v": "to_v"}
        device = den.device
        self.embedding = nn.Parameter(word_vector(pipe, superclass).unsqueeze(0))  # the phrase's mean row
        self.i_star_initialized = False
        self.i_star_version = 0
        self.global_lock = False  # inference only: K reads the superclass prompt (edits/key_lock.py)
        self.o_v = nn.ParameterDict()
        self.o_k: dict[str, torch.Tensor] = {}
        if self.per_site:
            self.segments = dit_segments(pipe)
            self.targets = len(self.segments)
            self.width = den.get_submodule(f"{self.layers[0]}.add_k_proj").in_features
            # e_super per block (S, d): the base's add_k_proj input at the superclass (reference states)
            self.e_super = (superclass_site_inputs(pipe, superclass, self.layers) if fresh else
                            {layer: torch.zeros(self.targets, self.width) for layer in self.layers})
            self.i_star = {layer: e.clone() for layer, e in self.e_super.items()}  # (S, d) per block
            self.i_star_versions = dict.fromkeys(self.layers, 0)
            # whether i*_l was set from training inputs yet: a tensor, so a compiled step reads it without
            # specialising on it
            self.i_star_set = {layer: torch.tensor(False) for layer in self.layers}
            self._observing: tuple | None = None  # training: (first rows (S, B), present (S, B), layers left)
        else:
            self.targets = 1
            self.e_super = superclass_encoding(pipe, superclass)
            self.width = self.e_super.shape[-1]
            self.i_star = self.e_super.clone()
        with torch.no_grad():
            for name in self.layers:
                attn = den.get_submodule(name)
                key = _key(name)
                e_super = self.e_super[name] if self.per_site else self.e_super
                self.o_v[key] = nn.Parameter(_project(getattr(attn, self.proj_names["v"]), e_super))
                o_k = _project(getattr(attn, self.proj_names["k"]), e_super)
                self.o_k[key] = nn.Parameter(o_k) if config.lock == "trained" else o_k
        self.to(device)
        self.beta, self.tau = config.beta_train, config.tau_train

    def to(self, device):
        self.embedding.data = self.embedding.data.to(device)
        self.o_v.to(device)
        if self.per_site:
            self.i_star = {k: v.to(device) for k, v in self.i_star.items()}
            self.i_star_set = {k: v.to(device) for k, v in self.i_star_set.items()}
        else:
            self.i_star = self.i_star.to(device)
        for k, v in self.o_k.items():
            if isinstance(v, nn.Parameter):
                v.data = v.data.to(device)
            else:
                self.o_k[k] = v.to(device)
        return self

    # -- the per-layer view the group reads (SD: one i* for every layer)
    def input_target(self, layer: str | None) -> torch.Tensor:
        """i*: (d,) on SD (every layer); (S, d) of one joint block on a diffusion transformer."""
        return self.i_star if layer is None else self.i_star[layer]

    def version_of(self, layer: str | None) -> int:
        return self.i_star_version if layer is None else self.i_star_versions[layer]

    # -- construction
    @classmethod
    def for_training(cls, pipe, token, superclass, config, C_inv=None, corpus: str = "custom") -> "Perfusion":
        """``C_inv`` defaults to the inverse of the base's default covariance (its own caption corpus if it
        ships one, else the built-in corpus); ``corpus`` names a given ``C_inv`` in the concept header."""
        from ..covariance import default_covariance, inverse

        cls.check_base(pipe)
        if C_inv is None:
            C, corpus = default_covariance(pipe)
            C_inv = inverse(C)
        method = cls(pipe, token, superclass, config, C_inv)
        method.corpus = corpus
        method.install()
        return method

    @classmethod
    def check_together(cls, concepts: list) -> None:
        corpora = {c.header.get("covariance", "builtin") for c in concepts}
        if len(corpora) > 1:
            raise BadInputError(f"Perfusion concepts composed together must share one covariance C, these use "
                                f"{', '.join(sorted(corpora))}; re-train them against one caption corpus")

    @classmethod
    def from_concept(cls, pipe, concept, **knobs) -> "Perfusion":
        """``lock=global`` on a diffusion transformer is refused here, before anything is built."""
        from ..knobs import parse

        if parse(cls, knobs).get("lock") == "global":
            cls._refuse_global(pipe)
        return super().from_concept(pipe, concept, **knobs)

    @staticmethod
    def _refuse_global(pipe) -> None:
        family = families.of(pipe)
        if family.denoiser == "transformer":
            raise BadInputError(f"lock=global does not work on {family.label}: {DIT_GLOBAL_LOCK}; use lock=local")

    @classmethod
    def rebuild(cls, pipe, concept) -> "Perfusion":
        cls.check_base(pipe)
        corpus = concept.header.get("covariance", "builtin")
        method = cls(pipe, concept.token, concept.superclass, cls.make_config(concept.config),
                     _inverse_for(pipe, corpus), fresh=False)
        method.corpus = corpus
        method.load_state_tensors(concept.tensors)
        return method

    def training_knobs(self) -> dict[str, Any]:
        return {"beta": self.config.beta_train, "tau": self.config.tau_train}

    def knobs_changed(self, old) -> None:
        """beta, tau, gate and lock, also while attached (the group rebuilds its gate and key lock)."""
        k, defaults, config = self.knob_values, self.concept_defaults, self.config
        if k.lock == "global":
            try:
                self._refuse_global(self.pipe)
            except BadInputError:
                self.knob_values = old
                raise
        self.global_lock = k.lock == "global"
        default_beta = defaults.get("beta_global", config.beta_global) if self.global_lock else defaults.get("beta", config.beta)
        self.beta = None if not k.gate else (default_beta if k.beta is None else k.beta)
        self.tau = defaults.get("tau", config.tau) if k.tau is None else k.tau
        if self.installed and self.group is not None:
            self.group.changed()

    @staticmethod
    def concept_shapes(unet, text_dim: int, lock: str = "local", segments: int | None = None) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors a concept file holds for ``unet`` (works on the meta device); a
        diffusion transformer (``segments``: its context segments, ``dit_segments``): per joint block i*, o*_V and
        o*_K, one row per segment."""
        shapes: dict[str, tuple[int, ...]] = {"embedding": (1, text_dim)}
        if segments is not None:
            from ..edits.placement import joint_attentions

            for name, attn in joint_attentions(unet):
                shapes[f"i_star.{_key(name)}"] = (segments, attn.add_k_proj.in_features)
                shapes[f"o_v.{_key(name)}"] = (segments, attn.add_v_proj.out_features)
                shapes[f"o_k.{_key(name)}"] = (segments, attn.add_k_proj.out_features)
            return shapes
        shapes["i_star"] = (text_dim,)
        for name, attn in cross_attention_layers(unet):
            shapes[f"o_v.{_key(name)}"] = (attn.to_v.out_features,)
            if lock == "trained":
                shapes[f"o_k.{_key(name)}"] = (attn.to_k.out_features,)
        return shapes

    # -- training hooks
    def param_groups(self) -> list[dict]:
        groups = [
            {"params": [self.embedding], "lr": self.config.lr_embedding, "name": "embedding"},
            {"params": list(self.o_v.values()), "lr": self.config.lr_value, "name": "o_v"},
        ]
        if self.config.lock == "trained":
            groups.append({"params": list(self.o_k.values()), "lr": self.config.lr_value, "name": "o_k"})
        return groups

    @torch.no_grad()
    def on_text_encoded(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """i* <- ema * i* + (1 - ema) * mean encoding at the concept token (first batch: set). On a diffusion
        transformer the encoding is each joint block's add_k_proj input, read by the sites during the denoiser
        call that follows (:meth:`observe`); here only where the token sits in each segment."""
        if self.per_site:
            firsts, present = [], []
            for (tok_name, start, rows) in self.segments:
                (token_id,) = getattr(self.pipe, tok_name).convert_tokens_to_ids([self.token])
                hits = input_ids[:, start:start + rows] == token_id
                firsts.append(hits.int().argmax(dim=1) + start)
                present.append(hits.any(dim=1))
            self._observing = (torch.stack(firsts), torch.stack(present), set(self.layers))
            for layer in self.layers:  # i*_l moves in the forward that follows (compiled or not)
                self.i_star_versions[layer] += 1
                if self.installed:  # what a compiled forward reads but must not build: factors, gate
                    self.group.factors(hidden.device, layer)
            if self.installed:
                self.group.gate(hidden.dtype, hidden.device)
            return
        (token_id,) = token_site(self.pipe).ids(self.key)
        hits = input_ids == token_id
        present = hits.any(dim=1)
        # the encoding at each prompt's first occurrence, averaged over the prompts that have one; no host
        # sync (a GPU would otherwise wait here every step) except once, for the first batch
        first = hits.int().argmax(dim=1)
        weight = present.float()
        found = weight.sum()
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), first].float()
        e_concept = (picked * weight[:, None]).sum(0) / found.clamp_min(1.0)
        if not self.i_star_initialized:
            if not bool(present.any()):
                return
            self.i_star = e_concept.clone()
            self.i_star_initialized = True
        else:
            updated = self.config.ema * self.i_star + (1 - self.config.ema) * e_concept
            self.i_star = torch.where(found > 0, updated, self.i_star)
        self.i_star_version += 1
        if self.installed:  # the shared projection and gate now, outside any compiled UNet
            self.group.projection(hidden.dtype, hidden.device)
            self.group.gate(hidden.dtype, hidden.device)

    @torch.no_grad()
    def observe(self, layer: str, x: torch.Tensor) -> None:
        """Training, diffusion transformer: i*_l <- EMA of block ``layer``'s add_k_proj input ``x`` (B, L, d) at
        the concept token's first row of each segment, once per step (the first of the block's two sites).

        Tensor operations only, written in place (the first training input sets i*_l, ``i_star_set``), so a
        compiled step traces it without a graph break and without recompiling as i* moves."""
        if self._observing is None or layer not in self._observing[2]:
            return
        firsts, present, left = self._observing
        left.discard(layer)
        if not left:
            self._observing = None
        rows = torch.arange(x.shape[0], device=x.device)
        picked = torch.stack([x[rows, f.to(x.device)].float() for f in firsts])  # (S, B, d)
        weight = present.to(x.device).float()
        found = weight.sum(1)  # (S,)
        e_concept = (picked * weight[..., None]).sum(1) / found.clamp_min(1.0)[:, None]
        old, was_set = self.i_star[layer], self.i_star_set[layer]
        updated = torch.where(was_set, self.config.ema * old + (1 - self.config.ema) * e_concept, e_concept)
        new = torch.where(found[:, None] > 0, updated, old)
        old.copy_(new)
        was_set.copy_(was_set | present.to(was_set.device).any())
        if not torch.compiler.is_compiling():  # traced: Perfusion.on_text_encoded counts the step instead
            self.i_star_versions[layer] += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"embedding": self.embedding.detach()}
        if self.per_site:  # o*_K is stored: the superclass inputs need forward passes of the transformer
            # copies: training writes i*_l in place (observe)
            tensors.update({f"i_star.{_key(k)}": v.detach().clone() for k, v in self.i_star.items()})
            tensors.update({f"o_k.{k}": v.detach() for k, v in self.o_k.items()})
        else:
            tensors["i_star"] = self.i_star.detach()
            if self.config.lock == "trained":
                tensors.update({f"o_k.{k}": v.detach() for k, v in self.o_k.items()})
        tensors.update({f"o_v.{k}": v.detach() for k, v in self.o_v.items()})
        return {k: v.float().cpu().contiguous() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.state_tensors()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        shaped = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
        if missing or extra or shaped:
            raise ConceptFileError(
                f"perfusion tensors do not match this base's cross-attention layers "
                f"(missing {missing[:3]}, unexpected {extra[:3]}, other shapes {shaped[:3]})"
            )
        with torch.no_grad():
            device = self.embedding.device
            self.embedding.copy_(tensors["embedding"].to(device))
            if self.per_site:
                for layer in self.layers:
                    self.i_star[layer] = tensors[f"i_star.{_key(layer)}"].to(device).float().clone()
                    self.i_star_versions[layer] += 1
                    self.i_star_set[layer].fill_(True)
            else:
                self.i_star = tensors["i_star"].to(device).float().clone()
            self.i_star_initialized = True
            self.i_star_version += 1
            for k, v in self.o_v.items():
                v.copy_(tensors[f"o_v.{k}"].to(device))
            for k, v in self.o_k.items():
                if f"o_k.{k}" in tensors:
                    if isinstance(v, nn.Parameter):
                        v.copy_(tensors[f"o_k.{k}"].to(device))
                    else:
                        self.o_k[k] = tensors[f"o_k.{k}"].to(device).float().clone()

    def concept_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()

    def inference_defaults(self) -> dict[str, Any]:
        return {"beta": self.config.beta, "beta_global": self.config.beta_global, "tau": self.config.tau}

    def header_fields(self) -> dict[str, Any]:
        return {"covariance": self.corpus}

    # -- the edit
    def target_output(self, layer: str, pathway: str) -> torch.Tensor:
        return (self.o_k if pathway == "k" else self.o_v)[_key(layer)]

    def new_group(self) -> PerfusionGroup:
        return PerfusionGroup(self.pipe, self.C_inv)


def _inverse_for(pipe, corpus: str) -> torch.Tensor:
    """C^-1 of the caption corpus ``corpus`` on this base, computed once per pipeline while anything is attached
    (every concept of a composition, and every ``handle.set``, reuses it)."""
    from ..covariance import covariance_for, inverse
    from ..edits.state import pipeline_state

    cache = pipeline_state(pipe).cache
    if ("C_inv", corpus) not in cache:
        C = covariance_for(pipe, corpus)
        if C is None:
            raise ConceptFileError(
                f"concept was trained with a custom caption corpus ({corpus}); "
                "run 'personalize covariance --base … --captions FILE' with the same captions first"
            )
        cache[("C_inv", corpus)] = inverse(C)
    return cache[("C_inv", corpus)]


def _key(layer: str) -> str:
    """Parameter-dict-safe name of a layer (no dots)."""
    return layer.replace(".", "/")


def _project(linear: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """W e (no bias: the site adds o* to the layer's output, which holds the bias); ``e`` (d,) or rows (S, d)."""
    base = getattr(linear, "base_layer", linear)
    e = e.float().to(base.weight.device)
    return (base.weight.float() @ e if e.ndim == 1 else e @ base.weight.float().T).detach().clone()


@torch.no_grad()
def superclass_encoding(pipe, superclass: str) -> torch.Tensor:
    """e_super: the mean text-encoder output at the superclass phrase's last token over the neutral templates (the
    module docstring says why the last)."""
    from ..templates import fill

    prompts = [fill(t, superclass) for t in NEUTRAL_TEMPLATES]
    positions = [phrase_last_position(pipe.tokenizer, t, superclass) for t in NEUTRAL_TEMPLATES]
    hidden = text_stack.encode(pipe, prompts).context.float()  # SDXL: both encoders' outputs side by side
    return torch.stack([hidden[i, p] for i, p in enumerate(positions)]).mean(0)


# ----------------------------------------------------------------------------- diffusion transformers
DIT_GLOBAL_LOCK = ("its text keys at a joint block depend on the image stream, so K reading the superclass prompt "
                   "would need a second transformer pass per step")


def _rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The concepts' o* as rows (J, d_out) on SD, (J x segments, d_out) on a diffusion transformer."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])


def dit_segments(pipe) -> list[tuple[str, int, int]]:
    """``(tokenizer name, first row, rows)`` of each context segment a concept token appears in
    (``Family.context_segments``; Flux: T5's; SD3: CLIP's 77, then T5's where the pipeline has T5): one rank-1
    target per segment and joint block."""
    family = families.of(pipe)
    length = sum(rows or family.max_length(pipe, name) for name, rows in family.context_tokenizers)
    return [(name, start, stop - start) for start, stop, name in family.context_segments(pipe, length)]


def _phrase_end(row: list[int], phrase: list[int]) -> int | None:
    """The index of ``phrase``'s last id at its first occurrence in ``row`` (None: absent)."""
    n = len(phrase)
    for i in range(len(row) - n + 1):
        if row[i:i + n] == phrase:
            return i + n - 1
    return None


@torch.no_grad()
def superclass_site_inputs(pipe, superclass: str, layers: list[str]) -> dict[str, torch.Tensor]:
    """e_super per joint block, (S, d): the base transformer's add_k_proj input at the superclass phrase's last
    token of each context segment, averaged over the neutral templates and the reference states
    (``covariance.site_inputs``: four step indices, seeded noise on a zero latent)."""
    from ..covariance import reference_steps, site_inputs
    from ..templates import fill, phrase_ids

    prompts = [fill(t, superclass) for t in NEUTRAL_TEMPLATES]
    ids = text_stack.tokenize(pipe, prompts, text_stack.encoders(pipe)[0].device)
    segments = dit_segments(pipe)
    positions = []  # (S, B): absolute context rows
    for tok_name, start, rows in segments:
        tok = getattr(pipe, tok_name)
        phrase = phrase_ids(base_tokenizer(pipe, tok_name), superclass)
        row_ids = tok(prompts, padding="max_length", max_length=rows, truncation=True).input_ids
        found = [_phrase_end(r, phrase) for r in row_ids]
        if any(p is None for p in found):
            raise BadInputError(f"the superclass '{superclass}' was cut from a neutral prompt by {tok_name}")
        positions.append([start + p for p in found])
    where = torch.tensor(positions)
    sites = [f"{layer}.add_k_proj" for layer in layers]
    total = None
    steps = reference_steps(pipe)
    encoding = text_stack.encode_ids(pipe, ids)
    for k, step in enumerate(steps):
        seen = site_inputs(pipe, encoding, sites, step, seed=k)
        rows = torch.arange(len(prompts), device=seen[sites[0]].device)
        picked = {s: torch.stack([seen[s][rows, w.to(rows.device)].double().mean(0) for w in where]).cpu()
                  for s in sites}
        total = picked if total is None else {s: total[s] + picked[s] for s in sites}
    return {layer: (total[site] / len(steps)).float() for layer, site in zip(layers, sites)}
