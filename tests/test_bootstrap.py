"""Bootstrap confidence intervals: the formulas against independent computations, and the report's use of them."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from personalize.benchmark.report import summarize, write_report
from personalize.evaluation.bootstrap import diff_ci, mean_ci


def test_mean_ci_matches_the_normal_approximation():
    """One large group: the percentile interval is close to mean +- 1.96 sd / sqrt(n)."""
    x = np.random.default_rng(1).normal(0.5, 0.2, size=400)
    lo, hi = mean_ci([x.tolist()], n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.004)
    assert hi == pytest.approx(x.mean() + half, abs=0.004)


def test_constant_data_has_a_point_interval_and_more_data_narrows_it():
    assert mean_ci([[0.3] * 5, [0.7] * 9]) == pytest.approx((0.5, 0.5))
    rng = np.random.default_rng(2)
    small = mean_ci([rng.uniform(size=10).tolist()])
    large = mean_ci([rng.uniform(size=1000).tolist()])
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5


def test_groups_weigh_equally_whatever_their_size():
    """The statistic is the mean of concept means (as the report's tables), not the pooled image mean."""
    a, b = [0.9] * 200 + [0.8] * 200, [0.1, 0.2, 0.1, 0.2]
    lo, hi = mean_ci([a, b])
    assert lo < (np.mean(a) + np.mean(b)) / 2 < hi
    assert hi < np.mean(a + b)  # the pooled mean (0.82) lies far outside


def test_diff_ci_separates_different_means_and_not_equal_ones():
    rng = np.random.default_rng(3)
    base = [rng.normal(0.2, 0.1, 30).tolist() for _ in range(3)]
    better = [rng.normal(0.5, 0.1, 30).tolist() for _ in range(3)]
    same = [rng.normal(0.2, 0.1, 30).tolist() for _ in range(3)]
    lo, hi = diff_ci(better, base)
    assert 0.2 < lo < hi < 0.4
    lo, hi = diff_ci(same, base)
    assert lo < 0 < hi
    assert diff_ci([[]], base) is None and mean_ci([]) is None and mean_ci([[float("nan")]]) is None


def _score(method: str, concept: str, setting: str, fid: list[float], align: list[float]) -> dict:
    return {"status": "done", "kind": "score", "method": method, "concept": concept, "concept_class": concept,
            "setting_label": setting, "provenance": {}, "result": {
                "fidelity": float(np.mean(fid)), "alignment": float(np.mean(align)), "n_images": len(fid),
                "samples": {"fidelity": fid, "alignment": align}}}


def _rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for c in ("a", "b", "c"):
        base_fid = [rng.uniform(0.05, 0.25) for _ in range(28)]
        rows.append(_score("base", c, "default", base_fid, [rng.uniform(0.6, 1) for _ in range(28)]))
        rows.append(_score("perfusion", c, "beta=0.6", [rng.uniform(0.5, 0.8) for _ in range(28)],
                           [rng.uniform(0.9, 1) for _ in range(28)]))
        rows.append(_score("residuals", c, "default", [v + rng.uniform(-0.05, 0.05) for v in base_fid],
                           [rng.uniform(0.6, 1) for _ in range(28)]))
    return rows


def test_report_shows_intervals_and_the_difference_from_the_base(tmp_path):
    rows = _rows()
    summary = summarize(rows)
    res = {r["method"]: r for r in summary["results"]["rows"]}
    for r in res.values():
        lo, hi = r["ci"]["fidelity"]
        assert lo < r["values"]["fidelity"] < hi
    vs = {r["method"]: r for r in summary["vs_base"]["rows"]}
    assert set(vs) == {"perfusion", "residuals"}
    assert vs["perfusion"]["ci"]["fidelity"][0] > 0.3
    assert vs["residuals"]["ci"]["fidelity"][0] < 0 < vs["residuals"]["ci"]["fidelity"][1]
    assert vs["perfusion"]["ci"]["alignment"][0] > 0.05
    assert vs["residuals"]["cells"][-1] == "no" and vs["perfusion"]["cells"][-1] == "yes"
    html_path, md_path = write_report(rows, tmp_path, tmp_path / "report")
    md = md_path.read_text()
    assert "## Difference from the base alone" in md
    lo, hi = res["perfusion"]["ci"]["fidelity"]
    assert f"\\[{lo:.3f}, {hi:.3f}\\]" in md and f"[{lo:.3f}, {hi:.3f}]" in html_path.read_text()


def test_rows_without_samples_get_no_interval():
    rows = _rows()
    for r in rows:
        r["result"] = {k: v for k, v in r["result"].items() if k != "samples"}
    summary = summarize(rows)
    assert all(not r["ci"] for r in summary["results"]["rows"]) and summary["vs_base"] is None


def test_toy_scoring_keeps_per_image_values_whose_means_are_the_scores(tmp_path):
    from personalize.benchmark.scoring import _per_image
    from personalize.datasets.toyworld.concepts import concept_scenes
    from personalize.datasets.toyworld.measure import score_folder
    from personalize.datasets.toyworld.world import render_scene

    prompts = {}
    for i, scene in enumerate(concept_scenes("striped_heart", 4) + concept_scenes("split_triangle", 2)):
        render_scene(scene).save(tmp_path / f"im{i}.png")
        prompts[f"im{i}"] = "a <tok> on the left, on a blue background" if i < 5 else "a red star, on a blue background"
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    res = score_folder(tmp_path, concept="striped_heart")
    samples = _per_image(res)
    assert len(samples["fidelity"]) == 5 and len(samples["alignment"]) == 6
    assert np.mean(samples["fidelity"]) == pytest.approx(res["fidelity"])
    assert np.mean(samples["alignment"]) == pytest.approx(res["alignment"])


def _loop_two_stage(groups, n_boot, rng):
    """A plain two-stage bootstrap: draw concepts with replacement, then each drawn concept's images."""
    reps = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(groups), size=len(groups))
        reps.append(np.mean([np.mean(rng.choice(groups[j], size=len(groups[j]))) for j in picks]))
    return np.quantile(reps, [0.025, 0.975])


