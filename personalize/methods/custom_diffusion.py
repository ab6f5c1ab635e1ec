"""Custom Diffusion (Kumari et al., CVPR 2023): cross-attention K/V + a modifier token per concept.

    W_K, W_V   every cross-attention's key/value projections (d_out, d_in), frozen
    dW_K, dW_V what training changes: out = W e + dW e, dW starts at 0, and only
               dW is stored ("deltas over the base"); gradients through the BOS
               position are stopped, as in the reference
    V*_j       one modifier token per concept j, initialised from ``init_words``
               (the reference's "ktn+pll+ucd"; a word of several tokens starts at
               the mean of its pieces)

Several concepts train jointly in one run (one image folder, token and
superclass each): their photos share the K/V deltas, each keeps its token, and
the prior batch draws from every concept's class images. Recipe (diffusers
``train_custom_diffusion`` README): lr 1e-5 with ``--scale_lr`` at batch 2 =
2e-5, doubled by the script under prior preservation = 4e-5; 250 steps (the
paper: 500 for two concepts), 200 class images, lambda 1, gradients clipped at
1.0, prompt "photo of a V* <class>". Not reproduced: the reference's random-resize
augmentation with "very small"/"zoomed in" prompts.

SD 2.x and SDXL: the K/V deltas sit on every cross-attention ``to_k``/``to_v``, whose
input is the context the UNet reads (SDXL: both encoders' outputs side by side, 2,048
wide); a modifier token is one vector per text encoder (``edits/tokens.py``). The
export is diffusers' format on every family: ``load_attn_procs`` reads the K/V weights
of any UNet, and on SDXL each token file holds diffusers' two-key SDXL layout
(``clip_l``, ``clip_g``), loaded once per tokenizer/encoder pair as diffusers documents
for SDXL textual inversions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import families
from ..edits.deltas import WeightDelta
from ..edits.placement import cross_attention_layers, site_names
from ..edits.sites import inner_layer
from ..errors import BadInputError, ConceptFileError
from ..text_stack import pairs, widths
from .base import Method
from .cards import CustomDiffusionCard, CustomDiffusionConfig
from .shared import as_list, cpu_float, load_into, single_tokens, word_vector, words_of
from .token_files import token_keys

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
PATHWAYS = ("k", "v")


class CustomDiffusion(CustomDiffusionCard, Method):
    prompting = "modifier"  # the reference's "photo of a <new1> cat"
    multi_concept = True
    export_formats = {
        "diffusers": f"{WEIGHTS_FILE} + <token>.safetensors: pipe.unet.load_attn_procs(DIR, weight_name="
                     f"'{WEIGHTS_FILE}', _pipeline=pipe); pipe.load_textual_inversion(DIR, weight_name='<token>.safetensors')"
                     "; SDXL: the token file holds clip_l and clip_g: pipe.load_textual_inversion(s['clip_l'], "
                     "token='<token>', text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer), and s['clip_g'] "
                     "with text_encoder_2 / tokenizer_2",
        "diffusers-lora": f"{LORA_FILE} (SD3 / Flux.1: dW of every add_k_proj / add_v_proj as a full-rank LoRA, "
                          "A = identity, B = dW) + <token>.safetensors: pipe.load_lora_weights(DIR); Flux: "
                          "the token file's clip_l / t5 with one pipe.load_textual_inversion call each",
    }
    export_needs_base = True
    import_formats = ("diffusers",)  # the full-rank LoRA of the transformers is written, not read back

    def __init__(self, pipe, token, superclass, config: CustomDiffusionConfig):
        self.tokens, self.superclasses = words_of(token, superclass)
        single_tokens(self.tokens)
        super().__init__(pipe, self.tokens[0], self.superclasses[0], config)
        inits = [w for w in config.init_words.split("+") if w]
        if len(inits) < len(self.tokens):
            raise BadInputError(f"init_words '{config.init_words}' has {len(inits)} word(s) for {len(self.tokens)} "
                                "concepts; give one per concept, '+'-separated")
        self.part = families.of(pipe).denoiser  # "unet", or "transformer" on a diffusion transformer
        denoiser = getattr(pipe, self.part)
        device = denoiser.device
        self.embedding = nn.Parameter(torch.stack([word_vector(pipe, w) for w in inits[: len(self.tokens)]]).to(device))
        # <cross-attention>.to_k / .to_v; on a diffusion transformer the text stream's add_k_proj / add_v_proj
        self._sites = site_names(denoiser, "kv")
        self.deltas: dict[str, nn.Parameter] = {
            f"delta.{name}": nn.Parameter(torch.zeros(denoiser.get_submodule(name).weight.shape, device=device))
            for name in self._sites}

    @classmethod
    def rebuild(cls, pipe, concept) -> "CustomDiffusion":
        tokens = concept.header.get("tokens", [concept.token])
        superclasses = concept.header.get("superclasses", [concept.superclass])
        method = cls(pipe, tokens, superclasses, cls.make_config(concept.config))
        method.load_state_tensors(concept.tensors)
        return method

    @staticmethod
    def concept_shapes(unet, text_dim: int, concepts: int = 1) -> dict[str, tuple[int, ...]]:
        """Names and shapes of a concept file's tensors for ``unet`` (works on the meta device)."""
        shapes: dict[str, tuple[int, ...]] = {"embedding": (concepts, text_dim)}
        for name in site_names(unet, "kv"):  # SD: each cross-attention's to_k/to_v; SD3/Flux: add_k/v_proj
            shapes[f"delta.{name}"] = tuple(inner_layer(unet.get_submodule(name)).weight.shape)
        return shapes

    # -- training
    def placeholders(self) -> list[str]:
        return [self.subject(t, s) for t, s in zip(self.tokens, self.superclasses)]

    def placeholder(self) -> str:
        return self.placeholders()[0]

    def templates(self) -> tuple[str, ...]:
        return ("photo of a {}",)  # the reference's instance prompt "photo of a <new1> cat"

    def _params(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding, **self.deltas}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self._params().values()), "lr": self.config.lr,
                 "weight_decay": self.config.weight_decay, "name": "kv+token"}]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return cpu_float(self._params())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self._params(), tensors, self.name)

    def header_fields(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "superclasses": self.superclasses} if len(self.tokens) > 1 else {}

    # -- the pipeline
    @property
    def key(self) -> str:
        return f"{self.name}:{'+'.join(self.tokens)}"

    def token_vectors(self) -> tuple[list[str], torch.Tensor]:
        return self.tokens, self.embedding

    def occupants(self) -> dict[str, dict]:
        return {self.part: {n: WeightDelta(self.deltas[f"delta.{n}"], detach_first=True) for n in self._sites}}

    # -- interop
    @classmethod
    def export(cls, concept, fmt: str, folder: Path, pipe=None) -> list[Path]:
        """diffusers' layout: full K/V weights (W + dW) per cross-attention processor, an empty entry for every
        other processor (so ``set_attn_processor`` gets all of them), and one textual-inversion file per token."""
        from ..paths import inside, save_safetensors

        tokens = concept.header.get("tokens", [concept.token])
        token_files = [inside(folder, f"{token}.safetensors") for token in tokens]  # checked before any write
        unet = families.denoiser(pipe)
        shapes = cls.concept_shapes(unet, sum(widths(pipe)), len(tokens))
        if {k: tuple(v.shape) for k, v in concept.tensors.items()} != shapes:
            raise ConceptFileError(f"'{concept.token}' was trained on another base than the one given (its tensors do "
                                   "not fit this UNet and text encoders); pass the base it was trained on")
        if fmt == "diffusers-lora":
            files = [save_safetensors(inside(folder, LORA_FILE), full_rank_lora(concept.tensors, families.of(pipe)))]
        else:
            files = [save_safetensors(inside(folder, WEIGHTS_FILE), cls._attn_procs(concept, unet))]
        for j, (token, path) in enumerate(zip(tokens, token_files)):
            files.append(save_safetensors(path, token_file(pipe, token, concept.tensors["embedding"][j:j + 1])))
        return files

    @staticmethod
    def _attn_procs(concept, unet) -> dict[str, torch.Tensor]:
        weights = {}
        cross = dict(cross_attention_layers(unet))
        for name in unet.attn_processors:
            layer = name[: -len(".processor")]
            if layer not in cross:
                weights[name] = torch.zeros(0)
                continue
            for p in PATHWAYS:
                base = getattr(cross[layer], f"to_{p}")
                W = getattr(base, "base_layer", base).weight.detach().float().cpu()
                weights[f"{name}.to_{p}_custom_diffusion.weight"] = W + concept.tensors[f"delta.{layer}.to_{p}"].float()
        return weights

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        from .token_files import family_of, multi_key_loading

        tokens = concept.header.get("tokens", [concept.token])
        superclasses = concept.header.get("superclasses", [concept.superclass])
        notes = {"prompt": " and ".join(f"a {t} {s}" for t, s in zip(tokens, superclasses))}
        family = family_of(concept)
        if fmt == "diffusers-lora":
            if family.exports.get("textual-inversion") == ():  # SD3: no stock token loader
                loading = (f"{family.export_refusals['textual-inversion']}: each <token>.safetensors "
                           f"({'/'.join(family.token_keys)}) is for personalize import, and a stock pipeline takes "
                           f"the prompt's embeddings made with the tokens added")
            else:
                loading = "; ".join(multi_key_loading(f"{t}.safetensors", t, family) for t in tokens)
            notes["how_to_load"] = f"pipe.load_lora_weights(DIR); {loading}"
        return notes

    @classmethod
    def import_state(cls, pipe, state: dict, *, token: str | None, superclass: str | list[str], embeddings=None,
                     metadata=None) -> dict[str, Any]:
        """diffusers' ``pytorch_custom_diffusion_weights`` (full K/V weights -> deltas over this base) plus the
        modifier tokens' textual-inversion files (``embeddings``); ``superclass``: one for every concept, or one
        per token file, in order."""
        from .token_files import check_vectors, ti_vectors

        if not embeddings:
            raise BadInputError("pass the modifier token file(s) with --embeddings '<token>.safetensors' "
                                "(written beside the Custom Diffusion weights)")
        found = [ti_vectors(e, pipe) for e in embeddings]  # SDXL's two-key files come back joined, without a name
        found = [(name, check_vectors(pipe, v, f"modifier token file {j + 1}")) for j, (name, v) in enumerate(found)]
        tokens = [name for name, _ in found]
        if token and len(tokens) == 1:
            tokens = [token]
        if None in tokens:
            raise BadInputError("an SDXL token file (clip_l, clip_g) does not name its token; import one concept at "
                                "a time with --token '<name>'")
        superclasses = as_list(superclass)
        if len(superclasses) != len(tokens) and len(superclasses) != 1:
            raise BadInputError(f"{len(superclasses)} superclasses for {len(tokens)} modifier tokens "
                                f"({', '.join(tokens)}); pass one --superclass per --embeddings file, in the same order")
        vectors = torch.cat([torch.atleast_2d(v).float() for _, v in found])
        tensors: dict[str, torch.Tensor] = {"embedding": vectors}
        cross = dict(cross_attention_layers(pipe.unet))
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            layer, _, rest = key.partition(".processor.")
            pathway = {"to_k_custom_diffusion.weight": "k", "to_v_custom_diffusion.weight": "v"}.get(rest)
            if pathway is None or layer not in cross:
                raise BadInputError(f"'{key}' is not a cross-attention K/V weight of this base; only Custom Diffusion's "
                                    "crossattn_kv training is supported")
            base = getattr(cross[layer], f"to_{pathway}")
            W = getattr(base, "base_layer", base).weight.detach().float().cpu()
            if not value.is_floating_point() or tuple(value.shape) != tuple(W.shape):
                raise BadInputError(f"'{key}' is a {value.dtype} tensor of shape {tuple(value.shape)}; this base's "
                                    f"weight there is float {tuple(W.shape)}; use the base the file was made for")
            tensors[f"delta.{layer}.to_{pathway}"] = value.float() - W
        missing = [f"{n}.processor.to_{p}_custom_diffusion.weight" for n in cross for p in PATHWAYS
                   if f"delta.{n}.to_{p}" not in tensors]
        if missing:
            raise BadInputError(f"the Custom Diffusion weights lack {len(missing)} of this base's cross-attention K/V "
                                f"weights (e.g. '{missing[0]}'); use the base the file was made for")
        if len(tokens) == 1:
            return {"token": tokens[0], "superclass": superclasses[0], "tensors": tensors}
        return {"token": tokens, "superclass": words_of(tokens, superclasses)[1], "tensors": tensors}


