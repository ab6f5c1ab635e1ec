"""The benchmark report: numbers, highlighting, Pareto fronts, self-contained HTML, Markdown, a real render."""
from __future__ import annotations

import itertools
import random
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from personalize.benchmark.report import image_grid, pareto_front, summarize, write_report

METHODS = {"perfusion": ["beta=0.7 lock=local", "beta=0.5 lock=global"], "residuals": ["default"],
           "textual-inversion": ["default"]}
CONCEPTS = [("split_triangle", "shape"), ("blue_ring", "shape"), ("teddy", "toy")]
PROMPTS = [("a {} on the left, on a green background", "concept"), ("a {} floating in space", "concept"),
           ("a red bicycle near the sea", "leakage")]
SEEDS = (0, 1)
MISSING = "images/residuals/default/teddy/p0-s0-0.png"
COLOURS = {"base": (150, 150, 150), "perfusion": (40, 110, 220), "residuals": (220, 70, 60),
           "textual-inversion": (60, 170, 90)}


# ------------------------------------------------------------------------------------------ fake benchmark


def _image(path: Path, method: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (48, 48), (235, 240, 230))
    ImageDraw.Draw(im).polygon([(6 + 4 * seed, 42), (24, 6), (42, 42)], fill=COLOURS[method])
    im.save(path)


def _common(rng: random.Random, method: str, concept: str, cls: str) -> dict:
    return {"status": "done", "method": method, "method_type": method, "concept": concept, "concept_class": cls,
            "peak_memory": rng.randint(1, 8) * 2 ** 30, "error": None,
            "provenance": {"git_sha": "0123456789abcdef", "base_fingerprint": "fp-tiny", "device": "cpu",
                           "host": "box"}}


def _settings(method: str) -> list[str]:
    return METHODS.get(method, ["default"])


def _score_result(rng: random.Random, method: str, backend: str) -> dict:
    if backend == "toy":
        if method == "base":
            return {"alignment": rng.uniform(0.5, 0.9)}
        return {"alignment": rng.uniform(0.2, 0.9), "fidelity": rng.uniform(0.2, 0.9),
                "leakage": rng.uniform(0.0, 0.3), "h": rng.uniform(0.2, 0.9)}
    if method == "base":
        return {"clip_text": rng.uniform(0.25, 0.3)}
    result = {"clip_text": rng.uniform(0.15, 0.3), "clip_image": rng.uniform(0.5, 0.9),
              "clip_text_norm": rng.uniform(0.6, 1.0), "dino_image": rng.uniform(0.3, 0.8),
              "leakage_dino": rng.uniform(0.5, 1.0), "h": rng.uniform(0.5, 0.9),
              "clip_image_sp": rng.uniform(0.5, 0.9), "clip_text_norm_sp": rng.uniform(0.6, 1.0)}
    if method == "textual-inversion":  # only some metrics
        del result["leakage_dino"]
        result["dino_image"] = None
    return result


def _rows(root: Path, backend: str) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for method, (concept, cls) in itertools.product(["base", *METHODS], CONCEPTS):
        if method != "base":
            rows.append({**_common(rng, method, concept, cls), "key": f"train/{method}/{concept}", "kind": "train",
                         "setting": {}, "setting_label": "default", "outputs": [f"concepts/{method}/{concept}.pt"],
                         "seconds": rng.uniform(10, 500), "result": {"file_bytes": rng.randint(2_000, 3_000_000),
                         "trainable_params": rng.randint(700, 2_000_000), "steps": 100}})
        for setting in _settings(method):
            rows += _generate_rows(rng, root, method, setting, concept, cls)
            rows.append({**_common(rng, method, concept, cls), "key": f"score/{method}/{setting}/{concept}",
                         "kind": "score", "setting": {}, "setting_label": setting, "seconds": 1.0,
                         "result": _score_result(rng, method, backend)})
    (root / MISSING).unlink()
    extra = [("failed", "RuntimeError: out of memory <oom>\nTraceback ..."), ("pending", None), ("pending", None),
             ("running", None)]
    for i, (status, error) in enumerate(extra):
        rows.append({**_common(rng, "residuals", "teddy", "toy"), "key": f"extra/{i}", "kind": "generate",
                     "status": status, "error": error, "setting": {}, "setting_label": "default", "outputs": []})
    return rows


