"""Every method on the SD 2.x and SDXL miniatures (``tiny-sd2``, ``tiny-sdxl``), beyond the method contract
(``test_method_contract.py`` already checks attach/detach, save -> load -> attach and the knobs on every family):

- one training step changes only what the method declares trainable, never a tensor of the base;
- SDXL: Perfusion's edits live in the concatenated context (both encoders side by side), its token in both
  tokenizers and tables, global key-locking and Eq. 4 through a stock ``pipe(prompt)``; Residuals + LAG under
  SDXL's classifier-free guidance (zeroed negative embeddings, or a negative prompt);
- a Perfusion + Residuals + Textual Inversion composition on SDXL; concepts of another family are refused;
- ``--resolution`` and the bad-input promises of ``train`` / ``generate`` on the new families.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import assert_eq4_group, make_photos
from personalize import attach, load_base, load_concept, methods, text_stack, train
from personalize.concept import Concept
from personalize.edits.placement import cross_attention_layers
from personalize.edits.state import pipeline_state
from personalize.errors import PersonalizeError
from personalize.methods.perfusion import _key

NAMES = methods.names()
XL = "tiny-sdxl"
_TRAINED: dict[str, dict[str, object]] = {}  # base -> method -> concept file, shared by every test of the module
BASES = ("tiny-sd2", "tiny-sdxl")
ONE_STEP = {"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
# settings under which every declared tensor trains in one step (no class images: prior weight 0)
EXTRA = {"textual-inversion": {"num_vectors": 2}, "dreambooth-lora": {"train_text_encoder": True},
         "dreambooth": {"train_text_encoder": True, "lr": 1e-4, "prior_loss_weight": 0.0},
         "custom-diffusion": {"prior_loss_weight": 0.0}}
FROZEN = {"residuals": {"embedding"}}  # declared but frozen by default (the paper's V* is not trained)
PROMPT = "a photo of a <disc> ball on the grass"


def image(pipe, prompt=PROMPT, seed=3, steps=2, **kwargs):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def base_tensors(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the base: UNet, VAE, each text encoder (its token embedding table included)."""
    parts = {"unet": pipe.unet, "vae": pipe.vae, **{te: getattr(pipe, te) for _, te in text_stack.pairs(pipe)}}
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict(keep_vars=True).items()}


def unreachable(pipe) -> set[str]:
    """Text-encoder tensors (``text_encoder.encoder.layers.1.mlp.fc1.weight``) that do not reach the UNet: SDXL reads
    each encoder's penultimate hidden state, so the first encoder's last layer and final norm never do."""
    encoders = {te: copy.deepcopy(getattr(pipe, te)).requires_grad_(True) for _, te in text_stack.pairs(pipe)}
    copied = copy.copy(pipe)
    for te, module in encoders.items():
        setattr(copied, te, module)
    out = text_stack.encode(copied, ["a photo of a ball"])
    (out.context.sum() + (0 if out.pooled is None else out.pooled.sum())).backward()
    return {f"{te}.{n.removeprefix('text_model.')}" for te, m in encoders.items()
            for n, p in m.named_parameters() if p.grad is None}


def reaches_unet(key: str, dead: set[str]) -> bool:
    """Whether the trainable ``key`` (a text-encoder weight, or a LoRA pair on one) can change the UNet's input."""
    layer = key.split(".lora_", 1)[0] + ".weight" if ".lora_" in key else key
    return layer not in dead


# --------------------------------------------------------------------------- shared training (once per base)
@pytest.fixture(scope="module", params=BASES)
def base(request):
    pipe = load_base(request.param)
    pipe.spec = request.param
    return pipe


@pytest.fixture(scope="module")
def dead(base):
    return unreachable(base)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos") / "p", n=2)


