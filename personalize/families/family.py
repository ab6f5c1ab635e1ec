"""The ``Family`` interface: everything a model family decides, in one object per family.

Generic code (the trainer, the seams, the methods, loading) asks the family of a pipeline
(``personalize.families.of(pipe)``) instead of assuming an SD UNet:

- **recognition and building**: the pipeline class a diffusers folder declares (``pipeline_classes``), the
  extra ``from_pretrained`` arguments (``load_kwargs``), whether a loaded pipeline is of this family
  (``matches``), and the built-in random test base (``tiny``, ``build_tiny``);
- **the denoiser**: its pipeline attribute (``denoiser``: ``unet`` or ``transformer``) and which edit kinds it
  has sites for (``edit_kinds``; a method naming another kind is refused on this family before any work);
- **text**: the (tokenizer, text encoder) pairs, each tokenizer's length, and how ids become the denoiser's
  conditioning (``encode_ids`` -> :class:`Encoding`);
- **the objective**: the noise schedule of training (``noise_schedule``), how a drawn step index noises the
  latents and what the prediction is compared with (``noised``), and the denoiser call (``predict``);
- **image sizes**: the native resolution and the pixel stride sides must be multiples of.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class Encoding:
    """A prompt batch as the denoiser reads it: ``context`` (B, L, D), the pooled vector (SDXL, SD3, Flux; else
    None), the ids aligned with the context's rows (where a concept's token sits: CLIP's on SD, T5's on Flux),
    and family-specific extras (tensors with one row per prompt, batch first)."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    ids: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class Noised:
    """One training step's denoiser input and target: the noised latents, the timestep the denoiser reads, and
    what its prediction is compared with (ε, v, or the flow-matching velocity); ``weight``: per-row loss weights
    (None: 1)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None


class Family:
    """One model family (see the module docstring). Subclasses set the class attributes and implement the
    methods that raise ``NotImplementedError``."""

    name: ClassVar[str]  # "sd1"
    label: ClassVar[str]  # "SD 1.x": what messages and the README's table call it
    pipeline_classes: ClassVar[tuple[str, ...]]  # the diffusers classes a folder of this family declares
    tiny: ClassVar[str]  # the built-in random test base
    denoiser: ClassVar[str] = "unet"
    denoiser_classes: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)  # diffusers classes of the denoiser
    #: the denoiser modules DreamBooth-LoRA trains (site kind ``attention``): module-name suffixes matched as peft
    #: matches ``target_modules`` (the whole name, or its end after a dot); None: every diffusers ``Attention``'s
    #: ``to_q``/``to_k``/``to_v``/``to_out.0`` (diffusers' ``train_dreambooth_lora.py``)
    lora_targets: ClassVar[tuple[str, ...] | None] = None
    edit_kinds: ClassVar[frozenset[str]]  # site kinds (edits.placement.KINDS) the denoiser has
    #: methods this family refuses although it has their site kinds: method name -> why (one line's worth)
    refuses: ClassVar[dict[str, str]] = {}
    text_pairs: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"),)
    #: the export formats this family keeps per method (method name -> format names); a method not named keeps
    #: all of its ``export_formats``
    exports: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: the keys of a token file holding one part per text encoder, in ``text_pairs`` order (SDXL ``clip_l``,
    #: ``clip_g``); empty: one encoder, ``{token: vectors}``
    token_keys: ClassVar[tuple[str, ...]] = ()
    #: the tokenizer whose length a prompt must fit (a longer prompt is refused, never cut: ``prompts.py``)
    prompt_tokenizer: ClassVar[str] = "tokenizer"
    #: the text encoders DreamBooth-LoRA's ``train_text_encoder`` puts LoRA on (the family's diffusers script's)
    lora_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    #: the (tokenizer, text encoder) pairs whose pooled output the denoiser reads beside the context (SDXL's
    #: ``text_embeds``, SD3's two CLIPs, Flux's CLIP-L): Perfusion gives a row holding its token the superclass
    #: prompt's pooled vector there (``edits/pooled.py``)
    pooled_encoders: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: the denoiser's forward arguments (keyword, position) of the noisy input and of the text context
    sample_arg: ClassVar[tuple[str, int]] = ("sample", 0)
    context_arg: ClassVar[tuple[str, int]] = ("encoder_hidden_states", 2)
    #: the tokenizers whose ids make up the context's rows, in row order: (tokenizer, rows; None = the rest)
    context_tokenizers: ClassVar[tuple[tuple[str, int | None], ...]] = (("tokenizer", None),)

    # -- recognition and building ------------------------------------------------------------------------------
    def matches(self, pipe) -> bool:
        raise NotImplementedError

    def build_tiny(self):
        """The family's built-in random test base, seeded so that every process builds the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            parts = self.tiny_components()
        return self.assemble(parts)

    def tiny_components(self) -> dict:
        raise NotImplementedError

    def load_kwargs(self, class_name: str) -> dict:
        """Extra ``from_pretrained`` / constructor arguments (no safety checker or watermarker)."""
        return {}

    def assemble(self, parts: dict, class_name: str | None = None):
        """A pipeline from its parts."""
        import diffusers

        class_name = class_name or self.pipeline_classes[0]
        return getattr(diffusers, class_name)(**parts, **self.load_kwargs(class_name))

    # -- the denoiser ------------------------------------------------------------------------------------------
    def denoiser_of(self, pipe):
        return getattr(pipe, self.denoiser)

    def denoiser_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noisy input and the text context of one denoiser call (a forward pre-hook's arguments)."""
        def read(arg):
            name, position = arg
            return args[position] if len(args) > position else kwargs.get(name)

        return read(self.sample_arg), read(self.context_arg)

    def token_grid(self, denoiser, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """(H, W) of the image tokens of one denoiser call, where every block sees the same grid (a diffusion
        transformer); None where each block records its own (a UNet's blocks work at several sizes)."""
        return None

    # -- text --------------------------------------------------------------------------------------------------
    def context_segments(self, pipe, length: int) -> list[tuple[int, int, str]]:
        """``(start, stop, tokenizer)``: which tokenizer's ids sit in each run of a context's ``length`` rows
        (``Encoding.ids``; SD3: CLIP's 77, then T5's). A tokenizer the pipeline lacks has no run."""
        out, start = [], 0
        for name, rows in self.context_tokenizers:
            stop = length if rows is None else min(length, start + rows)
            if getattr(pipe, name, None) is not None and stop > start:
                out.append((start, stop, name))
            start = stop
        return out

    def pairs(self, pipe) -> list[tuple[str, str]]:
        """The (tokenizer, text encoder) attribute names present on the pipeline, in the order their outputs are
        joined."""
        return [(tok, te) for tok, te in self.text_pairs if getattr(pipe, te, None) is not None]

    def max_length(self, pipe, tokenizer_name: str) -> int:
        """The number of ids a prompt is padded/cut to for one tokenizer."""
        return int(getattr(pipe, tokenizer_name).model_max_length)

    def tokenize(self, pipe, prompts: list[str], device=None) -> list[torch.Tensor]:
        """Each tokenizer's ids for ``prompts``, padded to its length."""
        out = []
        for tok_name, _ in self.pairs(pipe):
            tok = getattr(pipe, tok_name)
            ids = tok(prompts, padding="max_length", max_length=self.max_length(pipe, tok_name), truncation=True,
                      return_tensors="pt").input_ids
            out.append(ids if device is None else ids.to(device))
        return out

    def encode_ids(self, pipe, ids: list[torch.Tensor]) -> Encoding:
        raise NotImplementedError

    # -- the objective -----------------------------------------------------------------------------------------
    def noise_schedule(self, pipe):
        raise NotImplementedError

    def num_train_steps(self, schedule) -> int:
        return int(schedule.config.num_train_timesteps)

    def noised(self, schedule, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> Noised:
        raise NotImplementedError

    def predict(self, pipe, denoiser, noised: Noised, context: torch.Tensor, pooled: torch.Tensor | None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # -- image sizes -------------------------------------------------------------------------------------------
    def native_resolution(self, pipe) -> int:
        raise NotImplementedError

    def pixel_stride(self, pipe) -> int:
        raise NotImplementedError
