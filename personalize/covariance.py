"""C, the uncentered second moment of text-encoder outputs, and its inverse.

Perfusion measures similarity to a concept's target input in the metric C^-1
(see ``../shared/reference/perfusion-math.md``). C depends on the base model's
text encoder and on the caption corpus, so it is computed once per (base
fingerprint, corpus) and cached on disk.

The built-in corpus is ``CAPTION_TEMPLATES`` × the nouns in
``personalize/data/nouns.txt``: 32 templates × 261 nouns = 8,352 captions,
about 90,000 non-padding token vectors. The paper used ~100k captions, but C
only needs many more samples than its dimension (768 for SD 1.x): ~120
vectors per dimension keep the estimate well conditioned, and the corpus
encodes in minutes on a CPU. Pass ``captions`` (one per line) to use your own.

On a diffusion transformer (SD3, Flux.1) Perfusion edits each joint block's text-stream ``add_k_proj`` /
``add_v_proj``, whose input is the block's normed, timestep-modulated text hidden state, not the encoder output
(docs/PERFUSION_DIT.md). C is then one matrix per joint block, ``(blocks, d, d)`` stacked in block order: the
second moment of that input over the corpus's non-padding text rows, read on the base transformer at the
*reference states* (:func:`site_inputs`): a zero latent (the mean of the normalised latents) noised with seeded
Gaussian noise at four step indices spread over the training schedule, one per caption batch in turn.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from importlib import resources
from typing import Callable, Sequence

import torch

from . import families, text_stack

from .base import fingerprint
from .paths import atomic_path, cache_dir

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a blurry photo of a {}",
    "a cropped photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a rendering of a {}",
    "a painting of a {}",
    "a drawing of the {}",
    "a sketch of a {}",
    "a cartoon {}",
    "a {} on a table",
    "a {} in the garden",
    "a {} on the beach",
    "a {} in the snow",
    "a {} in the city at night",
    "a red {} next to a blue {}",
    "a {} and a dog",
    "two {} side by side",
    "a {} floating in space",
    "a watercolor painting of a {}",
    "an oil painting of a {} in a forest",
    "a {} wearing a hat",
    "a {} made of wood",
    "a toy {} on the floor",
    "a black and white photo of a {}",
    "a {} in front of a mountain",
)


def builtin_captions() -> list[str]:
    nouns = resources.files("personalize").joinpath("data/nouns.txt").read_text().split()
    return [t.replace("{}", n) for t in CAPTION_TEMPLATES for n in nouns]


BASE_CORPUS_FILE = "captions.txt"


def base_captions(pipe) -> list[str] | None:
    """The caption corpus a base ships in its own folder (``captions.txt``), or None for the built-in one.

    A base whose text encoder never saw everyday nouns (the toy world's) must estimate C from captions of
    its own world: the built-in corpus would measure untrained embeddings.
    """
    root = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    path = Path(root) / BASE_CORPUS_FILE if root else None
    if path is None or not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def default_covariance(pipe) -> tuple[torch.Tensor, str]:
    """C from the base's own corpus if it ships one, else the built-in corpus; and that corpus's id."""
    captions = base_captions(pipe)
    return load_or_compute_covariance(pipe, captions), corpus_id(captions)


def covariance_for(pipe, corpus: str) -> torch.Tensor | None:
    """C for a concept's recorded ``corpus`` id: computed if it is the built-in or the base's own corpus,
    else only from the cache (a custom corpus computed earlier with ``personalize covariance --captions``)."""
    if corpus == "builtin":
        return load_or_compute_covariance(pipe)
    captions = base_captions(pipe)
    if captions is not None and corpus_id(captions) == corpus:
        return load_or_compute_covariance(pipe, captions)
    return cached_covariance(pipe, corpus)


def corpus_id(captions: Sequence[str] | None) -> str:
    """``builtin`` or a short hash of a custom caption list."""
    if captions is None:
        return "builtin"
    return "sha256-" + hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


SITE_SAMPLES_PER_DIM = 40  # a diffusion transformer's C: text rows read per dimension (a transformer pass each batch)
REFERENCE_STEPS = 4  # reference step indices: the midpoints of 4 equal quarters of the training schedule
REFERENCE_SIDE = 16  # the reference latents' side (Flux: 8 x 8 packed patches; SD3: 8 x 8 patches of 2)


def reference_steps(pipe) -> list[int]:
    """The step indices (into the family's training schedule) of the reference states."""
    family = families.of(pipe)
    n = family.num_train_steps(family.noise_schedule(pipe))
    return [int((k + 0.5) * n / REFERENCE_STEPS) for k in range(REFERENCE_STEPS)]


@torch.no_grad()
def site_inputs(pipe, encoding, sites: list[str], step: int, seed: int) -> dict[str, torch.Tensor]:
    """The input of each of ``sites`` (module names in the denoiser) when the *base* denoiser reads the encoded
    prompts ``encoding`` (``text_stack.encode_ids``) at a reference state: latents ``x_0 = 0`` (the normalised
    latents' mean) noised at step index ``step`` with Gaussian noise from ``seed``, at :data:`REFERENCE_SIDE`.
    Every attached edit is set aside (``edits/site_inputs.bare``); the call stops after the last site."""
    from .edits.site_inputs import bare, captured

    family, den = families.of(pipe), families.denoiser(pipe)
    batch = encoding.context.shape[0]
    side = min(REFERENCE_SIDE, family.native_resolution(pipe) // int(pipe.vae_scale_factor)) // 2 * 2
    noise = torch.randn(batch, int(pipe.vae.config.latent_channels), side, side,
                        generator=torch.Generator().manual_seed(seed)).to(den.device, den.dtype)
    noised = family.noised(family.noise_schedule(pipe), torch.zeros_like(noise), noise,
                           torch.full((batch,), int(step), device=den.device))
    pooled = None if encoding.pooled is None else encoding.pooled.to(den.dtype)
    with bare(den), captured(den, sites) as seen:
        family.predict(pipe, den, noised, encoding.context.to(den.dtype), pooled)
    return seen


def segment_masks(pipe, prompts: Sequence[str], device=None) -> torch.Tensor:
    """(B, L) bool: the context rows that hold a token of the prompt (each segment's BOS..EOS; not padding)."""
    family = families.of(pipe)
    length = sum(rows or family.max_length(pipe, name) for name, rows in family.context_tokenizers)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for start, stop, tok_name in family.context_segments(pipe, length):  # a missing tokenizer's rows: none
        mask[:, start:stop] = getattr(pipe, tok_name)(list(prompts), padding="max_length", max_length=stop - start,
                                                      truncation=True, return_tensors="pt").attention_mask.bool()
    return mask.to(device)


@torch.no_grad()
def compute_site_covariance(pipe, captions: Sequence[str], batch_size: int = 16,
                            on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """(blocks, d, d): E[x x^T] of each joint block's ``add_k_proj`` input over the captions' non-padding text
    rows at the reference states (caption batch k at ``reference_steps()[k % 4]``, noise seed k), float64. The
    captions are read in a fixed shuffled order (seed 0) until there are ``SITE_SAMPLES_PER_DIM`` rows per
    dimension (Flux.1, d = 3,072: about the whole built-in corpus; a 32-wide test base: two batches), since every
    batch costs a transformer pass, not only a text-encoder pass."""
    from .edits.placement import site_names

    den = families.denoiser(pipe)
    sites = [f"{name}.add_k_proj" for name in site_names(den, "cross_attention")]
    needed = SITE_SAMPLES_PER_DIM * den.get_submodule(sites[0]).in_features
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    captions = [captions[i] for i in order]
    steps = reference_steps(pipe)
    total, count = None, 0
    for k, start in enumerate(range(0, len(captions), batch_size)):
        if count >= needed:
            if on_batch is not None:  # the rest of the corpus is not needed: the progress is complete
                on_batch(len(captions) - start)
            break
        batch = list(captions[start: start + batch_size])
        ids = text_stack.tokenize(pipe, batch, den.device)
        seen = site_inputs(pipe, text_stack.encode_ids(pipe, ids), sites, steps[k % len(steps)], seed=k)
        mask = segment_masks(pipe, batch, den.device)
        vectors = torch.stack([seen[s][mask].double() for s in sites])  # (blocks, N, d)
        total, count = _accumulate(total, count, vectors)
        if on_batch is not None:
            on_batch(len(batch))
    return (total / count).cpu()


@torch.no_grad()
def compute_covariance(
    pipe, captions: Sequence[str], batch_size: int = 64, on_batch: Callable[[int], None] | None = None
) -> torch.Tensor:
    """E[e e^T] over every non-padding position (BOS..EOS) of every caption, float64 (a diffusion transformer:
    per joint block, :func:`compute_site_covariance`)."""
    if families.of(pipe).denoiser == "transformer":
        return compute_site_covariance(pipe, captions, on_batch=on_batch)
    device = pipe.text_encoder.device
    total, count = None, 0
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start : start + batch_size])
        # CLIP's text encoder is causal: padding to the batch's longest caption instead of 77
        # leaves every non-padding output unchanged and costs a fraction of the compute.
        encs = [getattr(pipe, tok)(batch, padding="longest", max_length=getattr(pipe, tok).model_max_length,
                                   truncation=True, return_tensors="pt") for tok, _ in text_stack.pairs(pipe)]
        hidden = text_stack.encode_ids(pipe, [e.input_ids for e in encs]).context.double()  # SDXL: both, side by side
        mask = encs[0].attention_mask.to(device).bool()
        total, count = _accumulate(total, count, hidden[mask])
        if on_batch is not None:
            on_batch(len(batch))
    return (total / count).cpu()


def _accumulate(total: torch.Tensor | None, count: int, vectors: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The running sum of ``x x^T`` over the rows of ``vectors`` ((N, d), or (blocks, N, d) per block) and the row
    count."""
    outer = vectors.mT @ vectors
    return (outer if total is None else total + outer), count + vectors.shape[-2]


def covariance_path(pipe, corpus: str) -> Path:
    return cache_dir("covariance") / f"{fingerprint(pipe).digest}-{corpus}.safetensors"


def load_or_compute_covariance(
    pipe, captions: Sequence[str] | None = None, on_batch: Callable[[int], None] | None = None, recompute: bool = False
) -> torch.Tensor:
    """C for this base and corpus, from the cache or computed and cached (float64)."""
    from safetensors.torch import load_file, save_file

    corpus = corpus_id(captions)
    path = covariance_path(pipe, corpus)
    if path.exists() and not recompute:
        return load_file(str(path))["C"]
    C = compute_covariance(pipe, captions if captions is not None else builtin_captions(), on_batch=on_batch)
    with atomic_path(path) as tmp:
        save_file({"C": C.contiguous()}, str(tmp), metadata={"corpus": corpus})
    return C


def cached_covariance(pipe, corpus: str) -> torch.Tensor | None:
    """C from the cache only, or None."""
    from safetensors.torch import load_file

    path = covariance_path(pipe, corpus)
    return load_file(str(path))["C"] if path.exists() else None


def inverse(C: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C^-1 with a tiny ridge (relative to the mean eigenvalue) so it is positive definite; a stack of
    matrices (a diffusion transformer's, one per joint block) each with its own."""
    C = C.double()
    d = C.shape[-1]
    eye = torch.eye(d, dtype=C.dtype)
    mean = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1) / d
    return torch.linalg.inv(C + ridge * mean[..., None, None] * eye)
