"""Training you can watch: --report-to (tensorboard, read back), sample images every --validation-every steps,
--save-every concepts (each loads and attaches), diffusers' get_scheduler schedules (equal to stock, continued
exactly by --resume), and a missing tracker package refused in one line before any work."""
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photos

from personalize import attach, load_concept, train
from personalize.training import snapshots
from personalize.training.snapshots import samples_dir, steps_dir
from personalize.training.trackers import Tracker, logs_dir

STEPS = 4
#: a warm-up into a linear decay: every step's rate differs, and step 2 (where the resumed run stops) is mid-warm-up
WATCHED = {"steps": STEPS, "batch_size": 1, "masks": "none", "checkpoint_every": 0, "report_to": "tensorboard",
           "validation_every": 2, "validation_prompt": ["a photo of a {}", "a {} on the beach"], "save_every": 2,
           "lr_scheduler": "linear", "lr_warmup_steps": 3}


@pytest.fixture(scope="module")
def logged():
    """Every value a tracker is given, by output file stem: [(step, values)] (the real tracker still writes)."""
    seen = {}
    original = Tracker.log

    def spy(self, values, step):
        seen.setdefault(self.run, []).append((step, dict(values)))
        original(self, values, step)

    mp = pytest.MonkeyPatch()
    mp.setattr(Tracker, "log", spy)
    mp.setattr(snapshots, "SAMPLE_STEPS", 1)  # one sampler step per image (what is tested is where they go)
    yield seen
    mp.undo()


@pytest.fixture(scope="module")
def watched(tmp_path_factory, _tiny_master, logged):
    """A Perfusion run with every watching option on."""
    root = tmp_path_factory.mktemp("watched")
    photos = make_photos(root / "photos")
    out = train(copy.deepcopy(_tiny_master), photos, token="<disc>", superclass="ball", out=root / "watched.safetensors",
                settings=WATCHED, progress=False)
    return root, photos, out


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs_dir(out) / out.stem), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_loss_lr_grad_norm_step_time_and_the_samples(watched):
    _, _, out = watched
    acc = _events(out)
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert {"loss", "lr", "grad_norm", "step_time"} <= set(scalars)
    for tag in ("loss", "lr", "grad_norm", "step_time"):
        assert [s for s, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
    assert all(np.isfinite(v) and v > 0 for tag in ("loss", "grad_norm", "step_time") for _, v in scalars[tag])
    assert {"lr/embedding", "lr/o_v"} <= set(scalars)  # Perfusion's groups, each with its own rate
    # each logged image is the PNG written to OUT.samples/ at that step
    images = acc.Tags()["images"]
    assert len(images) == 2
    for tag in images:
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4]
        for event in events:
            name = tag.split("/", 1)[1]
            (png,) = (samples_dir(out) / f"step-{event.step:06d}").glob(f"{name}_*.png")
            logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
            assert np.array_equal(logged, np.asarray(Image.open(png).convert("RGB")))


def test_sample_images_at_every_nth_step_with_their_prompts(watched):
    _, _, out = watched
    folders = sorted(p.name for p in samples_dir(out).iterdir())
    assert folders == ["step-000002", "step-000004"]
    for folder in folders:
        prompts = json.loads((samples_dir(out) / folder / "prompts.json").read_text())
        assert sorted(prompts.values()) == ["a <disc> on the beach", "a photo of a <disc>"]
        assert all((samples_dir(out) / folder / f"{stem}.png").is_file() for stem in prompts)


