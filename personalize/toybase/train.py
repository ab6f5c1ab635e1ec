"""Train the toy world's tiny SD-1.x-shaped base model from scratch (GPU or CPU, reproducible, resumable).

    personalize toyworld train-base --out ~/.cache/personalize-toyworld/run
    personalize toyworld train-base --out ~/.cache/personalize-toyworld/run --resume

Phase 1 trains the VAE (AutoencoderKL, 32x32 px -> 16x16x4 latents) on world scenes
plus generic full-frame textures; phase 2 freezes it and trains the CLIP text
encoder (full 49,408-token table, real tokenizer ids) and the UNet jointly, with
v-prediction on SD's scaled_linear schedule, AdamW + warm-up + cosine decay,
grad clipping, EMA and 10 % caption dropout. Every step's data and noise are
derived from (seed, phase, step), so ``resume`` continues exactly.
The defaults (:class:`personalize.toybase.recipe.BaseRecipe`) are the recipe of the shipped weights
(docs/TOYWORLD.md): about 7 minutes on one H200 with ``workers=8``; on a 2-core CPU the same steps would take
hours (``minutes`` fits phase 2 to a time budget instead).
Checkpoints (``DIR/checkpoint/``: safetensors + a JSON sidecar, see :mod:`personalize.toybase.checkpoint`) are
written atomically every ``ckpt_every`` steps; at the end the EMA weights are exported as an fp16 diffusers
pipeline to ``DIR/pipeline`` (and to ``export`` if given). Progress lines go to ``DIR/train.log`` and to
``log`` (a callable taking one line), if given.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import BadInputError
from . import checkpoint as C
from . import model as M
from .data import StepBatches, step_loader
from .recipe import RESUME_FALLBACK, RESUMED_FROM_CHECKPOINT, BaseRecipe, Logger, fmt_time, git_commit, lr_at
from .vae import latent_scaling, vae_report


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


def min_snr_weights(sched, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    ac = sched.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def train_base(recipe: Optional[BaseRecipe] = None, *, out: os.PathLike | str, resume: bool = False,
               export: Optional[os.PathLike | str] = None, device: str = "auto", workers: int = 0,
               log: Optional[Callable[[str], None]] = None) -> Path:
    """Train (or with ``resume``, continue) a toy base in the work folder ``out``; returns the exported pipeline.

    ``workers``: DataLoader processes rendering batches ahead (0 = in the training process); the data are the
    same either way. ``device``: cpu, cuda, or auto (cuda when available). ``export``: also export the fp16
    pipeline there (e.g. the package weights folder)."""
    args = dataclasses.replace(recipe or BaseRecipe())  # a copy: resuming and --minutes change it
    command = args.command(out, resume, export, device, workers)
    arch = args.arch()
    torch.set_num_threads(args.threads)
    from ..devices import resolve_device

    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = M.build_tokenizer()  # build early: all code this run needs is loaded at start
    importlib.import_module("personalize.datasets.toyworld.concepts")  # load now: vae_report uses it late in the run
    out = Path(os.path.expanduser(out))
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log", log)

    state = None
    if resume and C.has_checkpoint(out):
        state = C.read(out)
        saved = state["args"]
        # the architecture and data recipe come from the checkpoint; schedule lengths may be extended
        arch = state["arch"]
        for k in RESUMED_FROM_CHECKPOINT:
            setattr(args, k, saved.get(k, RESUME_FALLBACK.get(k)))
        if saved.get("minutes") and "steps" in saved:
            args.steps, args.minutes = max(args.steps, int(saved["steps"])), 0.0
        log(f"resuming from {C.checkpoint_path(out)}: phase {state['phase']} step {state['step']}")
    elif resume:
        log(f"--resume: no checkpoint at {C.checkpoint_path(out)}, starting fresh")

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
        C.load_optimizers(state, {"vae_opt": vae_opt, "opt": opt})
        ema_unet, ema_te = state["ema_unet"], state["ema_te"]
        phase, step, elapsed, scaling = state["phase"], int(state["step"]), float(state["elapsed"]), float(state["scaling"])
        torch.set_rng_state(state["torch_rng"])
    elif args.vae_from:
        donor = C.read(args.vae_from)
        if donor["phase"] != "unet" or donor["arch"]["vae_channels"] != arch["vae_channels"]:
            raise BadInputError(f"--vae-from {args.vae_from}: needs a finished VAE phase with --vae-channels "
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

    run_args = dataclasses.asdict(args)

    def save(ph: str, st: int, seconds: float) -> None:
        """Checkpoint everything; ``seconds`` = training time so far (resumed runs add to it)."""
        C.save(out, state={"phase": ph, "step": st, "elapsed": seconds, "scaling": scaling, "arch": arch,
                           "args": run_args},
               modules={"vae": vae.state_dict(), "unet": unet.state_dict(), "te": te.state_dict(),
                        "ema_unet": ema_unet, "ema_te": ema_te},
               optimizers={"vae_opt": vae_opt, "opt": opt})

    # ---------------------------------------------------------------- phase 1: VAE
    if phase == "vae":
        vae.train()
        t0, losses = time.time(), []
        start = step
        batches = step_loader(StepBatches(args, "vae", latent_shape=latent_shape), step, workers)
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
                sps = (time.time() - t0) / (step - start)
                log(f"[vae] step {step}/{args.vae_steps} recon-mse {_recent(losses, args):.5f} "
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
    batches = step_loader(data, step, workers)
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
            log(f"[unet] step {step}/{args.steps} loss {_recent(losses, args):.4f} lr {lr:.2e} {sps:.3f} s/step, "
                f"ETA {fmt_time(sps * (args.steps - step))}, elapsed {fmt_time(elapsed + dt)}")
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
        "command": command,
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
    if export:
        dest2 = M.export_pipeline(pipe, Path(os.path.expanduser(export)), info)
        log(f"exported fp16 pipeline to {dest2}")
    return dest


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


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


def _recent(losses: list, args: BaseRecipe) -> float:
    """The mean loss over the last logging interval."""
    return float(torch.stack(losses[-args.log_every:]).mean())
