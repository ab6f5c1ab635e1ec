"""Perfusion on the diffusion transformers (``tiny-flux``, ``tiny-sd3``; docs/PERFUSION_DIT.md), tested like the SD
version:

- the site's output is the rank-1 formula written out here (not through ``rank1.py``): one concept through the
  multi-concept path is ``W x - s(x) W i* + g(s) o*`` (Flux: one target per block), Eq. 4's projection onto the
  targets' C^-1-orthogonal complement with one target per context segment (SD3: CLIP's and T5's rows) or per
  concept (two concepts on Flux);
- the key lock: at every joint block the edited key of the block's i* is the base key of the superclass input
  e_super (ungated, and with the gate open);
- an identity concept (i* = e_super, o* = W e_super, the superclass word's vector) with the gate off gives the
  base transformer's output for the superclass prompt: the gated K/V edits and the pooled vectors (which read
  the superclass prompt) are all the concept acts through;
- a short training run changes only the token vector, o*_V and i* (o*_K stays locked), no base tensor;
- ``lock=global`` is refused in one line (no second transformer pass per step).
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_photos
from personalize import attach, families, load_base, load_concept, text_stack, train
from personalize.concept import Concept
from personalize.covariance import inverse, load_or_compute_covariance
from personalize.edits.placement import joint_attentions
from personalize.edits.state import pipeline_state
from personalize.errors import BadInputError
from personalize.methods.perfusion import _key, dit_segments
from personalize.methods.shared import word_vector

DIT = ("tiny-flux", "tiny-sd3")
PROMPT = "a photo of a <disc> on the grass"
SETTINGS = {"steps": 2, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module", params=DIT)
def run(request, tmp_path_factory):
    """The base, and a Perfusion concept trained two steps on it, with the method's state before and after."""
    spec = request.param
    if spec not in _RUNS:
        base = load_base(spec)
        root = tmp_path_factory.mktemp(f"perfusion-{spec}")
        photos = make_photos(root / "photos", n=2)
        pipe = copy.deepcopy(base)
        before = {f"{part}.{k}": v.clone() for part in ("transformer", "vae", *[te for _, te in text_stack.pairs(pipe)])
                  for k, v in getattr(pipe, part).state_dict().items()}
        seen = {}

        def grab(step, loss, method):
            if step == 1:
                seen["e_super"] = {k: v.clone() for k, v in method.e_super.items()}
            seen["state"] = {k: v.clone() for k, v in method.state_tensors().items()}

        path = train(pipe, photos, token="<disc>", superclass="ball", out=root / "c.safetensors",
                     method="perfusion", settings=SETTINGS, callbacks=[grab], progress=False)
        _RUNS[spec] = dict(base=base, path=path, before=before, trained_pipe=pipe, **seen)
    return _RUNS[spec]


def C_inv_of(pipe) -> torch.Tensor:
    return inverse(load_or_compute_covariance(pipe))


def rank1_reference(x, W, bias, i_stars, o_stars, C_inv, beta=None, tau=None):
    """The variant's Eq. 4 written out with normal equations: ``x = x_perp + sum_j c_j i*_j`` with ``x_perp``
    C^-1-orthogonal to every target (``c = G^-1 I C^-1 x``, ``G = I C^-1 I^T``); ``W x_perp + b + sum_j g(c_j)
    o*_j`` (float64). With one target ``c = s``, the paper's similarity."""
    x, W, I, O, C_inv = (t.double() for t in (x, W, i_stars, o_stars, C_inv))
    gram = I @ C_inv @ I.T  # (J, J)
    coeff = torch.linalg.solve(gram, I @ C_inv @ x.mT).mT  # (..., J)
    x_perp = x - coeff @ I
    g = coeff if beta is None else torch.sigmoid((coeff - beta) / tau)
    return x_perp @ W.T + bias.double() + g @ O


