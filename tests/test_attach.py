"""attach/detach on a pipeline the user holds."""
import numpy as np
import pytest
import torch

from personalize import attach, generate, load_concept, train
from personalize.edits.sites import SiteWrapper


def _image(pipe, prompt="a photo of a <disc> on the grass", seed=3):
    out = pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images
    return out


def test_attach_then_detach_is_bit_identical(tiny, trained_concept):
    modules_before = dict(tiny.unet.named_modules())
    tokenizer, embedding = tiny.tokenizer, tiny.text_encoder.get_input_embeddings()
    before = _image(tiny, "a photo of a ball on the grass")
    handle = attach(tiny, trained_concept)
    assert any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())
    with_concept = _image(tiny)
    handle.detach()
    after = _image(tiny, "a photo of a ball on the grass")
    assert np.array_equal(before, after)
    assert tiny.tokenizer is tokenizer and tiny.text_encoder.get_input_embeddings() is embedding
    assert all(tiny.unet.get_submodule(n) is m for n, m in modules_before.items() if n)
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())
    assert with_concept.shape == before.shape


def test_context_manager_detaches(tiny, trained_concept):
    with attach(tiny, trained_concept, beta=0.6) as handle:
        assert handle.tokens == ["<disc>"]
        assert "<disc>" in tiny.tokenizer.get_vocab()
    assert "<disc>" not in tiny.tokenizer.get_vocab()


def test_concept_changes_the_output_and_beta_controls_it(tiny, trained_concept):
    base = _image(tiny, "a photo of a <disc> on the grass")  # unknown token: plain base behaviour
    with attach(tiny, trained_concept, beta=0.3, tau=0.15):
        strong = _image(tiny)
    with attach(tiny, trained_concept, beta=5.0, tau=0.15):
        weak = _image(tiny)
    assert not np.array_equal(strong, weak)
    assert np.abs(strong - base).mean() > 0


def test_saved_concept_reproduces_the_trained_pipeline(tiny, photos, tmp_path):
    """What the trainer had in the UNet at its last step is what attach() rebuilds from the file."""
    seen = {}
    prompt = "a photo of a <disc> in the snow"

    def last(step, loss, method):
        if step == 3:
            seen["image"] = _image(tiny, prompt)

    path = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
                 settings={"steps": 3, "batch_size": 2, "checkpoint_every": 0}, masks="none", progress=False,
                 callbacks=[last])
    concept = load_concept(path)
    with attach(tiny, concept, beta=concept.config["beta_train"], tau=concept.config["tau_train"]):
        again = _image(tiny, prompt)
    assert np.array_equal(seen["image"], again)


def test_attach_refuses_unknown_knob(tiny, trained_concept):
    from personalize.errors import BadInputError

    with pytest.raises(BadInputError, match="beta"):
        attach(tiny, trained_concept, strength=2)
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())


def test_generate_seeds_are_per_image(tiny):
    two = generate(tiny, "a photo of a ball", num_images=2, steps=2, seed=10)
    one = generate(tiny, "a photo of a ball", num_images=1, steps=2, seed=11)
    a, b, c = (np.asarray(i, dtype=np.int16) for i in (two[1], one[0], two[0]))
    assert np.abs(a - b).max() <= 2  # same seed; batching may round differently
    assert np.abs(a - c).mean() > 5  # different seeds give different images