@pytest.fixture(scope="module")
def stepped(base, photos, tmp_path_factory):
    """Each method trained one step on a copy of the base: its state before and after, and what the step touched."""
    from personalize.training import resolve_settings

    root = tmp_path_factory.mktemp("stepped")
    found = {}
    for name in NAMES:
        settings = {**ONE_STEP, **EXTRA.get(name, {})}
        pipe = copy.deepcopy(base)
        cls = methods.get(name)
        fresh = cls.for_training(pipe, "<disc>", "ball", resolve_settings(cls, settings)[1])
        initial = fresh.state_tensors()
        fresh.remove()
        tensors = base_tensors(pipe)
        frozen = {k: v.detach().clone() for k, v in tensors.items()}
        modules = {a: getattr(pipe, a) for a in ("unet", "vae", *[x for p in text_stack.pairs(pipe) for x in p])}
        seen = {}

        def after_step(step, loss, method, seen=seen, tensors=tensors, frozen=frozen):
            ids = {id(p) for g in method.param_groups() for p in g["params"]}
            seen.update(state=method.state_tensors(), in_optimizer=[k for k, v in tensors.items() if id(v) in ids],
                        changed=[k for k, v in tensors.items() if not torch.equal(v, frozen[k])])

        path = train(pipe, photos, token="<disc>", superclass="ball", out=root / f"{name}.safetensors", method=name,
                     settings=settings, callbacks=[after_step], progress=False)
        _TRAINED.setdefault(base.spec, {})[name] = path
        found[name] = dict(seen, initial=initial, path=path, pipe=pipe, frozen=frozen,
                           same_modules=all(getattr(pipe, a) is m for a, m in modules.items()))
    return found


@pytest.mark.parametrize("name", NAMES)
def test_one_step_changes_only_the_declared_tensors(name, stepped, base, dead):
    run = stepped[name]
    assert run["in_optimizer"] == [], f"base tensors handed to the optimizer: {run['in_optimizer'][:3]}"
    assert run["changed"] == [], f"base tensors changed by the step: {run['changed'][:3]}"
    state, initial = run["state"], run["initial"]
    assert state.keys() == initial.keys() and state
    # a LoRA's A gets no gradient while its B is still peft's zero init (the first step), unless weight decay moves it
    stuck = {k for k in state if k.endswith("lora_A.weight") and reaches_unet(k, dead)
             and not initial[k.replace("lora_A", "lora_B")].any()}
    assert bool(dead) == (text_stack.family(base) == "sdxl")
    unchanged = {k for k in state if torch.equal(state[k], initial[k]) and reaches_unet(k, dead)}
    assert unchanged <= FROZEN.get(name, set()) | stuck, f"declared tensors that did not train: {sorted(unchanged)[:3]}"
    assert not any(torch.equal(state[k.replace("lora_A", "lora_B")], initial[k.replace("lora_A", "lora_B")])
                   for k in stuck)
    # after training the pipeline holds its own modules again, bit for bit
    assert run["same_modules"], "the pipeline's modules were not restored"
    after = base_tensors(run["pipe"])
    assert after.keys() == run["frozen"].keys()
    assert all(torch.equal(after[k], v) for k, v in run["frozen"].items())
    # what each method trains on the family's text side
    encoders = [te for _, te in text_stack.pairs(base)]
    if name == "dreambooth-lora":
        assert {"unet", "text_encoder"} <= {k.split(".")[0] for k in state} <= {"unet", *encoders}
    if name == "dreambooth":
        assert {k.split(".")[0] for k in state} >= {"unet", "text_encoder"}
        assert not any(".embeddings." in k for k in state)  # the text encoders trained, their tables did not
    if name == "textual-inversion":  # one vector per encoder per token: each encoder's slice got a gradient
        assert state["embedding"].shape == (2, sum(text_stack.widths(base)))
        lr = methods.get(name).make_config(EXTRA[name]).lr
        for part in slices(base):  # AdamW's first step moves an element with a gradient by ~lr, one without by
            moved = (state["embedding"][:, part] - initial["embedding"][:, part]).abs()  # weight decay only
            assert moved.max() > lr / 2, (part, moved.max())


def test_dreambooth_lora_trains_both_sdxl_text_encoders(stepped, base):
    if text_stack.family(base) != "sdxl":
        pytest.skip("one text encoder")
    state = stepped["dreambooth-lora"]["state"]
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}


# --------------------------------------------------------------------------- SDXL: the shared fixtures
def trained_on(spec: str, name: str, photos, root) -> object:
    """The concept file of ``name`` trained one step on ``spec`` (the one ``stepped`` wrote, when it ran)."""
    if name not in _TRAINED.get(spec, {}):
        _TRAINED.setdefault(spec, {})[name] = train(
            load_base(spec), photos, token="<disc>", superclass="ball", out=root / f"{spec}-{name}.safetensors",
            method=name, settings={**ONE_STEP, **EXTRA.get(name, {})}, progress=False)
    return _TRAINED[spec][name]


