"""No silent defaults: ``train`` needs a base; ``generate``, ``export``, ``inspect`` and ``attach(None, ...)`` take the
base a concept's header records (and refuse another, or several different ones); a base keeps its own sampling
scheduler unless ``--scheduler`` names one, and training's noise schedule does not depend on it."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_photos
from safetensors.torch import load_file
from test_bad_input import check_error, run_cli

from personalize import PersonalizeError, attach, generate, load_base, load_base_for, load_concept, save_concept, train
from personalize.concept import Concept
from personalize.errors import BadInputError

TI = {"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none", "seed": 3}
GEN = ["--num-images", "1", "--steps", "2", "--resolution", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, _tiny_master):
    """Photos; the tiny base saved as a folder with an Euler scheduler (same weights); a textual-inversion concept
    trained on each ("tiny", and the folder), and one whose header records no loadable base."""
    from diffusers import EulerDiscreteScheduler

    root = tmp_path_factory.mktemp("defaults")
    photos = make_photos(root / "photos", n=2)
    pipe = copy.deepcopy(_tiny_master)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    folder = root / "euler-tiny"
    pipe.save_pretrained(folder)
    on_tiny = train("tiny", photos, token="<disc>", superclass="ball", out=root / "on-tiny.safetensors",
                    method="textual-inversion", settings=TI, progress=False, device="cpu")
    on_folder = train(str(folder), photos, token="<dot>", superclass="ball", out=root / "on-folder.safetensors",
                      method="textual-inversion", settings=TI, progress=False, device="cpu")
    concept = load_concept(on_tiny)
    header = copy.deepcopy(concept.header)
    header["provenance"]["base"] = "StableDiffusionPipeline"  # what a pipeline built in code records
    unknown = save_concept(root / "unknown.safetensors", Concept(header=header, tensors=concept.tensors))
    return {"root": root, "photos": photos, "folder": folder, "tiny": on_tiny, "folder_concept": on_folder,
            "unknown": unknown}


def _png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# --------------------------------------------------------------------------- train needs a base
def test_train_without_a_base_is_refused(capsys, world, tmp_path):
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(capsys, ["train", "--images", world["photos"], "--superclass", "ball", "--token", "<d>",
                                    "--out", out, "--device", "cpu"])
    check_error(code, err, "--base", "base:", "--config")
    assert not out.exists() and not list(tmp_path.iterdir())
    config = tmp_path / "bad.yaml"
    config.write_text("base: [tiny]\n")
    code, _, err = run_cli(capsys, ["train", "--images", world["photos"], "--superclass", "ball", "--token", "<d>",
                                    "--out", out, "--config", config, "--device", "cpu"])
    check_error(code, err, "'base:'", "--config")
    assert not out.exists()


def test_train_takes_the_base_from_config_and_the_flag_wins(capsys, monkeypatch, world, tmp_path):
    """What reaches the trainer: base: from --config, or --base over it; 'base' never reaches the settings."""
    import personalize.training

    seen = []

    def fake_train(base, images, *, settings, **kwargs):
        seen.append((base, "base" in settings))
        raise SystemExit(0)

    monkeypatch.setattr(personalize.training, "train", fake_train)
    config = tmp_path / "settings.yaml"
    config.write_text("base: tiny-sd2\nsteps: 1\n")
    args = ["train", "--config", config, "--images", world["photos"], "--superclass", "ball", "--token", "<d>",
            "--out", tmp_path / "c.safetensors"]
    assert run_cli(capsys, args)[0] == 0
    assert run_cli(capsys, [*args, "--base", "tiny-sdxl"])[0] == 0
    assert seen == [("tiny-sd2", False), ("tiny-sdxl", False)]


# --------------------------------------------------------------------------- the header's base by default
def test_the_header_records_the_base_a_pipeline_was_loaded_from(world, _tiny_master):
    from personalize.base import base_name

    assert load_concept(world["tiny"]).header["provenance"]["base"] == "tiny"
    assert load_concept(world["folder_concept"]).header["provenance"]["base"] == str(world["folder"])
    assert base_name(copy.deepcopy(_tiny_master)) == "tiny"  # train(pipe, ...) on load_base("tiny") records it too


def test_generate_defaults_to_the_header_base(capsys, world, tmp_path):
    """The folder concept without --base renders as with --base FOLDER (the same weights as tiny, but the folder's
    own Euler scheduler, which renders otherwise: test_scheduler_option_...): the header's base was loaded."""
    runs = {"default": [], "given": ["--base", str(world["folder"])]}
    images = {}
    for name, extra in runs.items():
        code, _, err = run_cli(capsys, ["generate", "--concept", world["folder_concept"], "--prompt",
                                        "a <dot> on a table", *GEN, *extra, "--out", tmp_path / name])
        assert code == 0, err
        images[name] = _png_bytes(tmp_path / name)
    assert images["default"] == images["given"] and images["default"]


