"""Two Perfusion concepts in one scene on the toy base: each concept's fidelity, composed vs alone.

    python benchmarks/toyworld_compose.py [WORK_DIR [STEPS [CONCEPT_A CONCEPT_B]]]

Trains two toy concepts (default ``split_triangle`` as <a> and ``dotted_square`` as <b>, the two textures
that survive the toy VAE best; STEPS each, default 150), samples
"a <a> on the left and a <b> on the right, on a white background" (and two more layouts) with both
attached (local and global lock), and scores each concept's object with the toy-world measurer by reading the
other placeholder as its superclass word. Baselines: each concept attached alone (the other object drawn
from its superclass word) and the base alone (both superclass words). Prints one JSON line; writes grid.png.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from personalize import attach, load_base
from personalize.claims import SAMPLING, train_toy_concept
from personalize.datasets.toyworld.measure import score_image
from personalize.generation import generate

from personalize.datasets.toyworld import get_concept

CONCEPTS = {"<a>": "split_triangle", "<b>": "dotted_square"}  # placeholder -> toy concept (main() may change it)
LAYOUTS = ("a {a} on the left and a {b} on the right, on a white background",
           "a {b} at the top and a {a} at the bottom, on a blue background",
           "a large {a} on the right and a small {b} on the left, on a green background")
SEEDS = 6


def scene_scores(pipe, words: dict[str, str], tag: str, images_out: list) -> dict:
    """Fidelity of each concept's object in the composed layouts, with ``words`` standing for the objects."""
    scores = {tok: [] for tok in CONCEPTS}
    slot = {"<a>": "a", "<b>": "b"}
    for layout in LAYOUTS:
        prompt = layout.format(a=words["<a>"], b=words["<b>"])
        for i, img in enumerate(generate(pipe, prompt, num_images=SEEDS, seed=0, **SAMPLING)):
            if i == 0:
                images_out.append((tag, img))
            for tok, name in CONCEPTS.items():
                other = next(t for t in CONCEPTS if t != tok)
                scored = layout.format(**{slot[tok]: tok, slot[other]: superclasses()[other]})
                fid = score_image(img, scored, placeholder=tok, concept=name)["fidelity"]
                scores[tok].append(0.0 if fid is None else fid)
    return {tok: round(float(np.mean(v)), 3) for tok, v in scores.items()}


def superclasses() -> dict[str, str]:
    return {tok: get_concept(name).superclass for tok, name in CONCEPTS.items()}


def main(work: Path, steps: int = 150) -> dict:
    began = time.time()
    SUPER = superclasses()
    pipe = load_base("toy")
    files = {tok: train_toy_concept(pipe, name, work / f"{name}.safetensors", token=tok, steps=steps) for tok, name in CONCEPTS.items()}
    train_s = round(time.time() - began, 1)
    grid: list = []
    results = {"base_alone": scene_scores(pipe, SUPER, "base", grid)}
    for tok in CONCEPTS:
        with attach(pipe, files[tok]):
            results[f"{tok}_alone"] = scene_scores(pipe, {**SUPER, tok: tok}, f"{tok} alone", grid)
    for lock in ("local", "global"):
        with attach(pipe, list(files.values()), lock=lock):
            results[f"composed_{lock}"] = scene_scores(pipe, {t: t for t in CONCEPTS}, f"both {lock}", grid)
    results.update(steps=steps, train_seconds=train_s, seconds=round(time.time() - began, 1), seeds=SEEDS, layouts=len(LAYOUTS))
    _grid(grid, work / "grid.png")
    return results


def _grid(tiles: list, path: Path) -> None:
    from PIL import Image

    rows: dict[str, list] = {}
    for tag, img in tiles:
        rows.setdefault(tag, []).append(img)
    w, h = tiles[0][1].size
    cols = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for r, imgs in enumerate(rows.values()):
        for c, img in enumerate(imgs):
            canvas.paste(img, (c * w, r * h))
    canvas.save(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "toyworld_compose_out")
    out.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 4:
        CONCEPTS.update({"<a>": sys.argv[3], "<b>": sys.argv[4]})
    print(json.dumps(main(out, int(sys.argv[2]) if len(sys.argv) > 2 else 150)))