@pytest.fixture(scope="module")
def xl_master():
    return load_base(XL)


@pytest.fixture
def xl(xl_master):
    return copy.deepcopy(xl_master)


@pytest.fixture(scope="module")
def xl_concepts(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    return {name: load_concept(trained_on(XL, name, photos, root))
            for name in ("perfusion", "residuals", "textual-inversion")}


def slices(pipe) -> list[slice]:
    """Each text encoder's columns of a token vector."""
    out, start = [], 0
    for w in text_stack.widths(pipe):
        out.append(slice(start, start + w))
        start += w
    return out


def C_inv_of(pipe, concept):
    from personalize.covariance import covariance_for, inverse

    return inverse(covariance_for(pipe, concept.header.get("covariance", "builtin"))).double()


def second_concept(first, C_inv, token="<cube>"):
    """A second Perfusion concept whose i* is C^-1-orthogonal to the first's, with its own o*_V (test_compose.py)."""
    i1 = first.tensors["i_star"].double()
    v = torch.randn(i1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * i1.norm() / i1.numel() ** 0.5
    v = v - (i1 @ C_inv @ v) / (i1 @ C_inv @ i1) * i1
    tensors = {k: (-t if k.startswith("o_v.") else t) for k, t in first.tensors.items()}
    tensors["i_star"] = v.float()
    return Concept(dict(first.header, token=token), tensors, None)


# --------------------------------------------------------------------------- SDXL: Perfusion
def test_perfusion_lives_in_the_concatenated_context_and_both_tables(xl, xl_concepts):
    concept = xl_concepts["perfusion"]
    width = sum(text_stack.widths(xl))
    assert text_stack.widths(xl) == [32, 32]  # clip_l + clip_g in miniature (768 + 1280 on SDXL)
    layers = list(cross_attention_layers(xl.unet))
    assert layers
    for name, attn in layers:
        assert attn.to_k.in_features == attn.to_v.in_features == width
        assert concept.tensors[f"o_v.{_key(name)}"].shape == (attn.to_v.out_features,)
    assert concept.tensors["i_star"].shape == (width,) and concept.tensors["embedding"].shape == (1, width)
    vocab = len(xl.tokenizer)
    with attach(xl, concept, beta=0.5, tau=0.02):
        ids = [getattr(xl, tok).convert_tokens_to_ids("<disc>") for tok, _ in text_stack.pairs(xl)]
        assert ids[0] == ids[1] >= vocab
        for (_, te), part in zip(text_stack.pairs(xl), slices(xl)):  # each table reads its own slice
            row = getattr(xl, te).get_input_embeddings()(torch.tensor([ids[0]]))[0]
            assert torch.equal(row, concept.tensors["embedding"][0, part])
        first, second = text_stack.tokenize(xl, [PROMPT])
        assert torch.equal((first[0] == ids[0]).nonzero(), (second[0] == ids[0]).nonzero())
        # the rank-1 property in the 64-wide space: the site maps i* to o*_V (gate open at s = 1)
        for name, _ in layers:
            out = xl.unet.get_submodule(f"{name}.to_v")(concept.tensors["i_star"].view(1, 1, -1))[0, 0]
            o_star = concept.tensors[f"o_v.{_key(name)}"]
            torch.testing.assert_close(out, o_star, rtol=1e-3, atol=1e-3 * o_star.abs().max().item())
    assert pipeline_state(xl, create=False) is None and len(xl.tokenizer_2) == vocab


def identity_concept(pipe, concept):
    """``concept`` rewritten so that its ungated edit is the identity: i* = e_super, o*_V = W_V e_super (o*_K is
    W_K e_super by key-locking) and the token's vector is the superclass word's, so with the gate off every K/V
    site computes W e and the concept's prompt encodes like the superclass prompt."""
    from personalize.methods.perfusion import superclass_encoding
    from personalize.methods.shared import word_vector

    e_super = superclass_encoding(pipe, concept.superclass)
    tensors = dict(concept.tensors, i_star=e_super.float(), embedding=word_vector(pipe, "ball").view(1, -1).float())
    for name, attn in cross_attention_layers(pipe.unet):
        tensors[f"o_v.{_key(name)}"] = (attn.to_v.weight.float() @ e_super.float()).contiguous()
    return Concept(concept.header, tensors, None)


@pytest.mark.parametrize("lock", ["local", "global"])
def test_an_identity_edit_with_the_gate_off_gives_the_base_image_on_sdxl(xl, xl_concepts, lock):
    base = image(xl, PROMPT.replace("<disc>", "ball"))
    with attach(xl, identity_concept(xl, xl_concepts["perfusion"]), gate=False, lock=lock):
        edited = image(xl)
    tolerance = 2e-3  # float rounding of W e - s W i* + s o*
    np.testing.assert_allclose(edited, base, rtol=0, atol=tolerance)
    # the trained concept (one step) does change it, beyond that tolerance: 0.0055 through its K/V edits and its
    # token's context (before the pooled vector read the superclass, test_sdxl_pooled.py, its leak doubled that)
    with attach(xl, xl_concepts["perfusion"], gate=False, lock=lock):
        assert np.abs(image(xl) - base).max() > 2 * tolerance


def keys_and_values(pipe, prompt, **kwargs):
    """K and V of every cross-attention in the first UNet call of a stock ``pipe(prompt)`` under CFG, and the
    UNet's context (rows: negative, positive)."""
    seen = {}

    def keep(key, value):  # the first call's value; hooks return None, so nothing is replaced
        if key not in seen:
            seen[key] = value.detach().clone()

    hooks = [pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: keep("context", kw["encoder_hidden_states"]), with_kwargs=True)]
    for name, _ in cross_attention_layers(pipe.unet):
        for p in "kv":
            hooks.append(pipe.unet.get_submodule(f"{name}.to_{p}").register_forward_hook(
                lambda m, a, out, key=(name, p): keep(key, out)))
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=6.0, output_type="latent", **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_global_key_lock_on_sdxl_reads_the_superclass_keys_in_both_cfg_halves(xl, xl_concepts, negative):
    concept, kw = xl_concepts["perfusion"], ({"negative_prompt": negative} if negative else {})
    superclass_prompt = PROMPT.replace("<disc>", "ball")
    with attach(xl, concept, lock="global", beta=0.6) as handle:
        assert handle.methods[0].group.key_lock is not None
        locked, locked_super = keys_and_values(xl, PROMPT, **kw), keys_and_values(xl, superclass_prompt, **kw)
        locked_image = image(xl, **kw)
    with attach(xl, concept, beta=0.6):
        local = keys_and_values(xl, PROMPT, **kw)
        local_image = image(xl, **kw)
    context = local["context"]
    assert context.shape[0] == 2 and (negative is not None) == bool(context[0].any())  # SDXL zeroes no-negative
    pairs = [k for k in local if k != "context"]
    assert pairs
    for key in pairs:
        if key[1] == "k":  # K reads the superclass prompt, in the positive row only
            assert torch.equal(locked[key], locked_super[key])
            assert torch.equal(locked[key][0], local[key][0]) and not torch.equal(locked[key][1], local[key][1])
        else:  # V reads the prompt as written, in both locks
            assert torch.equal(locked[key], local[key]) and not torch.equal(locked[key], locked_super[key])
    assert not np.array_equal(locked_image, local_image)
    assert pipeline_state(xl, create=False) is None


def test_two_perfusion_concepts_on_sdxl_share_one_projection_eq4(xl, xl_concepts):
    first = xl_concepts["perfusion"]
    second = second_concept(first, C_inv_of(xl, first))
    layers = [name for name, _ in cross_attention_layers(xl.unet)]
    with attach(xl, first, beta=0.6):
        single = image(xl, "a <disc> next to a cup")
    with attach(xl, [(first, {"beta": 0.6})]):
        assert np.array_equal(image(xl, "a <disc> next to a cup"), single)  # one concept in the list path
    with attach(xl, [second, first], beta=0.5, tau=0.02):
        assert_eq4_group(xl, [first, second], layers, width=sum(text_stack.widths(xl)))
        both = image(xl, "a <disc> next to a <cube>")
    with attach(xl, [first, second], beta=0.5, tau=0.02):
        assert np.array_equal(image(xl, "a <disc> next to a <cube>"), both)


# --------------------------------------------------------------------------- SDXL: Residuals + LAG under CFG
@pytest.fixture(scope="module")
def strong_xl(xl_concepts):
    """The residuals concept with its residuals scaled up, so that where they apply is plain to see (test_lag.py)."""
    concept = xl_concepts["residuals"]
    tensors = {k: v * 200 if k.endswith("lora_B.weight") else v for k, v in concept.tensors.items()}
    return Concept(concept.header, tensors, concept.path)


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_lag_on_sdxl_runs_through_stock_pipe_in_both_cfg_halves(xl, strong_xl, negative, monkeypatch):
    """No negative prompt: SDXL's pipeline feeds a zero context row, which matches no prompt; with one, the row is
    the negative prompt's. Either way the unconditional row takes the conditional row's mask (edits/lag.py)."""
    from personalize.edits.attention_maps import attention_maps

    kw = {"negative_prompt": negative} if negative else {}
    base = image(xl, PROMPT.replace("<disc>", "httr"), **kw)  # V* is the frozen 'httr' vector
    with attach(xl, strong_xl):
        personal = image(xl, **kw)
    with attach(xl, strong_xl, lag=True):
        localized = image(xl, **kw)
        store = attention_maps(xl)
        assert store.plan.source == [1, 1]  # rows: negative, positive
        assert store.masks
        for block in store.masks.values():
            for mask in block.values():
                assert torch.equal(mask[0], mask[1]) and 0 < mask[1].float().mean() < 1
    assert not np.array_equal(personal, base) and not np.array_equal(localized, personal)
    monkeypatch.setattr("personalize.edits.lag.exclusive_masks", lambda a, active=None: torch.zeros_like(a, dtype=torch.bool))
    with attach(xl, strong_xl, lag=True):
        assert np.array_equal(image(xl, **kw), base)  # masks off: the base model exactly
    monkeypatch.setattr("personalize.edits.lag.exclusive_masks", lambda a, active=None: torch.ones_like(a, dtype=torch.bool))
    with attach(xl, strong_xl, lag=True):
        assert np.array_equal(image(xl, **kw), personal)  # masks on everywhere: the residuals without LAG
    assert pipeline_state(xl, create=False) is None


# --------------------------------------------------------------------------- SDXL: composition, families
MIXED = "a <disc> next to a <pot> ball, in <style> style"


def test_perfusion_residuals_and_textual_inversion_compose_on_sdxl_in_any_order(xl, xl_concepts):
    items = [xl_concepts["perfusion"], (xl_concepts["residuals"], {"token": "<pot>", "lag": 1}),
             (xl_concepts["textual-inversion"], {"token": "<style>"})]
    before = image(xl, "a ball next to a ball")
    outputs = []
    for order in (items, items[::-1]):  # (test_method_contract.py tries three orders without LAG)
        with attach(xl, order):
            outputs.append(image(xl, MIXED, steps=1))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])
    with attach(xl, items[:1]):
        assert not np.array_equal(image(xl, MIXED, steps=1), outputs[0])  # the others take part
    assert pipeline_state(xl, create=False) is None and np.array_equal(image(xl, "a ball next to a ball"), before)


