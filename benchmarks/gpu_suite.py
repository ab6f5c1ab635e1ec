"""One-shot GPU suite: real-size speed and memory in one command (issue 15).

    python benchmarks/gpu_suite.py [--out DIR] [--parts train,sample,eval,scripts] [--anchors DIR]
    python benchmarks/gpu_suite.py --dry-run       # the same code on the CPU with `tiny`, in seconds
    python benchmarks/gpu_suite.py --base sdxl     # SD 2.1 / SDXL base 1.0 shapes at 768 / 1024 px (sd21, sdxl)
    python benchmarks/gpu_suite.py --base flux     # Flux.1-dev / SD3.5-medium shapes at 512 px (flux, sd3)

Writes one JSON line per measurement to stdout and to ``OUT/gpu_suite.jsonl``:

- ``train``: every registered method's training step through the real trainer
  on a random SD 1.5-shaped pipeline built in-process (``--base``: sd15 at 512 px,
  sd21 at 768, sdxl at 1024; a dry run uses the family's miniature), bf16 mixed
  precision, the method's own paper batch; prior preservation off so the work
  equals the diffusers scripts'): median s/step after warm-up, samples/s, peak
  GPU memory, FLOPs of one real step counted with ``FlopCounterMode``, MFU
  against the datasheet's dense bf16 peak and against a bf16 matmul measured
  here; Perfusion's time to a concept at the paper's 210 steps x batch 16.
  Each method steps eager and then compiled (``--train-steps``: CUDA graphs,
  the trainer's GPU default), the compiled row with its speed-up over eager
  and its compile seconds; the compile cache starts empty (cold), and
  Perfusion runs once more from the warm cache (dynamo reset, torch's
  on-disk FX graph and AOT autograd caches kept).
- ``sample``: DDIM 50 with classifier-free guidance, batch 1 and 8 (latents
  out), bare vs with a Perfusion concept vs with a Residuals concept and LAG,
  runs alternating; overhead ratios; with the eager denoiser and compiled
  (``--sample-modes``: ``generate --compile`` in reduce-overhead mode).
- ``eval``: CLIP ViT-B/32 + DINO ViT-S/16 (random weights) throughput from
  preprocessed tensors in memory and from PNG files decoded by worker
  processes, beside the machine's own decode limit measured in the same run
  (one process's decode + resize rate x workers).
- ``scripts``: the diffusers example scripts (``--anchors``, the
  ``perf-anchors`` folder), unmodified, on the same pipeline saved to disk, the
  same batch and precision, and the ratio of their median step to ours. On
  ``--base flux|sd3`` the script is diffusers' ``train_dreambooth_lora_flux.py`` /
  ``_sd3.py`` against DreamBooth-LoRA, looked for in ``--anchors``'
  ``diffusers-examples/`` (copy it there unmodified; the suite says so where it
  is missing), run with the same step timer (``sitecustomize.py``).

A method a family refuses gets a ``skipped`` row with the family's reason (none
is refused today). On a diffusion transformer sampling uses the family's stock
scheduler (flow matching, 28 steps as the stock pipelines' default) with
Flux.1-dev's guidance embedding at 3.5 (one pass per step) or SD3's CFG at 7.0,
and the attached concept of the sampling rows is DreamBooth-LoRA: a Perfusion
concept there first needs its per-block covariance, transformer passes over the
caption corpus (docs/PERFUSION_DIT.md), which the training rows pay instead.

``--budget-s`` (default 420) skips what would start after that many seconds, so
a run on a lent machine always ends inside its limit with what it measured.
How to carry this to a bare GPU machine: ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASHEET_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}  # dense, SXM parts
PAPER_STEPS, PAPER_BATCH = 210, 16  # Perfusion paper: 210 steps on average at batch 16
# the diffusers example script timed against each method, and its prompt words
SCRIPTS = {"dreambooth": "dreambooth", "dreambooth-lora": "dreambooth_lora",
           "textual-inversion": "textual_inversion", "custom-diffusion": "custom_diffusion"}
# on the diffusion transformers: the family's DreamBooth-LoRA script, against our DreamBooth-LoRA
DIT_SCRIPTS = {"flux": "train_dreambooth_lora_flux.py", "sd3": "train_dreambooth_lora_sd3.py"}
DIT = ("flux", "sd3")


class Suite:
    def __init__(self, out: Path, dry_run: bool, budget_s: float, modes: tuple[str, ...] = ("eager", "graphs"),
                 base: str = "sd15"):
        self.out, self.dry, self.modes, self.base = out, dry_run, modes, base
        self.res = 32 if dry_run else {"sd15": 512, "sd21": 768, "sdxl": 1024, "flux": 512, "sd3": 512}[base]
        self.device = "cpu" if dry_run or not torch.cuda.is_available() else "cuda"
        self.began, self.budget = time.perf_counter(), budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "gpu_suite.jsonl").open("a")
        self.peak_tflops = None

    # -- bookkeeping
    def emit(self, **row) -> dict:
        row = {"t_s": round(time.perf_counter() - self.began, 1), **row}
        line = json.dumps(row)
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        return row

    def in_budget(self, what: str) -> bool:
        left = self.budget - (time.perf_counter() - self.began)
        if left <= 0:
            self.emit(bench="skipped", what=what, reason=f"past --budget-s {self.budget}")
        return left > 0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None

    def pipeline(self, dtype=None):
        """The base every part uses: ``--base``-shaped random weights on a GPU, its miniature in a dry run."""
        from bases import TWIN, build

        torch.manual_seed(0)
        return build(TWIN[self.base] if self.dry else self.base, self.device, dtype)

    # -- ceilings
    def machine(self) -> None:
        row = {"bench": "machine", "device": self.device, "torch": torch.__version__, "dry_run": self.dry,
               "base": self.base, "commit": _git_commit()}
        for mod in ("diffusers", "transformers", "peft", "accelerate", "open_clip", "timm"):
            with contextlib.suppress(Exception):
                row[mod] = __import__(mod).__version__
        if self.device == "cuda":
            name = torch.cuda.get_device_name()
            row["gpu"] = name
            row["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            seconds = _median_time(lambda: a @ b, self.sync, warm=3, reps=10)
            self.peak_tflops = 2 * n**3 / seconds / 1e12
            row["matmul_bf16_tflops"] = round(self.peak_tflops, 1)
            del a, b
        self.machine_row = self.emit(**row)

    # -- training
    def train(self, methods: list[str], steps: int) -> dict[str, dict]:
        from personalize import families, train
        from personalize.methods import get, refusal
        from personalize.prior import PriorConfig
        from personalize.training import TrainConfig

        rows = {}
        family = families.get(self.base) if self.base in DIT else None  # the family names are the base names
        for method in methods:
            if not self.in_budget(f"train {method}"):
                break
            reason = refusal(method, family) if family is not None else None
            if reason:
                self.emit(bench="skipped", what=f"train {method}", reason=reason)
                continue
            cls = get(method)
            batch = 2 if self.dry else cls.train_defaults.get("batch_size", TrainConfig.batch_size)
            prior_off = {"prior_loss_weight": 0.0} if issubclass(cls.Config, PriorConfig) else {}
            rows[method] = self.train_modes(train, method, batch, steps, prior_off)
        return rows

    def train_modes(self, train, method: str, batch: int, steps: int, extra: dict) -> dict:
        """The method eager (FLOPs counted), then with the compiled step (CUDA graphs: the trainer's default on a
        GPU) from a cold compile cache, and for Perfusion once more from the warm cache (dynamo reset, the FX graph
        and AOT autograd caches on disk kept): s/step, speed-up over eager, MFU from the eager row's FLOPs (the
        same work), and cold / warm compile seconds (step 1 beyond eager's). Returns the fastest row."""
        rows = {}
        for mode in self.modes:
            runs = ["cold", "warm"] if mode == "graphs" and method == "perfusion" else ["cold"]
            for cache in runs if mode == "graphs" else [None]:
                if not self.in_budget(f"train {method} {mode}"):
                    break
                torch._dynamo.reset()
                row = self.train_one(train, method, batch, steps, extra, compiled=mode == "graphs",
                                     eager=rows.get("eager"), cache=cache)
                rows[mode if cache in (None, "cold") else "warm"] = row
        timed = [r for r in rows.values() if r.get("step_s")]
        return min(timed, key=lambda r: r["step_s"]) if timed else next(iter(rows.values()), {})

    def train_one(self, train, method: str, batch: int, steps: int, extra: dict, compiled: bool = False,
                  eager: dict | None = None, cache: str | None = None) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        pipe = self.pipeline()
        self.reset_peak()
        stamps: list[float] = []
        counter = FlopCounterMode(display=False)

        def tick(step, loss, m):
            self.sync()
            stamps.append(time.perf_counter())
            if compiled:  # a dispatch mode around a compiled module would recompile it: count eager runs only
                return
            if step == 1:  # count the FLOPs of step 2 exactly, as the trainer runs it (not timed)
                counter.__enter__()
            elif step == 2:
                counter.__exit__(None, None, None)

        with tempfile.TemporaryDirectory() as tmp:
            photos = _photos(Path(tmp) / "photos", 512 if not self.dry else 64)
            start = time.perf_counter()
            error = None
            try:
                train(pipe, photos, token="<bench>", superclass="dog", out=Path(tmp) / "c.safetensors",
                      method=method, progress=False, callbacks=[tick], device=self.device, masks="none",
                      settings={"steps": steps, "batch_size": batch, "checkpoint_every": 0,
                                "mixed_precision": "bf16", "compile": compiled, **extra})
            except Exception as exc:  # one method failing must not end the suite
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            end = time.perf_counter()
        row = {"bench": "train", "method": method, "batch": batch, "res": self.res,
               "precision": "bf16-mixed", "prior": False,
               "step": "graphs" if compiled else "eager", **({"compile_cache": cache} if cache else {})}
        if error or len(stamps) < 5:
            del pipe
            return self.emit(**row, error=error or f"only {len(stamps)} steps")
        deltas = [b - a for a, b in zip(stamps, stamps[1:])][2:]  # steps 4.. (1-3: warm-up, 2: FLOP count)
        step_s = statistics.median(deltas)
        flops = counter.get_total_flops() if not compiled else 0
        if compiled and eager and eager.get("tflop_per_step"):  # the same work as the eager step
            flops = eager["tflop_per_step"] * 1e12
        row.update(step_s=round(step_s, 4), samples_per_s=round(batch / step_s, 2), steps_timed=len(deltas),
                   setup_s=round(stamps[0] - start - deltas[0], 2), finish_s=round(end - stamps[-1], 2),
                   tflop_per_step=round(flops / 1e12, 3), achieved_tflops=round(flops / step_s / 1e12, 1),
                   peak_gib=self.peak_gib())
        datasheet = getattr(self, "machine_row", {}).get("datasheet_bf16_tflops")
        if not flops:
            row.update(tflop_per_step=None, achieved_tflops=None)
        elif datasheet:
            row["mfu"] = round(flops / step_s / 1e12 / datasheet, 4)
        if self.peak_tflops and flops:
            row["of_matmul_ceiling"] = round(flops / step_s / 1e12 / self.peak_tflops, 4)
        if compiled and eager and eager.get("step_s"):
            row["speedup_vs_eager"] = round(eager["step_s"] / step_s, 3)
            # step 1 beyond the eager run's: compiling (and capturing the graphs)
            row["compile_s"] = round((stamps[0] - start) - (eager["setup_s"] + eager["step_s"]), 1)
        if method == "perfusion" and batch == PAPER_BATCH:
            row["time_to_concept_210x16_s"] = round(row["setup_s"] + PAPER_STEPS * step_s + row["finish_s"], 1)
        del pipe
        return self.emit(**row)

    # -- sampling
    def sample(self, steps: int, batches: tuple[int, ...], reps: int, modes: tuple[str, ...] = ("eager",)) -> None:
        from personalize import attach, families, train
        from personalize.generation import compiled_denoiser

        if not self.in_budget("sample"):
            return
        pipe = self.pipeline()
        dit = self.base in DIT
        edit = "dreambooth-lora" if dit else "perfusion"  # on DiT the sampling rows time DreamBooth-LoRA
        guidance = (3.5 if self.base == "flux" else 7.0) if dit else 7.5
        steps = steps if self.dry or not dit else 28  # the stock Flux / SD3 pipelines' default
        concepts = {}
        with tempfile.TemporaryDirectory() as tmp:
            photos = _photos(Path(tmp) / "photos", 64)
            for method in (edit, "residuals"):
                concepts[method] = train(pipe, photos, token=f"<{method[:4]}>", superclass="dog",
                                         out=Path(tmp) / f"{method}.safetensors", method=method, progress=False, masks="none",
                                         device=self.device, settings={"steps": 1, "batch_size": 1,
                                                                       "checkpoint_every": 0})
            if self.device == "cuda":
                pipe.to(dtype=torch.float16)  # fp16 inference (a bf16 pipeline's fingerprint differs today)
            settings = {"bare": (None, {}, "a photo of a dog on the beach"),
                        edit: (concepts[edit], {}, f"a photo of a <{edit[:4]}> on the beach"),
                        "residuals_lag": (concepts["residuals"], {"lag": True}, "a photo of a <resi> dog on the beach")}
            # a dry run checks the compiled rows' code at batch 1 (each batch size traces every setting again)
            runs = [(nb, mode) for mode in modes for nb in batches if not (self.dry and mode != "eager" and nb > 1)]
            for nb, mode in runs:
                if not self.in_budget(f"sample batch {nb} {mode}"):
                    break
                times: dict[str, list[float]] = {k: [] for k in settings}
                for rep in range(reps + 1):  # the first round warms up (and compiles: one graph per setting)
                    for name, (concept, knobs, prompt) in settings.items():
                        ctx = attach(pipe, concept, **knobs) if concept is not None else contextlib.nullcontext()
                        with ctx, (compiled_denoiser(pipe, mode="reduce-overhead") if mode == "compiled"
                                   else contextlib.nullcontext()):
                            t = _time_once(lambda: pipe([prompt] * nb, num_inference_steps=steps, guidance_scale=guidance,
                                                        output_type="latent", height=self.res, width=self.res,
                                                        generator=torch.Generator(self.device).manual_seed(0)),
                                           self.sync)
                        if rep:
                            times[name].append(t)
                med = {k: statistics.median(v) for k, v in times.items()}
                sampler = f"{type(pipe.scheduler).__name__.replace('Scheduler', '').lower()}{steps}"
                self.emit(bench="sample", sampler=sampler, cfg=guidance, batch=nb, denoiser=mode,
                          dtype=str(families.denoiser(pipe).dtype), reps=reps,
                          **{f"{k.replace('-', '_')}_s": round(v, 4) for k, v in med.items()},
                          images_per_s_bare=round(nb / med["bare"], 2),
                          **{f"{edit.replace('-', '_')}_overhead": round(med[edit] / med["bare"] - 1, 4)},
                          lag_overhead=round(med["residuals_lag"] / med["bare"] - 1, 4), peak_gib=self.peak_gib())
        del pipe

    # -- evaluator
    def evaluate(self, n_files: int, workers: int) -> None:
        from personalize.evaluation.decode import encode_files
        from personalize.evaluation.models import ClipEncoder, DinoEncoder, pixel_transform

        if not self.in_budget("eval"):
            return
        clip = ClipEncoder(random_weights=True, device=self.device)
        dino = DinoEncoder(random_weights=True, device=self.device)
        batch = 4 if self.dry else 256
        dtypes = (torch.float32,) + ((torch.bfloat16,) if self.device == "cuda" else ())
        for dtype in dtypes:
            x = torch.randn(batch, 3, 224, 224, device=self.device)

            def both(x=x, dtype=dtype):
                with torch.inference_mode(), torch.autocast(self.device, dtype=dtype, enabled=dtype != torch.float32):
                    clip.model.encode_image(x)
                    dino.cls_features(x)

            s = _median_time(both, self.sync, warm=1 if self.dry else 3, reps=1 if self.dry else 10)
            self.emit(bench="eval_tensors", models="clip_vitb32+dino_vits16", dtype=str(dtype).split(".")[-1],
                      batch=batch, images_per_s=round(batch / s, 1))
        with tempfile.TemporaryDirectory() as tmp:
            paths = _random_pngs(Path(tmp), n_files, 512 if not self.dry else 64, workers)
            dtype = dtypes[-1]
            # the machine's own limit, in this run: one process decoding + resizing as the workers do, x workers
            from eval_decode import single_process_rate

            single = single_process_rate(paths[:max(16, min(256, n_files // 8))],
                                         (pixel_transform(224, 224), pixel_transform(256, 224)))
            clip.batch_size = dino.batch_size = batch
            for nw in sorted({0, workers}) if self.dry else (workers,):
                start = time.perf_counter()
                with torch.inference_mode(), torch.autocast(self.device, dtype=dtype, enabled=dtype != torch.float32):
                    # the evaluator's own file path (score_concept, personalize evaluate): each file decoded once
                    # for both encoders in the workers, sent as uint8, normalised on the device
                    ((c, d),) = encode_files((clip, dino), [paths], nw)
                self.sync()
                s = time.perf_counter() - start
                count = c.shape[0]
                limit = single * max(1, nw)
                self.emit(bench="eval_files", models="clip_vitb32+dino_vits16", dtype=str(dtype).split(".")[-1],
                          files=count, png_px=512 if not self.dry else 64, workers=nw, batch=batch,
                          images_per_s=round(count / s, 1), single_process_decode_per_s=round(single, 1),
                          decode_limit_per_s=round(limit, 1), of_decode_limit=round(count / s / limit, 3))

    # -- the diffusers scripts
    def scripts(self, anchors: Path, ours: dict[str, dict], steps: int, only: list[str]) -> None:
        if self.base in DIT:
            return self.dit_script(anchors, ours, steps)
        harness = anchors / "run_diffusers_scripts.sh"
        if not harness.is_file() or self.base != "sd15":
            self.emit(bench="skipped", what="scripts", reason=f"no {harness}" if self.base == "sd15" else
                      "the anchored diffusers scripts train SD 1.x pipelines only")
            return
        if not self.in_budget("scripts: save the pipeline"):
            return
        model = Path(tempfile.mkdtemp(prefix="sd15_"))
        try:
            pipe = self.pipeline()
            pipe.save_pretrained(model)
            del pipe
            self.reset_peak()
            for method in only:
                name = SCRIPTS[method]
                if not self.in_budget(f"script {name}"):
                    break
                batch = (ours.get(method) or {}).get("batch") or 1
                row = {"bench": "diffusers_script", "script": name, "method": method, "batch": batch, "steps": steps,
                       **run_script(anchors, model, name, batch, steps, 512 if not self.dry else 32,
                                    "bf16" if self.device == "cuda" else "no")}
                if "step_s" in row and ours.get(method, {}).get("step_s"):
                    row["ours_step_s"] = ours[method]["step_s"]
                    row["speedup_ours_vs_script"] = round(row["step_s"] / ours[method]["step_s"], 3)
                self.emit(**row)
        finally:
            shutil.rmtree(model, ignore_errors=True)


    def dit_script(self, anchors: Path, ours: dict[str, dict], steps: int) -> None:
        """The family's diffusers DreamBooth-LoRA script, unmodified, on the same pipeline saved to disk, against our
        DreamBooth-LoRA step (same batch, resolution, precision, rank 4)."""
        script = anchors / "diffusers-examples" / DIT_SCRIPTS[self.base]
        if not script.is_file():
            self.emit(bench="skipped", what="scripts", reason=f"no {script}: copy diffusers' examples/dreambooth/"
                      f"{script.name} there, unmodified (the step timer is {anchors / 'sitecustomize.py'})")
            return
        if not self.in_budget("scripts: save the pipeline"):
            return
        model = Path(tempfile.mkdtemp(prefix=f"{self.base}_"))
        try:
            pipe = self.pipeline(torch.bfloat16 if self.device == "cuda" else None)
            pipe.save_pretrained(model)
            del pipe
            self.reset_peak()
            batch = (ours.get("dreambooth-lora") or {}).get("batch") or 1
            if not self.in_budget(f"script {script.name}"):
                return
            row = {"bench": "diffusers_script", "script": script.stem, "method": "dreambooth-lora", "batch": batch,
                   "steps": steps, **run_dit_script(anchors, script, model, batch, steps, self.res,
                                                    "bf16" if self.device == "cuda" else "no")}
            if "step_s" in row and ours.get("dreambooth-lora", {}).get("step_s"):
                row["ours_step_s"] = ours["dreambooth-lora"]["step_s"]
                row["speedup_ours_vs_script"] = round(row["step_s"] / ours["dreambooth-lora"]["step_s"], 3)
            self.emit(**row)
        finally:
            shutil.rmtree(model, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers
def run_dit_script(anchors: Path, script: Path, model: Path, batch: int, steps: int, res: int,
                   precision: str) -> dict:
    """A diffusers DreamBooth-LoRA script for Flux / SD3 with its own defaults (rank 4, its target modules), the
    same five random photos and step timer as ``run_diffusers_scripts.sh``: median s/step (steps 5..), peak GPU
    memory and wall time, or ``error``."""
    outd = Path(tempfile.mkdtemp(prefix=f"script_{script.stem}_"))
    try:
        _photos(outd / "data", res)
        log = outd / "steps.json"
        env = {**os.environ, "STEP_LOG": str(log),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(anchors), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, str(script), "--pretrained_model_name_or_path", str(model),
               "--instance_data_dir", str(outd / "data"), "--instance_prompt", "a photo of sks dog",
               "--resolution", str(res), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
               "--mixed_precision", precision, "--checkpointing_steps", "1000000", "--seed", "0",
               "--learning_rate", "1e-4", "--dataloader_num_workers", "2", "--output_dir", str(outd / "out")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        try:
            record = json.loads(log.read_text())
        except (OSError, ValueError):
            return {"error": f"rc={proc.returncode} no step log: {proc.stderr[-500:]}".strip()}
        deltas = [b - a for a, b in zip(record["stamps"], record["stamps"][1:])][4:]
        if not deltas:
            return {"error": f"rc={proc.returncode} only {len(record['stamps'])} steps: {proc.stderr[-400:]}".strip()}
        peak = record.get("peak_gib")
        return {"step_s": round(statistics.median(deltas), 4), "peak_gib": round(peak, 2) if peak else None,
                "wall_s": round(wall, 1)}
    finally:
        shutil.rmtree(outd, ignore_errors=True)


def run_script(anchors: Path, model: Path, name: str, batch: int, steps: int, res: int, precision: str) -> dict:
    """One diffusers example script, unmodified, through the perf-anchors harness: its median s/step (steps 5..),
    peak GPU memory and wall time, or ``error``."""
    env = {**os.environ, "ONLY": name, "BATCH": str(batch), "STEPS": str(steps), "RES": str(res), "MP": precision,
           # the harness calls python3: this interpreter's (its venv's) even when the venv is not activated
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    outd = Path(tempfile.mkdtemp(prefix=f"script_{name}_"))
    try:
        proc = subprocess.run(["bash", str(anchors / "run_diffusers_scripts.sh"), str(model),
                               str(anchors / "diffusers-examples"), str(outd)], env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(outd, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(name + " ")), proc.stdout[-300:])
    fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    try:
        return {"step_s": float(fields["median_step_s"]), "peak_gib": fields.get("peak_gib"),
                "wall_s": float(fields["wall_s"])}
    except (KeyError, ValueError):
        return {"error": (line + " " + proc.stderr[-300:]).strip()[-600:]}


def _time_once(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _median_time(fn, sync, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    return statistics.median(_time_once(fn, sync) for _ in range(reps))


def _photos(folder: Path, size: int) -> Path:
    """Five synthetic photos (a disc on varied backgrounds)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        img = Image.new("RGB", (size, size), (200, 40 * i, 60))
        r = size // 4
        ImageDraw.Draw(img).ellipse((r + 4 * i, r, 3 * r + 4 * i, 3 * r), fill=(30, 200, 40), outline=(0, 0, 0))
        img.save(folder / f"photo_{i}.png")
    return folder


def _one_png(args) -> str:
    import numpy as np
    from PIL import Image

    path, size, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)  # smooth, like a generated image
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path)
    return path


def _random_pngs(folder: Path, n: int, size: int, workers: int) -> list[Path]:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(str(folder / f"{i:05d}.png"), size, i) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return [Path(p) for p in pool.map(_one_png, jobs, chunksize=16)]
    return [Path(_one_png(j)) for j in jobs]


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:
        return os.environ.get("SUITE_COMMIT")


def main(argv: list[str] | None = None) -> None:
    from personalize.methods import names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, the `tiny` base, a few steps: checks the code")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite_out"))
    parser.add_argument("--parts", default="train,sample,eval,scripts")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "perf-anchors",
                        help="the perf-anchors folder (run_diffusers_scripts.sh, diffusers-examples/)")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="methods whose diffusers script is timed")
    parser.add_argument("--base", choices=("sd15", "sd21", "sdxl", "flux", "sd3"), default="sd15",
                        help="real-size shape (random weights): SD 1.5, SD 2.1, SDXL base 1.0, Flux.1-dev, "
                             "SD3.5-medium (the last two at 512 px)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--train-steps", default="eager,graphs",
                        help="how the training rows step: eager, graphs (the compiled step, CUDA graphs, the "
                             "trainer's GPU default; Perfusion also from the warm compile cache), or both")
    parser.add_argument("--sample-modes", default="eager,compiled",
                        help="sampling rows with the eager denoiser, the compiled one (generate --compile, CUDA "
                             "graphs; concepts' knobs as tensors), or both")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="torch's compile cache folder (default: a fresh one, so the first compile is cold)")
    parser.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache or tempfile.mkdtemp(prefix="compile-cache-"))
    if args.dry_run:  # the CPU checks the compiled paths by tracing them (AOT autograd), not by minutes of codegen
        real_compile = torch.compile
        torch.compile = lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager", "mode": None})
    suite = Suite(args.out, args.dry_run, args.budget_s, tuple(args.train_steps.split(",")), args.base)
    if suite.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    suite.machine()
    methods = names() if args.methods == "all" else args.methods.split(",")
    ours = {}
    if "train" in parts:
        ours = suite.train(methods, steps=6 if args.dry_run else 12)
    if "scripts" in parts:  # right after ours: the ratio is the point
        suite.scripts(args.anchors, ours, steps=6 if args.dry_run else 12,
                      only=[m for m in args.scripts.split(",") if m in SCRIPTS])
    if "sample" in parts:
        suite.sample(steps=2 if args.dry_run else 50, batches=(1, 2) if args.dry_run else (1, 8),
                     reps=1 if args.dry_run else 2, modes=tuple(args.sample_modes.split(",")))
    if "eval" in parts:
        suite.evaluate(n_files=16 if args.dry_run else 4096, workers=2 if args.dry_run else args.workers)
    suite.emit(bench="done", seconds=round(time.perf_counter() - suite.began, 1))


if __name__ == "__main__":
    main()
