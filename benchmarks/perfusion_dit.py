"""Perfusion on the diffusion transformers, measured on the tiny bases (docs/PERFUSION_DIT.md).

    python benchmarks/perfusion_dit.py [--bases tiny-flux,tiny-sd3,tiny] [--steps 40]

Trains a Perfusion concept (synthetic disc photos, ``masks=none``) on each base, attaches it with its inference
defaults (local lock, beta 0.7, tau 0.15), and for each joint block l and each of the four reference step indices
(``covariance.reference_steps``) runs the transformer on the neutral prompts with the token and, separately, on
the base with the superclass word in its place, both at the same noised latent (a training photo's latent noised
with the same noise: the image the text stream attends to). Prints one JSON line per (base, block, step):

- ``lock_error``: ||K_edit(x_c) - K_base(x_s)|| / ||K_base(x_s)||, the edited key of the concept row against the
  base key of the superclass row: what key-locking promises to be 0;
- ``lock_error_at_i_star``: the same for the input i*_l itself (0 up to the gate: the lock holds exactly there);
- ``coord``: the gate's input at the concept row (the dual coordinate, 1 at i*_l) and ``gate`` its value;
- ``input_drift``: ||x_c - i*_l||_C^-1 / ||i*_l||_C^-1 (how far the row's actual input is from i*_l);
- ``super_drift``: ||x_s - e_super,l||_C^-1 / ||e_super,l||_C^-1 (how far the superclass row's input at this
  state is from its reference-state mean: the image and timestep dependence of the text stream);
- ``other_gate_max`` / ``other_coord_abs``: the largest gate value and mean |coordinate| over the other (non-padding)
  text rows (the gate keeps the edit off them);
- per block once: ``state_spread``, the superclass row's input at one prompt against its mean over the four
  states (what key-locking at a fixed e_super cannot follow), beside ``template_spread``, the same across the
  neutral prompts (which the SD version's e_super averages over too);
- ``lock_error_ungated``: ``lock_error`` with the gate off (Eq. 2: the lock is exact at i* there);
- per block once: ``segment_cosine`` (SD3: the C^-1-cosine between a block's CLIP-row and T5-row targets, the reason
  for the dual coordinates).

``tiny`` (SD 1.x) gives the same lock error where the encoder output is the projections' input, for comparison
(``measure_sd``). CPU, a minute or two per base; the numbers in docs/PERFUSION_DIT.md come from the defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch


def photos(folder: Path, n: int = 4, size: int = 40) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size + 8 * i, size), (200, 40 * i, 60))
        ImageDraw.Draw(img).ellipse((6 + 2 * i, 6, 30 + 2 * i, 30), fill=(30, 200, 40), outline=(0, 0, 0))
        img.save(folder / f"photo_{i}.png")
    return folder


def c_norm(v: torch.Tensor, C_inv: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return ((v @ C_inv) * v).sum(-1).clamp_min(0).sqrt()


@torch.no_grad()
def rows_at(pipe, prompts, sites, latents, noise, step, bare: bool):
    """Each site's input for ``prompts`` at ``latents`` noised at ``step`` (edits active unless ``bare``)."""
    from personalize import families, text_stack
    from personalize.edits.site_inputs import bare as bare_ctx, captured
    from contextlib import nullcontext

    family, den = families.of(pipe), families.denoiser(pipe)
    encoding = text_stack.encode(pipe, prompts)
    steps = torch.full((len(prompts),), step)
    noised = family.noised(family.noise_schedule(pipe), latents, noise, steps)
    with (bare_ctx(den) if bare else nullcontext()), captured(den, sites) as seen:
        family.predict(pipe, den, noised, encoding.context, encoding.pooled)
    return seen


