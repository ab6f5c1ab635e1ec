"""``personalize demo``: the whole flow on a built-in base, on a CPU, in about a minute.

It writes a few photos of a concept, trains a Perfusion concept on them,
generates it in new scenes at several β, and writes ``index.html`` (the
training photos, an image grid per β, the settings) to the output folder.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Callable

from .paths import atomic_path

SCENES = ("a photo of a {}", "a {} on the beach", "a {} in the snow", "a red {} next to a dog")
BETAS = (0.5, 0.7, 0.9)


def write_demo_photos(folder: Path, n: int = 5) -> Path:
    """Photos of a striped ball on plain backgrounds, in varied places and sizes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = [(235, 225, 200), (190, 215, 240), (210, 240, 200), (240, 200, 210), (220, 220, 220)]
    for i in range(n):
        size = 128
        img = Image.new("RGB", (size, size), backgrounds[i % len(backgrounds)])
        radius = 34 + 6 * (i % 3)
        cx, cy = 50 + 7 * i, 60 + 5 * ((i * 3) % 4)
        ball = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(ball)
        for k in range(0, size, 12):
            draw.rectangle((k, 0, k + 5, size), fill=(220, 40, 40))
            draw.rectangle((k + 6, 0, k + 11, size), fill=(250, 250, 250))
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        img.paste(ball, (0, 0), mask)
        img.save(folder / f"ball_{i}.png")
    return folder


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_demo(out: str | Path = "demo_out", base: str = "tiny", steps: int = 40, batch_size: int = 4,
             sample_steps: int = 25, log: Callable[[str], None] = lambda s: None) -> Path:
    """Run the demo; returns the path of ``index.html``."""
    from PIL import Image

    from .base import load_base
    from .compose import attach
    from .generation import generate, write_images
    from .training import train

    out = Path(out)
    began = time.time()
    photos = write_demo_photos(out / "photos")
    log(f"wrote {len(list(photos.glob('*.png')))} training photos to {photos}")
    pipe = load_base(base, device="cpu")
    token = "<striped-ball>"
    concept_path = train(pipe, photos, token=token, superclass="ball", out=out / "striped-ball.safetensors",
                         settings={"steps": steps, "batch_size": batch_size, "checkpoint_every": 0}, progress=True)
    log(f"trained {concept_path} ({concept_path.stat().st_size:,} bytes)")
    grid: dict[float, list[tuple[str, object]]] = {}
    for beta in BETAS:
        with attach(pipe, concept_path, beta=beta):
            for scene in SCENES:
                prompt = scene.format(token)
                image = generate(pipe, prompt, num_images=1, steps=sample_steps, seed=0)[0]
                write_images([image], prompt, out / "samples", seed=0, prefix=f"beta{beta}_")
                grid.setdefault(beta, []).append((prompt, image))
    seconds = time.time() - began
    photos_html = "".join(f'<img src="{_data_uri(Image.open(p).convert("RGB"))}" width="96">'
                          for p in sorted(photos.glob("*.png")))
    head = "".join(f"<th>{html.escape(s.format(token))}</th>" for s in SCENES)
    rows = "".join(
        f"<tr><th>β = {beta}</th>" + "".join(f'<td><img src="{_data_uri(img.resize((128, 128), Image.NEAREST))}"></td>'
                                             for _, img in grid[beta]) + "</tr>"
        for beta in BETAS
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>personalize demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}td,th{{padding:4px;text-align:center}}
img{{image-rendering:pixelated;border-radius:4px}}code{{background:#eee;padding:1px 4px}}</style></head><body>
<h1>personalize demo</h1>
<p>Base <code>{html.escape(base)}</code>, method <b>Perfusion</b>, token <code>{html.escape(token)}</code>
(superclass <i>ball</i>), {steps} steps × batch {batch_size}; sampling DDIM {sample_steps} steps, guidance 6, seed 0.
Whole demo: {seconds:.0f} s on CPU.</p>
<h2>Training photos</h2><p>{photos_html}</p>
<h2>Generated: new scenes × β</h2>
<p>Higher β gates the concept more strictly: weaker concept, closer to the prompt.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<p>Concept file: <code>{html.escape(concept_path.name)}</code> ({concept_path.stat().st_size:,} bytes).
Images and <code>prompts.json</code> are in <code>samples/</code>.</p>
</body></html>"""
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page)
    return index
