"""The web app in a real browser (the system Chromium through Playwright for Python): on the toy base, a bad
upload refused with its one-line message, five photos uploaded and trained for a few dozen steps with progress
and a sample shown, then two concepts composed and a knob slider moved, which changes the image.

Screenshots go to ``$PERSONALIZE_UI_SHOTS`` (default: the test's tmp folder); look at them after a change to the
page. Skipped, with the reason, where Chromium, Playwright or gradio is missing (``make test`` installs the
Python packages; Chromium comes from the OS packages, as for tests/test_report.py)."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio's first import, as personalize.ui.app does
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium (install it from the OS packages)")]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[dev]'")
pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[dev]'")

TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from personalize.datasets.toyworld.concepts import render_concept_examples
    from personalize.ui.app import launch
    from personalize.ui.studio import Studio

    work = tmp_path_factory.mktemp("ui")
    shots = Path(os.environ.get("PERSONALIZE_UI_SHOTS") or work / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    tri = render_concept_examples("split_triangle", work / "tri", captions=False)
    square = render_concept_examples("dotted_square", work / "square", captions=False)
    bad = work / "bad" / "holiday.png"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a PNG at all")
    studio = Studio(work / "app", base="toy", device="cpu")
    # the second concept of the composition, queued first through the API on the device's one worker: the
    # browser's run waits for it (one job at a time), as a second tab's would
    other = studio.train(square, "<sq>", "square", settings={"steps": 8, "batch_size": 2, "validation_every": 0})
    demo, url = launch(studio, port=_free_port(), block=False)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#photos")
        yield {"page": page, "studio": studio, "tri": tri, "bad": bad, "shots": shots, "other": other, "url": url}
        browser.close()
    demo.close()


def _upload(page, files) -> None:
    page.locator("#photos input[type=file]").set_input_files([str(f) for f in files])
    page.wait_for_function("n => document.querySelectorAll('#photos .file-preview tr, #photos table tr').length >= n",
                           arg=1)


def test_server_is_local_only_and_serves_only_the_app_folder(app):
    url, studio = app["url"], app["studio"]
    assert url.startswith("http://127.0.0.1:")
    assert "personalize" in urllib.request.urlopen(url).read().decode()
    report = studio.folder / "reports" / "bench" / "index.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html>a benchmark report</html>")
    assert studio.reports() == [report]
    assert urllib.request.urlopen(f"{url}gradio_api/file={report}").read() == report.read_bytes()
    for outside in ("/etc/passwd", str(studio.folder.parent / "bad" / "holiday.png")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}gradio_api/file={outside}")
        assert err.value.code == 403


def test_bad_upload_is_refused_with_the_one_line_message(app):
    page, studio = app["page"], app["studio"]
    _upload(page, [app["bad"], *app["tri"][:2]])
    page.fill("#token textarea, #token input", "<bad>")
    page.fill("#superclass textarea, #superclass input", "triangle")
    page.click("#train-btn")
    message = page.locator("#train-msg .ui-error")
    message.wait_for()
    text = message.inner_text()
    assert text == ("error: 'holiday.png' is not a readable image (UnidentifiedImageError); upload PNG, JPEG, "
                    "WEBP, BMP, GIF, TIFF photos")
    assert "\n" not in text and "Traceback" not in page.content()
    assert not (studio.folder / "runs" / "bad").exists()  # nothing stored
    page.screenshot(path=str(app["shots"] / "bad-upload.png"), full_page=True)
    page.locator("#photos button[aria-label='Clear']").first.click()


def test_upload_five_photos_train_and_watch(app):
    page = app["page"]
    _upload(page, app["tri"])
    assert len(app["tri"]) == 5
    page.fill("#token textarea, #token input", "<tri>")
    page.fill("#superclass textarea, #superclass input", "triangle")
    page.fill("#settings textarea", "steps=24\nbatch_size=2\nvalidation_every=24")
    page.click("#train-btn")
    page.wait_for_selector("#train-progress[data-state=running], #train-progress[data-state=done]")
    page.wait_for_selector("#train-progress[data-state=done]")
    assert "step 24 / 24" in page.inner_text("#train-progress")
    page.wait_for_selector("#train-samples img")
    assert app["other"].state == "done", app["other"].message  # the API's run, queued first, finished first
    page.screenshot(path=str(app["shots"] / "train.png"), full_page=True)
    assert (app["studio"].folder / "concepts" / "tri.safetensors").is_file()


def _pick(page, slot: int, name: str) -> None:
    page.locator(f"#concept-{slot} input").click()
    page.locator(f"#concept-{slot} li[role=option][aria-label='{name}']").click()


def _image_digest(page) -> str:
    src = page.locator("#gen-images img").first.get_attribute("src")
    return hashlib.sha256(urllib.request.urlopen(src).read()).hexdigest()


def test_generate_compose_and_move_a_slider(app):
    page, studio = app["page"], app["studio"]
    page.get_by_role("tab", name="Generate").click()
    page.click("#refresh-library")
    _pick(page, 0, "tri")
    page.wait_for_selector("#knob-0-beta", state="visible")
    _pick(page, 1, "sq")
    page.wait_for_selector("#knob-1-beta", state="visible")
    page.fill("#prompt textarea, #prompt input", "a <tri> on the left and a <sq> on the right, on a white background")
    page.click("#generate-btn")
    page.wait_for_selector("#gen-images img")
    page.wait_for_function("() => (document.querySelector('#gen-msg .ui-info') || {}).innerText?.includes('tri: beta=')")
    first = _image_digest(page)
    assert studio.attach_count == 1
    page.screenshot(path=str(app["shots"] / "compose.png"), full_page=True)
    before = page.inner_text("#gen-msg .ui-info")
    # the first concept's beta slider, dragged towards its right end: the page generates again on release
    box = page.locator("#knob-0-beta input[type=range]").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.97, box["y"] + box["height"] / 2)
    page.wait_for_function("b => { const m = document.querySelector('#gen-msg .ui-info, #gen-msg .ui-error'); "
                           "return m && m.innerText !== b; }", arg=before)
    after = page.inner_text("#gen-msg")
    assert "tri: beta=0.9" in after, after
    second = _image_digest(page)
    assert first != second, (before, after)
    assert studio.attach_count == 1  # the knob went through handle.set(), no re-attach
    page.screenshot(path=str(app["shots"] / "slider.png"), full_page=True)


def test_compare_grid_with_toy_world_scores(app):
    page = app["page"]
    page.get_by_role("tab", name="Compare").click()
    for name in ("tri", "sq"):
        page.locator("#compare-concepts input").click()
        page.locator(f"#compare-concepts li[role=option][aria-label='{name}']").click()
    page.locator("#compare-knob input").click()
    page.locator("#compare-knob li[role=option][aria-label='beta']").click()
    page.fill("#compare-values textarea, #compare-values input", "0.6, 0.9")
    page.locator("#compare-toy input").click()
    page.locator("#compare-toy li[role=option][aria-label='split_triangle']").click()
    page.click("#compare-btn")
    page.wait_for_selector("#compare-grid img")
    page.wait_for_function("() => (document.querySelector('#compare-msg .ui-info') || {}).innerText?.includes('4 image')")
    table = page.inner_text("#compare-scores")
    assert table.count("tri") == 2 and table.count("sq") == 2 and "0.9" in table
    page.screenshot(path=str(app["shots"] / "compare.png"), full_page=True)