def single_reference(x, W, bias, i_star, o_star, C_inv):
    """The single-concept, single-target ungated edit: ``W x + b - s W i* + s o*``."""
    x, W, i, o, C_inv = (t.double() for t in (x, W, i_star, o_star, C_inv))
    s = (x @ C_inv @ i) / (i @ C_inv @ i)
    return x @ W.T + bias.double() - s[..., None] * (W @ i) + s[..., None] * o


def sites(pipe):
    return [(name, attn) for name, attn in joint_attentions(pipe.transformer)]


def test_one_concept_through_the_multi_concept_path_is_the_single_formula(run):
    pipe, concept = run["base"], load_concept(run["path"])
    C_inv = C_inv_of(pipe)
    segments = len(dit_segments(pipe))
    assert segments == {"flux": 1, "sd3": 2}[families.of(pipe).name]  # T5's rows; CLIP's and T5's
    assert C_inv.shape == (len(sites(pipe)), 32, 32)
    with attach(pipe, concept, gate="off"):
        for b, (name, attn) in enumerate(sites(pipe)):
            i_star = concept.tensors[f"i_star.{_key(name)}"]
            assert i_star.shape == (segments, attn.add_k_proj.in_features)
            x = torch.randn(2, 5, i_star.shape[-1], generator=torch.Generator().manual_seed(b)) + i_star[0]
            for p in "kv":
                site = getattr(attn, f"add_{p}_proj")
                layer = site.base_layer
                o_star = concept.tensors[f"o_{p}.{_key(name)}"]
                got = site(x).double()
                want = rank1_reference(x, layer.weight, layer.bias, i_star, o_star, C_inv[b])
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                if segments == 1:  # Flux: one target per block, the single formula itself
                    single = single_reference(x, layer.weight, layer.bias, i_star[0], o_star[0], C_inv[b])
                    torch.testing.assert_close(got, single, rtol=1e-4, atol=1e-4)
    assert pipeline_state(pipe, create=False) is None


def test_two_concepts_share_one_projection_per_block_eq4(run):
    pipe, first = run["base"], load_concept(run["path"])
    C_inv = C_inv_of(pipe)
    g = torch.Generator().manual_seed(2)
    second = Concept(dict(first.header, token="<cube>"),
                     {k: (t + 0.5 * torch.randn(t.shape, generator=g) if not k.startswith("o_k.") else t)
                      for k, t in first.tensors.items()}, None)
    with attach(pipe, [second, first], beta=0.6, tau=0.2):
        for b, (name, attn) in enumerate(sites(pipe)):
            x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(10 + b))
            for p in "kv":
                layer = getattr(attn, f"add_{p}_proj").base_layer
                # the group's members are sorted by token: <cube> before <disc>
                I = torch.cat([second.tensors[f"i_star.{_key(name)}"], first.tensors[f"i_star.{_key(name)}"]])
                O = torch.cat([second.tensors[f"o_{p}.{_key(name)}"], first.tensors[f"o_{p}.{_key(name)}"]])
                want = rank1_reference(x, layer.weight, layer.bias, I, O, C_inv[b], beta=0.6, tau=0.2)
                torch.testing.assert_close(getattr(attn, f"add_{p}_proj")(x).double(), want, rtol=1e-4, atol=1e-4)
    assert pipeline_state(pipe, create=False) is None


def test_key_lock_maps_each_blocks_i_star_to_the_superclass_key(run):
    """o*_K of block l is W_K e_super,l; the site maps i*_l to o*_K + b, i.e. the base key of e_super,l, exactly
    ungated and with the gate open (s = 1 at i*; sigmoid(0.5 / 0.01) = 1 in float)."""
    pipe, concept, e_super = run["base"], load_concept(run["path"]), run["e_super"]
    for gate in ({"gate": "off"}, {"beta": 0.5, "tau": 0.01}):
        with attach(pipe, concept, **gate):
            for name, attn in sites(pipe):
                key = attn.add_k_proj
                locked = key(concept.tensors[f"i_star.{_key(name)}"])
                superclass_key = key.base_layer(e_super[name])
                torch.testing.assert_close(locked, superclass_key, rtol=1e-4, atol=1e-4)
                # the concept's trained i* is not e_super: the lock is what makes these equal
                assert not torch.allclose(key.base_layer(concept.tensors[f"i_star.{_key(name)}"]), superclass_key,
                                          atol=1e-3)
    assert pipeline_state(pipe, create=False) is None