def _generate_rows(rng, root: Path, method: str, setting: str, concept: str, cls: str) -> list[dict]:
    rows = []
    word = cls if method == "base" else f"<{concept}>"
    for (index, (template, purpose)), seed in itertools.product(enumerate(PROMPTS), SEEDS):
        outputs = [f"images/{method}/{setting.replace(' ', '_')}/{concept}/p{index}-s{seed}-{k}.png" for k in (0, 1)]
        for out in outputs:
            _image(root / out, method, seed)
        rows.append({**_common(rng, method, concept, cls), "key": f"gen/{method}/{setting}/{concept}/{index}/{seed}",
                     "kind": "generate", "setting": {}, "setting_label": setting, "prompt": template.format(word),
                     "prompt_index": index, "seed": seed, "purpose": purpose, "outputs": outputs,
                     "seconds": rng.uniform(1, 20)})
    return rows


@pytest.fixture(scope="module", params=["clip", "toy"])
def bench(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bench-{request.param}")
    rows = _rows(root, request.param)
    out = root / "report"
    index, md = write_report(rows, root, out, title="Bench <tok> & co")
    return {"backend": request.param, "rows": rows, "root": root, "out": out, "index": index, "md": md,
            "html": index.read_text(encoding="utf-8"), "markdown": md.read_text(encoding="utf-8")}


# ------------------------------------------------------------------------------------------ expectations


def _done(rows, kind):
    return [r for r in rows if r["status"] == "done" and r["kind"] == kind]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _expected_results(rows) -> dict:
    """(method, setting) -> key -> mean over concepts, computed directly from the rows."""
    scores = _done(rows, "score")
    keys = {k for r in scores for k in r["result"]}
    groups = {(r["method"], r["setting_label"]) for r in scores}
    return {g: {k: _mean([r["result"].get(k) for r in scores if (r["method"], r["setting_label"]) == g])
                for k in keys} for g in groups}


def _expected_cost(rows) -> dict:
    out = {}
    for method in {r["method"] for r in rows}:
        train = [r for r in _done(rows, "train") if r["method"] == method]
        gen = [r for r in _done(rows, "generate") if r["method"] == method]
        work = train + gen
        out[method] = {
            "train_seconds": _mean([r["seconds"] for r in train]),
            "file_bytes": _mean([r["result"]["file_bytes"] for r in train]),
            "trainable_params": _mean([r["result"]["trainable_params"] for r in train]),
            "seconds_per_image": sum(r["seconds"] for r in gen) / sum(len(r["outputs"]) for r in gen),
            "peak_memory": max(r["peak_memory"] for r in work),
        }
    return out


LOWER_IS_BETTER = {"leakage", "train_seconds", "file_bytes", "trainable_params", "seconds_per_image", "peak_memory"}


def _argbest(table: dict, key: str):
    cands = {name: v[key] for name, v in table.items() if name != "base" and name[0] != "base"
             and v.get(key) is not None}
    best = (min if key in LOWER_IS_BETTER else max)(cands.values())
    return {name for name, v in cands.items() if v == best}  # all of them on a tie


def _expected_best_h(rows, image_key, text_key) -> dict:
    """method -> (class -> chosen setting, mean H over classes), by brute force."""
    out = {}
    for method in METHODS:
        scores = [r for r in _done(rows, "score") if r["method"] == method]
        per_class, hs = {}, []
        for cls in sorted({r["concept_class"] for r in scores}):
            best = None
            for setting in METHODS[method]:
                mine = [r for r in scores if r["concept_class"] == cls and r["setting_label"] == setting]
                img = _mean([r["result"][image_key] for r in mine])
                txt = _mean([r["result"][text_key] for r in mine])
                h = 2 * img * txt / (img + txt)
                if best is None or h > best[1]:
                    best = (setting, h)
            per_class[cls] = best[0]
            hs.append(best[1])
        out[method] = (per_class, sum(hs) / len(hs))
    return out


# ------------------------------------------------------------------------------------------ html parsing


class _Tables(HTMLParser):
    """Every <table>: rows of cells as (text, attrs); plus every src attribute."""

    def __init__(self):
        super().__init__()
        self.tables, self.srcs, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", attrs]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append((self._cell[0], self._cell[1]))
            self._cell = None


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def _highlighted(table) -> dict:
    """data-key -> the leading text cells of the rows whose cell is highlighted."""
    out = {}
    for row in table[1:]:
        lead = tuple(text for text, attrs in row if "data-key" not in attrs)
        for _, attrs in row:
            if "best" in (attrs.get("class") or "").split():
                out.setdefault(attrs["data-key"], []).append(lead)
    return out


def _table_with(page: str, header: str):
    tables = _parse(page).tables
    return next(t for t in tables if header in [text for text, _ in t[0]])


# ------------------------------------------------------------------------------------------ tests


def test_pareto_front_matches_brute_force():
    rng = random.Random(3)
    for _ in range(300):
        points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(0, 12))]

        def dominated(p):
            return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)

        expected = {i for i, p in enumerate(points) if not dominated(p)}
        front = pareto_front(points)
        assert set(front) == expected and len(front) == len(expected)
        assert [points[i] for i in front] == sorted(points[i] for i in front)


