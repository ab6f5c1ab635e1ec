"""Metric objects: ``update(...)`` accumulates, ``compute()`` returns a float, ``higher_is_better`` says which way
(from the metric's spec in :mod:`.registry`).

- ClipTextScore: mean over images of ``2.5 * max(cos(img, text), 0)``, text = prompt with the learned
  token removed (CustomConcept101's CLIP-T).
- ClipImageScore / DinoImageScore: mean of the full cosine matrix between every generated and every
  reference image (no clipping, no factor).
- LeakageScore: mean DINO cosine between same-seed image pairs generated with and without the concept.
- ToyWorldScore: the toy world's ``score_folder`` behind the same interface.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import BadInputError
from .models import ClipEncoder, DinoEncoder, ImageLike

CLIP_TEXT_FACTOR = 2.5
_TOKEN_RE = re.compile(r"<[^<>\s]+>")


def remove_token(prompt: str, token: Union[None, str, Sequence[str]] = None) -> str:
    """The prompt without the learned token(s): "photo of a <new1> barn" -> "photo of a barn".

    ``token`` None removes every ``<...>`` word; a string or list removes exactly those words.
    """
    if token is None:
        out = _TOKEN_RE.sub(" ", prompt)
    else:
        out = prompt
        for t in [token] if isinstance(token, str) else token:
            out = re.sub(r"(?<!\S)" + re.escape(t) + r"(?!\S)", " ", out)
            out = out.replace(t, " ")
    out = re.sub(r"\s+", " ", out).strip()
    return re.sub(r"\s+([.,;:!?])", r"\1", out)


class Metric:
    name = "metric"

    @property
    def higher_is_better(self) -> bool:
        """The registered direction of the metric ``name`` (see :mod:`.registry`); True for an unregistered one."""
        from .registry import higher_is_better

        direction = higher_is_better(self.name)
        return True if direction is None else direction

    def reset(self) -> None:
        raise NotImplementedError

    def compute(self):
        raise NotImplementedError


class _MeanOfScores(Metric):
    """A metric that keeps one score per image (or image pair) and reports their mean."""

    def reset(self) -> None:
        self.scores: list[float] = []

    def compute(self) -> float:
        if not self.scores:
            raise BadInputError(f"{self.name}: nothing was scored; call update() with images first")
        return float(np.mean(self.scores))


class ClipTextScore(_MeanOfScores):
    """CLIP-T: ``update(images, prompts, token=None)`` with one prompt per image (or one prompt for all)."""

    name = "clip_text"

    def __init__(self, clip: ClipEncoder, factor: float = CLIP_TEXT_FACTOR):
        self.clip, self.factor = clip, factor
        self.reset()

    def update(self, images: Sequence[ImageLike], prompts: Union[str, Sequence[str]],
               token: Union[None, str, Sequence[str]] = None, features: Optional[np.ndarray] = None) -> np.ndarray:
        """``features``: the images' CLIP features when the caller has them (``score_concept``'s file path)."""
        images = list(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise BadInputError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        if not images:
            return np.zeros(0)
        texts = [remove_token(p, token) for p in prompts]
        unique = sorted(set(texts))
        tfeat = dict(zip(unique, self.clip.encode_texts(unique)))
        ifeat = self.clip.encode_images(images) if features is None else features
        cos = np.array([float(ifeat[i] @ tfeat[t]) for i, t in enumerate(texts)])
        scores = self.factor * np.maximum(cos, 0.0)
        self.scores.extend(scores.tolist())
        return scores


class _AllPairsImageScore(Metric):
    def __init__(self, encoder):
        self.encoder = encoder
        self.reset()

    def reset(self) -> None:
        self._gen: list[np.ndarray] = []
        self._ref: list[np.ndarray] = []

    def update(self, generated: Sequence[ImageLike] = (), reference: Sequence[ImageLike] = ()) -> None:
        generated, reference = list(generated), list(reference)
        if generated:
            self._gen.append(self.encoder.encode_images(generated))
        if reference:
            self._ref.append(self.encoder.encode_images(reference))

    def matrix(self) -> np.ndarray:
        if not self._gen or not self._ref:
            raise BadInputError(f"{self.name}: needs generated and reference images")
        return np.concatenate(self._gen) @ np.concatenate(self._ref).T

    def compute(self) -> float:
        return float(self.matrix().mean())


class ClipImageScore(_AllPairsImageScore):
    """CLIP-I: ``update(generated=[...], reference=[...])``; all-pairs mean cosine."""

    name = "clip_image"


class DinoImageScore(_AllPairsImageScore):
    """DINO-I: ``update(generated=[...], reference=[...])``; all-pairs mean cosine of DINO CLS features."""

    name = "dino_image"


class LeakageScore(_MeanOfScores):
    """Mean DINO cosine between same-seed pairs with/without the concept (1.0 = no leakage)."""

    name = "leakage_dino"

    def __init__(self, dino: DinoEncoder):
        self.dino = dino
        self.reset()

    def update(self, with_concept: Sequence[ImageLike], without_concept: Sequence[ImageLike],
               workers: int | None = None) -> np.ndarray:
        """``workers``: when every image is a file, decode them in that many worker processes (0: in this one),
        as :func:`score_concept` does (:func:`.decode.encode_files`: the same features to the bit)."""
        a, b = list(with_concept), list(without_concept)
        if len(a) != len(b):
            raise BadInputError(f"leakage: {len(a)} images with the concept but {len(b)} without; pair them by seed")
        if not a:
            return np.zeros(0)
        if workers is not None and all(_is_file(i) for i in (*a, *b)):
            (fa,), (fb,) = _file_features((self.dino,), [a, b], workers)
        else:
            fa, fb = self.dino.encode_images(a), self.dino.encode_images(b)
        sims = np.sum(fa * fb, axis=1)
        self.scores.extend(sims.tolist())
        return sims


class ToyWorldScore(Metric):
    """The toy world's measurers: ``update(folder, prompts=None, concept=..., reference=...)`` per folder.

    ``compute()`` returns {"alignment", "fidelity", "leakage", "n_images"}, image-weighted over folders.
    ``key`` picks one number instead (e.g. "alignment").
    """

    name = "toyworld"

    def __init__(self, key: Optional[str] = None):
        self.key = key
        self.reset()

    @property
    def higher_is_better(self) -> bool:
        """``key``'s registered direction (leakage, a mean pixel difference, is lower-is-better); without a key,
        True: the dict's alignment and fidelity."""
        from .registry import higher_is_better

        return True if self.key is None else higher_is_better(self.key) is not False

    def reset(self) -> None:
        self.results: list[dict] = []

    def update(self, folder: Union[str, Path], **kwargs) -> dict:
        from ..datasets.toyworld.measure import score_folder

        res = score_folder(folder, **kwargs)
        self.results.append(res)
        return res

    def compute(self):
        if not self.results:
            raise BadInputError("toyworld: no folders were scored")
        out = {}
        for k in ("alignment", "fidelity", "leakage"):
            vals = [(r[k], r["n_images"]) for r in self.results if r[k] is not None]
            w = sum(n for _, n in vals)
            out[k] = float(sum(v * n for v, n in vals) / w) if w else None
        out["n_images"] = sum(r["n_images"] for r in self.results)
        return out[self.key] if self.key else out


