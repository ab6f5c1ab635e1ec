"""Our trainer, eager and compiled, vs the diffusers example scripts, side by side on the CPU (issues 15, 28).

    python benchmarks/vs_diffusers_scripts.py [--res 256] [--steps 8] [--precisions no,bf16] [--repeats 2]
        [--methods dreambooth-lora,textual-inversion,custom-diffusion,dreambooth,perfusion]
        [--sides ours,compiled,script] [--model DIR] [--anchors DIR]

Every side trains on the same random SD 1.5-shaped pipeline folder (built once,
``unet.sample_size`` set so it trains at ``--res``), the same five photos, batch
and precision, prior preservation and loss masks off. Runs alternate (ours, compiled, script,
ours ..., ``--repeats`` rounds) so a busy machine slows every side alike, and
each side's best and worst s/step are reported: a busy machine shows as spread,
not as a ratio. ``compiled`` is ``train --compile`` (torch.compile of the step,
mode reduce-overhead, which on a CPU is inductor without CUDA graphs); its
compile cache starts empty, so its first run's step 1 minus eager's is the cold
compile time and a later run's is the warm one. Each run is its own process, so
its peak RSS is its own. Prints one JSON line per run and one summary line per
method and precision. Perfusion has no diffusers script (ours and compiled
only). Full DreamBooth's script is not run on a machine under 32 GiB (it was
killed by the OOM killer at 24 GiB, ``perf-anchors/README.md``); ours is, to
show it fits.
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


def ours(model: Path, method: str, precision: str, steps: int, batch: int, compiled: bool = False) -> dict:
    """One run of our trainer (in this process): median s/step from step 3 on, and the seconds from the call to
    the end of step 1 (loading, encoding the photos and, ``compiled``, compiling the step)."""
    from gpu_suite import _photos

    from personalize import train
    from personalize.methods import get
    from personalize.prior import PriorConfig

    stamps: list[float] = []
    extra = {"prior_loss_weight": 0.0} if issubclass(get(method).Config, PriorConfig) else {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photos(Path(tmp) / "photos", 256)
        began = time.perf_counter()
        train(str(model), photos, token="<bench>", superclass="dog",
              out=Path(tmp) / "c.safetensors", method=method, progress=False, device="cpu",
              callbacks=[lambda s, loss, m: stamps.append(time.perf_counter())],
              settings={"steps": steps, "batch_size": batch, "checkpoint_every": 0, "mixed_precision": precision,
                        "compile": compiled, "masks": "none", **extra})
    deltas = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    return {"step_s": round(statistics.median(deltas), 3), "first_step_s": round(stamps[0] - began, 2)}


def one(spec: dict) -> dict:
    """Run one side in this (fresh) process; adds the process tree's peak RSS."""
    if spec["side"] in ("ours", "compiled"):
        row = ours(Path(spec["model"]), spec["method"], spec["precision"], spec["steps"], spec["batch"],
                   compiled=spec["side"] == "compiled")
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
    parser.add_argument("--batch", type=int, default=0, help="images per step (0: each method's default)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; best and worst of each side shown")
    parser.add_argument("--sides", default="ours,compiled,script",
                        help="ours (eager), compiled (train --compile; its first run compiles cold), script")
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
    wanted = args.sides.split(",")
    compile_cache = tempfile.mkdtemp(prefix="compile-cache-")  # empty: the first compiled run of each method is cold
    for method in args.methods.split(","):
        batch = args.batch or get(method).train_defaults.get("batch_size", 1)
        for precision in args.precisions.split(","):
            sides = [(side, None) for side in ("ours", "compiled") if side in wanted]
            if "script" in wanted and method in SCRIPTS and (method != "dreambooth" or big_enough):
                sides.append(("script", SCRIPTS[method]))
            rows: dict[str, list[dict]] = {}
            for _ in range(args.repeats):  # ours, compiled, script, ours ...: a busy machine slows every side alike
                for side, script in sides:
                    spec = {"side": side, "method": method, "script": script, "precision": precision,
                            "batch": batch, "steps": args.steps, "res": args.res, "model": str(model),
                            "anchors": str(args.anchors)}
                    row = _run_one(spec, compile_cache)
                    print(json.dumps(row), flush=True)
                    if "step_s" in row:
                        rows.setdefault(side, []).append(row)
            print(json.dumps(summary(method, precision, args.res, batch, rows)), flush=True)


def summary(method: str, precision: str, res: int, batch: int, rows: dict[str, list[dict]]) -> dict:
    """Each side's best and worst s/step (the spread shows how busy the machine was), the speed-ups of the best
    runs, and the compiled side's cold and warm compile seconds (its step 1 beyond eager's, first run and later)."""
    out = {"method": method, "precision": precision, "res": res, "batch": batch}
    best = {side: min(r["step_s"] for r in runs) for side, runs in rows.items()}
    for side, runs in rows.items():
        out[f"{side}_s"] = [best[side], max(r["step_s"] for r in runs)]
    for fast, slow in (("ours", "script"), ("compiled", "script"), ("compiled", "ours")):
        if fast in best and slow in best:
            out[f"speedup_{fast}_vs_{slow}"] = round(best[slow] / best[fast], 3)
    if "compiled" in rows and "ours" in rows:
        eager_first = min(r["first_step_s"] for r in rows["ours"])
        firsts = [r["first_step_s"] for r in rows["compiled"]]
        out["compile_cold_s"] = round(firsts[0] - eager_first, 1)
        if len(firsts) > 1:
            out["compile_warm_s"] = round(min(firsts[1:]) - eager_first, 1)
    if "ours" in rows and "script" in rows:
        out["rss_ours_over_script"] = round(min(r["peak_rss_gib"] for r in rows["ours"]) /
                                            min(r["peak_rss_gib"] for r in rows["script"]), 3)
    return out


def _run_one(spec: dict, compile_cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": compile_cache}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1]) if lines else {**spec, "error": proc.stderr[-500:], "rc": proc.returncode}
    row.pop("model", None), row.pop("anchors", None)
    return row


if __name__ == "__main__":
    main()
