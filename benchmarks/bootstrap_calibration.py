"""Calibration of the report's bootstrap intervals on simulated benchmarks with known effects.

    python benchmarks/bootstrap_calibration.py [--reps 2000] [--old] [--old-reps 200] [--no-ids]

Prints a table: scheme, scenario, n_concepts, coverage (fraction of the 95 % intervals holding the true
value), false-positive rate (fraction of the intervals of a null effect that exclude 0) and mean width. The
numbers, the machine and the reading are in ``docs/STATISTICS.md``.

Model (one image per concept c, prompt p, seed s; the base and the method share the concept, prompt and seed
parts, as images from the same prompt and seed do):

    base[c, p, s]   = LEVEL + a_c + b_cp + e_cps + n0_cps
    method[c, p, s] = LEVEL + a_c + b_cp + e_cps + delta_c + g_cp + n1_cps,   delta_c ~ N(effect, sd_between^2)

a_c: the concept's baseline (cancels in a paired difference), b_cp: the prompt's effect, e_cps: the seed's,
g_cp: how the method's gain varies with the prompt, n: each image's own noise. Homogeneous: sd_between = 0
(every concept gains the same); heterogeneous: concepts disagree. The estimand over concepts is the
population's (effect, or LEVEL + effect for a mean), not the sampled concepts' average; for one concept it is
that concept's own (delta_c, or LEVEL + a_c + delta_c), over the population of prompts and seeds.

Schemes: ``new`` is :mod:`personalize.evaluation.bootstrap` as the report calls it (concepts resampled with
their observed means; one concept: prompts resampled, the labels coming from the images' ids); ``--no-ids``
adds the one-concept rows without ids (old databases: each image its own unit); ``--old`` adds the scheme at
commit ``OLD_COMMIT`` (two-stage: concepts, then images within each), read from git.
"""
from __future__ import annotations

import argparse
import subprocess
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personalize.evaluation import bootstrap

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "66c9446952dad02a0138cd0e20a431016723b9ad"  # the last commit with the two-stage bootstrap
LEVEL = 0.7
MODEL = {"sd_concept": 0.05, "sd_prompt": 0.03, "sd_seed": 0.03, "sd_image": 0.03, "sd_gain_prompt": 0.015,
         "n_prompts": 20, "n_seeds": 5}
EFFECT = 0.02
SD_BETWEEN = 0.04


@dataclass(frozen=True)
class Scenario:
    name: str
    quantity: str  # "difference" (method minus base, paired images) or "mean" (the method's score)
    sd_between: float
    n_concepts: int


SCENARIOS = (
    Scenario("difference, homogeneous", "difference", 0.0, 10),
    Scenario("difference, homogeneous", "difference", 0.0, 101),
    Scenario("difference, heterogeneous", "difference", SD_BETWEEN, 10),
    Scenario("difference, heterogeneous", "difference", SD_BETWEEN, 101),
    Scenario("mean, concepts differ", "mean", SD_BETWEEN, 10),
    Scenario("mean, concepts differ", "mean", SD_BETWEEN, 101),
    Scenario("one concept, difference", "difference", 0.0, 1),
    Scenario("one concept, mean", "mean", 0.0, 1),
)



def simulate(rng: np.random.Generator, n_concepts: int, effect: float, sd_between: float):
    """One benchmark: (base, method) as (n_concepts, n_prompts * n_seeds) arrays (image i has prompt
    i // n_seeds) and the true values {"difference", "mean"} (see the module's docstring)."""
    c, p, s = n_concepts, MODEL["n_prompts"], MODEL["n_seeds"]
    a = rng.normal(0, MODEL["sd_concept"], (c, 1, 1))
    shared = a + rng.normal(0, MODEL["sd_prompt"], (c, p, 1)) + rng.normal(0, MODEL["sd_seed"], (c, p, s))
    delta = effect + sd_between * rng.normal(size=c)
    base = LEVEL + shared + rng.normal(0, MODEL["sd_image"], (c, p, s))
    method = (LEVEL + shared + delta[:, None, None] + rng.normal(0, MODEL["sd_gain_prompt"], (c, p, 1))
              + rng.normal(0, MODEL["sd_image"], (c, p, s)))
    if c == 1:  # one concept: its own effect and mean (prompts and seeds average out over their populations)
        truth = {"difference": float(delta[0]), "mean": LEVEL + float(a[0, 0, 0] + delta[0])}
    else:  # the population of concepts
        truth = {"difference": effect, "mean": LEVEL + effect}
    return base.reshape(c, p * s), method.reshape(c, p * s), truth