def test_a_given_base_that_does_not_match_is_refused(capsys, world, tmp_path):
    code, _, err = run_cli(capsys, ["generate", "--concept", world["tiny"], "--base", "tiny-sd2", "--prompt",
                                    "a <disc>", "--out", tmp_path / "o", *GEN])
    check_error(code, err, "on-tiny.safetensors", "SD 2.x")
    assert not (tmp_path / "o").exists()


def test_concepts_recording_different_bases_are_refused_in_one_line(capsys, world, tmp_path):
    code, _, err = run_cli(capsys, ["generate", "--concept", world["tiny"], "--concept", world["folder_concept"],
                                    "--prompt", "a <disc> and a <dot>", "--out", tmp_path / "o", *GEN])
    # the folder by its path (a long one is shown cut: its first 40 characters always show, whatever the temp root)
    check_error(code, err, "different bases", "tiny", str(world["folder"])[:40], "--base")
    assert not (tmp_path / "o").exists()
    with pytest.raises(BadInputError, match="different bases"):
        load_base_for([world["tiny"], world["folder_concept"]])


def test_a_header_without_a_loadable_base_asks_for_one(capsys, world, tmp_path):
    code, _, err = run_cli(capsys, ["generate", "--concept", world["unknown"], "--prompt", "a <disc>",
                                    "--out", tmp_path / "o", *GEN])
    check_error(code, err, "unknown.safetensors", "StableDiffusionPipeline", "--base")
    assert not (tmp_path / "o").exists()
    concept = load_concept(world["unknown"])  # a forged header: a path too long for any filesystem
    concept.header["provenance"]["base"] = "models/" + "x" * 100_000
    forged = save_concept(tmp_path / "forged.safetensors", concept)
    code, _, err = run_cli(capsys, ["generate", "--concept", forged, "--prompt", "a <disc>", "--out", tmp_path / "o",
                                    *GEN])
    assert len(check_error(code, err, "forged.safetensors", "--base")) < 500
    assert not (tmp_path / "o").exists()


def test_generate_without_a_concept_needs_a_base(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["generate", "--prompt", "a ball", "--out", tmp_path / "o", *GEN])
    check_error(code, err, "--base", "without --concept")
    assert not (tmp_path / "o").exists()


def test_attach_none_loads_the_header_base(world, _tiny_master):
    pipe = copy.deepcopy(_tiny_master)
    with attach(pipe, world["tiny"]):
        expected = generate(pipe, "a <disc> on a table", steps=2, resolution=32)
    with attach(None, world["tiny"]) as handle:
        assert handle.pipe is not pipe and handle.pipe.unet.config == pipe.unet.config
        got = generate(handle.pipe, "a <disc> on a table", steps=2, resolution=32)
    assert got[0].tobytes() == expected[0].tobytes()
    with pytest.raises(PersonalizeError, match="StableDiffusionPipeline"):
        attach(None, world["unknown"])