def denoise(pipe, prompt):
    """One transformer call at a fixed noised latent (the family's training call)."""
    family = families.of(pipe)
    encoding = text_stack.encode(pipe, [prompt])
    g = torch.Generator().manual_seed(4)
    side = family.native_resolution(pipe) // int(pipe.vae_scale_factor)
    latents = torch.randn(1, pipe.vae.config.latent_channels, side, side, generator=g)
    noised = family.noised(family.noise_schedule(pipe), latents, torch.randn(latents.shape, generator=g),
                           torch.tensor([500]))
    with torch.no_grad():
        return family.predict(pipe, pipe.transformer, noised, encoding.context, encoding.pooled)


def test_an_identity_concept_with_the_gate_off_gives_the_base_output(run):
    """i*_l = e_super,l and o*_{K,V} = W e_super,l make every site's ungated edit W x (up to rounding), and the
    token's vector is the superclass word's: the transformer then computes the superclass prompt, the pooled
    vectors included (they read the superclass prompt for a row holding the token; Flux's CLIP-L would otherwise
    pool at the token's row, its highest id)."""
    pipe, concept = run["base"], load_concept(run["path"])
    base = denoise(pipe, PROMPT.replace("<disc>", "ball"))
    tensors = dict(concept.tensors, embedding=word_vector(pipe, "ball").view(1, -1).float())
    for name, attn in sites(pipe):
        e = run["e_super"][name]
        tensors[f"i_star.{_key(name)}"] = e
        tensors[f"o_v.{_key(name)}"] = (e @ attn.add_v_proj.weight.T).contiguous()
        torch.testing.assert_close(tensors[f"o_k.{_key(name)}"], e @ attn.add_k_proj.weight.T)
    identity = Concept(concept.header, tensors, None)
    with attach(pipe, identity, gate="off"):
        edited = denoise(pipe, PROMPT)
    tolerance = 1e-4 * base.abs().max().item()
    torch.testing.assert_close(edited, base, rtol=0, atol=tolerance)
    with attach(pipe, concept, gate="off"):  # the trained concept (two steps) does change it
        assert (denoise(pipe, PROMPT) - base).abs().max() > 10 * tolerance
    assert pipeline_state(pipe, create=False) is None


def test_training_changes_only_the_token_o_v_and_i_star(run):
    pipe, state, e_super = run["trained_pipe"], run["state"], run["e_super"]
    after = {f"{part}.{k}": v for part in ("transformer", "vae", *[te for _, te in text_stack.pairs(pipe)])
             for k, v in getattr(pipe, part).state_dict().items()}
    assert after.keys() == run["before"].keys()
    assert all(torch.equal(after[k], v) for k, v in run["before"].items()), "a base tensor changed"
    assert not torch.equal(state["embedding"], word_vector(pipe, "ball").view(1, -1).float().cpu())
    names = [name for name, _ in sites(pipe)]
    assert {k for k in state} == {"embedding", *(f"{t}.{_key(n)}" for n in names for t in ("i_star", "o_v", "o_k"))}
    for name, attn in sites(pipe):
        e = e_super[name]
        assert not torch.allclose(state[f"o_v.{_key(name)}"], e @ attn.add_v_proj.weight.T), "o*_V did not train"
        torch.testing.assert_close(state[f"o_k.{_key(name)}"], e @ attn.add_k_proj.weight.T)  # locked
        assert not torch.allclose(state[f"i_star.{_key(name)}"], e), "i* did not follow the concept's inputs"


def test_global_key_lock_is_refused_in_one_line(run):
    pipe = run["base"]
    with pytest.raises(BadInputError) as err:
        attach(pipe, run["path"], lock="global")
    message = str(err.value)
    assert "\n" not in message and "lock=global" in message and families.of(pipe).label in message
    assert pipeline_state(pipe, create=False) is None