def measure(spec: str, steps: int, out: Path) -> list[dict]:
    from personalize import attach, families, load_base, load_concept, text_stack, train
    from personalize.covariance import reference_steps
    from personalize.edits.placement import joint_attentions
    from personalize.methods.perfusion import _key, _phrase_end, dit_segments, superclass_site_inputs
    from personalize.templates import NEUTRAL_TEMPLATES, fill, phrase_ids
    from personalize.edits.tokens import base_tokenizer

    base = load_base(spec)
    path = train(copy.deepcopy(base), photos(out / "photos"), token="<disc>", superclass="ball",
                 out=out / f"{spec}.safetensors", method="perfusion",
                 settings={"steps": steps, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}, progress=False)
    concept = load_concept(path)
    pipe = base
    family = families.of(pipe)
    layers = [name for name, _ in joint_attentions(pipe.transformer)]
    sites = [f"{name}.add_k_proj" for name in layers]
    segments = dit_segments(pipe)
    prompts = [fill(t, "<disc>") for t in NEUTRAL_TEMPLATES]
    supers = [fill(t, "ball") for t in NEUTRAL_TEMPLATES]
    # one photo latent per prompt (the training photos, encoded as the latent cache does), one noise draw
    import numpy as np
    from PIL import Image

    size = family.native_resolution(pipe)
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32))
              .permute(2, 0, 1) / 127.5 - 1 for p in sorted((out / "photos").glob("*.png"))]
    pixels = torch.stack([images[i % len(images)] for i in range(len(prompts))])
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    latents = (z - shift) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    e_super = superclass_site_inputs(pipe, "ball", layers)  # the reference-state means (what o*_K is made of)
    records = []
    with attach(pipe, concept) as handle:
        method = handle.methods[0]
        C_inv = method.C_inv.double()
        group = method.group
        # rows: the concept token's first row per segment (the superclass word's last row in the super prompts)
        concept_rows, super_rows = [], []
        for tok_name, start, rows in segments:
            tok = getattr(pipe, tok_name)
            (tid,) = tok.convert_tokens_to_ids(["<disc>"])
            row_ids = tok(prompts, padding="max_length", max_length=rows, truncation=True).input_ids
            concept_rows.append([start + r.index(tid) for r in row_ids])
            phrase = phrase_ids(base_tokenizer(pipe, tok_name), "ball")
            sup_ids = tok(supers, padding="max_length", max_length=rows, truncation=True).input_ids
            super_rows.append([start + _phrase_end(r, phrase) for r in sup_ids])
        from personalize.covariance import segment_masks

        mask = segment_masks(pipe, prompts)
        supers_seen = []  # per step: the superclass rows' inputs (for the spread over states)
        for k, step in enumerate(reference_steps(pipe)):
            edited = rows_at(pipe, prompts, sites, latents, noise, step, bare=False)
            plain = rows_at(pipe, supers, sites, latents, noise, step, bare=True)
            supers_seen.append(plain)
            for b, (layer, site) in enumerate(zip(layers, sites)):
                key = pipe.transformer.get_submodule(site)
                i_star = method.i_star[layer].double()
                ref = e_super[layer].double()
                proj = group.projection(torch.float64, "cpu", layer)
                for s, (tok_name, _, _) in enumerate(segments):
                    n = len(prompts)
                    xc = edited[site][torch.arange(n), concept_rows[s]].double()
                    xs = plain[site][torch.arange(n), super_rows[s]].double()
                    k_edit = key(xc.float()).double()
                    k_base = key.base_layer(xs.float()).double()
                    lock = ((k_edit - k_base).norm(dim=-1) / k_base.norm(dim=-1)).mean().item()
                    handle.set(gate=False)
                    k_open = key(xc.float()).double()
                    handle.set(gate=None)
                    lock_open = ((k_open - k_base).norm(dim=-1) / k_base.norm(dim=-1)).mean().item()
                    at_i = key(i_star[s:s + 1].float()).double()
                    o_k = method.o_k[_key(layer)][s].double()
                    bias = key.base_layer.bias.double() if key.base_layer.bias is not None else 0
                    lock_i = ((at_i[0] - (o_k + bias)).norm() / (o_k + bias).norm()).item()
                    coords = proj.similarity(xc)  # (n, J·S) dual coordinates
                    coord = coords[:, s].mean().item()
                    gate = torch.sigmoid((coords[:, s] - method.beta) / method.tau).mean().item()
                    drift = (c_norm(xc - i_star[s], C_inv[b]) / c_norm(i_star[s], C_inv[b])).mean().item()
                    sdrift = (c_norm(xs - ref[s], C_inv[b]) / c_norm(ref[s], C_inv[b])).mean().item()
                    others = mask.clone()
                    others[torch.arange(n), concept_rows[s]] = False
                    x_all = edited[site].double()
                    c_all = proj.similarity(x_all)[..., s]
                    g_all = torch.sigmoid((c_all - method.beta) / method.tau)
                    records.append(dict(base=spec, block=layer, segment=tok_name, step=step,
                                        lock_error=round(lock, 4), lock_error_ungated=round(lock_open, 4),
                                        lock_error_at_i_star=round(lock_i, 4),
                                        coord=round(coord, 3), gate=round(gate, 3), input_drift=round(drift, 3),
                                        super_drift=round(sdrift, 3),
                                        other_gate_max=round(g_all[others].max().item(), 4),
                                        other_coord_abs=round(c_all[others].abs().mean().item(), 3)))
        # the text stream's dependence on the state at a fixed prompt: each superclass row's input against its
        # mean over the four states (step + noised photo), relative in the C^-1 norm; block 0 reads the encoder
        # output through the timestep modulation only, later blocks also what the image stream gave them
        for b, (layer, site) in enumerate(zip(layers, sites)):
            for s, (tok_name, _, _) in enumerate(segments):
                n = len(prompts)
                xs = torch.stack([seen[site][torch.arange(n), super_rows[s]].double() for seen in supers_seen])
                mean = xs.mean(0)
                spread = (c_norm(xs - mean, C_inv[b]) / c_norm(mean, C_inv[b])).mean().item()
                across = (c_norm(mean - mean.mean(0), C_inv[b]) / c_norm(mean, C_inv[b])).mean().item()
                records.append(dict(base=spec, block=layer, segment=tok_name, state_spread=round(spread, 4),
                                    template_spread=round(across, 4)))
        if len(segments) == 2:
            for b, layer in enumerate(layers):
                i1, i2 = method.i_star[layer].double()
                cos = (i1 @ C_inv[b] @ i2) / (c_norm(i1, C_inv[b]) * c_norm(i2, C_inv[b]))
                records.append(dict(base=spec, block=layer, segment_cosine=round(cos.item(), 3)))
    return records