def prompt_labels(n_concepts: int) -> list[list[int]]:
    """Each image's prompt, per concept: what the report reads from the images' ids ("p3_s1_0": prompt 3)."""
    return [np.repeat(np.arange(MODEL["n_prompts"]), MODEL["n_seeds"]).tolist()] * n_concepts


def new_interval(quantity: str, base: np.ndarray, method: np.ndarray, seed: int, ids: bool = True):
    """The report's interval today (one concept: prompts resampled when ``ids``, else each image)."""
    c = len(base)
    labels = prompt_labels(c) if ids else None
    if quantity == "mean":
        return bootstrap.mean_ci(list(method), seed=seed, over_groups=c > 1, clusters=labels)
    return bootstrap.diff_ci(list(method), list(base), seed=seed, over_groups=c > 1, paired=True, clusters=labels)


def old_module() -> types.ModuleType:
    """personalize/evaluation/bootstrap.py as it was at ``OLD_COMMIT`` (needs the git checkout)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:personalize/evaluation/bootstrap.py"],
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("bootstrap_old")
    exec(compile(src, "bootstrap_old.py", "exec"), module.__dict__)
    return module


def old_interval_fn():
    old = old_module()

    def interval(quantity: str, base: np.ndarray, method: np.ndarray, seed: int):
        c = len(base)
        if quantity == "mean":
            return old.mean_ci(list(method), seed=seed, over_groups=c > 1)
        return old.diff_ci(list(method), list(base), seed=seed, over_groups=c > 1, paired=True)
    return interval


def calibrate(interval, scenario: Scenario, reps: int, seed: int = 0) -> dict:
    """Coverage, false-positive rate (differences only) and mean width of ``interval`` over ``reps`` simulated
    benchmarks (and as many null ones). The data depend on the seed and the scenario only, so every scheme
    sees the same benchmarks."""
    key = [seed, scenario.n_concepts, round(scenario.sd_between * 1e4), scenario.quantity == "mean"]
    start = time.perf_counter()
    hits, widths = 0, []
    rng = np.random.default_rng(key + [0])
    for r in range(reps):
        base, method, truth = simulate(rng, scenario.n_concepts, EFFECT, scenario.sd_between)
        lo, hi = interval(scenario.quantity, base, method, r)
        hits += lo <= truth[scenario.quantity] <= hi
        widths.append(hi - lo)
    false_pos = None
    if scenario.quantity == "difference":
        false_pos, rng = 0, np.random.default_rng(key + [1])
        for r in range(reps):
            base, method, _ = simulate(rng, scenario.n_concepts, 0.0, scenario.sd_between)
            lo, hi = interval(scenario.quantity, base, method, r)
            false_pos += lo > 0 or hi < 0
        false_pos /= reps
    return {"coverage": hits / reps, "false_positive": false_pos, "width": float(np.mean(widths)), "reps": reps,
            "seconds": time.perf_counter() - start}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000, help="simulated benchmarks per scenario (and as many "
                        "null ones for the false-positive rate)")
    parser.add_argument("--old", action="store_true", help=f"also the two-stage scheme of {OLD_COMMIT[:7]}")
    parser.add_argument("--old-reps", type=int, default=200, help="reps for --old (it is ~100x slower at 101 "
                        "concepts: it resamples every image)")
    parser.add_argument("--no-ids", action="store_true", help="also the one-concept rows without image ids")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    schemes = [("new", new_interval, args.reps, SCENARIOS)]
    if args.no_ids:
        schemes.append(("new, no ids", lambda *a: new_interval(*a, ids=False), args.reps,
                        [s for s in SCENARIOS if s.n_concepts == 1]))
    if args.old:
        schemes.append((f"old ({OLD_COMMIT[:7]})", old_interval_fn(), args.old_reps, SCENARIOS))
    print(f"| scheme | scenario | concepts | coverage | false positives | mean width | reps | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, interval, reps, scenarios in schemes:
        for sc in scenarios:
            res = calibrate(interval, sc, reps, args.seed)
            print(f"| {name} | {sc.name} | {sc.n_concepts} | {_pct(res['coverage'])} | "
                  f"{_pct(res['false_positive'])} | {res['width']:.4f} | {reps} | {res['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
