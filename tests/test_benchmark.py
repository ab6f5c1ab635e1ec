"""The benchmark runner: spec checks, the plan, resumable rows, kill -9, two processes, failures."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from personalize.benchmark.db import BenchmarkDB
from personalize.benchmark.plan import build_plan
from personalize.benchmark.runner import run_benchmark
from personalize.benchmark.spec import parse_spec
from personalize.cli import main
from personalize.errors import BadInputError

# the smallest toy-world benchmark that still has every kind of row: 1 concept, 2 settings, 1 prompt, 2 seeds
SPEC = {
    "name": "unit",
    "base": "toy",
    "device": "cpu",
    "evaluator": {"backend": "toyworld"},
    "concepts": [{"toyworld": ["split_triangle"]}],
    "prompts": ["a {} on the left, on a green background"],
    "leakage_prompts": ["a white triangle on the right, on a blue background"],
    "seeds": [0, 1],
    "sampler": {"steps": 2, "guidance": 4.0},
    "methods": [{"method": "perfusion", "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1},
                 "sweep": {"beta": [0.6, 0.9]}}],
}
N_ROWS = 2 + 2 + 1 + 1 + 2 * (2 + 2) + 2  # base leakage, base prompts, base score, train, generate, score


def write_spec(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def table(db_path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(str(db_path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def images_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file()}


def expected_images(db_path: Path) -> set[str]:
    return {o for (outs,) in table(db_path, "SELECT outputs FROM units WHERE kind='generate'") for o in json.loads(outs)}


# ----------------------------------------------------------------------------- spec
@pytest.mark.parametrize("change, message", [
    ({"seedz": [0]}, "unknown key(s) seedz"),
    ({"evaluator": {"backend": "clip", "clip_weight": "x"}}, "evaluator: unknown key(s) clip_weight"),
    ({"methods": [{"method": "perfusion", "sweep": {"betta": [0.5]}}]}, "no inference knob 'betta'"),
    ({"methods": [{"method": "perfusion", "train": {"stepz": 3}}]}, "unknown setting(s) stepz"),
    ({"methods": [{"method": "perfuson"}]}, "did you mean"),
    ({"methods": [{"method": "perfusion"}, {"method": "perfusion"}]}, "labels repeat"),
    ({"concepts": [{"toyworld": ["no_such_concept"]}]}, "unknown toy-world concept"),
    ({"concepts": [{"folder": "photos"}]}, "needs 'superclass'"),
    ({"prompts": ["a photo of a dog"]}, "has no {} slot"),
    ({"leakage_prompts": ["a {} at the top"]}, "must not mention the concept"),
    ({"seeds": [0, 0]}, "repeat a seed"),
    ({"sampler": {"steps": 0}}, "sampler.steps must be a whole number"),
])
def test_bad_specs_are_refused_with_one_line(tmp_path, change, message):
    with pytest.raises(BadInputError) as info:
        parse_spec({**SPEC, **change}, root=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_cli_reports_rows_or_fails_in_one_line(tmp_path, capsys):
    good = write_spec(tmp_path / "good")
    main(["benchmark", "validate", str(good)])
    assert f"({N_ROWS} in all)" in capsys.readouterr().out
    bad = write_spec(tmp_path / "bad", colour="red")
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "validate", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key(s) colour" in err and len(err.splitlines()) == 1


def test_plan_rows_keys_and_dependencies(tmp_path):
    units = build_plan(parse_spec(SPEC, root=tmp_path))
    assert len(units) == N_ROWS == len({u.key for u in units})
    by_key = {u.key: u for u in units}
    for u in units:
        assert all(d in by_key for d in u.deps)
    score = by_key["score/perfusion/split_triangle/beta=0.9"]
    kinds = sorted(by_key[d].kind + ":" + by_key[d].method for d in score.deps)
    # its 4 generate rows (2 prompt x seed + 2 leakage), the base's score and the 2 base leakage images
    assert kinds == ["generate:base"] * 2 + ["generate:perfusion"] * 4 + ["score:base"]
    gen = by_key["generate/perfusion/split_triangle/beta=0.9/p0_s1"]
    assert gen.deps == ["train/perfusion/split_triangle"] and gen.setting == {"beta": 0.9}
    assert gen.prompt == "a <tok> on the left, on a green background" and gen.seed == 1
    base = by_key["generate/base/split_triangle/default/p0_s1"]
    assert base.prompt == "a triangle on the left, on a green background"  # the superclass in the slot
    positions = {u.key: i for i, u in enumerate(units)}
    assert all(positions[d] < positions[u.key] for u in units for d in u.deps)


# ----------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    spec = parse_spec(SPEC, root=root)
    summary = run_benchmark(spec, root / "out", progress=False)
    return spec, root / "out", summary


def test_run_fills_every_row_with_results_and_provenance(finished_run):
    _, out, summary = finished_run
    assert summary.counts["done"] == summary.counts["total"] == N_ROWS and summary.ran == N_ROWS
    db = BenchmarkDB(out / "benchmark.sqlite", create=False)
    rows = {r["key"]: r for r in db.rows()}
    db.close()
    for r in rows.values():
        assert r["status"] == "done" and r["attempts"] == 1 and r["seconds"] > 0 and r["peak_memory"] > 10 * 2**20
        prov = r["provenance"]
        assert prov["versions"]["torch"] and prov["device"] == "cpu" and len(prov["base_fingerprint"]) == 16
        assert "git_sha" in prov
    train = rows["train/perfusion/split_triangle"]
    concept_file = out / train["outputs"][0]
    assert train["result"]["file_bytes"] == concept_file.stat().st_size
    assert train["result"]["trainable_params"] > 0 and train["result"]["steps"] == 2
    assert not concept_file.with_name(concept_file.name + ".ckpt").exists()  # checkpoints removed when done
    # Perfusion's default masks=auto: a toy concept trains with the renderer's exact masks, no segmenter needed
    from personalize import load_concept

    assert load_concept(concept_file).header["provenance"]["masks"] == "folder"
    assert sorted(p.name for p in (out / "data" / "split_triangle" / "masks").iterdir()) == \
        sorted(p.name for p in (out / "data" / "split_triangle" / "photos").glob("*.png"))
    assert images_under(out) == expected_images(out / "benchmark.sqlite")
    for label in ("beta=0.6", "beta=0.9"):
        res = rows[f"score/perfusion/split_triangle/{label}"]["result"]
        assert 0 <= res["alignment"] <= 1 and 0 <= res["fidelity"] <= 1 and res["leakage"] >= 0
        base = rows["score/base/split_triangle/default"]["result"]
        assert res["alignment_norm"] == pytest.approx(res["alignment"] / base["alignment"])


def test_scores_equal_the_toy_measurers_on_the_same_files(finished_run):
    from personalize.datasets.toyworld.measure import score_folder
    from personalize.evaluation import harmonic_mean

    _, out, _ = finished_run
    db = BenchmarkDB(out / "benchmark.sqlite", create=False)
    rows = db.rows()
    db.close()
    gens = [r for r in rows if r["key"].startswith("generate/perfusion/split_triangle/beta=0.6/p")]
    folder = out / Path(gens[0]["outputs"][0]).parent
    direct = score_folder(folder, prompts={Path(o).stem: r["prompt"] for r in gens for o in r["outputs"]},
                          concept="split_triangle", placeholder="<tok>")
    res = next(r for r in rows if r["key"] == "score/perfusion/split_triangle/beta=0.6")["result"]
    assert res["fidelity"] == pytest.approx(direct["fidelity"]) and res["alignment"] == pytest.approx(direct["alignment"])
    assert res["h"] == pytest.approx(harmonic_mean(direct["fidelity"], direct["alignment"]))


def test_rerun_skips_finished_rows(finished_run):
    spec, out, _ = finished_run
    before = table(out / "benchmark.sqlite", "SELECT key, finished, attempts FROM units ORDER BY key")
    again = run_benchmark(spec, out, progress=False)
    assert again.ran == 0
    assert table(out / "benchmark.sqlite", "SELECT key, finished, attempts FROM units ORDER BY key") == before


def test_a_changed_spec_is_refused_not_mixed_in(finished_run):
    spec, out, _ = finished_run
    changed = parse_spec({**SPEC, "sampler": {"steps": 3, "guidance": 4.0}}, root=spec.root)
    with pytest.raises(BadInputError, match="other settings"):
        run_benchmark(changed, out, progress=False)


def test_a_failed_row_is_recorded_blocks_its_dependents_and_is_retried(tmp_path, monkeypatch):
    from personalize.benchmark import work

    spec = parse_spec(SPEC, root=tmp_path)
    real = work.Worker.generate
    victim = "generate/perfusion/split_triangle/beta=0.6/l0_s0"

    def flaky(self, row):
        if row["key"] == victim:
            raise RuntimeError("out of memory (simulated)")
        return real(self, row)

    monkeypatch.setattr(work.Worker, "generate", flaky)
    first = run_benchmark(spec, tmp_path / "out", progress=False)
    assert first.counts["failed"] == 1 and first.failures[0][0] == victim
    assert "out of memory (simulated)" in first.failures[0][1]
    status = dict(table(tmp_path / "out" / "benchmark.sqlite", "SELECT key, status FROM units"))
    assert status["score/perfusion/split_triangle/beta=0.6"] == "pending"  # blocked, not run on missing images
    assert status["score/perfusion/split_triangle/beta=0.9"] == "done"
    monkeypatch.setattr(work.Worker, "generate", real)
    second = run_benchmark(spec, tmp_path / "out", progress=False)
    assert second.ran == 2 and second.counts["done"] == N_ROWS  # the failed row and the score it blocked


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "personalize.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_kill_9_at_any_moment_loses_nothing_finished_and_duplicates_nothing(tmp_path):
    spec_path = write_spec(tmp_path)
    out = tmp_path / "out"
    db_path = out / "benchmark.sqlite"
    proc = _cli("benchmark", "run", str(spec_path), "--out", str(out), "--no-progress")
    deadline = time.time() + 300
    done: list = []
    while time.time() < deadline and proc.poll() is None:
        try:
            done = table(db_path, "SELECT key, finished FROM units WHERE status='done'") if db_path.exists() else []
        except sqlite3.OperationalError:  # the file exists but its tables are still being created
            done = []
        if len(done) >= 7:  # past training, in the middle of sampling
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + (proc.stdout.read() or "")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = dict(table(db_path, "SELECT key, finished FROM units WHERE status='done'"))
    assert len(before) >= len(done) and len(before) < N_ROWS

    spec = parse_spec(SPEC, root=tmp_path)
    summary = run_benchmark(spec, out, progress=False)
    assert summary.counts["done"] == N_ROWS
    after = dict(table(db_path, "SELECT key, finished FROM units"))
    assert all(after[k] == t for k, t in before.items())  # nothing finished was redone
    attempts = dict(table(db_path, "SELECT key, attempts FROM units"))
    assert sum(attempts.values()) <= N_ROWS + 1  # at most the row in flight at the kill ran twice
    assert summary.ran == N_ROWS - len(before)
    assert images_under(out) == expected_images(db_path)  # no duplicates, no partial files


def test_two_processes_split_rows_without_overlap(tmp_path):
    """The command `benchmark run --help` gives for N processes (torchrun; on a CPU it starts CPU processes)."""
    spec_path = write_spec(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "personalize.cli", "benchmark", "run", str(spec_path), "--out", str(out), "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    db_path = out / "benchmark.sqlite"
    assert result.returncode == 0, _launch_failure(result, db_path)
    rows = table(db_path, "SELECT key, status, attempts, worker FROM units")
    assert len(rows) == N_ROWS and all(status == "done" and attempts == 1 for _, status, attempts, _ in rows)
    ranks = dict(table(db_path, "SELECT id, rank FROM workers"))
    workers_used = {w for *_, w in rows}
    assert {ranks[w] for w in workers_used} == {0, 1}  # both processes did work, no row twice
    assert images_under(out) == expected_images(db_path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_failure(result, db_path: Path) -> str:
    """What a failed launch says: the failed rows and each rank's own traceback (the launcher's comes last)."""
    failed = table(db_path, "SELECT key, error FROM units WHERE status='failed'") if db_path.exists() else []
    own = [part for part in result.stderr.split("Traceback (most recent call last)") if "personalize" in part]
    return f"failed rows: {failed}\nstdout: {result.stdout[-1500:]}\nrank tracebacks: {[p[-1500:] for p in own]}"


def test_report_cli_on_a_real_run(finished_run, tmp_path):
    _, out, _ = finished_run
    main(["benchmark", "report", str(out / "benchmark.sqlite"), "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "perfusion" in page and "beta=0.9" in page and "not generated" not in page  # base leakage cell found
    assert page.count("data:image/png;base64") >= 1 + 2 * 2  # a plot and the grid's images
    assert "fidelity" in (tmp_path / "report" / "report.md").read_text()


def test_status_cli_and_missing_database(finished_run, tmp_path, capsys):
    _, out, _ = finished_run
    main(["benchmark", "status", str(out / "benchmark.sqlite")])
    assert f"{N_ROWS}/{N_ROWS} done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "report", str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "r")])
    assert info.value.code == 2 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["status", "report"])
def test_a_file_that_is_not_a_benchmark_database_is_one_line(tmp_path, capsys, command):
    junk, other = tmp_path / "junk.sqlite", tmp_path / "other.sqlite"
    junk.write_text("not sqlite at all")
    sqlite3.connect(str(other)).execute("CREATE TABLE t (a)")
    for path in (junk, other):
        extra = ["--out", str(tmp_path / "r")] if command == "report" else []
        with pytest.raises(SystemExit) as info:
            main(["benchmark", command, str(path), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "not a benchmark database" in err and "Traceback" not in err
        assert not (tmp_path / "r").exists()


def test_clip_backend_scores_match_an_independent_computation(tmp_path, clip_weights_file, dino_weights_file):
    """CLIP/DINO backend (random weights from files, passed like --clip-weights): normalisation, H, leakage."""
    import numpy as np

    from personalize.evaluation import ClipEncoder, DinoEncoder, harmonic_mean

    spec = parse_spec({**SPEC, "seeds": [0], "evaluator": {"backend": "clip", "clip_weights": str(clip_weights_file),
                                                           "dino_weights": str(dino_weights_file)},
                       "methods": [{"method": "perfusion", "train": {"steps": 1, "batch_size": 1, "masks": "none"}}]}, root=tmp_path)
    summary = run_benchmark(spec, tmp_path / "out", progress=False)
    assert summary.counts["done"] == summary.counts["total"]
    db = BenchmarkDB(tmp_path / "out" / "benchmark.sqlite", create=False)
    rows = {r["key"]: r for r in db.rows()}
    db.close()
    res, base = rows["score/perfusion/split_triangle/default"]["result"], rows["score/base/split_triangle/default"]["result"]
    if base["clip_text"] > 0:  # random CLIP weights may put every text on the clipped side of zero
        assert res["clip_text_norm"] == pytest.approx(res["clip_text"] / base["clip_text"])
    else:
        assert res["clip_text_norm"] is None
    text = res["clip_text_norm"] if res["clip_text_norm"] is not None else res["clip_text"]
    assert res["h"] == pytest.approx(harmonic_mean(res["clip_image"], text))
    out = tmp_path / "out"
    with_c = out / rows["generate/perfusion/split_triangle/default/l0_s0"]["outputs"][0]
    without = out / rows["generate/base/_leakage/default/l0_s0"]["outputs"][0]
    dino = DinoEncoder(weights=dino_weights_file)
    a, b = dino.encode_images([with_c]), dino.encode_images([without])
    assert res["leakage_dino"] == pytest.approx(float(np.sum(a * b)), abs=1e-5)
    clip = ClipEncoder(weights=clip_weights_file)
    photos = sorted((out / "data" / "split_triangle" / "photos").glob("*.png"))
    gen = out / rows["generate/perfusion/split_triangle/default/p0_s0"]["outputs"][0]
    expected = float((clip.encode_images([gen]) @ clip.encode_images(photos).T).mean())
    assert res["clip_image"] == pytest.approx(expected, abs=1e-5)
    text = clip.encode_texts(["a on the left, on a green background"])  # the prompt without <tok>
    cos = float(clip.encode_images([gen])[0] @ text[0])
    assert res["clip_text"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)


def test_example_specs_parse_and_the_toy_one_plans():
    from personalize.benchmark.spec import load_spec

    examples = Path(__file__).resolve().parents[1] / "examples"
    cc101 = load_spec(examples / "cc101_benchmark.yaml")
    assert [m.label for m in cc101.methods][:2] == ["perfusion", "residuals"] and len(cc101.methods[0].settings()) == 6
    toy = load_spec(examples / "toy_benchmark.yaml")
    units = build_plan(toy)
    concepts, trainings = 4, 4  # perfusion (local), perfusion-trained-k, residuals, textual-inversion
    settings = 4 + 3 + 2 + 1
    per_setting = 7 * 4 + 4 * 4  # 7 claim prompts and 4 leakage prompts, 4 seeds each
    base = concepts * (7 * 4 + 1) + 4 * 4  # each concept's superclass prompts + score; shared leakage prompts
    assert len(units) == concepts * trainings + concepts * settings * (per_setting + 1) + base


def test_cc101_and_folder_sources_plan_with_their_prompts_tokens_and_classes(cc101, tmp_path):
    from conftest import make_photos

    make_photos(tmp_path / "teddy")
    no_prompts = {k: v for k, v in SPEC.items() if k != "prompts"}  # each source brings its own prompts
    methods = SPEC["methods"] + [{"method": "residuals", "train": {"steps": 2}}]
    spec = parse_spec({**no_prompts, "evaluator": {"backend": "clip"}, "methods": methods, "concepts": [
        {"cc101": str(cc101), "names": ["scene_barn"]},
        {"folder": str(tmp_path / "teddy"), "superclass": "teddy", "token": "<ted>", "prompts": ["a {} at sea"]}]},
        root=tmp_path)
    units = build_plan(spec)
    gens = {u.key: u for u in units if u.kind == "generate"}

    def barn(method, setting):
        return [p for _, p in sorted((u.prompt_index, u.prompt) for u in gens.values()
                                     if u.method == method and u.concept == "scene_barn" and u.seed == 0
                                     and u.purpose == "concept" and u.setting == setting)]

    # each method as it trained: Perfusion's word in place of the class word, Residuals' V* before it
    assert barn("perfusion", {"beta": 0.6}) == ["<new1> in snowy ice.", "photo of a <new1> at night",
                                                "<new1> with a river"]
    assert barn("residuals", {}) == ["<new1> barn in snowy ice.", "photo of a <new1> barn at night",
                                     "<new1> barn with a river"]
    assert gens["generate/base/scene_barn/default/p1_s0"].prompt == "photo of a barn at night"
    assert gens["generate/perfusion/teddy/beta=0.6/p0_s0"].prompt == "a <ted> at sea"
    assert gens["generate/residuals/teddy/default/p0_s0"].prompt == "a <ted> teddy at sea"
    protocols = {(u.method, u.concept): u.payload["protocol"] for u in units if u.kind == "score" and u.method != "base"}
    assert protocols["perfusion", "scene_barn"] == {"prompting": "word", "subject": "<new1>", "selection": "last step",
                                                    "sampler": spec.sampler, "comparability": None}
    assert spec.sampler["scheduler"] == "ddim"  # pinned: the spec names none, so the benchmarks' DDIM
    assert protocols["residuals", "teddy"]["prompting"] == "modifier"
    assert protocols["residuals", "teddy"]["subject"] == "<ted> teddy"
    classes = {u.concept: u.concept_class for u in units if u.kind == "train"}
    assert classes == {"scene_barn": "scene", "teddy": "teddy"}
    leak = [u.prompt for u in units if u.method == "base" and u.purpose == "leakage" and u.seed == 0]
    assert len(leak) == 1  # the spec's own leakage prompt, shared by both concepts
    with pytest.raises(BadInputError, match="no concept named 'scene_nope'"):
        build_plan(parse_spec({**SPEC, "evaluator": {"backend": "clip"},
                               "concepts": [{"cc101": str(cc101), "names": ["scene_nope"]}]}, root=tmp_path))
    with pytest.raises(BadInputError, match="scores toy-world concepts only"):
        parse_spec({**SPEC, "concepts": [{"cc101": str(cc101)}]}, root=tmp_path)
