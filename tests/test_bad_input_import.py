"""``import`` as an attacker (or a damaged download) would feed it, on SD 1.x (``tiny``) and SDXL (``tiny-sdxl``).

Every imported tensor must be finite, floating point and of the exact shape the base needs before anything is
written; every malformed file (wrong dtype, missing or extra keys, a non-tensor, truncated or empty) is one line,
exit code 2, and no output file. Each format first imports cleanly in its valid form (the control), so a refusal
below is caused by the one thing each case changes. Also: ``inspect`` on a forged header holding 100k-character
strings prints them cut (rich took minutes to lay them out) and still prints all of it with ``--json``.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from test_bad_input import check_error, run_cli

BASES = ("tiny", "tiny-sdxl")


@pytest.fixture(scope="module")
def pipes():
    from personalize.base import load_base

    return {name: load_base(name) for name in BASES}


@pytest.fixture(autouse=True)
def _shared_bases(monkeypatch, pipes):
    """``--base tiny`` gives the module's pipeline instead of building a new one per case (import leaves the
    base as it was: the method contract), so a hundred cases stay fast."""
    import personalize.base

    real = personalize.base.load_base
    monkeypatch.setattr(personalize.base, "load_base",
                        lambda spec, *a, **k: pipes[spec] if not a and not k and spec in pipes else real(spec, *a, **k))


def _widths(pipe) -> list[int]:
    from personalize.text_stack import widths

    return list(widths(pipe))


# --------------------------------------------------------------------------- valid files of each format
def ti_state(pipe) -> dict:
    """diffusers' ``{token: (1, d)}``; SDXL: the two-key ``{clip_l, clip_g}`` layout."""
    g = torch.Generator().manual_seed(0)
    w = _widths(pipe)
    if len(w) == 2:
        return {"clip_l": torch.randn(1, w[0], generator=g), "clip_g": torch.randn(1, w[1], generator=g)}
    return {"<cat>": torch.randn(1, w[0], generator=g)}


