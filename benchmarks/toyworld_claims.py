"""Measure the Perfusion claims in the toy world and print the numbers (docs/TOYWORLD.md records them).

    python benchmarks/toyworld_claims.py [--concept split_triangle] [--betas 0.6,0.8,1.0,1.2] [--json out.json]

Trains one concept with local key-locking and one with trained K (the ablation) on the shipped `toy` base,
then samples the fixed prompt sets of personalize/claims.py: the superclass baseline,
each lock at its default beta, the ungated edit, and a beta sweep. Same code path as
tests/test_toyworld_claims.py.
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
    p.add_argument("--betas", default="0.6,0.8,1.0,1.2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from personalize import load_base
    from personalize import claims

    pipe = load_base("toy")
    work = Path(tempfile.mkdtemp(prefix="toy-claims-"))
    results: dict = {"concept": args.concept, "steps": args.steps, "batch": args.batch, "seeds": args.seeds}
    began = time.time()
    results["superclass"] = claims.superclass_baseline(pipe, args.concept, work, seeds=2 * args.seeds)["fidelity"]
    reference = claims.no_concept_reference(pipe, work, seeds=args.seeds)
    rows = {}
    for lock in ("local", "trained"):
        t = time.time()
        path = claims.train_toy_concept(pipe, args.concept, work / f"{lock}.safetensors", lock=lock,
                                        steps=args.steps, batch_size=args.batch)
        results[f"train_seconds_{lock}"] = round(time.time() - t, 1)
        settings = [("default", {})] + ([("gate off", {"gate": "off"})] + [
            (f"beta {b}", {"beta": float(b)}) for b in args.betas.split(",")] if lock == "local" else [])
        for label, knobs in settings:
            rows[f"{lock} {label}"] = claims.measure_concept(pipe, path, args.concept, work / f"{lock}-{label}",
                                                             reference=reference, seeds=args.seeds,
                                                             recon_seeds=2 * args.seeds, **knobs)
            print(f"{lock:8s} {label:10s} " + "  ".join(
                f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in rows[f'{lock} {label}'].items()),
                flush=True)
    results["rows"] = rows
    results["seconds"] = round(time.time() - began, 1)
    print(f"superclass-only fidelity {results['superclass']:.3f}; total {results['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