def test_over_groups_matches_a_plain_two_stage_bootstrap_and_is_wider():
    """Concepts that differ a lot: resampling them dominates the interval (an independent loop agrees)."""
    rng = np.random.default_rng(5)
    groups = [rng.normal(mu, 0.05, 20).tolist() for mu in rng.uniform(0.2, 0.8, 12)]
    lo, hi = mean_ci(groups, n_boot=4000, over_groups=True)
    ref_lo, ref_hi = _loop_two_stage(groups, 4000, np.random.default_rng(99))
    assert lo == pytest.approx(ref_lo, abs=0.015) and hi == pytest.approx(ref_hi, abs=0.015)
    fixed = mean_ci(groups, n_boot=4000)
    assert (hi - lo) > 3 * (fixed[1] - fixed[0])
    sd = np.std([np.mean(g) for g in groups], ddof=1) / np.sqrt(len(groups))  # normal approximation
    assert hi - lo == pytest.approx(2 * 1.96 * sd, rel=0.15)


def test_paired_differences_see_a_small_consistent_gain_that_unpaired_misses():
    """Same prompts and seeds: image-to-image variation cancels in the paired difference."""
    rng = np.random.default_rng(6)
    base = [rng.normal(0.5, 0.2, 40) for _ in range(3)]
    better = [(b + 0.02 + rng.normal(0, 0.005, 40)).tolist() for b in base]
    base = [b.tolist() for b in base]
    lo, hi = diff_ci(better, base, paired=True, over_groups=True)
    assert 0.015 < lo < 0.02 < hi < 0.025
    lo, hi = diff_ci(better, base)
    assert lo < 0 < hi
    d = [np.subtract(a, b).tolist() for a, b in zip(better, base)]
    assert diff_ci(better, base, paired=True) == mean_ci(d)
    with pytest.raises(ValueError):
        diff_ci([[1.0, 2.0]], [[1.0]], paired=True)


def test_feature_cache_encodes_each_file_once(tmp_path):
    from PIL import Image

    from personalize.benchmark.work import FeatureCache

    class Counting:
        calls = 0

        def encode_images(self, images):
            images = list(images)
            Counting.calls += len(images)
            return np.array([[float(np.asarray(Image.open(p) if not isinstance(p, Image.Image) else p).mean()), 1.0]
                             for p in images]).reshape(len(images), 2)

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(paths[-1])
    cache, plain = FeatureCache(Counting()), Counting()
    first = cache.encode_images(paths)
    again = cache.encode_images([paths[2], paths[0], Image.new("RGB", (4, 4), (90, 0, 0))])
    assert Counting.calls == 4  # 3 files once, the in-memory image every time
    assert np.array_equal(first, plain.encode_images(paths))
    assert np.array_equal(again[:2], first[[2, 0]]) and again[2, 0] == 30.0


def test_a_single_observation_has_no_interval_and_no_significance():
    """One image resamples to itself: no zero-width interval that would read as certainty."""
    from personalize.evaluation.bootstrap import diff_ci, mean_ci, significant

    assert mean_ci([[0.4]]) is None and mean_ci([[0.4]], over_groups=True) is None
    assert diff_ci([[0.5]], [[0.4]], paired=True) is None and significant(diff_ci([[0.5]], [[0.4]])) is None
    lo, hi = mean_ci([[0.4, 0.6]])
    assert lo < hi
    assert mean_ci([[0.4], [0.6]], over_groups=True)[0] < mean_ci([[0.4], [0.6]], over_groups=True)[1]