def test_export_and_inspect_use_the_header_base(capsys, world, tmp_path, _tiny_master):
    """Custom Diffusion's export reads the base's K/V weights: without --base it takes the header's, giving the
    same files as --base tiny; inspect shows that base."""
    from personalize.interop import export_concept

    cd = train("tiny", world["photos"], token="<cd>", superclass="ball", out=tmp_path / "cd.safetensors",
               method="custom-diffusion", settings={**TI, "steps": 1, "prior_loss_weight": 0}, progress=False,
               device="cpu")
    given = export_concept(cd, tmp_path / "given", base=copy.deepcopy(_tiny_master))
    code, _, err = run_cli(capsys, ["export", cd, "--out", tmp_path / "default"])
    assert code == 0, err
    for f in sorted(p.name for p in given.glob("*.safetensors")):
        a, b = load_file(str(given / f)), load_file(str(tmp_path / "default" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    code, out, _ = run_cli(capsys, ["inspect", cd])
    assert code == 0 and "on tiny" in " ".join(out.split())


# --------------------------------------------------------------------------- schedulers
def test_a_base_keeps_its_own_scheduler(world):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    assert type(load_base(str(world["folder"])).scheduler) is EulerDiscreteScheduler  # no longer made DDIM
    assert type(load_base("tiny").scheduler) is DDIMScheduler  # the built-in bases: DDIM, as always


def test_scheduler_option_swaps_the_class_from_the_base_config(capsys, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pipe = load_base("tiny-sd2", scheduler="euler")
    own = load_base("tiny-sd2").scheduler.config
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    assert pipe.scheduler.config.prediction_type == own.prediction_type == "v_prediction"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (own.beta_start, own.beta_end)
    assert type(load_base("tiny", scheduler="DPM++").scheduler) is DPMSolverMultistepScheduler
    images = {}
    for name in ("ddim", "euler"):
        code, _, err = run_cli(capsys, ["generate", "--base", "tiny", "--prompt", "a ball", "--out", tmp_path / name,
                                        *GEN, "--scheduler", name])
        assert code == 0, err
        images[name] = _png_bytes(tmp_path / name)
    assert images["euler"] != images["ddim"] and images["euler"]


def test_an_unknown_scheduler_is_one_line_listing_the_choices(capsys, tmp_path):
    from personalize.benchmark.spec import parse_spec
    from personalize.schedulers import SCHEDULERS

    code, _, err = run_cli(capsys, ["generate", "--base", "tiny", "--prompt", "a ball", "--out", tmp_path / "o",
                                    "--scheduler", "karras-magic", *GEN])
    check_error(code, err, "--scheduler", "karras-magic", *SCHEDULERS)
    assert not (tmp_path / "o").exists()
    spec = {"base": "toy", "evaluator": {"backend": "toyworld"}, "concepts": [{"toyworld": ["split_triangle"]}],
            "methods": [{"method": "perfusion"}]}
    assert parse_spec(spec, root=tmp_path).sampler["scheduler"] == "ddim"  # pinned by default
    assert parse_spec({**spec, "sampler": {"scheduler": "Euler-A"}}, root=tmp_path).sampler["scheduler"] == "euler-a"
    with pytest.raises(BadInputError, match="sampler.scheduler 'lcm-fast'.*ddim, ddpm"):
        parse_spec({**spec, "sampler": {"scheduler": "lcm-fast"}}, root=tmp_path)


def test_the_benchmark_worker_samples_with_the_spec_scheduler(tmp_path):
    from diffusers import HeunDiscreteScheduler

    from personalize.benchmark.spec import parse_spec
    from personalize.benchmark.work import Worker

    class Meta:
        def meta(self):
            return {}

        def set_meta(self, **values):
            pass

    spec = parse_spec({"base": "tiny", "concepts": [{"folder": "photos", "superclass": "ball"}],
                       "methods": [{"method": "perfusion"}], "sampler": {"scheduler": "heun"}}, root=tmp_path)
    assert type(Worker(spec, tmp_path, "cpu", Meta()).pipe.scheduler) is HeunDiscreteScheduler


def test_training_does_not_depend_on_the_sampling_scheduler(world):
    """Same weights, DDIM (tiny) or Euler (the saved folder) for sampling: training's DDPM noise schedule comes
    from the scheduler config either way, so the two concepts are equal bit for bit."""
    a, b = load_file(str(world["tiny"])), load_file(str(world["folder_concept"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
