"""Each built-in method's card: what it declares without torch — name, description, sites, ``Config`` (settings
and their help), ``Knobs``, the trainer defaults of its recipe and where they come from.

A method's class derives from its card (``class Perfusion(PerfusionCard, Method)``), so the card *is* the
method's declaration, read in one place by the trainer and by the command line; ``registry.card(name)`` gives it
without importing the method's module (and with it torch, diffusers and peft), which keeps ``personalize
--help``, ``personalize train --help`` (whose flags and defaults are derived from these dataclasses,
``cli/flags.py``) and ``personalize methods`` fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..knobs import NoKnobs, describe, knob
from ..prior import PriorConfig


class MethodCard:
    """The torch-free part of :class:`personalize.methods.base.Method`."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: the seams it edits: "tokens" and site kinds of ``edits/placement.py`` ("kv", "attention", "proj_out",
    #: "text_attention"), or "unet" (the whole UNet swapped)
    sites: ClassVar[tuple[str, ...]]
    Config: ClassVar[type]
    #: the inference knobs ``attach`` / ``handle.set`` accept, a dataclass of ``knobs.knob`` fields
    Knobs: ClassVar[type] = NoKnobs
    #: ``{knob: help}``, derived from :attr:`Knobs` (shown in --help, ``personalize methods`` and errors)
    knobs: ClassVar[dict[str, str]] = {}
    #: TrainConfig fields this method defaults differently (explicit settings win)
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: where the defaults come from (paper or reference script, the effective learning rate spelled out);
    #: shown by ``personalize methods``
    recipe: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.knobs = describe(cls.Knobs)


# ----------------------------------------------------------------------------- perfusion
@dataclass
class PerfusionConfig:
    """Paper defaults (Perfusion §4-5): beta 0.75 / tau 0.10 in training; lr 0.006 / 0.03 (the recipe: ``recipe``)."""

    lock: str = field(default="local", metadata={
        "help": "key locking in training: local (o*_K frozen at the superclass) or trained (the paper's ablation)"})
    beta_train: float = field(default=0.75, metadata={"help": "gate threshold while training"})
    tau_train: float = field(default=0.10, metadata={"help": "gate temperature while training"})
    beta: float = field(default=0.70, metadata={
        "help": "inference default gate threshold, local lock (paper: 0.6-0.75)"})
    beta_global: float = field(default=0.50, metadata={
        "help": "inference default gate threshold, global lock (paper: 0.4-0.6)"})
    tau: float = field(default=0.15, metadata={"help": "inference default gate temperature"})
    lr_embedding: float = field(default=0.006, metadata={
        "help": "learning rate of the token embedding (paper §4.4: 0.006 at batch 16, not scaled)"})
    lr_value: float = field(default=0.03, metadata={
        "help": "learning rate of o*_V (paper §4.4: 0.03 at batch 16, not scaled)"})
    ema: float = field(default=0.99, metadata={"help": "EMA decay of the superclass key i*"})


@dataclass
class PerfusionKnobs:
    beta: float | None = knob(None, "gate threshold; higher = weaker concept, better text alignment (s = 1 at the "
                                    "concept, about 0 for unrelated words, so a negative beta would open the gate "
                                    "on every word; default: the concept's beta, or beta_global with lock=global)",
                              low=0)
    tau: float | None = knob(None, "gate temperature (default: the concept's tau)", low=0, low_open=True)
    gate: bool = knob(True, "on (default) or off: off applies the ungated edit of Eq. 2 (an ablation)")
    lock: str = knob("local", "local (default) or global: K reads the prompt with the concept word replaced by its "
                              "superclass", choices=("local", "global"))


class PerfusionCard(MethodCard):
    name = "perfusion"
    description = "Key-locked gated rank-1 edits of cross-attention K/V (~56 KB per concept)"
    sites = ("tokens", "kv")
    Config = PerfusionConfig
    Knobs = PerfusionKnobs
    # §4.4: the loss is weighted by a zero-shot soft mask of the superclass (§5.3: it raises text similarity)
    # Gradient clipping at 1.0 is ours, not the paper's (which lists none): with the mask-weighted loss
    # (normalised by the mask's area) rare huge steps, unclipped, dropped the toy world's split_triangle from
    # fidelity 0.893 to 0.206 (docs/TOYWORLD.md); unmasked runs never reach the clip, so it changes nothing there.
    train_defaults = {"steps": 250, "batch_size": 16, "max_grad_norm": 1.0, "masks": "auto"}
    recipe = ("Perfusion paper §4.4: batch 16, lr 0.03 (o*_V) / 0.006 (embedding) = the effective rates; loss "
              "weighted by a zero-shot CLIPSeg mask of the superclass; gradient norm clipped at 1.0 (ours: the "
              "paper lists no clipping, and the masked loss without it collapsed the toy world's fidelity "
              "0.893 -> 0.206); 8 validation prompts every 25 steps, best harmonic mean kept (with an evaluator)")