@pytest.fixture(scope="module")
def other_families(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {spec: trained_on(spec, "textual-inversion", photos, root) for spec in ("tiny", "tiny-sd2")}


@pytest.mark.parametrize("spec, family", [("tiny", "SD 1.x"), ("tiny-sd2", "SD 2.x")])
def test_a_concept_of_another_family_is_refused_naming_both(xl, xl_concepts, other_families, spec, family):
    refused(xl, other_families[spec], family, "SDXL")
    refused(load_base(spec), xl_concepts["perfusion"], "SDXL", family)  # and the other way round


@pytest.mark.parametrize("spec, family", [("tiny", "SD 1.x"), ("tiny-sd2", "SD 2.x")])
def test_a_composition_with_a_concept_of_another_family_is_refused_naming_both(xl, xl_concepts, other_families,
                                                                               spec, family):
    refused(xl, [xl_concepts["textual-inversion"], (other_families[spec], {"token": "<o>"})], family, "SDXL")


def refused(pipe, items, *words):
    with pytest.raises(PersonalizeError) as err:
        attach(pipe, items)
    message = str(err.value)
    assert all(w in message for w in words) and "\n" not in message, message
    assert pipeline_state(pipe, create=False) is None


# --------------------------------------------------------------------------- --resolution, bad input through the CLI
def test_a_non_native_resolution_trains_at_that_size_and_is_recorded(photos, tmp_path):
    pipe = load_base(XL)
    assert text_stack.native_resolution(pipe) == 32
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((tuple(a[0].shape), kw["added_cond_kwargs"]["time_ids"][0].tolist())),
        with_kwargs=True)
    try:
        path = train(pipe, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
                     method="textual-inversion", settings={**ONE_STEP, "resolution": 64}, progress=False)
    finally:
        hook.remove()
    assert seen == [((1, 4, 32, 32), [64.0, 64.0, 0.0, 0.0, 64.0, 64.0])]  # latents and SDXL's time ids at 64 px
    assert load_concept(path).header["provenance"]["resolution"] == 64


