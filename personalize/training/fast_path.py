"""The trainer's fast path: fused AdamW, cached text encodings, frozen weights held in the compute dtype."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import families, text_stack


def _adamw(groups: list[dict], device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel when every parameter is a floating tensor on a GPU."""
    params = [p for g in groups for p in g["params"]]
    fused = torch.device(device).type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    # the default rate is the first group's (every group sets its own): diffusers' polynomial schedule decays
    # from optimizer.defaults["lr"] to its lr_end, as in the scripts, whose optimizer is built with their rate
    lr = groups[0].get("lr", 1e-3) if groups else 1e-3
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, **({"fused": True} if fused else {}))


class TextCache:
    """Text-encoder outputs per prompt, for runs where nothing trained acts on the text path (the prompts come
    from a few templates, so after the first steps the text encoder no longer runs)."""

    def __init__(self):
        self.rows: dict[str, text_stack.Encoding] = {}  # prompt -> its one-row encoding

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], ids: list[torch.Tensor]) -> text_stack.Encoding:
        """The encoding of ``prompts`` (``ids``: one tensor per text encoder), encoding only prompts not seen yet."""
        missing = [i for i, p in enumerate(prompts) if p not in self.rows]
        if missing:
            first = {}
            for i in missing:
                first.setdefault(prompts[i], i)
            order = list(first.values())
            new = text_stack.encode_ids(pipe, [t[order] for t in ids])
            for k, i in enumerate(order):
                self.rows[prompts[i]] = text_stack.Encoding(
                    new.context[k], None if new.pooled is None else new.pooled[k], new.ids[k],
                    {key: value[k] for key, value in new.extra.items()})
        rows = [self.rows[p] for p in prompts]
        stack = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
        return text_stack.Encoding(stack([r.context for r in rows]), stack([r.pooled for r in rows]),
                                   stack([r.ids for r in rows]), {key: stack([r.extra[key] for r in rows])
                                                                  for key in rows[0].extra})


class FrozenInComputeDtype:
    """Under mixed precision, the frozen weights of the pipeline held in the compute dtype while training.

    Autocast would otherwise cast every frozen fp32 weight at every use (memory traffic, and a second copy
    of each weight kept for the backward pass). Trainable parameters stay as they are (fp32 master
    weights). :meth:`restore` puts back the original tensors themselves, so the pipeline is bit-identical
    after training; the originals wait in CPU memory meanwhile."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, pipe, trainable: Sequence[torch.Tensor], mixed_precision: str):
        self.dtype = self.DTYPES.get(mixed_precision)
        keep = {id(p) for p in trainable}
        modules = [m for m in (families.denoiser(pipe), *text_stack.encoders(pipe), pipe.vae) if m is not None]
        seen: set[int] = set()
        self.frozen = []
        for module in modules:
            for p in module.parameters():
                if id(p) in keep or id(p) in seen or p.requires_grad or not p.is_floating_point():
                    continue
                seen.add(id(p))
                self.frozen.append(p)
        self.saved: list[torch.Tensor] | None = None

    def cast(self) -> None:
        if self.dtype is None or self.saved is not None:
            return
        self.saved = []
        for p in self.frozen:
            original = p.data
            p.data = original.to(self.dtype)
            self.saved.append(original.to("cpu", non_blocking=True) if original.is_cuda else original)

    def restore(self) -> None:
        if self.saved is None:
            return
        for p, original in zip(self.frozen, self.saved):
            p.data = original.to(p.device)
        self.saved = None