def test_pareto_front_floats():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.95, 0.05)]
    front = pareto_front(points)
    assert sorted(front) == [0, 1, 3, 4, 5]
    assert [points[i] for i in front] == [(0.1, 0.9), (0.5, 0.5), (0.5, 0.5), (0.9, 0.1), (0.95, 0.05)]


def test_summary_numbers(bench):
    summary = summarize(bench["rows"])
    assert summary["counts"] == {"done": len(_done(bench["rows"], "score")) + len(_done(bench["rows"], "train"))
                                 + len(_done(bench["rows"], "generate")), "failed": 1, "pending": 2, "running": 1}
    expected = _expected_results(bench["rows"])
    got = {(r["method"], r["setting"]): r["values"] for r in summary["results"]["rows"]}
    assert set(got) == set(expected)
    for group, values in expected.items():
        for key, value in values.items():
            assert got[group][key] == pytest.approx(value) if value is not None else got[group][key] is None
    assert summary["results"]["rows"][0]["method"] == "base" and summary["results"]["rows"][0]["reference"]
    cost = {r["method"]: r["values"] for r in summary["cost"]["rows"]}
    for method, values in _expected_cost(bench["rows"]).items():
        for key, value in values.items():
            assert cost[method][key] == pytest.approx(value) if value is not None else cost[method][key] is None


def test_best_h_matches_brute_force(bench):
    keys = ("clip_image_sp", "clip_text_norm_sp") if bench["backend"] == "clip" else ("fidelity", "alignment")
    expected = _expected_best_h(bench["rows"], *keys)
    got = {r["method"]: r for r in summarize(bench["rows"])["best_h"]["rows"]}
    assert set(got) == set(METHODS)
    for method, (per_class, h) in expected.items():
        assert got[method]["per_class"] == per_class
        assert got[method]["values"]["h"] == pytest.approx(h)


def test_highlighted_cells_are_the_true_best(bench):
    page = bench["html"]
    results = _highlighted(_table_with(page, "concepts"))
    expected = _expected_results(bench["rows"])
    keys = {k for v in expected.values() for k, x in v.items() if x is not None}
    assert set(results) == keys
    for key in keys:
        assert {lead[:2] for lead in results[key]} == _argbest(expected, key), key
    if bench["backend"] == "toy":
        assert "leakage" in results  # a lower-is-better score column
    cost = _highlighted(_table_with(page, "trainable params ↓"))
    expected_cost = _expected_cost(bench["rows"])
    assert set(cost) == set(expected_cost["perfusion"])
    for key in cost:
        assert {lead[0] for lead in cost[key]} == _argbest(expected_cost, key), key
    assert len(cost["peak_memory"]) > 1  # a tie: every tied cell is highlighted


def test_base_is_reference_not_ranked(bench):
    table = _table_with(bench["html"], "concepts")
    base = [row for row in table[1:] if row[0][0] == "base"]
    assert len(base) == 1 and all("best" not in (a.get("class") or "") for _, a in base[0])


def test_html_is_self_contained_and_escaped(bench):
    page = bench["html"]
    parsed = _parse(page)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert parsed.srcs and all(s.startswith("data:image/png;base64,") for s in parsed.srcs)
    assert "url(" not in page and "<link" not in page
    for method in [*METHODS, "base"]:
        assert f">{method}<" in page
    for concept, cls in CONCEPTS:
        assert PROMPTS[0][0].format(f"&lt;{concept}&gt;") in page  # first concept prompt
        assert PROMPTS[0][0].format(cls) in page  # the base's prompt with the superclass word
        assert PROMPTS[1][0].format(f"&lt;{concept}&gt;") not in page  # bounded: 2 prompts per concept
    assert PROMPTS[2][0] in page  # the leakage prompt
    assert "<split_triangle>" not in page and "Bench &lt;tok&gt; &amp; co" in page
    assert "out of memory &lt;oom&gt;" in page