BAD_TRAIN = {  # (train_args keywords, extra flags, words the one error line names)
    "token-in-vocabulary": ({"token": "dog"}, [], ("'dog'", "already in the vocabulary")),
    "token-path": ({"token": "<a/b>"}, [], ("not a valid token", "path separator")),
    "resolution-off-stride": ({}, ["--resolution", "30"], ("--resolution", "multiple of 4")),
    "resolution-negative": ({}, ["--resolution", "-64"], ("--resolution",)),
    "resolution-huge": ({}, ["--resolution", "1000000"], ("--resolution",)),
    "images-missing": ({"images": "NO_SUCH"}, [], ("does not exist", "--images")),
    "images-empty": ({"images": "EMPTY"}, [], ("no images",)),
}


@pytest.mark.parametrize("spec", BASES)
@pytest.mark.parametrize("given, extra, words", list(BAD_TRAIN.values()), ids=list(BAD_TRAIN))
def test_train_refuses_bad_input_on_the_new_families(capsys, photos, tmp_path, spec, given, extra, words):
    from test_bad_input import assert_no_train_output, check_error, run_cli, train_args

    (tmp_path / "EMPTY").mkdir()
    out = tmp_path / "out" / "c.safetensors"
    given = dict(given)  # parametrize shares the dict between the two bases
    images = tmp_path / given.pop("images") if "images" in given else photos
    code, _, err = run_cli(capsys, train_args(images, out, *extra, base=spec, **given))
    check_error(code, err, *words)
    assert_no_train_output(out)


