"""The web app's handlers (``personalize/ui``) called as plain Python on the toy base: uploads bounded and stored
under app-made names, the CLI's settings checks and messages, one job at a time per device, cancel and resume,
knobs through ``handle.set()`` equal to a fresh attach, the gallery's settings beside each image, the compare
grid's toy-world scores, and ``personalize ui``'s own refusals. The page itself: tests/test_ui_browser.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from personalize.errors import BadInputError
from personalize.ui.uploads import Limits, store_photos

from cli_capture import run


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from personalize.datasets.toyworld.concepts import render_concept_examples

    work = tmp_path_factory.mktemp("photos")
    return {"tri": render_concept_examples("split_triangle", work / "tri"),
            "sq": render_concept_examples("dotted_square", work / "sq", captions=False), "work": work}


def _wait(job, timeout: float = 300.0):
    end = time.time() + timeout
    while not job.finished and time.time() < end:
        time.sleep(0.05)
    assert job.finished, job.state
    return job


@pytest.fixture(scope="module")
def studio(tmp_path_factory, photos):
    from personalize.ui.studio import Studio

    s = Studio(tmp_path_factory.mktemp("app"), base="toy", device="cpu")
    first = s.train(photos["tri"], "<tri>", "triangle", settings="steps=6\nbatch_size=2\nvalidation_every=3")
    second = s.train(photos["sq"], "<sq>", "square", settings={"steps": 4, "batch_size": 2, "validation_every": 0})
    assert second.state == "queued"  # one job at a time on the device: it waits for the first
    _wait(first)
    _wait(second)
    assert (first.state, second.state) == ("done", "done"), (first.message, second.message)
    assert second.started >= first.started
    s.first = first
    yield s
    s.close()


# ------------------------------------------------------------------------------------------------- uploads
def _refused(files, tmp_path, masks=(), limits=Limits()) -> str:
    dest = tmp_path / "run"
    with pytest.raises(BadInputError) as err:
        store_photos(files, dest, masks, limits)
    assert not dest.exists() and not list(tmp_path.glob(".run*"))  # nothing stored, no temp left
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) not in message  # one line naming the upload, not a server path
    return message


def test_uploads_are_bounded_and_checked(photos, tmp_path):
    tri = photos["tri"]
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"not an image")
    assert _refused([*tri, fake], tmp_path) == ("'holiday.png' is not a readable image (UnidentifiedImageError); "
                                                "upload PNG, JPEG, WEBP, BMP, GIF, TIFF photos")
    assert _refused(tri, tmp_path, limits=Limits(max_photos=4)) == "5 photos uploaded; upload at most 4"
    assert _refused(tri, tmp_path, limits=Limits(max_bytes=100)).startswith("'split_triangle_00.png' is 0.0 MB, over")
    assert _refused(tri, tmp_path, limits=Limits(max_pixels=1000)) == (
        "'split_triangle_00.png' is 32x32 = 1,024 pixels, over the 1,000 an uploaded image may have; downscale it")
    assert _refused(tri, tmp_path, limits=Limits(max_total_bytes=1000)).startswith("the upload is 0 MB, over")
    ico = tmp_path / "icon.ico"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(ico)
    assert _refused([ico], tmp_path) == "'icon.ico' is a ICO image; upload PNG, JPEG, WEBP, BMP, GIF, TIFF"
    assert _refused([], tmp_path).startswith("no photos uploaded")
    stray = tmp_path / "other.txt"
    stray.write_text("a {} on the sand")
    assert _refused([*tri, stray], tmp_path).startswith("caption 'other.txt' has no photo named 'other.*'")
    assert _refused(tri, tmp_path, masks=[tri[0]]).startswith("4 photo(s) have no mask")


def test_uploads_are_stored_under_app_made_names(photos, tmp_path):
    odd = tmp_path / "..\u202e evil name;rm -rf.png"  # whatever the browser calls it, the app names it
    odd.write_bytes(photos["tri"][0].read_bytes())
    caption = tmp_path / "..\u202e evil name;rm -rf.txt"
    caption.write_text("a {} on a red background")
    stored = store_photos([odd, caption, photos["tri"][1]], tmp_path / "run", masks=[odd, photos["tri"][1]])
    assert [p.name for p in stored] == ["00.png", "01.png"]
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["00.png", "00.png", "00.txt", "01.png",
                                                                     "01.png", "masks", "photos"]
    assert (tmp_path / "run" / "photos" / "00.txt").read_text() == "a {} on a red background"
    assert (tmp_path / "run" / "photos" / "00.png").read_bytes() == odd.read_bytes()


# ------------------------------------------------------------------------------------------------ training
def test_training_ran_watched_and_wrote_the_library(studio):
    status = studio.status(studio.first)
    assert [s for s, _ in status["losses"]] == list(range(1, 7))
    assert all(np.isfinite(loss) for _, loss in status["losses"])
    assert [p.parent.name for p in status["samples"]] == ["step-000003", "step-000006"]
    library = {c["name"]: c for c in studio.library()}
    assert set(library) == {"tri", "sq"}
    assert (library["tri"]["method"], library["tri"]["token"], library["tri"]["base"]) == ("perfusion", "<tri>", "toy")
    knobs = {k.name: k for k in library["tri"]["knobs"]}
    assert set(knobs) == {"beta", "tau", "gate", "lock"}
    assert knobs["beta"].value == 0.7 and knobs["tau"].value == 0.15  # the concept's own inference defaults
    record = json.loads((studio.folder / "runs" / "tri" / "run.json").read_text())
    assert record["masks"] == "none" and record["settings"]["steps"] == 6


def test_training_settings_are_the_clis(studio, photos):
    from personalize import methods
    from personalize.training import resolve_settings

    for text, settings in (("steps=-1", {"steps": -1}), ("lr_value=nan", {"lr_value": "nan"}),
                           ("no_such=1", {"no_such": 1}), ("flip_p=2", {"flip_p": 2})):
        with pytest.raises(BadInputError) as cli:
            resolve_settings(methods.get("perfusion"), settings)
        with pytest.raises(BadInputError) as ui:
            studio.train(photos["tri"], "<new>", "triangle", settings=text)
        assert str(ui.value) == str(cli.value)
    for server_path in ("masks=/etc", "segmenter=/tmp", "segmenter=../x", 'class_images=["/home"]'):  # nothing on the server is named
        with pytest.raises(BadInputError, match="the page takes no folder on the server"):
            studio.train(photos["tri"], "<new>", "triangle", settings=server_path)
    with pytest.raises(BadInputError, match=r"^--set 'steps' must look like KEY=VALUE"):
        studio.train(photos["tri"], "<new>", "triangle", settings="steps")
    with pytest.raises(BadInputError, match="is not a valid token"):
        studio.train(photos["tri"], "no brackets here", "triangle")
    with pytest.raises(BadInputError, match="^unknown method"):
        studio.train(photos["tri"], "<new>", "triangle", method="perfusionn")
    with pytest.raises(BadInputError, match=r"^concept name '\.\./x': use 1-64 letters"):
        studio.train(photos["tri"], "<new>", "triangle", name="../x")
    with pytest.raises(BadInputError, match="^a concept named 'tri' is already in the library"):
        studio.train(photos["tri"], "<tri>", "triangle")
    assert sorted(p.name for p in (studio.folder / "runs").iterdir()) == ["sq", "tri"]  # nothing stored


def test_cancel_then_resume(studio, photos):
    job = studio.train(photos["sq"], "<sq2>", "square",
                       settings={"steps": 10, "batch_size": 2, "validation_every": 0, "checkpoint_every": 2})
    with pytest.raises(BadInputError, match="^a run named 'sq2' is queued or running"):  # a second tab, same name
        studio.train(photos["sq"], "<sq2>", "square")
    with pytest.raises(BadInputError, match="^run 'sq2' is queued or running already"):
        studio.resume("sq2")
    while job.step < 3 and not job.finished:
        time.sleep(0.01)
    studio.queue.cancel(job.id)
    _wait(job)
    assert job.state == "cancelled" and job.message.startswith(f"cancelled after step {job.step}")
    assert not (studio.folder / "concepts" / "sq2.safetensors").exists()  # no half-written concept
    assert studio.stopped_runs() == ["sq2"]
    last = job.step - job.step % 2  # the last checkpoint
    resumed = _wait(studio.resume("sq2"))
    assert resumed.state == "done", resumed.message
    assert [s for s, _ in resumed.losses] == list(range(last + 1, 11))
    assert studio.stopped_runs() == []
    with pytest.raises(BadInputError, match="has finished"):
        studio.resume("sq2")
    with pytest.raises(BadInputError, match="^no stopped run named 'nothing'"):
        studio.resume("nothing")


# ---------------------------------------------------------------------------------------------- generating
def test_knobs_change_through_set_equal_a_fresh_attach(studio):
    from personalize.compose import attach
    from personalize.generation import generate
    from personalize.images import open_rgb

    prompt = "a <tri> on the left, on a green background"
    (a,) = studio.generate([("tri", {"beta": 0.7})], prompt, seed=3, steps=6)
    count = studio.attach_count
    (b,) = studio.generate([("tri", {"beta": 0.95, "tau": 0.05})], prompt, seed=3, steps=6)
    assert studio.attach_count == count  # no re-attach
    assert not np.array_equal(np.asarray(open_rgb(a)), np.asarray(open_rgb(b)))

    def fresh():
        studio._detach()
        with attach(studio._pipe(), studio.concept_path("tri"), beta=0.95, tau=0.05):
            return generate(studio._pipe(), prompt, num_images=1, steps=6, guidance=4.0, seed=3)[0]

    expected = studio.queue.run(fresh)
    assert np.array_equal(np.asarray(open_rgb(b)), np.asarray(expected))
    settings = json.loads(b.with_suffix(".json").read_text())
    assert settings == {"base": "toy", "prompt": prompt, "negative_prompt": None, "steps": 6, "guidance": 4.0,
                        "seed": 3, "concepts": [{"name": "tri", "file": "concepts/tri.safetensors",
                                                 "knobs": {"beta": 0.95, "tau": 0.05}}]}
    assert not [p for p in (studio.folder / "gallery").iterdir() if p.name.startswith(".")]  # atomic: no temps
    assert studio.gallery()[0] == (b, prompt)


def test_compose_two_concepts_each_with_its_own_knobs(studio):
    paths = studio.generate([("tri", {"beta": 0.9}), ("sq", {"gate": False})],
                            "a <tri> on the left and a <sq> on the right", seed=0, steps=4, num_images=2)
    assert len(paths) == 2
    handle = studio._attached[1]
    values = {m.token: m.knob_values for m in handle.methods}
    assert (values["<tri>"].beta, values["<tri>"].gate) == (0.9, True)
    assert values["<sq>"].beta is None and values["<sq>"].gate is False
    count = studio.attach_count
    studio.generate([("tri", {"beta": 0.8}), ("sq", {"gate": True})], "a <tri> and a <sq>", steps=2)
    assert studio.attach_count == count


def test_generate_refusals_are_one_line(studio):
    cases = [
        (([("../../etc/passwd", {})], "a <tri>"), "concept '../../etc/passwd' is not in the library; pick one of the list"),
        (([("tri", {})], "  "), "prompt is empty; describe the image, e.g. 'a photo of a <my-teddy> on the beach'"),
        (([("tri", {"beta": -1})], "a <tri>"), "<tri>: beta must be a finite number >= 0, not -1"),
        (([("tri", {"lag": True})], "a <tri>"), "perfusion does not take lag; it takes beta, tau, gate, lock"),
        (([("tri", {}), ("tri", {})], "a <tri>"), "a concept is selected twice; pick each once"),
    ]
    for (selection, prompt), message in cases:
        with pytest.raises(BadInputError) as err:
            studio.generate(selection, prompt, steps=2)
        assert str(err.value) == message
    with pytest.raises(BadInputError, match=r"^--steps must be a whole number >= 1, not 0"):
        studio.generate([], "a photo", steps=0)
    with pytest.raises(BadInputError, match=r"^steps must be a whole number, not 2.5"):
        studio.generate([], "a photo", steps=2.5)


def test_compare_grid_with_toy_world_scores(studio):
    from personalize.datasets.toyworld.measure import score_image

    out = studio.compare(["tri", "sq"], "a {} on the left, on a blue background", seed=1, knob="beta",
                         values="0.6, 0.9", toy_concept="split_triangle", steps=4)
    rows = out["rows"]
    assert [(r["concept"], r["value"]) for r in rows] == [("tri", 0.6), ("tri", 0.9), ("sq", 0.6), ("sq", 0.9)]
    for r in rows:  # the scores are the toy world's measurers on the very images written
        token = "<tri>" if r["concept"] == "tri" else "<sq>"
        truth = score_image(r["image"], f"a {token} on the left, on a blue background", placeholder=token,
                            concept="split_triangle")
        assert (r["alignment"], r["fidelity"]) == (truth["alignment"], truth["fidelity"])
    from PIL import Image

    assert Image.open(out["grid"]).size == (2 * 128, 2 * (128 + 14))
    assert json.loads((out["folder"] / "scores.json").read_text())["rows"] == rows
    # CLIP-T / CLIP-I through the evaluators' own metrics, on an encoder that records what it is given (the
    # metrics' math is tested in tests/test_evaluation.py): the prompt without the token, the concept's own photos
    seen = {"texts": [], "images": 0}

    class Encoder:
        def encode_texts(self, texts):
            seen["texts"] += list(texts)
            return np.array([[1.0, 0.0, 0.0] for _ in texts])

        def encode_images(self, images):
            images = list(images)
            seen["images"] += len(images)
            return np.array([[0.6, 0.8, 0.0] for _ in images])

    class Dino:
        def encode_images(self, images):
            images = list(images)
            seen["dino"] = seen.get("dino", 0) + len(images)
            # the generated image (one) at right angles to the photos (five): DINO-I 0, against CLIP-I 1 above
            return np.array([[1.0, 0.0, 0.0]] if len(images) == 1 else [[0.0, 1.0, 0.0]] * len(images))

    studio._clip, studio._dino = Encoder(), Dino()
    out = studio.compare(["tri", "sq"], "a {} on the left", seed=1, steps=2, clip=True)
    assert [(r["clip_text"], r["clip_image"], r["dino_image"]) for r in out["rows"]] == [
        (pytest.approx(2.5 * 0.6), pytest.approx(1.0), pytest.approx(0.0))] * 2
    assert set(seen["texts"]) == {"a on the left"} and seen["images"] == 2 * (1 + 1 + 5)  # CLIP-T 1, CLIP-I 1 + 5 photos
    assert seen["dino"] == 2 * (1 + 5)  # DINO-I: the image and the concept's 5 photos
    with pytest.raises(BadInputError, match=r"needs \{\} where each concept's token goes"):
        studio.compare(["tri"], "a photo")
    with pytest.raises(BadInputError, match="^unknown toy-world concept 'nope'; known: "):
        studio.compare(["tri"], "a {}", toy_concept="nope")


# -------------------------------------------------------------------------------------------- the command
def test_ui_without_gradio_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    code, out, err = run(["ui"])
    assert (code, err.strip()) == (2, "error: the web app needs gradio: pip install 'personalize[ui]'")


def test_ui_help_and_usage_errors(tmp_path):
    code, out, _ = run(["ui", "--help"])
    assert code == 0 and "127.0.0.1" in out and "--folder" in out and "toy" in out
    code, _, err = run(["ui", "--port", "0"])
    assert code == 2 and err.count("\n") == 1
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    code, _, err = run(["ui", "--folder", str(not_a_folder)])
    assert (code, err.strip()) == (2, f"error: --folder '{not_a_folder}' is a file; pass a folder for the output")
    for flag in ("--clip-weights", "--dino-weights"):
        code, _, err = run(["ui", "--folder", str(tmp_path / "app"), flag, str(tmp_path / "none.safetensors")])
        assert (code, err.count("\n"), flag in err) == (2, 1, True)
    code, _, err = run(["ui", "--folder", str(tmp_path / "app"), "--device", "cuda:7"])
    assert (code, err.count("\n"), "cuda:7" in err) == (2, 1, True)


@pytest.mark.parametrize("method", ["perfusion", "residuals", "textual-inversion", "dreambooth", "dreambooth-lora",
                                    "custom-diffusion"])
def test_each_methods_recipe_box_and_knob_controls(method):
    """The settings box a method starts with reads back as exactly its default recipe (the CLI's settings), and
    every knob it takes has a control inside the knob's own range."""
    from personalize import methods
    from personalize.knobs import specs
    from personalize.training import resolve_settings
    from personalize.ui.studio import knob_controls, parse_settings, recipe

    cls = methods.get(method)
    text, box = recipe(method)
    assert text == cls.recipe
    given = parse_settings(box)
    defaults = resolve_settings(cls, {"masks": "none"})
    assert resolve_settings(cls, {**given, "masks": "none"}) == defaults
    controls = {c.name: c for c in knob_controls(method)}
    assert set(controls) == set(specs(cls.Knobs))
    for name, spec in specs(cls.Knobs).items():
        c = controls[name]
        if c.kind == "slider":
            assert (spec.low is None or c.low >= spec.low) and (spec.high is None or c.high <= spec.high)
            spec.parse(c.low, name), spec.parse(c.high, name)  # both ends are values the knob accepts
        assert c.kind == {bool: "checkbox", str: "choice"}.get(spec.kind, "slider")
