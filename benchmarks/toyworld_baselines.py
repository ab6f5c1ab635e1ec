"""Every method on the toy world, with the same budget: fidelity / alignment / leakage (informative).

    python benchmarks/toyworld_baselines.py [--concept split_triangle] [--steps 150] [--recipe] [--methods all]

Each method trains on the same rendered photos of one held-out concept with the same steps, batch size and seed
(its own learning rates and losses; ``--recipe``: each method's own default steps and batch size instead), then the fixed prompt sets of personalize/claims.py are
sampled and scored exactly as for Perfusion's claims. Methods with prior preservation sample ``--class-images``
class images from the toy base (cached). CPU-sized budgets, so these are not the methods' paper settings.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="split_triangle")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--class-images", type=int, default=16)
    p.add_argument("--recipe", action="store_true", help="each method's default steps and batch size")
    p.add_argument("--methods", default="all")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from personalize import load_base
    from personalize import claims
    from personalize.methods import get, names
    from personalize.prior import PriorConfig
    from personalize.training import TrainConfig

    pipe = load_base("toy")
    work = Path(tempfile.mkdtemp(prefix="toy-baselines-"))
    results: dict = {"concept": args.concept, "steps": args.steps, "batch_size": args.batch_size, "rows": {}}
    results["superclass"] = claims.superclass_baseline(pipe, args.concept, work, seeds=2 * args.seeds)["fidelity"]
    reference = claims.no_concept_reference(pipe, work, seeds=args.seeds)
    print(f"superclass-only fidelity {results['superclass']:.3f}", flush=True)
    for method in (names() if args.methods == "all" else args.methods.split(",")):
        settings = {}
        if isinstance(get(method).make_config(), PriorConfig):
            settings = {"num_class_images": args.class_images, "class_steps": claims.SAMPLING["steps"],
                        "class_guidance": claims.SAMPLING["guidance"]}
        budget = {"steps": args.steps, "batch_size": args.batch_size}
        if args.recipe:
            budget = {k: get(method).train_defaults.get(k, getattr(TrainConfig, k)) for k in budget}
        began = time.time()
        path = claims.train_toy_concept(pipe, args.concept, work / f"{method}.safetensors", method=method,
                                        **budget, **settings)
        row = claims.measure_concept(pipe, path, args.concept, work / method, reference=reference,
                                     seeds=args.seeds, recon_seeds=2 * args.seeds)
        row.update(budget, train_seconds=round(time.time() - began, 1))
        results["rows"][method] = row
        print(f"{method:18s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
