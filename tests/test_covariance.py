"""C: what it averages, and its cache."""
import torch

from personalize.covariance import (
    CAPTION_TEMPLATES,
    builtin_captions,
    compute_covariance,
    corpus_id,
    covariance_path,
    inverse,
    load_or_compute_covariance,
)


def test_covariance_averages_every_non_padding_position(tiny):
    captions = ["a photo of a dog", "a teapot", "a red cube next to a blue sphere on a wooden table"]
    tok = tiny.tokenizer
    vectors = []
    with torch.no_grad():
        for c in captions:  # one caption at a time, padded to 77: BOS..EOS are the real positions
            enc = tok(c, padding="max_length", max_length=77, return_tensors="pt")
            n = int(enc.attention_mask.sum())
            vectors.append(tiny.text_encoder(enc.input_ids)[0][0, :n].double())
    v = torch.cat(vectors)
    expected = v.T @ v / v.shape[0]
    # float32 kernels round differently for other sequence lengths; the set of positions is what matters
    assert torch.allclose(compute_covariance(tiny, captions, batch_size=2), expected, rtol=1e-4, atol=1e-5)


def test_builtin_corpus_size_and_ids():
    captions = builtin_captions()
    assert len(captions) == len(CAPTION_TEMPLATES) * 261 == 8352
    assert corpus_id(None) == "builtin" and corpus_id(["a"]) != corpus_id(["b"])


def test_cache_is_keyed_by_base_and_corpus(tiny):
    custom = ["a photo of a cat", "a photo of a dog", "a cup"]
    C = load_or_compute_covariance(tiny, custom)
    path = covariance_path(tiny, corpus_id(custom))
    assert path.is_file()
    from safetensors.torch import save_file

    save_file({"C": 2 * C}, str(path))  # the next call must read the cache, not recompute
    assert torch.equal(load_or_compute_covariance(tiny, custom), 2 * C)
    assert torch.allclose(load_or_compute_covariance(tiny, custom, recompute=True), C)


def test_inverse_is_scale_invariant_in_the_edit(tiny):
    from personalize.methods.rank1 import rank1_edit

    C = load_or_compute_covariance(tiny, ["a photo of a cat", "a dog", "a red cup on a table"] * 3)
    g = torch.Generator().manual_seed(0)
    e, W = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64)
    i_star, o_star = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    a = rank1_edit(e, W, i_star, o_star, inverse(C), beta=0.7, tau=0.1)
    b = rank1_edit(e, W, i_star, o_star, inverse(10 * C), beta=0.7, tau=0.1)
    assert torch.allclose(a, b, atol=1e-8)


def test_a_base_can_ship_its_own_caption_corpus(tmp_path, _tiny_master, photos):
    """captions.txt in a base's folder replaces the built-in corpus for C, is recorded in the concept header,
    and is used again (not the built-in corpus) when the concept is attached."""
    from personalize import attach, load_base, load_concept, train
    from personalize.covariance import (base_captions, corpus_id, default_covariance, inverse,
                                        load_or_compute_covariance)

    folder = tmp_path / "base"
    _tiny_master.save_pretrained(folder)
    captions = ["a red ball on the left", "a blue cube at the top", "a photo of a ball"] * 5
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    pipe = load_base(str(folder))
    assert base_captions(pipe) == captions and base_captions(_tiny_master) is None
    C, corpus = default_covariance(pipe)
    assert corpus == corpus_id(captions) != "builtin"
    assert torch.allclose(C, load_or_compute_covariance(pipe, captions))
    assert not torch.allclose(C, load_or_compute_covariance(pipe))
    out = train(pipe, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
                settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0}, masks="none", progress=False)
    assert load_concept(out).header["covariance"] == corpus
    with attach(pipe, out) as handle:
        C_inv = handle.methods[0].C_inv
    assert torch.allclose(C_inv.double(), inverse(C).double())
