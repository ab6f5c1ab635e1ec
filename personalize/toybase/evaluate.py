"""Sample the toy-world base model on held-out captions, score it, and export its weights.

    personalize toyworld evaluate-base --pipeline personalize/toybase/weights --n 200
    personalize toyworld evaluate-base --export-from ~/.cache/personalize-toyworld/run --to personalize/toybase/weights
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ..datasets.toyworld.measure import score_folder
from ..datasets.toyworld.world import caption, heldout_scenes, render_scene
from ..paths import atomic_dir
from . import checkpoint as C
from . import model as M

PathLike = Union[str, os.PathLike]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_base_pipeline(path: Optional[PathLike] = None, dtype: torch.dtype = torch.float32):
    """The toy-world base model as a diffusers StableDiffusionPipeline (default: the shipped weights)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or WEIGHTS_DIR), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_prompts(pipe, prompts: dict[str, str], out_dir: PathLike, steps: int = 25, guidance: float = 4.0,
                   seed: int = 0, batch_size: int = 50) -> Path:
    """Generate one image per (stem -> prompt) into ``out_dir`` as ``<stem>.png`` + ``prompts.json``.

    Image i uses ``torch.Generator().manual_seed(seed + i)`` (stems in sorted order), so a folder generated
    with and without a concept is pixel-comparable.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = sorted(prompts)
    for start in range(0, len(stems), batch_size):
        chunk = stems[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([prompts[s] for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens).images
        for s, im in zip(chunk, images):
            im.save(out / f"{s}.png")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    return out


def heldout_prompts(n: int, seed: int = 1234) -> dict[str, str]:
    """``n`` captions whose attribute combinations never occur in training, keyed ``heldout_000``..."""
    return {f"heldout_{i:03d}": caption(s) for i, s in enumerate(heldout_scenes(n, seed))}


def save_grid(folder: PathLike, path: PathLike, n: int = 32, cols: int = 8, scale: int = 2,
              with_truth: bool = True, seed: int = 1234) -> Path:
    """A small PNG grid: for each held-out caption, the true render (left) beside the sample (right)."""
    from PIL import Image

    from ..images import open_rgb
    from ..samples import read_samples

    samples = read_samples(folder)[:n]
    scenes = heldout_scenes(len(samples), seed) if with_truth else None
    cell = 32 * (2 if with_truth else 1) + 2
    rows = (len(samples) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * 34), (0, 0, 0))
    for i, (png, _) in enumerate(samples):
        x, y = (i % cols) * cell, (i // cols) * 34
        if with_truth:
            grid.paste(render_scene(scenes[i]), (x, y))
            grid.paste(open_rgb(png), (x + 32, y))
        else:
            grid.paste(open_rgb(png), (x, y))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return Path(path)


def evaluate_base(pipeline: Union[None, PathLike, object] = None, n: int = 200, out_dir: Optional[PathLike] = None,
                  steps: int = 25, guidance: float = 4.0, seed: int = 0, grid: Optional[PathLike] = None,
                  batch_size: int = 50) -> dict:
    """Sample the base model on ``n`` held-out captions and score them with the measurers.

    Returns score_folder's dict (per_attribute: background/shape/color/size/position accuracies) plus
    "settings"; ``grid`` saves a truth|sample PNG of the first 32.
    """
    import tempfile

    pipe = pipeline if hasattr(pipeline, "unet") else load_base_pipeline(pipeline)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory()
        out_dir = tmp.name
    t0 = time.time()
    folder = sample_prompts(pipe, heldout_prompts(n), out_dir, steps=steps, guidance=guidance, seed=seed,
                            batch_size=batch_size)
    result = score_folder(folder)
    result["settings"] = {"n": n, "steps": steps, "guidance": guidance, "seed": seed,
                          "sample_seconds": round(time.time() - t0, 1)}
    if grid is not None:
        save_grid(folder, grid)
    if tmp is not None:
        tmp.cleanup()
    return result


def export_from_checkpoint(run_dir: PathLike, dest: PathLike = WEIGHTS_DIR, ema: bool = True) -> Path:
    """Export the (EMA) weights of ``run_dir``'s checkpoint as an fp16 diffusers pipeline into ``dest``.

    Use it on an unfinished run; a finished run has already exported ``run_dir/pipeline``
    (copy that with ``copy_pipeline``).
    """
    from .recipe import git_commit

    state = C.read(run_dir)
    arch = state["arch"]
    vae, unet, te = M.build_vae(arch), M.build_unet(arch), M.build_text_encoder(arch)
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=float(state["scaling"]))
    unet.load_state_dict(state["ema_unet"] if ema else state["unet"])
    te.load_state_dict(state["ema_te"] if ema else state["te"])
    pipe = M.assemble_pipeline(vae.eval(), te.eval(), unet.eval(),
                               prediction_type=state["args"]["prediction_type"],
                               zero_snr=bool(state["args"].get("zero_snr", False)))
    info = {"exported_from": str(run_dir), "phase": state["phase"], "step": int(state["step"]),
            "unet_steps_planned": state["args"]["steps"], "args": state["args"], "arch": arch,
            "seed": state["args"]["seed"], "git_commit": git_commit(), "train_seconds": round(float(state["elapsed"]), 1),
            "ema": ema, "exported": time.strftime("%Y-%m-%d %H:%M:%S")}
    return M.export_pipeline(pipe, dest, info)


def copy_pipeline(src: PathLike, dest: PathLike = WEIGHTS_DIR) -> Path:
    """Copy a finished run's ``pipeline`` folder to ``dest`` (replacing it atomically)."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        shutil.copytree(Path(src).expanduser(), tmp, dirs_exist_ok=True)
        M.load_as_float32(tmp)
    return dest
