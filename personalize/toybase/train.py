"""Train the toy world's tiny SD-1.x-shaped base model from scratch (GPU or CPU, reproducible, resumable).

    python -m personalize.toybase.train --out ~/.cache/personalize-toyworld/run
    python -m personalize.toybase.train --out ~/.cache/personalize-toyworld/run --resume

Phase 1 trains the VAE (AutoencoderKL, 32x32 px -> 16x16x4 latents) on world scenes
plus generic full-frame textures; phase 2 freezes it and trains the CLIP text
encoder (full 49,408-token table, real tokenizer ids) and the UNet jointly, with
v-prediction on SD's scaled_linear schedule, AdamW + warm-up + cosine decay,
grad clipping, EMA and 10 % caption dropout. Every step's data and noise are
derived from (seed, phase, step), so ``--resume`` continues exactly.
The defaults are the recipe of the shipped weights (docs/TOYWORLD.md): about 7 minutes on one
H200 with ``--workers 8``; on a 2-core CPU the same steps would take hours (``--minutes`` fits phase 2
to a time budget instead).
Checkpoints (``DIR/checkpoint.pt``) are written atomically every ``--ckpt-every``
steps; at the end the EMA weights are exported as an fp16 diffusers pipeline
to ``DIR/pipeline`` (and to ``--export`` if given).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from ..datasets.toyworld.world import COLORS, render_array, sample_scene, training_caption

CKPT = "checkpoint.pt"


# --------------------------------------------------------------------------- data
def generic_texture(rng: random.Random, size: int = 32, supersample: int = 4) -> np.ndarray:
    """A full-frame generic pattern (stripes / checks / dots / blobs, random colours) for VAE training only."""
    from PIL import Image, ImageDraw

    big = size * supersample

    def col():
        if rng.random() < 0.5:
            return rng.choice(list(COLORS.values()) + [(20, 20, 20), (240, 130, 30), (240, 150, 190)])
        return tuple(rng.randrange(256) for _ in range(3))

    img = Image.new("RGB", (big, big), col())
    d = ImageDraw.Draw(img)
    kind = rng.randrange(4)
    period = rng.uniform(3, 9) * supersample
    c2 = col()
    if kind == 0:  # stripes, random angle
        ang = rng.choice([0, 90, rng.uniform(0, 180)])
        layer = Image.new("RGB", (big * 2, big * 2), img.getpixel((0, 0)))
        dl = ImageDraw.Draw(layer)
        x = rng.uniform(0, period)
        while x < 2 * big:
            dl.rectangle((x, 0, x + period / 2, 2 * big), fill=c2)
            x += period
        layer = layer.rotate(ang, resample=Image.BILINEAR)
        img = layer.crop((big // 2, big // 2, big // 2 + big, big // 2 + big))
    elif kind == 1:  # checks
        off = rng.uniform(0, period)
        n = int(big / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2:
                    d.rectangle((off + i * period, off + j * period, off + (i + 1) * period, off + (j + 1) * period), fill=c2)
    elif kind == 2:  # dots
        r = period * rng.uniform(0.2, 0.4)
        off = rng.uniform(0, period)
        n = int(big / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                cx, cy = off + i * period, off + j * period
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c2)
    else:  # random blobs / polygons / arcs
        for _ in range(rng.randint(2, 8)):
            x0, y0 = rng.uniform(-10, big), rng.uniform(-10, big)
            w = rng.uniform(2, 16) * supersample
            shape = rng.randrange(3)
            if shape == 0:
                d.ellipse((x0, y0, x0 + w, y0 + w * rng.uniform(0.5, 1.5)), fill=col())
            elif shape == 1:
                pts = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, w)) for _ in range(rng.randint(3, 6))]
                d.polygon(pts, fill=col())
            else:
                d.arc((x0, y0, x0 + w, y0 + w), rng.uniform(0, 360), rng.uniform(0, 360), fill=col(),
                      width=int(rng.uniform(1, 3) * supersample))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def vae_batch(seed: int, step: int, batch: int, texture_fraction: float) -> torch.Tensor:
    rng = random.Random(f"{seed}:vae:{step}")
    arrays = []
    for _ in range(batch):
        if rng.random() < texture_fraction:
            arrays.append(generic_texture(rng))
        else:
            arrays.append(render_array(sample_scene(rng, held_out=False)))
    return to_tensor(arrays)


class CaptionIds:
    """Caches tokenizer ids (SD pipeline tokenization: pad to 77 with <|endoftext|>, no attention mask)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        out = []
        for c in captions:
            ids = self.cache.get(c)
            if ids is None:
                ids = self.tok(c, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids[0]
                if len(self.cache) < 200_000:
                    self.cache[c] = ids
            out.append(ids)
        return torch.stack(out)


def unet_batch(seed: int, step: int, batch: int, dropout: float) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(f"{seed}:unet:{step}")
    arrays, caps = [], []
    for _ in range(batch):
        scene = sample_scene(rng, held_out=False)
        arrays.append(render_array(scene))
        cap = training_caption(scene, rng)
        caps.append("" if rng.random() < dropout else cap)
    return to_tensor(arrays), caps


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = that step's whole batch (renders, token ids, noise, timesteps), derived from
    ``(seed, phase, step)`` alone: a DataLoader's worker processes can render ahead without changing a
    single number, and a resumed run sees exactly the data an uninterrupted one would."""

    def __init__(self, args, phase: str, tokenizer=None, num_timesteps: int = 1000, latent_shape=(4, 16, 16)):
        self.args, self.phase, self.num_timesteps, self.latent_shape = args, phase, num_timesteps, latent_shape
        self.ids_of = CaptionIds(tokenizer) if tokenizer is not None else None

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int) -> dict:
        a = self.args
        if self.phase == "vae":
            x = vae_batch(a.seed, step, a.vae_batch, a.texture_fraction)
            gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
            return {"x": x, "eps_post": torch.randn((x.shape[0], *self.latent_shape), generator=gen)}
        x, caps = unet_batch(a.seed, step, a.batch, a.caption_dropout)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + 500_000 + step)
        shape = (x.shape[0], *self.latent_shape)
        eps_post = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), generator=gen)
        return {"x": x, "ids": self.ids_of(caps), "eps_post": eps_post, "noise": noise, "t": t}


def step_loader(dataset: StepBatches, start: int, workers: int):
    """Batches for steps start, start+1, ... in order (``workers`` processes render ahead)."""
    sampler = range(start, 1 << 40)
    if workers <= 0:
        return (dataset[i] for i in sampler)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                            prefetch_factor=4, persistent_workers=False,
                                            pin_memory=torch.cuda.is_available()))


# --------------------------------------------------------------------------- utilities
def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # pragma: no cover
        return "unknown"


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Logger:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def param_groups(module: torch.nn.Module, wd: float):
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        (no_decay if (p.ndim < 2 or "embedding" in n) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="personalize toyworld train-base", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work dir (checkpoints, log, exported pipeline)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes rendering batches ahead (0 = in the training process); the data "
                        "are the same either way")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--vae-from", default=None,
                   help="take the trained VAE (and its latent scaling) from another run's DIR/checkpoint.pt and "
                        "skip phase 1")
    p.add_argument("--texture-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=3762, help="UNet + text encoder steps")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="instead of --steps: after 100 timed steps, set the step count so phase 2 lasts about "
                        "this long (the cosine schedule follows the new length)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = plain MSE")
    p.add_argument("--prediction-type", default="v_prediction", choices=["v_prediction", "epsilon"])
    p.add_argument("--vae-channels", default=",".join(map(str, M.DEFAULT_ARCH["vae_channels"])),
                   help="VAE block widths; n blocks -> 2^(n-1)x downsampling")
    p.add_argument("--unet-channels", default=",".join(map(str, M.DEFAULT_ARCH["unet_channels"])))
    p.add_argument("--unet-attn", default=",".join(str(int(a)) for a in M.DEFAULT_ARCH["unet_cross_attn"]),
                   help="per UNet level: 1 = cross-attention block, 0 = plain ResNet block")
    p.add_argument("--unet-layers", type=int, default=M.DEFAULT_ARCH["unet_layers"])
    p.add_argument("--latent-scale-mult", type=float, default=1.0,
                   help="latent scaling factor = mult / std(latents); < 1 lowers every timestep's SNR")
    p.add_argument("--zero-snr", action="store_true",
                   help="rescale SD's schedule to zero terminal SNR (+ trailing DDIM timesteps); may be switched on "
                        "when resuming, to fine-tune a model trained without it")
    p.add_argument("--scale-images", type=int, default=512, help="renders used to set the latent scaling factor")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=0,
                   help="every this many phase-2 steps, sample --eval-n held-out captions with the EMA weights "
                        "and append the scores to DIR/evals.jsonl (0 = only at the end, if --eval-n)")
    p.add_argument("--eval-n", type=int, default=0, help="held-out captions per evaluation (0 = no evaluation)")
    p.add_argument("--export", default=None, help="also export the fp16 pipeline here (e.g. the package weights dir)")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def min_snr_weights(sched, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    ac = sched.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = M.build_tokenizer()  # build early: all code this run needs is loaded at start
    importlib.import_module("personalize.datasets.toyworld.concepts")  # load now: vae_report uses it late in the run
    out = Path(os.path.expanduser(args.out))
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log")
    ckpt_path = out / CKPT

    arch = dict(M.DEFAULT_ARCH)
    arch["vae_channels"] = [int(c) for c in args.vae_channels.split(",")]
    arch["unet_channels"] = [int(c) for c in args.unet_channels.split(",")]
    arch["unet_cross_attn"] = [bool(int(a)) for a in args.unet_attn.split(",")]
    if len(arch["unet_cross_attn"]) != len(arch["unet_channels"]):
        raise SystemExit("--unet-attn needs one flag per --unet-channels level")
    arch["unet_layers"] = args.unet_layers

    state = None
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        saved = state["args"]
        # the architecture and data recipe come from the checkpoint; schedule lengths may be extended
        arch = json.loads(state["arch"])
        for k in ("seed", "vae_batch", "vae_lr", "vae_kl", "texture_fraction", "batch", "lr", "warmup",
                  "weight_decay", "ema", "caption_dropout", "prediction_type", "latent_scale_mult", "min_snr"):
            setattr(args, k, saved.get(k, {"latent_scale_mult": 1.0, "min_snr": 0.0}.get(k)))
        if saved.get("minutes") and "steps" in saved:
            args.steps, args.minutes = max(args.steps, int(saved["steps"])), 0.0
        log(f"resuming from {ckpt_path}: phase {state['phase']} step {state['step']}")
    elif args.resume:
        log(f"--resume: no checkpoint at {ckpt_path}, starting fresh")

    torch.manual_seed(args.seed)
    vae, unet, te = M.build_vae(arch), M.build_unet(arch), M.build_text_encoder(arch)
    log(f"params: vae {M.count_params(vae):,} unet {M.count_params(unet):,} text encoder {M.count_params(te):,}; "
        f"arch {json.dumps(arch)}; device {device}")
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    opt = torch.optim.AdamW(param_groups(unet, args.weight_decay) + param_groups(te, args.weight_decay), lr=args.lr)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
    phase, step, elapsed = "vae", 0, 0.0
    scaling = 1.0
    if state is not None:
        vae.load_state_dict(state["vae"])
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
        vae_opt.load_state_dict(state["vae_opt"])
        opt.load_state_dict(state["opt"])
        ema_unet, ema_te = state["ema_unet"], state["ema_te"]
        phase, step, elapsed, scaling = state["phase"], int(state["step"]), float(state["elapsed"]), float(state["scaling"])
        torch.set_rng_state(state["torch_rng"])
    elif args.vae_from:
        donor = torch.load(Path(os.path.expanduser(args.vae_from)) / CKPT, weights_only=True)
        donor_arch = json.loads(donor["arch"])
        if donor["phase"] != "unet" or donor_arch["vae_channels"] != arch["vae_channels"]:
            raise SystemExit(f"--vae-from {args.vae_from}: needs a finished VAE phase with --vae-channels "
                             f"{args.vae_channels}")
        vae.load_state_dict(donor["vae"])
        phase, scaling = "unet", float(donor["scaling"])
        log(f"VAE from {args.vae_from} (latent scaling factor {scaling:.4f})")
    vae.to(device)
    unet.to(device)
    te.to(device)
    ema_unet = {k: v.to(device) for k, v in ema_unet.items()}
    ema_te = {k: v.to(device) for k, v in ema_te.items()}
    _optimizer_to(vae_opt, device)
    _optimizer_to(opt, device)
    latent_shape = (arch["latent_channels"], M.latent_size(arch), M.latent_size(arch))

    run_args = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "export", "device", "workers")}

    def save(ph: str, st: int, seconds: float) -> None:
        """Checkpoint everything; ``seconds`` = training time so far (resumed runs add to it)."""
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        atomic_save({
            "phase": ph, "step": st, "elapsed": seconds, "scaling": scaling, "arch": json.dumps(arch),
            "args": run_args, "vae": cpu(vae.state_dict()), "vae_opt": _optimizer_state_cpu(vae_opt),
            "unet": cpu(unet.state_dict()), "te": cpu(te.state_dict()), "opt": _optimizer_state_cpu(opt),
            "ema_unet": cpu(ema_unet), "ema_te": cpu(ema_te), "torch_rng": torch.get_rng_state(),
        }, ckpt_path)

    # ---------------------------------------------------------------- phase 1: VAE
    if phase == "vae":
        vae.train()
        t0, losses = time.time(), []
        start = step
        batches = step_loader(StepBatches(args, "vae", latent_shape=latent_shape), step, args.workers)
        while step < args.vae_steps:
            for g in vae_opt.param_groups:
                g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
            b = next(batches)
            x = b["x"].to(device, non_blocking=True)
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * b["eps_post"].to(device, non_blocking=True)
            rec = vae.decode(z).sample
            kl = post.kl().mean() / x[0].numel()
            mse = F.mse_loss(rec, x)
            loss = mse + 0.5 * F.l1_loss(rec, x) + args.vae_kl * kl
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            vae_opt.step()
            losses.append(mse.detach())
            step += 1
            if step % args.log_every == 0 or step == args.vae_steps:
                dt = time.time() - t0
                sps = dt / (step - start)
                log(f"[vae] step {step}/{args.vae_steps} recon-mse {torch.stack(losses[-args.log_every:]).mean():.5f} "
                    f"{sps:.3f} s/step, ETA vae {fmt_time(sps * (args.vae_steps - step))}")
            if step % args.ckpt_every == 0 and step < args.vae_steps:
                save("vae", step, elapsed + time.time() - t0)
        del batches
        elapsed += time.time() - t0
        vae.eval()
        scaling = args.latent_scale_mult * latent_scaling(vae, args.seed, args.scale_images)
        vae.register_to_config(scaling_factor=scaling)
        report = vae_report(vae, out, n=min(128, args.scale_images))
        log(f"[vae] done: latent scaling factor {scaling:.4f} ({args.latent_scale_mult} / std); {report}")
        phase, step = "unet", 0
        save(phase, step, elapsed)
    vae.register_to_config(scaling_factor=scaling)
    vae.eval().requires_grad_(False)

    # ---------------------------------------------------------------- phase 2: text encoder + UNet
    noise_sched = M.build_training_scheduler(args.prediction_type, args.zero_snr)
    data = StepBatches(args, "unet", tokenizer, noise_sched.config.num_train_timesteps, latent_shape)
    batches = step_loader(data, step, args.workers)
    ac = noise_sched.alphas_cumprod.to(device)
    unet.train()
    te.train()
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    t0, losses = time.time(), []
    start, timed_from = step, None

    def evaluate(label: str) -> None:
        res = _evaluate_ema(args, arch, vae, unet, te, ema_unet, ema_te, tokenizer, device)
        res.update(step=step, weights=label, elapsed=round(elapsed + time.time() - t0, 1))
        with open(out / "evals.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        log(f"[eval] step {step} {label}: " + " ".join(f"{k} {v:.3f}" for k, v in res["per_attribute"].items())
            + f" alignment {res['alignment']:.3f}")

    while step < args.steps:
        if args.minutes and step == start + 20:
            timed_from = (time.time(), step)
        if args.minutes and timed_from and step == timed_from[1] + 100:
            sps = (time.time() - timed_from[0]) / 100
            args.steps = run_args["steps"] = step + int(max(0.0, args.minutes * 60 - (time.time() - t0)) / sps)
            log(f"[unet] {sps:.4f} s/step: {args.steps} steps fill --minutes {args.minutes}")
            if step >= args.steps:
                break
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        b = next(batches)
        x = b["x"].to(device, non_blocking=True)
        t = b["t"].to(device, non_blocking=True)
        noise = b["noise"].to(device, non_blocking=True)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            lat = (post.mean + post.std * b["eps_post"].to(device, non_blocking=True)) * scaling
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * lat if args.prediction_type == "v_prediction" else noise
        cond = te(b["ids"].to(device, non_blocking=True)).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr > 0:
            loss = (per_sample * min_snr_weights(noise_sched, t, args.min_snr, args.prediction_type)).mean()
        else:
            loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, args.ema if step >= args.warmup else 0.9)
        ema_update(ema_te, te, args.ema if step >= args.warmup else 0.9)
        losses.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t0
            sps = dt / (step - start)
            log(f"[unet] step {step}/{args.steps} loss {torch.stack(losses[-args.log_every:]).mean():.4f} "
                f"lr {lr:.2e} {sps:.3f} s/step, ETA {fmt_time(sps * (args.steps - step))}, "
                f"elapsed {fmt_time(elapsed + dt)}")
            del losses[:-args.log_every]
        if step % args.ckpt_every == 0 or step == args.steps:
            save("unet", step, elapsed + time.time() - t0)
        if args.eval_n and args.eval_every and step % args.eval_every == 0:
            evaluate("ema")
    del batches
    save("unet", step, elapsed + time.time() - t0)
    if args.eval_n and not (args.eval_every and step % args.eval_every == 0):
        evaluate("ema")
    elapsed += time.time() - t0

    # ---------------------------------------------------------------- export (EMA weights)
    unet.load_state_dict(ema_unet)
    te.load_state_dict(ema_te)
    unet.eval()
    te.eval()
    pipe = M.assemble_pipeline(vae.cpu(), te.cpu(), unet.cpu(), tokenizer, prediction_type=args.prediction_type,
                                zero_snr=args.zero_snr)
    info = {
        "command": "python -m personalize.toybase.train " + " ".join(
            sys.argv[1:] if argv is None else list(argv)),
        "args": run_args,
        "arch": arch,
        "seed": args.seed,
        "git_commit": git_commit(),
        "train_seconds": round(elapsed, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vae_steps": args.vae_steps,
        "unet_steps": args.steps,
        "latent_scaling_factor": scaling,
        "torch": torch.__version__,
        "threads": args.threads,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    dest = M.export_pipeline(pipe, out / "pipeline", info)
    log(f"exported fp16 pipeline to {dest} ({M.folder_size_mb(dest):.1f} MB); trained {fmt_time(elapsed)}")
    if args.export:
        dest2 = M.export_pipeline(pipe, Path(os.path.expanduser(args.export)), info)
        log(f"exported fp16 pipeline to {dest2}")
    return dest


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


def _optimizer_state_cpu(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    sd["state"] = {i: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


@torch.no_grad()
def _evaluate_ema(args, arch, vae, unet, te, ema_unet, ema_te, tokenizer, device) -> dict:
    """evaluate_base on a copy of the models holding the EMA weights (training state untouched)."""
    from .evaluate import evaluate_base

    eu, et = M.build_unet(arch).to(device), M.build_text_encoder(arch).to(device)
    eu.load_state_dict(ema_unet)
    et.load_state_dict(ema_te)
    pipe = M.assemble_pipeline(vae, et.eval(), eu.eval(), tokenizer, prediction_type=args.prediction_type,
                               zero_snr=args.zero_snr)
    pipe.set_progress_bar_config(disable=True)
    res = evaluate_base(pipe, n=args.eval_n, batch_size=256 if device.type == "cuda" else 50)
    return {k: v for k, v in res.items() if k in ("alignment", "per_attribute", "settings")}


@torch.no_grad()
def latent_scaling(vae, seed: int, n: int = 512) -> float:
    x = vae_batch(seed + 99, 0, n, 0.0).to(vae.device)
    z = vae.encode(x).latent_dist.mean
    return float(1.0 / z.std())


@torch.no_grad()
def vae_report(vae, out: Path, n: int = 128) -> str:
    """Recon MSE on fresh world scenes and on the held-out concepts' renders (+ a comparison PNG)."""
    from PIL import Image

    from ..datasets.toyworld.concepts import CONCEPTS, concept_scenes
    from ..datasets.toyworld.world import render_scene

    rng = random.Random("vae-report")
    world = to_tensor([render_array(sample_scene(rng, held_out=None)) for _ in range(n)])
    conc = to_tensor([np.asarray(render_scene(s)) for c in CONCEPTS for s in concept_scenes(c)])
    res = {}
    for name, x in (("world", world), ("concepts", conc)):
        x = x.to(vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        res[name] = F.mse_loss(rec, x).item()
        if name == "concepts":
            both = torch.cat([x, rec], 3)  # side by side
            arr = ((both + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            grid = Image.new("RGB", (5 * 66, (len(arr) + 4) // 5 * 33))
            for i, a in enumerate(arr):
                grid.paste(Image.fromarray(a), ((i % 5) * 66, (i // 5) * 33))
            grid.save(out / "vae_concepts_recon.png")
    return f"recon MSE world {res['world']:.5f}, concepts {res['concepts']:.5f}"


if __name__ == "__main__":
    main()


def finetune_decoder(pipeline_dir: os.PathLike | str, out_dir: os.PathLike | str, steps: int, batch: int = 32,
                     lr: float = 2e-4, texture_fraction: float = 0.5, seed: int = 1, log=None) -> Path:
    """Fine-tune only the VAE decoder of a trained pipeline (the encoder, hence every latent the UNet was
    trained on, stays bit-identical): sharper fine textures without retraining the UNet. Saves the fp16
    VAE to ``out_dir`` (diffusers ``AutoencoderKL`` folder) every 200 steps and at the end."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(pipeline_dir) / "vae", torch_dtype=torch.float32)
    vae.requires_grad_(False)
    dec = [vae.decoder, vae.post_quant_conv]
    for m in dec:
        m.requires_grad_(True).train()
    params = [p for m in dec for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out = Path(out_dir)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 20)
        x = vae_batch(seed, step, batch, texture_fraction)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 900_000 + step)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log and (step + 1) % 25 == 0:
            log(f"[decoder] step {step + 1}/{steps} loss {loss.item():.5f} {(time.time() - t0) / (step + 1):.2f} s/step")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            vae.eval()
            half = AutoencoderKL.from_config(vae.config)
            half.load_state_dict(vae.state_dict())
            tmp = out.with_name(out.name + ".tmp")
            half.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            if out.exists():
                import shutil

                shutil.rmtree(out)
            os.replace(tmp, out)
            for m in dec:
                m.train()
    return out
