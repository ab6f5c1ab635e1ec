"""What the diffusion-transformer families (SD3, Flux.1) share: the denoiser is ``pipe.transformer``, and which
methods work on it.

Site kinds (``edits/placement.py``): the joint attentions (``cross_attention``), their text-stream K/V
projections ``add_k_proj`` / ``add_v_proj`` (``kv``: Custom Diffusion's counterpart of cross-attention K/V), the
modules of the family's diffusers DreamBooth-LoRA script (``attention``), the text encoders' attention
(``text_attention``) and the blocks (``transformer``). Not yet: ``proj_out`` (Personalized Residuals: the blocks'
attention output projections are found, but the residual sites and LAG from the joint attention are not built).
Perfusion edits the ``kv`` sites with i*, C and the superclass key taken per joint block (its text keys depend on
the image stream through the blocks before it, so the lock is exact at each block's i*, not for every image and
timestep: docs/PERFUSION_DIT.md); its global key lock is refused (``methods/perfusion.py``).

Export formats (``exports``; ``export_refusals`` says why a method keeps none, ``personalize export`` shows it;
Perfusion has no export format on any family, no stock loader applies a gated edit):
DreamBooth-LoRA's ``diffusers-lora`` (``transformer.*`` / ``text_encoder.*`` keys, what diffusers' own
``train_dreambooth_lora_flux.py`` / ``_sd3.py`` save and ``FluxPipeline`` / ``StableDiffusion3Pipeline
.load_lora_weights`` read). Flux adds Textual Inversion and DreamBooth-LoRA's ``kohya`` file in kohya sd-scripts'
Flux names (``families/flux.py``); SD3 has no kohya layout diffusers reads. DreamBooth's ``single-file`` export writes the SD
checkpoint layout; its pipeline folder ``OUT.pipeline/`` loads with the family's stock ``from_pretrained``.
"""
from __future__ import annotations

from typing import ClassVar

from .family import Family


class DiffusionTransformer(Family):
    """A family whose denoiser is a diffusion transformer with joint (text + image) attention blocks."""

    denoiser: ClassVar[str] = "transformer"
    edit_kinds = frozenset({"cross_attention", "kv", "attention", "text_attention", "transformer"})
    refuses: ClassVar[dict[str, str]] = {}
    exports: ClassVar[dict[str, tuple[str, ...]]] = {
        **{name: () for name in ("custom-diffusion", "dreambooth", "residuals", "textual-inversion")},
        "dreambooth-lora": ("diffusers-lora",)}
    #: why a method keeps no export format on this family (method name -> one line's worth)
    export_refusals: ClassVar[dict[str, str]] = {
        "dreambooth": "its single-file export writes the SD checkpoint layout; the trained pipeline folder "
                      "OUT.pipeline/ beside the concept file is the export (the family's stock from_pretrained "
                      "loads it; prompt with the identifier word)",
        "textual-inversion": "no stock diffusers pipeline of this family loads token embeddings",
    }
