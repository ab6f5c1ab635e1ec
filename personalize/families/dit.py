"""What the diffusion-transformer families (SD3, Flux.1) share: the denoiser is ``pipe.transformer``, and which
methods work on it.

Site kinds (``edits/placement.py``): the joint attentions (``cross_attention``), their text-stream K/V
projections ``add_k_proj`` / ``add_v_proj`` (``kv``: Custom Diffusion's counterpart of cross-attention K/V), the
modules of the family's diffusers DreamBooth-LoRA script (``attention``), the text encoders' attention
(``text_attention``) and the blocks (``transformer``). Not yet: ``proj_out`` (Personalized Residuals: the blocks'
attention output projections are found, but the residual sites and LAG from the joint attention are not built),
and Perfusion is refused by name (``refuses``): its key lock needs text keys that depend on the prompt alone.

Export formats (``exports``): none yet for these families; concepts attach, compose and generate in personalize.
"""
from __future__ import annotations

from typing import ClassVar

from .family import Family

PERFUSION_REASON = ("Perfusion's key lock needs text keys that depend on the prompt alone, and a joint-attention "
                    "block's text keys also depend on the image through the blocks before it")


class DiffusionTransformer(Family):
    """A family whose denoiser is a diffusion transformer with joint (text + image) attention blocks."""

    denoiser: ClassVar[str] = "transformer"
    edit_kinds = frozenset({"cross_attention", "kv", "attention", "text_attention", "transformer"})
    refuses: ClassVar[dict[str, str]] = {"perfusion": PERFUSION_REASON}
    exports: ClassVar[dict[str, tuple[str, ...]]] = {
        name: () for name in ("custom-diffusion", "dreambooth", "dreambooth-lora", "residuals", "textual-inversion")}
