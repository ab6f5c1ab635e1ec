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
    from personalize.methods.perfusion import rank1_edit

    C = load_or_compute_covariance(tiny, ["a photo of a cat", "a dog", "a red cup on a table"] * 3)
    g = torch.Generator().manual_seed(0)
    e, W = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64)
    i_star, o_star = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    a = rank1_edit(e, W, i_star, o_star, inverse(C), beta=0.7, tau=0.1)
    b = rank1_edit(e, W, i_star, o_star, inverse(10 * C), beta=0.7, tau=0.1)
    assert torch.allclose(a, b, atol=1e-8)