# ----------------------------------------------------------------------------- residuals
@dataclass
class ResidualsConfig:
    """Paper defaults (§4.1): r_i = 0.05 m_i, lr 1e-3 (150 steps at batch 4, no clipping: ``train_defaults``),
    token frozen."""

    rank_fraction: float = field(default=0.05, metadata={
        "help": "rank = round(F x channels) per proj_out", "flag": True})
    rank: int = field(default=0, metadata={
        "help": "> 0: the same LoRA rank in every proj_out instead of --rank-fraction", "flag": True})
    train_token: bool = field(default=False, metadata={
        "help": "also train the token's vector V* (the paper's ablation; overfits)", "flag": True})
    lr: float = field(default=1e-3, metadata={"help": "learning rate (paper §4.1: 1.0e-3 at batch 4, not scaled)"})
    init_token: str = field(default="httr", metadata={
        "help": "single token V* starts at (a late BPE merge, i.e. a rarely used token; in T5, the mean of "
                "its pieces)"})


@dataclass
class ResidualsKnobs:
    lag: bool | None = knob(None, "localized attention-guided sampling: apply the residuals only where the concept "
                                  "is attended (default: off)")


class ResidualsCard(MethodCard):
    name = "residuals"
    description = "Low-rank residuals on every transformer proj_out, optional LAG sampling (~5 MB per SD 1.5 concept)"
    sites = ("tokens", "proj_out")
    Config = ResidualsConfig
    Knobs = ResidualsKnobs
    train_defaults = {"steps": 150, "batch_size": 4, "max_grad_norm": None}
    recipe = ("Personalized Residuals paper §4.1: rank 0.05 x channels, 150 iterations at batch 4, lr 1e-3 "
              "(= the effective rate, nothing scaled), token frozen, no regularisation images; the paper lists no "
              "gradient clipping, so none")


# ----------------------------------------------------------------------------- textual inversion
@dataclass
class TextualInversionConfig:
    """diffusers textual_inversion README: lr 5e-4 x --scale_lr (batch 1 x 4 accumulation) = 2e-3, AdamW weight
    decay 1e-2 (3000 updates of 4 images: ``train_defaults``, no clipping)."""

    num_vectors: int = field(default=1, metadata={"help": "vectors per token", "flag": True})
    init_word: str | None = field(default=None, metadata={
        "help": "word the vectors start from (None: the superclass); a multi-token word starts at its pieces' mean",
        "flag": True})
    lr: float = field(default=2e-3, metadata={
        "help": "learning rate (diffusers textual_inversion README: 5e-4 --scale_lr x batch 1 x 4 accumulation "
                "= 2e-3 effective; here batch 4 in one step)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (textual_inversion.py)"})


class TextualInversionCard(MethodCard):
    name = "textual-inversion"
    description = "Only new token vector(s) train (Gal et al. 2022); 3 KB per vector on SD 1.5"
    sites = ("tokens",)
    Config = TextualInversionConfig
    train_defaults = {"steps": 3000, "batch_size": 4, "max_grad_norm": None}
    recipe = ("diffusers textual_inversion README: batch 1 x 4 gradient accumulation, lr 5e-4 with --scale_lr "
              "= 5e-4 x 4 x 1 = 2e-3 effective, 3000 updates, AdamW weight decay 1e-2, no gradient clipping "
              "(textual_inversion.py never clips); here batch 4 per step at lr 2e-3, the same update")


# ----------------------------------------------------------------------------- dreambooth
@dataclass
class DreamBoothConfig(PriorConfig):
    """diffusers DreamBooth README with prior preservation: lr 5e-6 (800 steps at batch 1, no --scale_lr), 200 class
    images, lambda 1, AdamW weight decay 1e-2, clipping at 1.0; identifier 'sks'."""

    lr: float = field(default=5e-6, metadata={
        "help": "learning rate of the UNet (train_dreambooth README: 5e-6 at batch 1, not scaled)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (train_dreambooth.py)"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "also train the text encoder (SDXL: both, as train_dreambooth_lora_sdxl.py)", "flag": True})
    lr_text_encoder: float = field(default=5e-6, metadata={
        "help": "learning rate of the text encoder (train_dreambooth.py: the same --learning_rate)"})
    identifier: str = field(default="sks", metadata={
        "help": "one rare token of the base vocabulary; the concept token copies its embedding"})


