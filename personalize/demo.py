"""``personalize demo``: the whole flow on the toy world's base model, on a CPU, in under two minutes.

It renders a held-out toy concept's example images, trains a Perfusion concept on them on ``--base toy``,
generates it in new scenes at several β, scores every image with the toy world's ground-truth measurers
(alignment to the prompt, fidelity to the concept, leakage into prompts without it) and writes
``index.html`` (photos, image grid, scores table) to the output folder.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Callable

from .paths import atomic_path

CONCEPT = "split_triangle"  # its two-colour halves survive the toy VAE best
SCENES = 4  # the first SCENES of claims.context_prompts(CONCEPT)
BETAS = (0.6, 0.7, 0.8)  # 0.7: Perfusion's default


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


STEPS = 300  # x batch 8: about the samples the paper's 210 steps x batch 16 see


def run_demo(out: str | Path = "demo_out", steps: int = STEPS, batch_size: int = 8, seeds: int = 4,
             betas=BETAS, log: Callable[[str], None] = lambda s: None) -> Path:
    """Run the demo on ``--base toy``; returns the path of ``index.html``."""
    from PIL import Image

    from . import claims
    from .base import load_base
    from .datasets.toyworld import get_concept

    out = Path(out)
    began = time.time()
    spec = get_concept(CONCEPT)
    pipe = load_base("toy", device="cpu")
    log(f"toy concept '{CONCEPT}': {spec.description} (superclass '{spec.superclass}')")
    concept_path = claims.train_toy_concept(pipe, CONCEPT, out / f"{CONCEPT}.safetensors", steps=steps,
                                            batch_size=batch_size, progress=True)
    photos = out / f"{CONCEPT}.photos"
    log(f"trained {concept_path} ({concept_path.stat().st_size:,} bytes) on the photos in {photos}")
    baseline = claims.superclass_baseline(pipe, CONCEPT, out / "samples", seeds=2 * seeds)
    # the base alone on the page's new scenes, the superclass word in place of the token, the same seed
    claims.sample(pipe, claims.context_prompts(CONCEPT)[:SCENES], out / "samples" / "base_context",
                  word=spec.superclass, seeds=1)
    reference = claims.no_concept_reference(pipe, out / "samples", seeds=seeds)
    scores = {}
    for beta in betas:
        scores[beta] = claims.measure_concept(pipe, concept_path, CONCEPT, out / "samples" / f"beta{beta}",
                                              reference=reference, seeds=seeds, recon_seeds=2 * seeds, beta=beta)
        log(f"β {beta}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scores[beta].items()))
    seconds = time.time() - began
    page = _page(out, photos, concept_path, scores, baseline, steps, batch_size, seconds, Image)
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page)
    return index


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _page(out: Path, photos: Path, concept_path: Path, scores: dict, baseline: dict, steps: int,
          batch_size: int, seconds: float, Image) -> str:
    from . import claims
    from .datasets.toyworld import get_concept
    from .generation import slug
    from .images import open_rgb

    token = claims.TOKEN
    scenes = [claims.RECON[0]] + list(claims.context_prompts(CONCEPT)[:SCENES])

    def thumb(path: Path, size: int) -> str:
        return _data_uri(open_rgb(path).resize((size, size), Image.NEAREST))

    def cell(path: Path) -> str:
        return f'<td><img src="{thumb(path, 128)}"></td>'

    photos_html = "".join(f'<img src="{thumb(p, 96)}">' for p in sorted(photos.glob("*.png")))
    head = "".join(f"<th>{html.escape(s.format(token))}</th>" for s in scenes)
    sc = get_concept(CONCEPT).superclass
    base_cells = [cell(out / "samples" / ("superclass" if s in claims.RECON else "base_context")
                       / f"{slug(s.format(sc))}_0.png") for s in scenes]
    rows = (f'<tr class="base"><th>base alone<br><small>“{html.escape(sc)}” for {html.escape(token)}</small></th>'
            f"{''.join(base_cells)}</tr>")
    for beta in scores:
        folder = out / "samples" / f"beta{beta}"
        cells = [cell(folder / ("recon" if s in claims.RECON else "context") / f"{slug(s.format(token))}_0.png")
                 for s in scenes]
        rows += f"<tr><th>β = {beta}</th>{''.join(cells)}</tr>"
    keys = ("fidelity", "context_alignment", "context_fidelity", "leakage", "no_concept_alignment")
    table = "".join(f"<tr><th>β = {beta}</th>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in keys) + "</tr>"
                    for beta, v in scores.items())
    table += (f"<tr><th>base alone, “a photo of a {html.escape(get_concept(CONCEPT).superclass)}”</th>"
              f"<td>{_fmt(baseline['fidelity'])}</td><td colspan=4></td></tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>personalize demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}td,th{{padding:4px;text-align:center}}
img{{image-rendering:pixelated;border-radius:4px;margin:2px}}code{{background:#eee;padding:1px 4px}}
table.s td{{font-variant-numeric:tabular-nums}}</style></head><body>
<h1>personalize demo</h1>
<p>Base <code>toy</code> (the toy world's text-to-image model, shipped in the package), method <b>Perfusion</b>,
token <code>{html.escape(token)}</code> for the held-out concept <i>{html.escape(CONCEPT)}</i>,
{steps} steps × batch {batch_size}, the loss weighted by the renderer's exact mask of the concept
(the paper's §4.4 masked loss, with a perfect segmenter); sampling DDIM {claims.SAMPLING['steps']} steps, guidance
{claims.SAMPLING['guidance']}, seed 0. Whole demo: {seconds:.0f} s on CPU.</p>
<h2>Training photos</h2><p>{photos_html}</p>
<h2>Generated: the base alone, then the concept at each β</h2>
<p>First row: the base model alone, the superclass word in place of the token, the same seed. Then the
concept: higher β gates it more strictly (a weaker concept, closer to the prompt). Measured over many
seeds and concepts: docs/TOYWORLD.md.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<h2>Scores (toy-world ground truth)</h2>
<table class="s"><tr><th></th><th>fidelity<br>“a photo of a {html.escape(token)}”</th><th>alignment<br>new scenes</th>
<th>fidelity<br>new scenes</th><th>leakage<br>prompts without it</th><th>alignment<br>prompts without it</th></tr>
{table}</table>
<p>alignment: fraction of the prompt's stated attributes (background, shapes, colours, sizes, positions) that hold;
fidelity: 0–1 match of the object to the concept's pattern and colours; leakage: mean pixel change (0–1) on the
same seeds versus the base without the concept. See docs/TOYWORLD.md.</p>
<p>Concept file: <code>{html.escape(concept_path.name)}</code> ({concept_path.stat().st_size:,} bytes).
Images and <code>prompts.json</code> are in <code>samples/</code>.</p>
</body></html>"""
