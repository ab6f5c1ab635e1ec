"""Capture-only cross-attention maps of chosen prompt tokens, per transformer block.

Nothing here changes a computation; it only reads. While at least one *watcher*
(e.g. a LAG-sampled concept) is registered on a pipeline:

- the pipeline's prompt-row matcher (``prompt_rows.py``) records each encoded
  prompt: its token ids and its output (the rows the UNet will see as
  ``encoder_hidden_states``);
- a pre-hook on the UNet matches every batch row to a recorded prompt, asks
  each watcher which text columns are its own in that row, and lets a row with
  none (the unconditional half under classifier-free guidance) borrow the maps
  of the row with identical latents that has some (the conditional half);
- a pre-hook on every transformer block records its H x W from its
  ``(N, C, H, W)`` input, so a map is never reshaped by guessing from a
  sequence length;
- occupants of each cross-attention's ``to_q`` / ``to_k`` keep the current
  forward's queries and keys (the attention itself still runs with SDPA).

``token_maps(block, keys)`` then computes ``softmax(q k^T * scale)`` over the
text columns only, for the source rows only, averages it over heads and the
block's cross-attention layers and sums it over each watcher's columns.

On a diffusion transformer (SD3, Flux.1) every block is watched: the capture keeps each block's image queries and
text keys (``joint_maps.py`` says which projections and how the processor's norms and rotary embedding are
applied), a pre-hook on its attention keeps Flux's rotary embedding, and the denoiser's pre-hook records the one
token grid all blocks share (``Family.token_grid``) and the text length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import families
from ..errors import BadInputError
from ..families import denoiser
from ..transfer import to_device
from .joint_maps import capture_sites, image_text_probs
from .placement import block_cross_attentions, dit_blocks, transformer_blocks
from .prompt_rows import prompt_rows
from .sites import occupy, vacate
from .state import pipeline_state, release

_KEY = "attention-maps"
Columns = Callable[[list[int]], list[int]]  # token ids of one prompt -> the watcher's column indices


@dataclass
class Plan:
    """Which batch row's maps each row uses (``source``) and, per watcher, its columns in each source row."""

    source: list[int | None]
    columns: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    _tensors: dict = field(default_factory=dict, repr=False)

    def sources(self) -> list[int]:
        return sorted({s for s in self.source if s is not None})

    def tensors(self, keys: list[str], device, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan as tensors on ``device``, made once per plan: the source rows (S,), each watcher's column
        counts in each source row (K, S, length) and which source each batch row reads (n, S)."""
        cache_key = (tuple(keys), str(device), length)
        if cache_key not in self._tensors:
            sources = self.sources()
            columns = torch.zeros(len(keys), len(sources), length)
            for ki, key in enumerate(keys):
                for si, s in enumerate(sources):
                    for c in self.columns.get(key, {}).get(s, []):
                        columns[ki, si, c] += 1
            assign = torch.zeros(len(self.source), len(sources))
            for r, src in enumerate(self.source):
                if src is not None:
                    assign[r, sources.index(src)] = 1
            self._tensors[cache_key] = tuple(to_device(t, device) for t in (torch.tensor(sources), columns, assign))
        return self._tensors[cache_key]


class _Capture:
    """Occupant of ``attn2.to_q`` / ``attn2.to_k``: keeps the output of the current forward."""

    order = 1000  # after every edit of the same site: the maps see the keys the attention sees

    def __init__(self, maps: "AttentionMaps", block: str, attn: nn.Module, slot: int):
        self.maps, self.block, self.attn, self.slot = maps, block, attn, slot

    def __call__(self, wrapper, x, out):
        entry = self.maps._captured.setdefault(self.block, {}).setdefault(id(self.attn), [self.attn, None, None])
        entry[1 + self.slot] = out.detach()
        return out


class AttentionMaps:
    """The per-pipeline capture store (see the module docstring); get it with :func:`attention_maps`."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.watchers: dict[str, Columns] = {}
        self.sizes: dict[str, tuple[int, int]] = {}  # block -> (H, W), from its input
        # the latest (N, H, W) map and mask per block and watcher, kept by lag.block_masks for inspection
        self.maps: dict[str, dict[str, torch.Tensor]] = {}
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.plan: Plan | None = None
        self._plan_key: tuple | None = None
        self._captured: dict[str, dict[int, list]] = {}
        self._keys: list[str] = []  # the watchers, in the order of the plan's tensors
        self._plan_tensors: tuple = ()  # Plan.tensors(self._keys, ...) of the current plan
        self._handles: list = []
        self._sites: list[str] = []
        self.family = families.of(pipe)
        self._joint = self.family is not None and self.family.denoiser == "transformer"
        self._rotary: dict[int, object] = {}  # id(joint attention) -> its rotary embedding this forward (Flux)
        self._text_len = 0

    # -- watchers ---------------------------------------------------------------------------
    def watch(self, key: str, columns: Columns) -> None:
        if not self.watchers:
            self._install()
        self.watchers[key] = columns
        self._plan_key = None

    def unwatch(self, key: str) -> None:
        self.watchers.pop(key, None)
        self._plan_key = None
        if not self.watchers:
            self._uninstall()

    def _install(self) -> None:
        unet = denoiser(self.pipe)
        names = {id(m): n for n, m in unet.named_modules()}
        prompt_rows(self.pipe).subscribe(_KEY)
        self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        if self._joint:
            for name, block in dit_blocks(unet):
                for site, attn, slot in capture_sites(name, block):
                    occupy(unet, site, _KEY, _Capture(self, name, attn, slot))
                    self._sites.append(site)
                self._handles.append(block.attn.register_forward_pre_hook(self._rotary_hook, with_kwargs=True))
            return
        for name, block in transformer_blocks(unet):
            self.sizes[name] = (0, 0)  # every block's entry from the start: a compiled denoiser sees one dict shape
            self._handles.append(block.register_forward_pre_hook(self._size_hook(name), with_kwargs=True))
            for attn in block_cross_attentions(block):
                attn_name = names[id(attn)]
                for slot, proj in enumerate(("to_q", "to_k")):
                    site = f"{attn_name}.{proj}"
                    occupy(unet, site, _KEY, _Capture(self, name, attn, slot))
                    self._sites.append(site)

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        for site in self._sites:
            vacate(denoiser(self.pipe), site, _KEY)
        self._handles, self._sites = [], []
        self._captured, self.plan, self._plan_key, self._rotary = {}, None, None, {}
        self._keys, self._plan_tensors = [], ()
        prompt_rows(self.pipe).unsubscribe(_KEY)
        state = pipeline_state(self.pipe, create=False)
        if state is not None and state.attention_maps is self:
            state.attention_maps = None
            release(self.pipe)

    # -- hooks ------------------------------------------------------------------------------
    def _size_hook(self, name: str):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None and hidden.ndim == 4:
                self.sizes[name] = (int(hidden.shape[-2]), int(hidden.shape[-1]))

        return hook

    def _rotary_hook(self, module, args, kwargs) -> None:
        self._rotary[id(module)] = kwargs.get("image_rotary_emb")

    @torch.no_grad()
    def _on_unet(self, module, args, kwargs) -> None:
        sample, context = self.family.denoiser_inputs(args, kwargs)
        self._captured.clear()  # the same dicts, emptied: a compiled denoiser (this hook runs outside it) fills them
        self._rotary.clear()
        if self._joint:
            grid = self.family.token_grid(module, args, kwargs)
            self.sizes = {name: grid for name, _ in dit_blocks(module)}
            self._text_len = int(context.shape[1])
        # one plan per prompt batch: the pipeline passes the same context tensor at every denoising step,
        # and building a plan waits for the device (it compares rows), so it is reused while nothing changed
        reuse = (context, context._version, tuple(sample.shape), tuple(self.watchers), prompt_rows(self.pipe).version)
        if self.plan is None or self._plan_key is None or not _same_key(self._plan_key, reuse):
            self.plan = self._make_plan(sample, context)
            self._plan_key = reuse
            # the plan as tensors for every watcher, made here (eagerly): what the maps read, compiled or not
            self._keys = sorted(self.watchers)
            self._plan_tensors = self.plan.tensors(self._keys, context.device, int(context.shape[1]))

    def _make_plan(self, sample: torch.Tensor, context: torch.Tensor) -> Plan:
        n = context.shape[0]
        row_ids: list[list[int] | None] = [None] * n
        for r, (encoded, j) in prompt_rows(self.pipe).match(context).items():
            row_ids[r] = encoded.ids[j].tolist()
        if all(ids is None for ids in row_ids):
            raise BadInputError(
                "LAG sampling could not read the prompt's tokens: pass the prompt as text "
                "(not prompt_embeds, and without clip_skip) or attach without lag"
            )
        columns = {key: {} for key in self.watchers}
        for r, ids in enumerate(row_ids):
            for key, fn in self.watchers.items():
                cols = fn(ids) if ids is not None else []
                if cols:
                    columns[key][r] = cols
        own = [any(r in c for c in columns.values()) for r in range(n)]
        same_latents = (sample[:, None] == sample[None]).flatten(2).all(-1).cpu()
        source: list[int | None] = []
        for r in range(n):
            if own[r]:
                source.append(r)
            else:
                partners = [p for p in same_latents[r].nonzero().flatten().tolist() if own[p]]
                source.append(partners[0] if partners else None)
        return Plan(source, columns)

    # -- maps -------------------------------------------------------------------------------
    @torch.no_grad()
    def token_maps(self, block: str, keys: list[str]) -> torch.Tensor:
        """(K, N, H, W) cross-attention mass on each watcher's columns in ``block``, this forward."""
        entries = list(self._captured.pop(block, {}).values())
        if self.plan is None or block not in self.sizes or not entries:
            raise RuntimeError(f"no cross-attention was captured for {block} in this forward")
        h, w = self.sizes[block]
        rows, every_column, assign = self._plan_tensors
        n = assign.shape[0]
        device = entries[0][1].device
        if rows.numel() == 0:  # no row holds a watched token
            return torch.zeros(len(keys), n, h, w, device=device)
        text = self._text_len if self._joint else entries[0][2].shape[1]
        lengths = (h * w, h * w + text) if self._joint else (h * w,)  # a Flux single block: text + image rows
        for _, q, k in entries:
            if q is None or k is None or q.shape[1] not in lengths:
                raise RuntimeError(f"{block}: captured queries do not match the block's {h}x{w} grid")
        columns = every_column[[self._keys.index(key) for key in keys]]  # (K, S, text)
        mass = None
        for attn, q, k in entries:
            if self._joint:
                probs = image_text_probs(attn, q[rows], k[rows], text, self._rotary.get(id(attn)))  # (S, HW, T)
            else:
                probs = text_attention(q[rows], k[rows], attn.heads, attn.scale)  # (S, HW, T)
            step = torch.einsum("slt,kst->ksl", probs, columns)  # each watcher's mass per source row
            mass = step if mass is None else mass + step
        out = torch.einsum("ns,ksl->knl", assign, mass)  # each batch row reads its source row
        return (out / len(entries)).view(len(keys), n, h, w)


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1:] == b[1:]


def text_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax over the text columns of (q k^T) * scale, averaged over heads: (B, L, C), (B, T, C) -> (B, L, T)."""
    b, length, _ = q.shape
    qh = q.float().view(b, length, heads, -1).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, -1).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1).mean(1)


def attention_maps(pipe) -> AttentionMaps:
    """The pipeline's capture store (created on first use; it installs itself on the first watcher)."""
    state = pipeline_state(pipe)
    if state.attention_maps is None:
        state.attention_maps = AttentionMaps(pipe)
    return state.attention_maps
