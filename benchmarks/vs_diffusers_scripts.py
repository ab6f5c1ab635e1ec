"""Our trainer vs the diffusers example scripts, side by side on the CPU (issue 15, item 3).

    python benchmarks/vs_diffusers_scripts.py [--res 256] [--steps 8] [--precisions no,bf16]
        [--methods dreambooth-lora,textual-inversion,custom-diffusion,dreambooth] [--model DIR] [--anchors DIR]

Both sides train on the same random SD 1.5-shaped pipeline folder (built once,
``unet.sample_size`` set so it trains at ``--res``), the same five photos, batch
and precision, prior preservation off; runs alternate (ours, script, ours,
script ..., ``--repeats`` rounds; the best of each side counts) so a busy
machine slows both alike. Each run is its own process, so its peak RSS is its own. Prints one JSON line per run and one ratio line per
method and precision. Full DreamBooth's script is not run on a machine under
32 GiB (it was killed by the OOM killer at 24 GiB, ``perf-anchors/README.md``);
ours is, to show it fits.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, res: int) -> Path:
    """The random SD 1.5-shaped pipeline, saved once (fp32), training at ``res`` pixels."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch

    from personalize.sd_shapes import sd15_pipeline

    torch.manual_seed(0)
    pipe = sd15_pipeline("cpu")
    pipe.unet.register_to_config(sample_size=res // pipe.vae_scale_factor)
    pipe.save_pretrained(folder)
    return folder


def ours(model: Path, method: str, precision: str, steps: int, batch: int) -> dict:
    """One run of our trainer (in this process): median s/step from step 3 on."""
    from gpu_suite import _photos

    from personalize import train
    from personalize.methods import get
    from personalize.prior import PriorConfig

    stamps: list[float] = []
    extra = {"prior_loss_weight": 0.0} if issubclass(get(method).Config, PriorConfig) else {}
    with tempfile.TemporaryDirectory() as tmp:
        train(str(model), _photos(Path(tmp) / "photos", 256), token="<bench>", superclass="dog",
              out=Path(tmp) / "c.safetensors", method=method, progress=False, device="cpu",
              callbacks=[lambda s, loss, m: stamps.append(time.perf_counter())],
              settings={"steps": steps, "batch_size": batch, "checkpoint_every": 0, "mixed_precision": precision,
                        **extra})
    deltas = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    return {"step_s": round(statistics.median(deltas), 3)}


def one(spec: dict) -> dict:
    """Run one side in this (fresh) process; adds the process tree's peak RSS."""
    if spec["side"] == "ours":
        row = ours(Path(spec["model"]), spec["method"], spec["precision"], spec["steps"], spec["batch"])
    else:
        from gpu_suite import run_script

        row = run_script(Path(spec["anchors"]), Path(spec["model"]), spec["script"], spec["batch"], spec["steps"],
                         spec["res"], spec["precision"])
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {**spec, **row, "peak_rss_gib": round(peak / 2**20, 2)}


def main() -> None:
    from gpu_suite import SCRIPTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each side counts")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--methods", default="dreambooth-lora,textual-inversion,custom-diffusion,dreambooth")
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "sd15_random_256")
    parser.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "perf-anchors")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one side, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))), flush=True)
        return
    from personalize.methods import get

    model = build_model(args.model, args.res)
    big_enough = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >= 32 * 2**30
    for method in args.methods.split(","):
        batch = get(method).train_defaults.get("batch_size", 1)
        for precision in args.precisions.split(","):
            sides = [("ours", None)]
            if method != "dreambooth" or big_enough:
                sides.append(("script", SCRIPTS[method]))
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # ours, script, ours, script ...: a busy machine slows both alike
                for side, script in sides:
                    spec = {"side": side, "method": method, "script": script, "precision": precision,
                            "batch": batch, "steps": args.steps, "res": args.res, "model": str(model),
                            "anchors": str(args.anchors)}
                    row = _run_one(spec)
                    print(json.dumps(row), flush=True)
                    if "step_s" in row and ("step_s" not in best.get(side, {}) or row["step_s"] < best[side]["step_s"]):
                        best[side] = row
            if len(best) == 2:
                print(json.dumps({"method": method, "precision": precision, "res": args.res, "batch": batch,
                                  "best_ours_s": best["ours"]["step_s"], "best_script_s": best["script"]["step_s"],
                                  "speedup_ours_vs_script": round(best["script"]["step_s"] / best["ours"]["step_s"], 3),
                                  "rss_ours_over_script": round(best["ours"]["peak_rss_gib"] /
                                                                best["script"]["peak_rss_gib"], 3)}), flush=True)


def _run_one(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1]) if lines else {**spec, "error": proc.stderr[-500:], "rc": proc.returncode}
    row.pop("model", None), row.pop("anchors", None)
    return row


if __name__ == "__main__":
    main()
