"""Token-vector files of other tools, read and written by every method that moves token vectors (Textual
Inversion, Residuals' V*, Custom Diffusion's modifier tokens).

Layouts read: diffusers' ``{token: (n, d)}`` (on SDXL the pair ``learned_embeds.safetensors`` +
``learned_embeds_2.safetensors`` of diffusers' ``textual_inversion_sdxl.py``, one file per encoder), AUTOMATIC1111's ``string_to_param`` (.pt) and its safetensors
``emb_params``, and the SDXL two-key layout ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (the one SDXL
embeddings are shared in: diffusers' docs load it with two ``load_textual_inversion`` calls, one per text
encoder, and AUTOMATIC1111 reads it from its embeddings folder). On SDXL a token vector here is the two
encoders' vectors side by side (``edits/tokens.py``: ``clip_l`` = ``text_encoder``'s columns first), so the
two-key file is that vector split at ``text_stack.widths``. Flux writes (and reads) the layout of diffusers' advanced
Flux DreamBooth script's pivotal-tuning embeddings, ``{"clip_l": (n, 768), "t5": (n, 4096)}``, which a stock
``FluxPipeline`` loads with two ``load_textual_inversion`` calls (CLIP-L and T5 with ``tokenizer_2``); SD3's
three-key layout is read and written for personalize only (the stock SD3 pipeline loads no embeddings).
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import torch

from ..errors import BadInputError

#: the archive's top folder in an A1111 ``.pt``: torch.save names it after the file written (our temp file carried
#: the host name and process id); "archive" is what torch itself uses for a buffer
A1111_ARCHIVE = "archive"
#: the entries AUTOMATIC1111's safe loader (modules/safe.py) lets through: data.pkl, version and data/<n> under one
#: top folder; torch >= 2 adds .format_version, .storage_alignment, byteorder and .data/serialization_id
_A1111_ENTRY = re.compile(r"(data\.pkl|version|data/\d+)")
#: the real SDXL's encoder widths (CLIP ViT-L, OpenCLIP ViT-bigG): the split of a concept file that predates
#: the header's ``text_widths``
SDXL_WIDTHS = (768, 1280)


def ti_pair(state: dict, second: list[dict], pipe=None) -> tuple[str | None, torch.Tensor]:
    """``ti_vectors`` of ``state``, joined with the second encoder's file when one is given: diffusers'
    ``textual_inversion_sdxl.py`` writes ``learned_embeds.safetensors`` (text_encoder) and
    ``learned_embeds_2.safetensors`` (text_encoder_2), each ``{token: (n, d)}``."""
    name, vectors = ti_vectors(state, pipe)
    if not second:
        return name, vectors
    if len(second) > 1:
        raise BadInputError(f"textual-inversion takes one --embeddings file (the second encoder's, "
                            f"learned_embeds_2.safetensors), not {len(second)}")
    name_2, vectors_2 = ti_vectors(second[0])
    if name and name_2 and name != name_2:
        raise BadInputError(f"the two files name different tokens ({name!r}, {name_2!r}); pass the pair one "
                            "textual_inversion_sdxl.py run wrote")
    first, other = torch.atleast_2d(vectors), torch.atleast_2d(vectors_2)
    if first.dim() != 2 or other.dim() != 2 or first.shape[0] != other.shape[0]:
        raise BadInputError(f"the two files hold {tuple(first.shape)} and {tuple(other.shape)} vectors; both "
                            "encoders need one vector per token")
    return name or name_2, torch.cat([first, other], dim=1)


def ti_vectors(state: dict, pipe=None) -> tuple[str | None, torch.Tensor]:
    """(token name or None, vectors) from any of the textual-inversion layouts (SDXL: clip_l and clip_g joined;
    with ``pipe``, each part must be as wide as its encoder)."""
    keys = _layout_keys(state)
    if keys:
        parts = [torch.atleast_2d(state[k]) for k in keys]
        if pipe is not None:
            from ..text_stack import widths

            if keys != token_keys(pipe):
                from .. import families

                owners = " or ".join(f.label for f in families.FAMILIES.values() if f.token_keys == keys)
                raise BadInputError(f"the embedding holds {', '.join(keys)} vectors, as {owners} embeddings do; "
                                    f"this {families.of(pipe).label} base's hold "
                                    f"{', '.join(token_keys(pipe)) or 'one token -> vectors entry'}: it needs an "
                                    f"{owners} base")
            for key, part, width in zip(keys, parts, widths(pipe)):
                check_vectors(pipe, part, f"the embedding's '{key}'", width)
        if len({p.shape[0] for p in parts}) != 1:
            raise BadInputError(f"the embedding has {', '.join(f'{p.shape[0]} {k}' for k, p in zip(keys, parts))} "
                                "vectors; every encoder needs one vector per token")
        return None, torch.cat(parts, dim=1)
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise BadInputError("A1111 embedding has no string_to_param['*']; is it a textual-inversion file?")
        return state.get("name"), params["*"]
    if "emb_params" in state:
        return None, state["emb_params"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise BadInputError(f"not a textual-inversion file: expected one token -> vectors entry, found {len(tensors)} "
                            f"tensors ({', '.join(list(tensors)[:3])})")
    return next(iter(tensors.items()))


def _layout_keys(state: dict) -> tuple[str, ...]:
    """The multi-encoder layout ``state`` is in (the longest family ``token_keys`` all present), or ()."""
    from .. import families

    layouts = sorted({f.token_keys for f in families.FAMILIES.values() if f.token_keys}, key=len, reverse=True)
    return next((keys for keys in layouts if all(isinstance(state.get(k), torch.Tensor) for k in keys)), ())


def check_vectors(pipe, vectors: torch.Tensor, what: str = "the embedding", width: int | None = None) -> torch.Tensor:
    """``vectors`` as (n, d) float if ``d`` is this base's token width (both SDXL encoders' together; ``width``: one
    encoder's), else one line saying which family the file is for."""
    from ..text_stack import FAMILIES, family, widths

    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        kind = f"a {vectors.dtype} tensor" if isinstance(vectors, torch.Tensor) else f"a {type(vectors).__name__}"
        raise BadInputError(f"{what} holds {kind}, not floating-point token vectors; is it a textual-inversion file?")
    if vectors.dim() == 2 and vectors.shape[0] == 0:
        raise BadInputError(f"{what} holds no vectors (shape {tuple(vectors.shape)}); a token needs at least one")
    vectors = torch.atleast_2d(vectors).float()
    if width is not None:
        if vectors.dim() != 2 or vectors.shape[-1] != width:
            raise BadInputError(f"{what} holds {tuple(vectors.shape)} vectors; this base's encoder takes {width}-wide "
                                "ones")
        return vectors
    need = widths(pipe)
    if vectors.shape[-1] == sum(need) and vectors.dim() == 2:
        return vectors
    if len(need) > 1 and vectors.dim() == 2 and vectors.shape[-1] in need:
        raise BadInputError(f"{what} holds {tuple(vectors.shape)} vectors; an SDXL base needs an SDXL embedding "
                            f"(clip_l {need[0]} + clip_g {need[1]} wide): diffusers' textual_inversion_sdxl.py "
                            "writes two files, pass learned_embeds.safetensors as FILE and "
                            "learned_embeds_2.safetensors with --embeddings")
    if len(need) > 1:
        raise BadInputError(f"{what} holds {tuple(vectors.shape)} vectors; an SDXL base needs an SDXL embedding "
                            f"(clip_l {need[0]} + clip_g {need[1]} wide)")
    raise BadInputError(f"{what} holds {tuple(vectors.shape)} vectors, this {FAMILIES[family(pipe)]} base takes "
                        f"{need[0]}-wide ones; an SDXL embedding (clip_l + clip_g) needs an SDXL base")