def test_grid_bounded_and_missing_image(bench):
    page = bench["html"]
    grid = _parse(page).tables[-2]  # the grid comes before the failed units
    assert [text for text, _ in grid[0]] == ["", "base (no concept)", *METHODS]
    assert len(grid) - 1 == 2 * len(CONCEPTS)
    assert page.count("image missing") == 1
    n_images = len(_parse(page).srcs)
    n_plots = 2 if bench["backend"] == "clip" else 1
    assert n_images == 2 * len(CONCEPTS) * (len(METHODS) + 1) - 1 + n_plots


def test_grid_uses_each_methods_best_h_setting(bench):
    keys = ("clip_image_sp", "clip_text_norm_sp") if bench["backend"] == "clip" else ("fidelity", "alignment")
    choice = {m: per_class for m, (per_class, _) in _expected_best_h(bench["rows"], *keys).items()}
    grid = image_grid([r for r in bench["rows"] if r["status"] == "done"], choice)
    assert grid["methods"] == ["base", *METHODS]
    for row in grid["rows"]:
        assert [c["method"] for c in row["cells"]] == grid["methods"]
        for cell in row["cells"][1:]:
            setting = choice[cell["method"]][row["concept_class"]]
            assert cell["setting"] == setting
            assert cell["path"].startswith(f"images/{cell['method']}/{setting.replace(' ', '_')}/{row['concept']}/")
            assert cell["path"].endswith("-s0-0.png")
        assert row["cells"][0]["path"].startswith(f"images/base/default/{row['concept']}/")
    assert [(r["purpose"], r["prompt"]) for r in grid["rows"][:2]] == [
        ("concept", PROMPTS[0][0].format("<split_triangle>")), ("leakage", PROMPTS[2][0])]


def test_markdown_tables_bold_best_and_links(bench):
    md, out = bench["markdown"], bench["out"]
    expected = _expected_results(bench["rows"])
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "concepts" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    key, label = ("clip_image", "CLIP-I ↑") if bench["backend"] == "clip" else ("leakage", "leakage ↓")
    column = cols.index(label)
    best = _argbest(expected, key)
    assert len(best) == 1
    body = lines[lines.index(header) + 2: lines.index(header) + 2 + len(expected)]
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        is_best = (cells[0], cells[1]) in best
        assert cells[column].startswith("**") == is_best, line
    assert any(line.startswith("| base (reference) |") for line in body)
    plots = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", md)
    assert len(plots) == (2 if bench["backend"] == "clip" else 1)
    for plot in plots:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    links = re.findall(r"\]\(([^)]+\.png)\)( \(missing\))?", md)
    assert links
    for target, missing in links:
        if not target.startswith("plots/"):
            assert (out / urllib.parse.unquote(target)).is_file() != bool(missing), target
    assert sum(1 for _, m in links if m) == 1
    assert r"\<split_triangle\>" in md
    assert not list(out.rglob("*.tmp"))


def test_no_score_rows(tmp_path):
    rows = [r for r in _rows(tmp_path, "clip") if r["kind"] != "score"]
    index, md = write_report(rows, tmp_path, tmp_path / "out")
    page = index.read_text()
    assert "No score rows yet" in page and "No score rows yet" in md.read_text()
    assert not (tmp_path / "out" / "plots").exists()
    assert "Cost per method" in page and "base (no concept)" in page
    index, md = write_report([], tmp_path, tmp_path / "empty")
    assert "No generated images yet" in index.read_text()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium")
def test_chromium_renders_the_page(bench, tmp_path):
    if bench["backend"] != "clip":
        pytest.skip("one render is enough")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           bench["index"].resolve().as_uri()]
    subprocess.run(cmd, timeout=60, capture_output=True, check=False)
    assert shot.is_file()
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 2000)
        colours = im.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # not a blank page


def test_method_styles_distinct():
    from personalize.benchmark.report import _method_styles

    styles = _method_styles(["perfusion", "perfusion", "base", "residuals", "residuals", "textual-inversion"])
    colours = [styles[m][0] for m in ("perfusion", "residuals", "textual-inversion", "base")]
    assert len(set(colours)) == 4
