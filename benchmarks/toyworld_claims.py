"""Decide the Perfusion claims in the toy world on several concepts and training seeds, with paired intervals.

    python benchmarks/toyworld_claims.py --work DIR [--concepts a,b,c,d] [--seeds 4] [--json out.json]

Each concept of ``--concepts`` (default: claims.CLAIM_CONCEPTS, 4 held-out concepts) is trained ``--seeds``
times (training seeds 0..n-1) with local key-locking and with trained K (the paper's ablation), each with its
method's default recipe (exact masks, 150 steps x 8). Then, images matched by prompt and sampling seed, 95 %
intervals over concepts (personalize.claims.paired):

- claim 2, key-locking helps alignment: context alignment, local minus trained K (> 0 with its interval);
- claim 3, gating preserves the prior: on prompts without the token, the change from the base (mean pixel
  difference) with the gate on minus with the gate off (< 0 with its interval);
- claim 4, beta spans the trade-off (training seed 0 of every concept, claims.BETA_GRID): mean fidelity
  non-increasing and context alignment non-decreasing along the grid, and both end points significantly
  different in the claimed direction.

Trained concepts stay in --work (a rerun skips them). docs/TOYWORLD.md records the numbers;
tests/test_toyworld_claims.py runs the same code when PERSONALIZE_CLAIMS=1 (`make claims`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def decide(pipe, work: Path, concepts, seeds, log=print) -> dict:
    from personalize import claims

    work.mkdir(parents=True, exist_ok=True)
    reference = claims.no_concept_reference(pipe, work, seeds=4)
    files = {}
    for name in concepts:
        for seed in seeds:
            for lock in ("local", "trained"):
                out = work / f"{name}-{lock}-{seed}.safetensors"
                if not out.exists():
                    t = time.time()
                    claims.train_toy_concept(pipe, name, out, lock=lock, seed=seed)
                    log(f"trained {out.name} in {time.time() - t:.0f} s")
                files[name, seed, lock] = out
    align = {lock: {} for lock in ("local", "trained")}
    leak = {"gated": {}, "ungated": {}}
    for (name, seed, lock), path in files.items():
        run = f"{name}/{seed}"
        align[lock][run] = claims.per_image(pipe, path, name, claims.context_prompts(name), "alignment",
                                            work / "s" / f"{name}-{lock}-{seed}-ctx")
        if lock == "local":
            for label, knobs in (("gated", {}), ("ungated", {"gate": "off"})):
                leak[label][run] = claims.per_image(pipe, path, name, claims.NO_CONCEPT, "leakage",
                                                    work / "s" / f"{name}-{seed}-{label}", reference=reference,
                                                    **knobs)
    out = {"concepts": list(concepts), "seeds": list(seeds)}
    c2 = claims.paired(align["local"], align["trained"])
    out["claim2"] = {**c2, "local": _mean(align["local"]), "trained": _mean(align["trained"]),
                     "holds": claims.excludes_zero(c2, +1)}
    c3 = claims.paired(leak["gated"], leak["ungated"])
    out["claim3"] = {**c3, "gated": _mean(leak["gated"]), "ungated": _mean(leak["ungated"]),
                     "holds": claims.excludes_zero(c3, -1)}
    fid, ali = {}, {}
    for beta in claims.BETA_GRID:
        fid[beta], ali[beta] = {}, {}
        for name in concepts:
            path, run = files[name, seeds[0], "local"], f"{name}/{seeds[0]}"
            fid[beta][run] = claims.per_image(pipe, path, name, claims.RECON, "fidelity",
                                              work / "s" / f"{name}-b{beta}-recon", seeds=8, beta=beta)
            ali[beta][run] = claims.per_image(pipe, path, name, claims.context_prompts(name), "alignment",
                                              work / "s" / f"{name}-b{beta}-ctx", beta=beta)
    lo, hi = claims.BETA_GRID[0], claims.BETA_GRID[-1]
    f = [_mean(fid[b]) for b in claims.BETA_GRID]
    a = [_mean(ali[b]) for b in claims.BETA_GRID]
    f_end, a_end = claims.paired(fid[hi], fid[lo]), claims.paired(ali[hi], ali[lo])
    out["claim4"] = {"betas": list(claims.BETA_GRID), "fidelity": f, "alignment": a,
                     "fidelity_end_diff": f_end, "alignment_end_diff": a_end,
                     "monotone": all(x >= y for x, y in zip(f, f[1:])) and all(x <= y for x, y in zip(a, a[1:])),
                     "holds": (all(x >= y for x, y in zip(f, f[1:])) and all(x <= y for x, y in zip(a, a[1:]))
                               and claims.excludes_zero(f_end, -1) and claims.excludes_zero(a_end, +1))}
    return out


def _mean(runs: dict) -> float:
    values = [v for images in runs.values() for v in images.values()]
    return sum(values) / len(values)


def main() -> None:
    from personalize import claims

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the trained concepts and samples (reused on a rerun)")
    p.add_argument("--concepts", default=",".join(claims.CLAIM_CONCEPTS))
    p.add_argument("--seeds", type=int, default=len(claims.CLAIM_SEEDS))
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from personalize import load_base

    began = time.time()
    result = decide(load_base("toy"), Path(args.work), args.concepts.split(","), list(range(args.seeds)),
                    log=lambda m: print(m, flush=True))
    result["seconds"] = round(time.time() - began)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
