"""What one Perfusion training step may and may not change."""
import copy

import torch

from personalize import train
from personalize.methods.perfusion import Perfusion, PerfusionConfig, superclass_encoding
from personalize.training import denoising_loss

ONE_STEP = {"steps": 1, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}


def _run_one_step(pipe, photos, tmp_path, **settings):
    seen = {}

    def grab(step, loss, method):
        seen["state"] = {k: v.clone() for k, v in method.state_tensors().items()}
        seen["o_k"] = {k: v.detach().clone() for k, v in method.o_k.items()}
        seen["e_super"] = method.e_super.clone()

    train(pipe, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
          settings={**ONE_STEP, **settings}, progress=False, callbacks=[grab])
    return seen


def _initial(pipe, lock="local"):
    method = Perfusion(pipe, "<disc>", "ball", PerfusionConfig(lock=lock), C_inv=torch.eye(32, dtype=torch.float64))
    return method.state_tensors(), {k: v.detach().clone() for k, v in method.o_k.items()}


def test_one_step_changes_exactly_token_and_values(tiny, photos, tmp_path):
    before_base = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    before_base.update({f"te.{k}": v.clone() for k, v in tiny.text_encoder.state_dict().items()})
    init_state, init_o_k = _initial(copy.deepcopy(tiny))
    seen = _run_one_step(tiny, photos, tmp_path)
    state = seen["state"]
    assert not torch.equal(state["embedding"], init_state["embedding"]), "token vector did not train"
    o_v = [k for k in state if k.startswith("o_v.")]
    assert len(o_v) == 7
    for k in o_v:
        assert not torch.equal(state[k], init_state[k]), f"{k} did not train"
    for k, v in seen["o_k"].items():
        assert torch.equal(v, init_o_k[k]), f"o*_K {k} changed under key-locking"
    # i* starts from the first batch's concept-token encoding, not from e_super
    assert not torch.allclose(state["i_star"], seen["e_super"])
    after = {k: v for k, v in tiny.unet.state_dict().items()}
    after.update({f"te.{k}": v for k, v in tiny.text_encoder.state_dict().items()})
    assert after.keys() == before_base.keys()
    for k in before_base:
        assert torch.equal(after[k], before_base[k]), f"base weight {k} changed"


def test_trained_k_ablation_learns_keys(tiny, photos, tmp_path):
    _, init_o_k = _initial(copy.deepcopy(tiny), lock="trained")
    seen = _run_one_step(tiny, photos, tmp_path, lock="trained")
    assert all(not torch.equal(seen["o_k"][k], init_o_k[k]) for k in init_o_k)
    assert any(k.startswith("o_k.") for k in seen["state"])


def test_i_star_ema_uses_the_concept_token_position(tiny):
    method = Perfusion.for_training(tiny, "<disc>", "ball", PerfusionConfig(), C_inv=torch.eye(32, dtype=torch.float64))
    try:
        ids = tiny.tokenizer(["a photo of a <disc>", "<disc> and a <disc> toy"], padding="max_length",
                             max_length=77, return_tensors="pt").input_ids
        (token_id,) = tiny.tokenizer.convert_tokens_to_ids(["<disc>"])
        assert ids[0, 5] == token_id and ids[1, 1] == token_id  # BOS counted
        hidden = torch.randn(2, 77, 32)
        method.on_text_encoded(ids, hidden)
        first = (hidden[0, 5] + hidden[1, 1]) / 2  # first occurrence in each prompt
        assert torch.allclose(method.i_star, first)
        hidden2 = torch.randn(2, 77, 32)
        method.on_text_encoded(ids, hidden2)
        assert torch.allclose(method.i_star, 0.99 * first + 0.01 * (hidden2[0, 5] + hidden2[1, 1]) / 2)
    finally:
        method.remove()


def test_key_lock_starts_at_the_superclass(tiny):
    method = Perfusion(tiny, "<disc>", "ball", PerfusionConfig(), C_inv=torch.eye(32, dtype=torch.float64))
    e_super = superclass_encoding(tiny, "ball")
    name = method.layers[0]
    attn = tiny.unet.get_submodule(name)
    assert torch.allclose(method.target_output(name, "k"), attn.to_k.weight @ e_super, atol=1e-6)
    assert torch.allclose(method.target_output(name, "v"), attn.to_v.weight @ e_super, atol=1e-6)
    (ball_id,) = tiny.tokenizer("ball", add_special_tokens=False).input_ids
    assert torch.equal(method.embedding[0], tiny.text_encoder.get_input_embeddings().weight[ball_id])


def test_mask_weighted_loss_ignores_masked_out_pixels():
    pred, target = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    target[..., :, :2] = 5.0  # error only in the left half
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1.0  # weight only the right half
    assert denoising_loss(pred, target, mask) == 0
    assert denoising_loss(pred, target, None) > 0


def test_masked_training_runs_and_differs(tiny, photos, tmp_path):
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for p in photos.iterdir():
        m = Image.new("L", (40, 40), 0)
        m.paste(255, (0, 0, 20, 40))
        m.save(masks / p.name)
    plain = _run_one_step(copy.deepcopy(tiny), photos, tmp_path / "a")["state"]
    seen = {}
    train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "b.safetensors", masks=masks,
          settings=ONE_STEP, progress=False,
          callbacks=[lambda s, loss, m: seen.update(state=m.state_tensors())])
    o_v = [k for k in plain if k.startswith("o_v.")]
    assert any(not torch.equal(plain[k], seen["state"][k]) for k in o_v), "the mask did not change the update"


def test_gradient_checkpointing_gives_the_same_step(tiny, photos, tmp_path):
    plain = _run_one_step(copy.deepcopy(tiny), photos, tmp_path / "a")["state"]
    ckpt = _run_one_step(tiny, photos, tmp_path / "b", gradient_checkpointing=True)["state"]
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6), k


def test_the_edit_follows_i_star_when_the_projection_is_rewritten_in_place(tiny):
    """Training rewrites the shared projection's tensors in place each step (a compiled step keeps reading them);
    the site's cached W U_b must follow: after i* moves, the site's output is the rank-1 edit of the new i*."""
    from personalize.methods.rank1 import rank1_edit

    C_inv = torch.eye(32, dtype=torch.float64) + 0.1
    method = Perfusion.for_training(tiny, "<disc>", "ball", PerfusionConfig(), C_inv=C_inv)
    try:
        ids = tiny.tokenizer(["a photo of a <disc>"] * 2, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        attn = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
        layer = "down_blocks/0/attentions/0/transformer_blocks/0/attn2"
        e = torch.randn(3, 32)
        outputs = []
        for _ in range(2):
            method.on_text_encoded(ids, torch.randn(2, 77, 32))
            projection = method.group.projection(torch.float32, torch.device("cpu"))
            with torch.no_grad():
                outputs.append(attn.to_v(e))
            expected = rank1_edit(e, attn.to_v.base_layer.weight, method.i_star, method.target_output(layer, "v"),
                                  C_inv, method.beta, 0.1 if method.tau is None else method.tau)
            torch.testing.assert_close(outputs[-1], expected.float(), rtol=1e-4, atol=1e-5)
        assert method.group.projection(torch.float32, torch.device("cpu")) is projection  # rewritten in place
        assert not torch.allclose(outputs[0], outputs[1])
    finally:
        method.remove()