def full_rank_lora(tensors: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """The K/V deltas as a diffusers LoRA: for each ``delta.<site>`` (d_out, d_in), ``lora_A`` = the d_in identity
    and ``lora_B`` = dW, rank d_in and no alpha (diffusers takes alpha = rank: scale 1), so ``B (A x) = dW x``
    bit for bit (``A x`` only copies x)."""
    out = {}
    for key, delta in tensors.items():
        if key.startswith("delta."):
            site = f"{family.denoiser}.{key[len('delta.'):]}"
            out[f"{site}.lora_A.weight"] = torch.eye(delta.shape[1], dtype=torch.float32)
            out[f"{site}.lora_B.weight"] = delta.float().contiguous()
    return out


def token_file(pipe, token: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """A modifier token's textual-inversion file for ``pipe``: ``{token: vectors}``, or on SDXL each encoder's
    columns under ``clip_l`` / ``clip_g``."""
    sizes = widths(pipe)
    if vectors.shape[-1] != sum(sizes):
        raise BadInputError(f"the concept's token vectors are {vectors.shape[-1]} wide, this base's text encoders "
                            f"{'+'.join(map(str, sizes))}; pass the base it was trained on")
    if len(pairs(pipe)) == 1:
        return {token: vectors}
    return dict(zip(token_keys(pipe), vectors.split(sizes, dim=-1)))  # SDXL: diffusers' clip_l / clip_g layout