def lora_state(pipe) -> dict:
    """A kohya LoRA (rank 2, alpha 1) on the UNet's cross-attention to_k and the text encoder's attention."""
    g = torch.Generator().manual_seed(1)
    te_prefix = "lora_te_" if len(_widths(pipe)) == 1 else "lora_te1_"
    out = {}
    for prefix, module, ends in (("lora_unet_", pipe.unet, ("attn2.to_k",)),
                                 (te_prefix, pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, layer in module.named_modules():
            if not name.endswith(ends):
                continue
            if prefix != "lora_unet_" and not name.startswith("text_model."):
                name = "text_model." + name
            stem = prefix + name.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = 0.3 * torch.randn(2, layer.in_features, generator=g)
            out[f"{stem}.lora_up.weight"] = 0.3 * torch.randn(layer.out_features, 2, generator=g)
            out[f"{stem}.alpha"] = torch.tensor(1.0)
    return out


def cd_state(pipe) -> dict:
    """diffusers' ``pytorch_custom_diffusion_weights``: full K/V weights of every cross-attention processor."""
    from personalize.edits.placement import cross_attention_layers

    cross = dict(cross_attention_layers(pipe.unet))
    out = {}
    for name in pipe.unet.attn_processors:
        layer = name[: -len(".processor")]
        if layer not in cross:
            out[name] = torch.zeros(0)
            continue
        for p in "kv":
            out[f"{name}.to_{p}_custom_diffusion.weight"] = getattr(cross[layer], f"to_{p}").weight.detach() + 0.01
    return out


def _write(path, state, pickle: bool = False, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(state, path)
    else:
        save_file(state, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- the damage
def mutations(state: dict) -> dict[str, dict]:
    """A few dozen ways to break one file of tensors: {case: broken state}. The first tensor is damaged."""
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 0]
    k, v = keys[0], state[keys[0]]

    def put(key, value):
        return {**state, key: value}

    nan = v.clone()
    nan.view(-1)[0] = float("nan")
    return {
        "nan": put(k, nan),
        "inf": put(k, torch.full_like(v, float("inf"))),
        "neg-inf-last": put(keys[-1], torch.full_like(state[keys[-1]], float("-inf"))),
        "int32": put(k, v.to(torch.int32)),
        "bool": put(k, v > 0),
        "one-wider": put(k, torch.zeros(*v.shape[:-1], v.shape[-1] + 1)),
        "one-column": put(k, torch.zeros(v.shape[0], 1)),
        "three-d": put(k, v.unsqueeze(0).repeat(2, 1, 1)),
        "scalar": put(k, torch.tensor(1.0)),
        "no-rows": put(k, torch.zeros(0, v.shape[-1])),
        "missing": {key: val for key, val in state.items() if key != k},
    }


def _cases():
    """(base, format, case): every mutation of every format on every base, plus format-specific damage."""
    out = []
    for base in BASES:
        formats = ["ti", "lora", "cd", "cd-token"] + (["a1111-pt", "a1111-st"] if base == "tiny" else [])
        for fmt in formats:
            out += [(base, fmt, case) for case in mutations({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)})]
        out += [(base, "lora", "alpha-vector"), (base, "lora", "metadata-not-json"),
                (base, "lora", "metadata-a-list"), (base, "lora", "metadata-rank-text"), (base, "lora", "one-row"),
                (base, "cd", "broadcast-row"), (base, "cd", "extra-key"),
                (base, "raw", "empty-file"), (base, "raw", "garbage"), (base, "raw", "truncated"),
                (base, "raw", "header-too-long")]
    out += [("tiny", "a1111-pt", "param-is-text"), ("tiny", "a1111-pt", "param-is-list"),
            ("tiny", "a1111-pt", "not-a-dict")]
    return out


def _files(pipe, tmp_path, fmt: str, case: str):
    """(file, extra CLI arguments) for one case."""
    sdxl = len(_widths(pipe)) == 2
    folder = tmp_path / "in"
    token = ["--token", "<cat>"]
    if fmt == "raw":
        data = save_file_bytes(ti_state(pipe))
        broken = {"empty-file": b"", "garbage": b"not a safetensors file at all",
                  "truncated": data[: len(data) - 7],
                  "header-too-long": (10**9).to_bytes(8, "little") + data[8:]}[case]
        path = folder / "learned_embeds.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(broken)
        return path, ["--method", "textual-inversion", *token]
    if fmt == "ti":
        state = _pick(ti_state(pipe), case)
        return _write(folder / "learned_embeds.safetensors", state), ["--method", "textual-inversion", *token]
    if fmt == "a1111-st":
        state = _pick({"emb_params": ti_state(pipe)["<cat>"]}, case)
        return _write(folder / "cat.safetensors", state), ["--method", "textual-inversion", *token]
    if fmt == "a1111-pt":
        vectors = ti_state(pipe)["<cat>"]
        special = {"param-is-text": {"string_to_param": {"*": "vectors"}, "name": "<cat>"},
                   "param-is-list": {"string_to_param": [vectors], "name": "<cat>"},
                   "not-a-dict": [vectors]}
        state = special.get(case) or {"string_to_param": _pick({"*": vectors}, case), "name": "<cat>",
                                      "string_to_token": {"*": 265}, "step": 0}
        return _write(folder / "cat.pt", state, pickle=True), ["--method", "textual-inversion", "--allow-pickle"]
    if fmt == "lora":
        state, metadata = lora_state(pipe), None
        alpha = next(k for k in state if k.endswith(".alpha"))
        down = next(k for k in state if k.endswith(".lora_down.weight"))
        if case == "alpha-vector":
            state[alpha] = torch.ones(3)
        elif case == "one-row":  # lora_down of rank 1 against a lora_up of rank 2
            state[down] = state[down][:1]
        elif case.startswith("metadata"):
            state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
            metadata = {"lora_adapter_metadata": {"metadata-not-json": "{r: 4",
                                                  "metadata-a-list": "[4, 1]",
                                                  "metadata-rank-text": '{"r": "four", "lora_alpha": 1}'}[case]}
        else:
            state = _pick(state, case)
        return _write(folder / "lora.safetensors", state, metadata=metadata), ["--method", "dreambooth-lora", *token]
    weights, tok = cd_state(pipe), ti_state(pipe)
    first = next(k for k, v in weights.items() if v.numel())
    if fmt == "cd":
        if case == "broadcast-row":  # one row: W + dW would broadcast it over every row
            weights[first] = weights[first][:1].clone()
        elif case == "extra-key":
            weights["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(4, 4)
        else:
            weights = _pick(weights, case)
    else:
        tok = _pick(tok, case)
    args = ["--method", "custom-diffusion", "--embeddings", _write(folder / "<cat>.safetensors", tok)]
    return _write(folder / WEIGHTS, weights), args + (token if sdxl else [])


WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


def _pick(state: dict, case: str) -> dict:
    return state if case == "valid" else mutations(state)[case]


def save_file_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state)


def _import(capsys, base, file, out, extra):
    return run_cli(capsys, ["import", file, "--superclass", "ball", "--base", base, "--out", out, *extra])


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("fmt", ["ti", "a1111-pt", "a1111-st", "lora", "cd", "fp16"])
def test_each_format_imports_when_valid(capsys, pipes, tmp_path, base, fmt):
    """The control: the valid file of each format imports (so each refusal below is the damage's doing), and a
    half-precision file is not 'wrong dtype'."""
    if fmt.startswith("a1111") and base != "tiny":
        pytest.skip("A1111's SDXL embedding is the two-key safetensors layout: the 'ti' case")
    if fmt == "fp16":
        file = _write(tmp_path / "in" / "half.safetensors", {k: v.half() for k, v in ti_state(pipes[base]).items()})
        extra = ["--method", "textual-inversion", "--token", "<cat>"]
    else:
        file, extra = _files(pipes[base], tmp_path, fmt, "valid")
    out = tmp_path / "out" / "cat.safetensors"
    code, stdout, err = _import(capsys, base, file, out, extra)
    assert code == 0, err
    assert out.is_file() and "wrote concept" in stdout


@pytest.mark.parametrize("base, fmt, case", _cases(), ids=["-".join(c) for c in _cases()])
def test_malformed_import_is_one_line_and_writes_nothing(capsys, pipes, tmp_path, base, fmt, case):
    file, extra = _files(pipes[base], tmp_path, fmt, case)
    out = tmp_path / "out" / "cat.safetensors"
    code, stdout, err = _import(capsys, base, file, out, extra)
    words = {"nan": ("nan or infinite",), "inf": ("nan or infinite",), "neg-inf-last": ("nan or infinite",),
             "int32": ("int32",), "bool": ("bool",)}.get(case, ())
    check_error(code, err, *words)
    assert not out.parent.exists(), f"{sorted(p.name for p in out.parent.iterdir())} written"


@pytest.mark.parametrize("base", BASES)
def test_custom_diffusion_weight_of_another_shape_names_key_and_shapes(capsys, pipes, tmp_path, base):
    """A (1, d) K weight used to broadcast over the (d_out, d) base weight and import with exit code 0."""
    file, extra = _files(pipes[base], tmp_path, "cd", "broadcast-row")
    from safetensors.torch import load_file

    key, value = next((k, v) for k, v in load_file(str(file)).items() if v.numel() and v.shape[0] == 1)
    full = next(v for k, v in cd_state(pipes[base]).items() if k == key)
    out = tmp_path / "out" / "cat.safetensors"
    code, _, err = _import(capsys, base, file, out, extra)
    check_error(code, err, key, str(tuple(value.shape)), str(tuple(full.shape)))
    assert not out.exists()


@pytest.mark.parametrize("base", BASES)
def test_lora_pair_of_another_shape_names_layer_and_shapes(capsys, pipes, tmp_path, base):
    state = lora_state(pipes[base])
    down = next(k for k in state if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    state[down] = torch.zeros(2, state[down].shape[1] + 3)
    file = _write(tmp_path / "in" / "lora.safetensors", state)
    out = tmp_path / "out" / "cat.safetensors"
    code, _, err = _import(capsys, base, file, out, ["--method", "dreambooth-lora", "--token", "<cat>"])
    line = check_error(code, err, "lora_A", f"(2, {state[down].shape[1]})")
    assert "attn2.to_k" in line
    assert not out.exists()


# --------------------------------------------------------------------------- inspect on a forged header
LONG = 100_000


@pytest.fixture(scope="module")
def forged(tmp_path_factory, pipes):
    """A valid concept re-sealed with 100k-character strings in four header fields and a markup-like superclass."""
    from personalize.concept import Concept, load_concept, save_concept
    from personalize.interop import import_file

    root = tmp_path_factory.mktemp("forged")
    source = _write(root / "in" / "learned_embeds.safetensors", ti_state(pipes["tiny"]))
    path = import_file(pipes["tiny"], source, method="textual-inversion", superclass="ball",
                       out=root / "cat.safetensors")
    concept = load_concept(path)
    header = json.loads(json.dumps(concept.header))
    header["provenance"]["base"] = "b" * LONG
    header["provenance"]["package_version"] = "v" * LONG
    header["base_fingerprint"]["digest"] = "d" * LONG
    header["inference_defaults"] = {"note": "n" * LONG}
    header["superclass"] = "[bold]ball[/] " + "s" * LONG
    assert len(json.dumps(header)) < 1 << 20  # within the header limit: a file load_concept accepts
    return save_concept(root / "forged.safetensors", Concept(header, concept.tensors))


def test_inspect_cuts_long_header_strings(capsys, forged):
    from personalize.cli.concepts import SHOWN_MAX

    code, stdout, err = run_cli(capsys, ["inspect", forged])
    assert code == 0, err
    flat = stdout.replace("\n", "")
    assert flat.count(f"({LONG:,} characters)") == 3 and flat.count(" characters)") == 5  # + superclass, defaults
    runs = [len(m.group(0)) for m in re.finditer(r"b+|v+|d+|n+|s+", flat)]
    assert SHOWN_MAX - 10 <= max(runs) <= SHOWN_MAX  # each long value shown up to the cut, no further
    assert len(stdout) < 5 * SHOWN_MAX + 2000  # five cut values and the fixed text: bounded, not 500k characters
    assert "[bold]ball[/]" in stdout.replace("\n", "")  # shown as written, not read as markup


def test_inspect_json_keeps_the_whole_header(capsys, forged):
    code, stdout, err = run_cli(capsys, ["inspect", forged, "--json"])
    assert code == 0, err
    header = json.loads(stdout)["header"]
    assert header["provenance"]["base"] == "b" * LONG and header["superclass"].endswith("s" * LONG)
