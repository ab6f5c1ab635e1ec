"""What the diffusion-transformer families (SD3, Flux.1) share: the denoiser is ``pipe.transformer``, and which
methods work on it.

Site kinds (``edits/placement.py``): the joint attentions (``cross_attention``), their text-stream K/V
projections ``add_k_proj`` / ``add_v_proj`` (``kv``: Custom Diffusion's counterpart of cross-attention K/V), the
modules of the family's diffusers DreamBooth-LoRA script (``attention``), the text encoders' attention
(``text_attention``), each block's attention output projection (``proj_out``: Personalized Residuals, with LAG
from the joint attention, ``edits/joint_maps.py``) and the blocks (``transformer``). Perfusion edits the ``kv``
sites with i*, C and the superclass key taken per joint block (its text keys depend on the image stream through
the blocks before it, so the lock is exact at each block's i*, not for every image and timestep:
docs/PERFUSION_DIT.md); its global key lock is refused (``methods/perfusion.py``).

Custom Diffusion's K/V deltas export as a full-rank diffusers LoRA on ``add_k_proj`` / ``add_v_proj`` (``lora_A`` =
the identity, ``lora_B`` = dW: ``B A x = dW x`` exactly), the one stock path there is for a weight delta on these
pipelines (diffusers' ``load_attn_procs`` reads Custom Diffusion weights into UNets only).

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
    sample_arg = ("hidden_states", 0)
    context_arg = ("encoder_hidden_states", 1)
    edit_kinds = frozenset({"cross_attention", "kv", "proj_out", "attention", "text_attention", "transformer"})
    refuses: ClassVar[dict[str, str]] = {}
    exports: ClassVar[dict[str, tuple[str, ...]]] = {
        **{name: () for name in ("dreambooth", "textual-inversion")},
        "dreambooth-lora": ("diffusers-lora",), "residuals": ("diffusers-lora",), "custom-diffusion": ("diffusers-lora",)}
    def token_grid(self, denoiser, args, kwargs) -> tuple[int, int]:
        """The latent grid over the patch size (SD3: ``hidden_states`` is (N, C, H, W), patched p x p)."""
        sample, _ = self.denoiser_inputs(args, kwargs)
        p = int(denoiser.config.patch_size)
        return int(sample.shape[-2]) // p, int(sample.shape[-1]) // p

    #: why a method keeps no export format on this family (method name -> one line's worth)
    export_refusals: ClassVar[dict[str, str]] = {
        "dreambooth": "its single-file export writes the SD checkpoint layout; the trained pipeline folder "
                      "OUT.pipeline/ beside the concept file is the export (the family's stock from_pretrained "
                      "loads it; prompt with the identifier word)",
        "textual-inversion": "no stock diffusers pipeline of this family loads token embeddings",
    }