@pytest.fixture(scope="module")
def xl_ti_file(photos, tmp_path_factory):
    return trained_on(XL, "textual-inversion", photos, tmp_path_factory.mktemp("xl-ti"))


def test_generate_at_a_non_native_resolution_on_sdxl(capsys, xl_ti_file, tmp_path):
    from PIL import Image

    from test_bad_input import gen_args, run_cli

    code, _, err = run_cli(capsys, gen_args(xl_ti_file, tmp_path / "gen", "--resolution", "64", base=XL))
    assert code == 0, err
    (png,) = (tmp_path / "gen").glob("*.png")
    assert Image.open(png).size == (64, 64)


@pytest.mark.parametrize("size, words", [("30", ("--resolution", "multiple of 4")), ("-64", ("--resolution",)),
                                         ("1000000", ("--resolution",))], ids=["off-stride", "negative", "huge"])
def test_generate_refuses_a_bad_resolution_on_sdxl(capsys, xl_ti_file, tmp_path, size, words):
    from test_bad_input import assert_no_images, check_error, gen_args, run_cli

    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(xl_ti_file, folder, "--resolution", size, base=XL))
    check_error(code, err, *words)
    assert_no_images(folder)
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.iterdir())


def test_inspect_names_the_family(capsys, xl_concepts):
    from test_bad_input import run_cli

    code, out, _ = run_cli(capsys, ["inspect", xl_concepts["textual-inversion"].path])
    assert code == 0 and "(SDXL)" in out