class DreamBoothCard(MethodCard):
    name = "dreambooth"
    description = "Full UNet fine-tune with prior preservation (Ruiz et al. 2023); a new base (3.4 GB UNet), not composable"
    sites = ("tokens", "unet", "text_encoder")  # SDXL: text_encoder_2 too
    Config = DreamBoothConfig
    train_defaults = {"steps": 800, "batch_size": 1, "checkpoint_every": 200, "max_grad_norm": 1.0}
    recipe = ("diffusers train_dreambooth README (prior preservation): batch 1, lr 5e-6 without --scale_lr = 5e-6 "
              "effective, 800 steps, 200 class images, lambda 1, AdamW weight decay 1e-2, gradients clipped at 1.0 "
              "(--max_grad_norm)")


# ----------------------------------------------------------------------------- dreambooth-lora
@dataclass
class DreamBoothLoraConfig(PriorConfig):
    """diffusers train_dreambooth_lora README: rank 4 (alpha = rank), lr 1e-4, AdamW weight decay 1e-2 (500 steps at
    batch 1, clipping at 1.0); prior preservation off unless prior_loss_weight > 0."""

    prior_loss_weight: float = field(default=0.0, metadata={
        "help": "weight of the class-image loss (lambda), 0 = off", "flag": True})
    rank: int = field(default=4, metadata={"help": "LoRA rank on every attention projection", "flag": True})
    lr: float = field(default=1e-4, metadata={
        "help": "learning rate (train_dreambooth_lora README: 1e-4 at batch 1, not scaled)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (train_dreambooth_lora.py)"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "LoRA on the text encoder's attention too (SDXL: both encoders; same lr)", "flag": True})
    identifier: str = field(default="sks", metadata={
        "help": "one rare token of the base vocabulary; the concept token copies its embedding"})


@dataclass
class DreamBoothLoraKnobs:
    scale: float = knob(1.0, "LoRA strength: 0 = the base model, 1 = as trained (default)", low=-10, high=10)


class DreamBoothLoraCard(MethodCard):
    name = "dreambooth-lora"
    description = "DreamBooth with peft LoRA (r=4) on every UNet attention projection; ~3 MB per SD 1.5 concept"
    sites = ("tokens", "attention", "text_attention")
    Config = DreamBoothLoraConfig
    Knobs = DreamBoothLoraKnobs
    train_defaults = {"steps": 500, "batch_size": 1, "max_grad_norm": 1.0}
    recipe = ("diffusers train_dreambooth_lora README: rank 4, batch 1, lr 1e-4 without --scale_lr = 1e-4 "
              "effective, 500 steps, no prior preservation, AdamW weight decay 1e-2, gradients clipped at 1.0 "
              "(--max_grad_norm)")


# ----------------------------------------------------------------------------- custom diffusion
@dataclass
class CustomDiffusionConfig(PriorConfig):
    """diffusers train_custom_diffusion README: lr 1e-5 x --scale_lr (batch 2) x 2 under prior preservation = 4e-5,
    250 steps, 200 class images, lambda 1, AdamW weight decay 1e-2, clipping at 1.0, modifier tokens initialised
    from 'ktn+pll+ucd'."""

    lr: float = field(default=4e-5, metadata={
        "help": "learning rate (train_custom_diffusion README: 1e-5 --scale_lr x batch 2 = 2e-5, doubled with prior "
                "preservation = 4e-5; set 2e-5 with prior_loss_weight=0)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (train_custom_diffusion.py)"})
    init_words: str = field(default="ktn+pll+ucd", metadata={
        "help": "words the modifier tokens start from, '+'-separated, one per concept in order"})


class CustomDiffusionCard(MethodCard):
    name = "custom-diffusion"
    description = "Cross-attention K/V deltas + modifier token(s), several concepts in one run (Kumari et al. 2023)"
    sites = ("tokens", "kv")
    Config = CustomDiffusionConfig
    train_defaults = {"steps": 250, "batch_size": 2, "max_grad_norm": 1.0}
    recipe = ("diffusers train_custom_diffusion README: batch 2, lr 1e-5 with --scale_lr = 1e-5 x 1 x 2 = 2e-5, "
              "x 2 under prior preservation (train_custom_diffusion.py) = 4e-5 effective; 250 steps, 200 class "
              "images, lambda 1, AdamW weight decay 1e-2, gradients clipped at 1.0 (--max_grad_norm)")


#: name -> card of every built-in method (``registry.card``)
CARDS: dict[str, type[MethodCard]] = {card.name: card for card in (
    PerfusionCard, ResidualsCard, TextualInversionCard, DreamBoothCard, DreamBoothLoraCard, CustomDiffusionCard)}
