"""Textual Inversion, DreamBooth (full and LoRA) and Custom Diffusion on the shared trainer, on `tiny`:
one step changes exactly the parameters each method declares, and a saved concept attached again
reproduces what the trainer had in the pipeline."""
import copy

import numpy as np
import pytest
import torch

from personalize import attach, load_concept, train
from personalize.methods import get
from personalize.training import resolve_settings

ONE_STEP = {"steps": 1, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}
# settings that make every declared tensor train in one step (prior images: the photos themselves, no sampling)
SETTINGS = {
    "textual-inversion": {"num_vectors": 2},
    "dreambooth-lora": {"train_text_encoder": True},
    "custom-diffusion": {"prior_loss_weight": 1.0, "class_images": "PHOTOS"},
    "dreambooth": {"train_text_encoder": True, "lr": 1e-4, "class_images": "PHOTOS"},
}
METHODS = list(SETTINGS)


def _settings(method, photos, **more):
    return {**ONE_STEP, **{k: (str(photos) if v == "PHOTOS" else v) for k, v in SETTINGS[method].items()}, **more}


def _image(pipe, prompt, seed=3):
    return pipe(prompt, num_inference_steps=2, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def _base_state(pipe):
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, part).state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_exactly_the_declared_parameters(method, tiny, photos, tmp_path):
    cls = get(method)
    _, config = resolve_settings(cls, _settings(method, photos))
    fresh = cls.for_training(copy.deepcopy(tiny), "<disc>", "ball", config)
    initial = fresh.state_tensors()
    fresh.remove()
    before = _base_state(tiny)
    modules = {part: getattr(tiny, part) for part in ("unet", "text_encoder", "vae", "tokenizer")}
    seen = {}
    train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors", method=method,
          settings=_settings(method, photos), progress=False,
          callbacks=[lambda s, loss, m: seen.update(state=m.state_tensors())])
    state = seen["state"]
    assert state.keys() == initial.keys() and state
    unchanged = [k for k in state if torch.equal(state[k], initial[k])]
    assert not unchanged, f"declared parameters that did not train: {unchanged[:3]}"
    after = _base_state(tiny)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [], "a base weight changed"
    assert all(getattr(tiny, part) is m for part, m in modules.items()), "the pipeline's modules were not restored"
    if method == "dreambooth":  # the text encoder trained, its embedding tables did not
        assert any(k.startswith("text_encoder.") for k in state)
        assert not any(".embeddings." in k for k in state)
    if method == "dreambooth-lora":
        assert {k.split(".")[0] for k in state} == {"unet", "text_encoder"}


@pytest.mark.parametrize("method", METHODS)
def test_saved_concept_reproduces_the_trained_pipeline(method, tiny, photos, tmp_path):
    seen = {}
    prompt = "a photo of a <disc> ball on the grass"
    steps = 2

    def last(step, loss, m):
        if step == steps:
            seen["image"] = _image(tiny, prompt)

    path = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors", method=method,
                 settings=_settings(method, photos, steps=steps), progress=False, callbacks=[last])
    before = _image(tiny, prompt)
    with attach(tiny, load_concept(path)):
        again = _image(tiny, prompt)
    assert np.array_equal(seen["image"], again)
    assert np.array_equal(before, _image(tiny, prompt)), "detach did not restore the base"


def test_dreambooth_writes_a_pipeline_folder_and_is_not_composable(tiny, photos, tmp_path, capsys):
    from personalize.cli import main
    from personalize.errors import BadInputError

    path = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "db.safetensors",
                 method="dreambooth", settings=_settings("dreambooth", photos, train_text_encoder=False), progress=False)
    concept = load_concept(path)
    assert (tmp_path / "db.pipeline" / "model_index.json").is_file()
    assert concept.header["pipeline"] == "db.pipeline" and concept.header["composable"] is False
    assert concept.tensors == {}
    main(["inspect", str(path)])
    assert "not composable" in capsys.readouterr().out
    ti = train(copy.deepcopy(tiny), photos, token="<other>", superclass="ball", out=tmp_path / "ti.safetensors",
               method="textual-inversion", settings=ONE_STEP, progress=False)
    with attach(tiny, ti):
        with pytest.raises(BadInputError, match="cannot be composed"):
            attach(tiny, path)
    with attach(tiny, path):
        with pytest.raises(BadInputError, match="cannot be composed"):
            attach(tiny, ti)
    (tmp_path / "db.pipeline" / "model_index.json").unlink()
    from personalize.errors import ConceptFileError

    with pytest.raises(ConceptFileError, match="pipeline folder"):
        attach(tiny, path)


def test_custom_diffusion_trains_several_concepts_jointly(tiny, photos, tmp_path, monkeypatch):
    import personalize.training.loop as training  # the loop looks denoising_step up there
    from conftest import make_photos

    other = make_photos(tmp_path / "other", n=3)
    prompts = []
    real = training.denoising_step

    def spy(pipe, scheduler, method, batch, *rest, **kw):
        prompts.extend(batch.prompts)
        return real(pipe, scheduler, method, batch, *rest, **kw)

    monkeypatch.setattr(training, "denoising_step", spy)
    path = train(tiny, [photos, other], token=["<disc>", "<blob>"], superclass=["ball", "cup"],
                 out=tmp_path / "two.safetensors", method="custom-diffusion",
                 settings={**ONE_STEP, "steps": 3, "batch_size": 4, "prior_loss_weight": 0}, progress=False)
    assert any("<disc> ball" in p for p in prompts) and any("<blob> cup" in p for p in prompts)
    concept = load_concept(path)
    assert concept.header["tokens"] == ["<disc>", "<blob>"] and concept.header["superclasses"] == ["ball", "cup"]
    assert concept.tensors["embedding"].shape == (2, 32)
    with attach(tiny, concept):
        assert {"<disc>", "<blob>"} <= set(tiny.tokenizer.get_vocab())


def test_resume_continues_a_multi_concept_prior_run_exactly(tiny, photos, tmp_path):
    """Checkpoints carry the lists of tokens and the prior batch's randomness (one generator for both)."""
    from conftest import make_photos

    other = make_photos(tmp_path / "other", n=2)
    words = dict(token=["<disc>", "<blob>"], superclass=["ball", "cup"], method="custom-diffusion", progress=False)
    settings = {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "class_images": [str(other), str(photos)]}
    whole = train(copy.deepcopy(tiny), [photos, other], out=tmp_path / "whole.safetensors", settings=settings, **words)
    train(copy.deepcopy(tiny), [photos, other], out=tmp_path / "part.safetensors", settings={**settings, "steps": 1},
          **words)
    part = train(copy.deepcopy(tiny), [photos, other], out=tmp_path / "part.safetensors", settings=settings,
                 resume=True, **words)
    a, b = load_concept(whole).tensors, load_concept(part).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