def toyworld_metrics(**options) -> dict:
    """The ``toyworld`` backend's metric objects (see :mod:`.registry`): one ToyWorldScore per number."""
    return {key: ToyWorldScore(key) for key in ("alignment", "fidelity", "leakage")}


def _is_file(item) -> bool:
    return isinstance(item, (str, Path))


def _file_features(encoders, groups: list[list], workers: int) -> list[list[np.ndarray]]:
    """``encode_files`` for the files an encoder has not cached (``cached``/``remember``: the benchmark runner's
    ``FeatureCache``); cached features are reused, the rest decoded once for all encoders."""
    from .decode import encode_files

    def cached(enc, item):
        look = getattr(enc, "cached", None)
        return None if look is None else look(item)

    known = [[[cached(e, item) for e in encoders] for item in g] for g in groups]
    todo = [[i for i, feats in enumerate(kg) if any(f is None for f in feats)] for kg in known]
    fresh = encode_files(encoders, [[g[i] for i in t] for g, t in zip(groups, todo)], workers) if any(todo) else []
    for g, (group, t) in enumerate(zip(groups, todo)):
        for k, enc in enumerate(encoders):
            for row, i in enumerate(t):
                known[g][i][k] = fresh[g][k][row]
                if hasattr(enc, "remember"):
                    enc.remember(group[i], fresh[g][k][row])
    return [[np.stack([feats[k] for feats in kg]) for k in range(len(encoders))] for kg in known]


def score_concept(clip, dino, generated: Sequence[ImageLike], prompts: Union[str, Sequence[str]],
                  reference, token: Union[None, str, Sequence[str]] = None, workers: Optional[int] = None) -> dict:
    """CC101's three scores for one concept's generated images.

    ``reference``: the concept's reference images, or for a composition a dict name -> images; image
    scores are then computed against each concept's references separately ({"clip_image": {name: ...}}).
    ``samples`` keeps the per-image values, in the order of ``generated`` (for bootstrap intervals): CLIP-T
    per image, and per image its mean cosine over all references (their mean is the all-pairs mean).
    ``workers``: when every image is a file, each is decoded once for both encoders, in that many worker
    processes (0: in this one; :func:`.decode.encode_files`; the same features to the bit); None, or images in
    memory: each encoder's ``encode_images``.
    """
    generated = list(generated)
    refs = reference if isinstance(reference, dict) else {None: reference}
    refs = {name: list(images) for name, images in refs.items()}
    for name, images in refs.items():
        if not images:
            raise BadInputError(f"score_concept: no reference images{'' if name is None else ' for ' + name}")
    files = workers is not None and generated and all(_is_file(i) for g in (generated, *refs.values()) for i in g)
    if files:
        (gen_clip, gen_dino), *ref_feats = _file_features((clip, dino), [generated, *refs.values()], workers)
    ct = ClipTextScore(clip)
    text = ct.update(generated, prompts, token=token, features=gen_clip if files else None)
    out: dict = {"clip_text": ct.compute(), "n_images": len(generated)}
    if not files:
        gen_clip, gen_dino = clip.encode_images(generated), dino.encode_images(generated)
        ref_feats = [(clip.encode_images(images), dino.encode_images(images)) for images in refs.values()]
    per: dict = {"clip_image": {}, "dino_image": {}}
    rows: dict = {"clip_image": {}, "dino_image": {}}
    for name, (ref_clip, ref_dino) in zip(refs, ref_feats):
        for key, feat, ref in (("clip_image", gen_clip, ref_clip), ("dino_image", gen_dino, ref_dino)):
            row_means = (feat @ ref.T).mean(axis=1)  # each image against every reference
            rows[key][name] = [float(v) for v in row_means]
            per[key][name] = float(row_means.mean())  # = the all-pairs mean
    out["samples"] = {"clip_text": [float(v) for v in text]}
    for key, vals in per.items():
        out[key] = vals[None] if None in vals else vals
        out["samples"][key] = rows[key][None] if None in rows[key] else rows[key]
    return out