def concept_widths(concept, vectors: torch.Tensor) -> list[int]:
    """Each text encoder's width for a concept's token ``vectors``: one width on a one-encoder family; else the
    header's ``text_widths`` (or, in an SDXL file without it, the real SDXL's 768 + 1280) split them."""
    keys = token_keys(concept)
    if not keys:
        return [int(vectors.shape[-1])]
    found = [int(w) for w in concept.header.get("text_widths") or ()]
    if not found and is_sdxl(concept) and vectors.shape[-1] == sum(SDXL_WIDTHS):
        found = list(SDXL_WIDTHS)
    if len(found) != len(keys) or sum(found) != vectors.shape[-1]:
        raise BadInputError(f"the concept's {vectors.shape[-1]}-wide token vectors cannot be split into "
                            f"{', '.join(keys)} (no text_widths in its header); re-import or retrain it")
    return found


def token_state(concept, token: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file content a stock loader reads for ``vectors``: ``{token: (n, d)}``, or on a family with several
    text encoders one key per encoder (SDXL ``{"clip_l": ..., "clip_g": ...}``, Flux ``clip_l``/``t5``, SD3
    ``clip_l``/``clip_g``/``t5``; no token inside: the loader is told the token)."""
    vectors = vectors.detach().float().contiguous()
    sizes = concept_widths(concept, vectors)
    if len(sizes) == 1:
        return {token: vectors}
    return {k: part.contiguous() for k, part in zip(token_keys(concept), vectors.split(sizes, dim=-1))}


def token_keys(concept_or_pipe) -> tuple[str, ...]:
    """The keys of the family's multi-encoder token file (``Family.token_keys``; empty for one encoder)."""
    from .. import families

    if hasattr(concept_or_pipe, "header"):
        name = concept_or_pipe.header.get("base_fingerprint", {}).get("family", "sd1")
        return families.FAMILIES[name].token_keys if name in families.FAMILIES else ()
    return families.of(concept_or_pipe).token_keys


def is_sdxl(concept) -> bool:
    return concept.header.get("base_fingerprint", {}).get("family") == "sdxl"


def sdxl_loading(file: str, token: str) -> str:
    """How a stock ``StableDiffusionXLPipeline`` loads a two-key file (``export.json``'s ``how_to_load``)."""
    from ..families import get

    return multi_key_loading(file, token, get("sdxl"))


def multi_key_loading(file: str, token: str, family) -> str:
    """How a stock pipeline of ``family`` loads a file in its multi-encoder layout: one ``load_textual_inversion``
    call per key, each with its encoder and tokenizer (SDXL ``clip_l``/``clip_g``; Flux ``clip_l``/``t5``, as
    diffusers' advanced Flux script's model card loads its pivotal-tuning embeddings)."""
    calls = [f"pipe.load_textual_inversion(state['{key}'], token='{token}', text_encoder=pipe.{te}, "
             f"tokenizer=pipe.{tok})" for key, (tok, te) in zip(family.token_keys, family.text_pairs)]
    return "; ".join([f"state = safetensors.torch.load_file('{file}')", *calls])


def family_of(concept):
    """The family a concept's header records (None: one personalize does not know)."""
    from .. import families

    return families.FAMILIES.get(concept.header.get("base_fingerprint", {}).get("family", "sd1"))


def save_a1111(path: Path, token: str, vectors: torch.Tensor) -> None:
    """AUTOMATIC1111's embedding layout (``string_to_param``), a pickle by nature (we only write it). torch's zip is
    rewritten with only the entries A1111's safe loader accepts (``A1111_ARCHIVE/data.pkl``, ``version``,
    ``data/<n>``; torch reads it back without the others: the byte order is the host's, little-endian), under a
    fixed top folder, then written atomically."""
    from ..paths import atomic_path

    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().float().clone()}, "name": token,
            "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}
    raw = io.BytesIO()
    torch.save(data, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            inner = entry.filename.split("/", 1)[1]
            if _A1111_ENTRY.fullmatch(inner):
                dst.writestr(zipfile.ZipInfo(f"{A1111_ARCHIVE}/{inner}", date_time=(1980, 1, 1, 0, 0, 0)),
                             src.read(entry))
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(out.getvalue())