def measure_sd(spec: str, steps: int, out: Path) -> list[dict]:
    """The same lock error on an SD base (``tiny``) for comparison: there every cross-attention reads the
    encoder output, which depends on the prompt only, so the error comes from the prompts alone (the concept row's
    encoding against i*, each template's superclass encoding against their mean e_super)."""
    from personalize import attach, load_base, load_concept, text_stack, train
    from personalize.edits.placement import cross_attention_layers
    from personalize.templates import NEUTRAL_TEMPLATES, fill, phrase_last_position

    base = load_base(spec)
    path = train(copy.deepcopy(base), photos(out / "photos"), token="<disc>", superclass="ball",
                 out=out / f"{spec}.safetensors", method="perfusion",
                 settings={"steps": steps, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}, progress=False)
    prompts = [fill(t, "<disc>") for t in NEUTRAL_TEMPLATES]
    supers = [fill(t, "ball") for t in NEUTRAL_TEMPLATES]
    rows = torch.tensor([phrase_last_position(base.tokenizer, t, "ball") for t in NEUTRAL_TEMPLATES])
    n = len(prompts)
    records = []
    with torch.no_grad(), attach(base, load_concept(path)) as handle:
        xs = text_stack.encode(base, supers).context[torch.arange(n), rows].double()
        method = handle.methods[0]
        xc = text_stack.encode(base, prompts).context[torch.arange(n), rows].double()
        C_inv = method.C_inv.double()
        for name, attn in cross_attention_layers(base.unet):
            key = attn.to_k
            k_base = key.base_layer(xs.float()).double()
            k_edit = key(xc.float()).double()
            handle.set(gate=False)
            k_open = key(xc.float()).double()
            handle.set(gate=None)
            err = lambda k: ((k - k_base).norm(dim=-1) / k_base.norm(dim=-1)).mean().item()  # noqa: E731
            records.append(dict(base=spec, block=name, lock_error=round(err(k_edit), 4),
                                lock_error_ungated=round(err(k_open), 4)))
        mean = xs.mean(0)
        spread = (c_norm(xs - mean, C_inv) / c_norm(mean, C_inv)).mean().item()
        records.append(dict(base=spec, template_spread=round(spread, 4)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default="tiny-flux,tiny-sd3,tiny")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.bases.split(","):
            run = measure_sd if spec in ("tiny", "tiny-sd2", "tiny-sdxl") else measure
            for record in run(spec, args.steps, Path(tmp) / spec):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