def test_lr_each_step_is_diffusers_get_scheduler_and_resume_mid_warmup_continues_it(watched, logged, _tiny_master):
    """The rate of every step equals stock get_scheduler's on a dummy optimizer; a run stopped at step 2 (mid
    warm-up) and resumed logs the same rates and ends in the same tensors (samples and --save-every, on in the
    uninterrupted run only, never touch the trajectory)."""
    from diffusers.optimization import get_scheduler

    root, photos, out = watched
    param = torch.nn.Parameter(torch.zeros(1))
    lr = load_concept(out).config["lr_embedding"]
    dummy = torch.optim.AdamW([{"params": [param], "lr": lr}])
    stock = get_scheduler("linear", dummy, num_warmup_steps=3, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        stock.step()
    assert len(set(expected)) == STEPS and expected[0] == 0.0  # warm-up starts from 0, as diffusers' does
    rates = [(step, values["lr/embedding"]) for step, values in logged["watched"]]
    assert rates == list(enumerate(expected, start=1))

    plain = {**WATCHED, "report_to": "tensorboard", "validation_every": 0, "validation_prompt": None, "save_every": 0,
             "checkpoint_every": 2}

    def stop(step, loss, method):
        if step == 2:
            raise KeyboardInterrupt

    part = root / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(_tiny_master), photos, token="<disc>", superclass="ball", out=part, settings=plain,
              progress=False, callbacks=[stop])
    train(copy.deepcopy(_tiny_master), photos, token="<disc>", superclass="ball", out=part, settings=plain,
          progress=False, resume=True)
    resumed = [(step, values["lr/embedding"]) for step, values in logged["resumed"]]
    assert resumed == rates
    a, b = load_concept(out).tensors, load_concept(part).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_every_writes_concepts_that_load_and_attach(watched, _tiny_master):
    _, _, out = watched
    files = sorted(steps_dir(out).glob("*.safetensors"))
    assert [f.name for f in files] == ["step-000002.safetensors", "step-000004.safetensors"]
    last = load_concept(files[-1])
    assert last.header["provenance"]["steps"] == 2 * 2 and load_concept(files[0]).header["provenance"]["steps"] == 2
    final = load_concept(out).tensors
    assert all(torch.equal(last.tensors[k], final[k]) for k in final)  # step 4 is the final state
    pipe = copy.deepcopy(_tiny_master)
    for f in files:
        with attach(pipe, f):
            assert "<disc>" in pipe.tokenizer.get_vocab()


def test_a_baseline_samples_and_saves_its_steps_too(tmp_path, tiny, logged, monkeypatch):
    """Textual Inversion with no schedule flag: every step at its recipe's constant rate; samples at 2 and the
    last step (3); the step-2 file holds exactly the state the trainer had after step 2, and attaches."""
    rates = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        rates.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    photos = make_photos(tmp_path / "photos")
    seen = {}

    def keep(step, loss, method):
        if step == 2:
            seen.update({k: v.detach().clone() for k, v in method.concept_tensors().items()})

    out = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "ti.safetensors",
                method="textual-inversion", progress=False, callbacks=[keep],
                settings={"steps": 3, "batch_size": 1, "checkpoint_every": 0, "validation_every": 2,
                          "validation_prompt": "a {} on the beach", "save_every": 2})
    assert rates == [[load_concept(out).config["lr"]]] * 3
    assert sorted(p.name for p in samples_dir(out).iterdir()) == ["step-000002", "step-000003"]
    assert all(len(list((samples_dir(out) / f).glob("*.png"))) == 1 for f in ("step-000002", "step-000003"))
    assert not logs_dir(out).exists()  # --report-to none: no tracker folder
    (saved,) = steps_dir(out).glob("*.safetensors")
    concept = load_concept(saved)
    assert concept.tensors.keys() == seen.keys() and all(torch.equal(concept.tensors[k], seen[k]) for k in seen)
    with attach(tiny, saved):
        assert "<disc>" in tiny.tokenizer.get_vocab()


def test_a_tracker_whose_package_is_missing_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    from test_bad_input import run_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    photos = make_photos(tmp_path / "photos")
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(capsys, ["train", "--base", "tiny", "--images", photos, "--token", "<disc>",
                                    "--superclass", "ball", "--out", out, "--report-to", "wandb"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pip install wandb" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing written


@pytest.mark.parametrize("settings, words", [
    ({"report_to": "mlflow"}, "--report-to must be one of none, tensorboard, wandb, trackio"),
    ({"lr_scheduler": "step"}, "--lr-scheduler must be one of constant"),
    ({"lr_warmup_steps": 5}, "constant ignores it"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 9}, "longer than the run"),
    ({"validation_prompt": "a {}"}, "--validation-prompt needs --validation-every"),
    ({"validation_prompt": " ", "validation_every": 1}, "--validation-prompt is empty"),
    ({"save_every": -1}, "save_every"),
])
def test_bad_watch_settings_are_refused_before_any_work(tmp_path, settings, words):
    from personalize.errors import BadInputError

    with pytest.raises(BadInputError, match=words.replace("-", r"\-")):
        train("no-such-base-is-loaded", tmp_path, token="<disc>", superclass="ball", out=tmp_path / "x.safetensors",
              settings={"steps": 2, **settings}, progress=False)
    assert list(tmp_path.iterdir()) == []
