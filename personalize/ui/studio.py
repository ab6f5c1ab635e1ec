"""The web app's handlers as plain Python (the page in :mod:`.app` only wires them to widgets): train from
uploaded photos, the library of concept files, generate and compose with per-concept knobs, the gallery, the
compare grid. Each takes what a widget gives and raises the library's one-line
:class:`personalize.errors.PersonalizeError` on bad input, which the page shows as it is.

The app folder holds everything the app writes: ``runs/NAME/`` (the uploaded photos, masks, captions and
``run.json``), ``concepts/NAME.safetensors`` (with the trainer's ``.ckpt/`` and ``.samples/`` beside it),
``gallery/`` (each PNG with its settings as JSON beside it), ``compare/`` and ``reports/`` (benchmark reports the
page links to). Names come from the app
(:func:`concept_name`, ``inside``), never a browser path.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import BadInputError
from ..paths import atomic_path, inside
from .jobs import DeviceQueue, Job
from .uploads import LIMITS, Limits, save_json, store_photos

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: the app's own defaults where the CLI's would not suit a page (each editable in the settings box)
WATCH = {"validation_prompt": "a photo of a {}"}
_QUEUES: dict[str, DeviceQueue] = {}  # one worker per device for the whole process (every app, every tab)
_QUEUES_LOCK = threading.Lock()


def default_folder() -> Path:
    """The per-user app folder: ``$XDG_DATA_HOME/personalize/ui`` (``~/.local/share/personalize/ui``)."""
    import os

    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(root, "personalize", "ui")


def queue_for(device) -> DeviceQueue:
    key = str(device)
    with _QUEUES_LOCK:
        if key not in _QUEUES:
            _QUEUES[key] = DeviceQueue(key)
        return _QUEUES[key]


def concept_name(name: str | None, token: str) -> str:
    """The library name of a new concept: ``name``, else the token's letters (``<my-teddy>`` -> ``my-teddy``)."""
    if name is None or not str(name).strip():
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(token)).strip("-_")[:64]
    name = str(name).strip()
    if not NAME.match(name):
        raise BadInputError(f"concept name {name[:70]!r}: use 1-64 letters, digits, '-' or '_' (it names a file)")
    return name


def parse_settings(text: str | None) -> dict[str, Any]:
    """The settings box: one ``KEY=VALUE`` per line, read as the CLI reads ``--set`` (a JSON value, else text);
    blank lines and ``#`` comments are skipped."""
    from ..cli.console import _load_settings

    lines = [line.strip() for line in (text or "").splitlines()]
    return _load_settings(None, [line for line in lines if line and not line.startswith("#")])


def recipe(method: str) -> tuple[str, str]:
    """(the method's recipe, its settings as ``KEY=VALUE`` lines: the trainer defaults its recipe sets and its
    Config's fields, the CLI's ``--set`` keys; ``masks`` is left to the upload, see :meth:`Studio.train`)."""
    import dataclasses

    from .. import methods as registry

    card = registry.card(method)
    values = {k: v for k, v in card.train_defaults.items() if k != "masks"}
    values.update({f.name: f.default for f in dataclasses.fields(card.Config)
                   if f.default is not dataclasses.MISSING and not isinstance(f.default, (dict, list))})
    lines = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return card.recipe, "\n".join(lines)


@dataclass
class KnobControl:
    """How the page shows one knob of one concept: a slider (numbers), a checkbox (flags) or a choice."""

    name: str
    kind: str  # "slider", "checkbox", "choice"
    value: Any
    help: str
    low: float = 0.0
    high: float = 1.0
    choices: tuple[str, ...] = ()


def knob_controls(method: str, defaults: dict[str, Any] | None = None) -> list[KnobControl]:
    """``method``'s inference knobs (:mod:`personalize.knobs` specs) as controls, each starting at the concept's
    own value (its header's ``inference_defaults``) where the knob's default is "the concept's"."""
    from .. import methods as registry
    from ..knobs import specs

    out = []
    for spec in specs(registry.card(method).Knobs).values():
        value = spec.default if spec.default is not None else (defaults or {}).get(spec.name)
        if spec.kind is bool:
            out.append(KnobControl(spec.name, "checkbox", bool(value), spec.help))
        elif spec.kind is str:
            out.append(KnobControl(spec.name, "choice", value, spec.help, choices=spec.choices))
        else:
            low = spec.low if spec.low is not None else 0.0
            low = low + 0.01 if spec.low_open else low
            high = spec.high if spec.high is not None else 1.0  # beta: s = 1 at the concept, the gate's edge
            if high - low > 4:  # a wide range (LoRA scale -10..10): the useful part around the default
                low, high = max(low, -2.0), min(high, 2.0)
            value = low if value is None else value
            out.append(KnobControl(spec.name, "slider", float(value), spec.help, float(low), float(high)))
    return out


class Studio:
    """The app's state: its folder, base and device, the pipeline loaded once per base and the concepts attached
    to it (kept attached while the selection stays, so a knob change is ``handle.set()``, not a re-attach)."""

    def __init__(self, folder: str | Path | None = None, base: str = "toy", device: str | None = None,
                 limits: Limits = LIMITS, clip_weights: str | Path | None = None,
                 dino_weights: str | Path | None = None):
        from ..devices import resolve_device

        self.folder = Path(folder) if folder is not None else default_folder()
        self.base = base
        self.device = resolve_device(device)
        self.limits = limits
        self.queue = queue_for(self.device)
        for sub in ("runs", "concepts", "gallery", "compare"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._pipes: dict[str, Any] = {}
        self._attached: tuple[tuple, Any] | None = None  # (selection key, Attachment)
        self.attach_count = 0  # how many times concepts were attached (a knob change must not add one)
        # the Compare tab's CLIP / DINO scores: local files, else open_clip's / timm's hub weights
        self.clip_weights, self.dino_weights = clip_weights, dino_weights
        self._clip = self._dino = None

    # -- folders --------------------------------------------------------------------------------------
    @property
    def concepts_dir(self) -> Path:
        return self.folder / "concepts"

    def concept_path(self, name: str) -> Path:
        """The library file of ``name``; a name not in the library is refused (nothing from the page is a path)."""
        if not isinstance(name, str) or not NAME.match(name):
            raise BadInputError(f"concept {str(name)[:70]!r} is not in the library; pick one of the list")
        path = inside(self.concepts_dir, f"{name}.safetensors")
        if not path.is_file():
            raise BadInputError(f"concept '{name}' is not in the library; pick one of the list")
        return path

    # -- the pipeline (on the device's worker only) -----------------------------------------------------
    def _pipe(self):
        if self.base not in self._pipes:
            from ..base import load_base

            self._pipes[self.base] = load_base(self.base, device=self.device)
        return self._pipes[self.base]

    def _detach(self) -> None:
        if self._attached is not None:
            self._attached[1].detach()
            self._attached = None

    def _attachment(self, names: Sequence[str]):
        """The attachment of ``names`` (attached once per selection; the files' sizes and times are in the key, so
        a concept retrained under its name is attached anew)."""
        from ..compose import attach

        paths = [self.concept_path(n) for n in names]
        key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
        if self._attached is not None and self._attached[0] == key:
            return self._attached[1]
        self._detach()
        handle = attach(self._pipe(), [str(p) for p in paths])
        self.attach_count += 1
        self._attached = (key, handle)
        return handle

    # -- training -------------------------------------------------------------------------------------
    def train(self, photos: Sequence, token: str, superclass: str, method: str = "perfusion",
              name: str | None = None, settings: str | dict | None = None, masks: Sequence = ()) -> Job:
        """Check everything, store the uploads under ``runs/NAME/`` and queue the run on the device's worker;
        returns its :class:`Job`. The settings are the CLI's (``--set`` keys, the same checks and messages);
        without ``masks`` in them the loss is weighted by the uploaded masks when there are any, else by none
        (``masks=auto`` segments with CLIPSeg, whose weights download once)."""
        from .. import methods as registry
        from ..templates import check_token
        from ..training import resolve_settings

        method_cls = registry.get(str(method))
        check_token(str(token or "").strip(), "token")
        superclass = str(superclass or "").strip()
        if not superclass:
            raise BadInputError("superclass is empty; say what it is in a word or two: 'teddy bear', 'dog'")
        name = concept_name(name, token)
        out = inside(self.concepts_dir, f"{name}.safetensors")
        if out.exists():
            raise BadInputError(f"a concept named '{name}' is already in the library; pick another name")
        if any(job.name == name and not job.finished for job in self.queue.jobs.values()):
            raise BadInputError(f"a run named '{name}' is queued or running (another tab?); pick another name")
        given = settings if isinstance(settings, dict) else parse_settings(settings)
        _no_paths(given)
        run_settings = {**(WATCH if given.get("validation_every", 1) else {}), **given}
        cfg, _ = resolve_settings(method_cls, run_settings)  # the CLI's checks and messages, before storing
        # watching the run: samples four times per run, a checkpoint ten times (cancel, then resume from it)
        run_settings.setdefault("validation_every", max(1, cfg.steps // 4))
        run_settings.setdefault("checkpoint_every", max(1, cfg.steps // 10))
        run = inside(self.folder / "runs", name)
        store_photos(photos, run, masks, self.limits)
        masks_setting = run_settings.pop("masks", None) or (str(run / "masks") if (run / "masks").is_dir() else "none")
        record = {"name": name, "method": method_cls.name, "token": token.strip(), "superclass": superclass,
                  "settings": run_settings, "masks": masks_setting, "base": self.base, "steps": cfg.steps}
        save_json(run / "run.json", record)
        return self._submit(record, resume=False)

    def resume(self, name: str) -> Job:
        """Continue the stopped run ``name`` from its last checkpoint (its photos and settings as stored)."""
        from ..checkpoints import has_checkpoint

        name = concept_name(name, "")
        if any(job.name == name and not job.finished for job in self.queue.jobs.values()):
            raise BadInputError(f"run '{name}' is queued or running already")
        record_path = inside(self.folder / "runs", name, "run.json")
        if not record_path.is_file():
            raise BadInputError(f"no stopped run named '{name}'; start it with Train")
        record = json.loads(record_path.read_text())
        out = inside(self.concepts_dir, f"{name}.safetensors")
        if out.exists():
            raise BadInputError(f"run '{name}' has finished: its concept is in the library")
        if not has_checkpoint(out):
            raise BadInputError(f"run '{name}' stopped before its first checkpoint; start it again with Train")
        return self._submit(record, resume=True)

    def stopped_runs(self) -> list[str]:
        """Runs with a checkpoint and no concept yet (cancelled or interrupted): what Resume offers."""
        from ..checkpoints import has_checkpoint

        out = []
        for run in sorted((self.folder / "runs").iterdir()):
            concept = self.concepts_dir / f"{run.name}.safetensors"
            if (run / "run.json").is_file() and not concept.exists() and has_checkpoint(concept):
                out.append(run.name)
        return out

    def _submit(self, record: dict, resume: bool) -> Job:
        from ..training import TrainConfig  # noqa: F401  (settings were checked; torch loads on the worker)

        run = self.folder / "runs" / record["name"]
        out = self.concepts_dir / f"{record['name']}.safetensors"
        total = int(record["steps"])

        def work(job: Job) -> Path:
            from ..training import train

            pipe = self._pipe()
            self._detach()  # the trainer installs its own edits on this pipeline; nothing else may be attached
            masks = record["masks"]
            return train(pipe, run / "photos", token=record["token"], superclass=record["superclass"], out=out,
                         method=record["method"], masks=Path(masks) if masks not in ("none", "auto") else masks,
                         resume=resume, settings=dict(record["settings"]), progress=False,
                         callbacks=[job.on_step], device=self.device)

        job = self.queue.submit(record["name"], total, work)
        job.out = out
        return job

    def status(self, job: Job) -> dict[str, Any]:
        """What the page shows of a run: state, step of total, the loss curve, the newest sample images."""
        from ..training import samples_dir

        samples = sorted(samples_dir(job.out).glob("step-*/*.png")) if samples_dir(job.out).is_dir() else []
        return {"state": job.state, "step": job.step, "total": job.total, "losses": list(job.losses),
                "message": job.message, "samples": samples, "queued_before": self.queue.waiting()}

    # -- the library ----------------------------------------------------------------------------------
    def library(self) -> list[dict[str, Any]]:
        """Every concept file in the folder: name, method, token, superclass, base and its knob controls."""
        from ..concept import load_concept
        from ..errors import PersonalizeError

        out = []
        for path in sorted(self.concepts_dir.glob("*.safetensors")):
            if not NAME.match(path.stem):
                continue
            try:
                concept = load_concept(path)
            except PersonalizeError as exc:
                out.append({"name": path.stem, "error": str(exc)})
                continue
            out.append({"name": path.stem, "method": concept.method, "token": concept.token,
                        "superclass": concept.superclass, "base": concept.header.get("provenance", {}).get("base"),
                        "knobs": knob_controls(concept.method, concept.inference_defaults)})
        return out

    # -- generating -----------------------------------------------------------------------------------
    def sampling_defaults(self) -> dict[str, Any]:
        """Steps and guidance: the toy world's (25, 4.0) on the toy base, else the CLI's (50 DDIM, 6: the paper)."""
        return {"steps": 25, "guidance": 4.0} if self.base == "toy" else {"steps": 50, "guidance": 6.0}

    def generate(self, selection: Sequence[tuple[str, dict[str, Any]]], prompt: str, negative_prompt: str = "",
                 seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 num_images: int = 1) -> list[Path]:
        """Images of ``prompt`` with the selected concepts (``[(name, {knob: value})]``; none: the base alone)
        attached, each with its own knobs set through ``handle.set()``; written to ``gallery/`` with their
        settings as JSON beside each PNG. Returns the PNGs' paths."""
        from ..prompts import check_prompt_text
        from ..settings import check_options

        defaults = self.sampling_defaults()
        steps = defaults["steps"] if steps is None else steps
        guidance = defaults["guidance"] if guidance is None else guidance
        steps, seed, num_images = (_whole(v, flag) for v, flag in ((steps, "steps"), (seed, "seed"),
                                                                 (num_images, "num_images")))
        check_options(num_images=num_images, steps=steps, guidance=float(guidance), seed=seed)
        if num_images > 8:
            raise BadInputError(f"num_images {num_images}: the page makes at most 8 at a time")
        check_prompt_text(prompt, "prompt")
        names = [n for n, _ in selection]
        if len(set(names)) != len(names):
            raise BadInputError("a concept is selected twice; pick each once")
        for n in names:
            self.concept_path(n)
        knobs = [dict(k or {}) for _, k in selection]

        def work():
            from ..generation import check_steps, generate
            from ..prompts import check_prompt_length

            pipe = self._pipe()
            check_steps(pipe, steps, "steps")
            if names:
                handle = self._attachment(names)
                self._set_knobs(handle, knobs)
            else:
                self._detach()
            check_prompt_length(pipe, prompt, "prompt")
            return generate(pipe, prompt, num_images=num_images, steps=steps, guidance=float(guidance), seed=seed,
                            negative_prompt=negative_prompt or None)

        images = self.queue.run(work)
        settings = {"base": self.base, "prompt": prompt, "negative_prompt": negative_prompt or None,
                    "steps": steps, "guidance": float(guidance),
                    "concepts": [{"name": n, "file": f"concepts/{n}.safetensors", "knobs": k}
                                 for n, k in zip(names, knobs)]}
        return [self._to_gallery(image, {**settings, "seed": seed + k}) for k, image in enumerate(images)]

    @staticmethod
    def _set_knobs(handle, knobs: list[dict[str, Any]]) -> None:
        """Each concept's own knobs through ``handle.set()`` (a handle per concept: ``set`` gives a knob to every
        concept that takes it); every value is checked before any changes."""
        from ..compose import Attachment
        from ..knobs import parse

        for method, values in zip(handle.methods, knobs):
            parse(type(method), values, f"{method.token}: ")
        for method, values in zip(handle.methods, knobs):
            if values:
                Attachment(handle.pipe, [method]).set(**values)

    def _to_gallery(self, image, settings: dict) -> Path:
        from ..generation import slug

        stamp = time.strftime("%Y%m%d-%H%M%S")
        stem = f"{stamp}-{time.time_ns() % 10**9:09d}-{slug(settings['prompt'], 30)}_{settings['seed']}"
        path = inside(self.folder / "gallery", f"{stem}.png")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        save_json(path.with_suffix(".json"), settings)
        return path

    def gallery(self, limit: int = 60) -> list[tuple[Path, str]]:
        """The newest images first, each with its prompt (from the settings beside it)."""
        out = []
        for png in sorted((self.folder / "gallery").glob("*.png"), reverse=True)[:limit]:
            side = png.with_suffix(".json")
            try:
                caption = json.loads(side.read_text()).get("prompt", "")
            except (OSError, ValueError):
                caption = ""
            out.append((png, caption))
        return out

    # -- compare --------------------------------------------------------------------------------------
    def compare(self, names: Sequence[str], template: str, seed: int = 0, knob: str | None = None,
                values: str | Sequence = (), toy_concept: str | None = None, steps: int | None = None,
                guidance: float | None = None, clip: bool = False) -> dict[str, Any]:
        """One image per (concept, knob value): ``template`` with ``{}`` filled by each concept's token, the same
        seed everywhere; scored by the toy world's ground truth when ``toy_concept`` names one of its concepts
        (the toy base), and with ``clip`` by CLIP-T (the prompt without the token, :class:`ClipTextScore`), CLIP-I
        and DINO-I (against the concept's uploaded photos, :class:`ClipImageScore`, :class:`DinoImageScore`), the
        evaluators' own metrics. Writes ``compare/STAMP/`` (the images, ``grid.png``, ``scores.json``) and returns
        ``{"grid": path, "rows": [{concept, knob value, image, alignment, fidelity, clip_text, clip_image,
        dino_image}]}``."""
        from ..prompts import check_prompt_text
        from ..settings import check_options

        if not names:
            raise BadInputError("pick at least one concept to compare")
        check_prompt_text(template, "prompt")
        if "{}" not in template:
            raise BadInputError("the compare prompt needs {} where each concept's token goes, e.g. 'a photo of a {}'")
        defaults = self.sampling_defaults()
        steps = _whole(defaults["steps"] if steps is None else steps, "steps")
        guidance = float(defaults["guidance"] if guidance is None else guidance)
        seed = _whole(seed, "seed")
        check_options(steps=steps, guidance=guidance, seed=seed)
        sweep = _values(values) if knob else [None]
        if knob and not sweep:
            raise BadInputError(f"give the values of {knob} to compare, e.g. 0.5, 0.7, 0.9")
        if len(sweep) * len(names) > 24:
            raise BadInputError(f"{len(names)} concepts x {len(sweep)} values is over the 24 images a grid may have")
        scorer = _toy_scorer(toy_concept, self.base)
        for n in names:
            self.concept_path(n)
        folder = inside(self.folder / "compare", time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}")

        def work():
            from ..generation import generate

            cells = []
            for n in names:
                handle = self._attachment([n])
                method = handle.methods[0]
                for value in sweep:
                    if value is not None:
                        if knob not in type(method).knobs:
                            cells.append((n, method.token, value, None, f"{type(method).name} has no {knob}"))
                            continue
                        self._set_knobs(handle, [{knob: value}])
                    prompt = template.replace("{}", method.token)
                    (image,) = generate(handle.pipe, prompt, num_images=1, steps=steps, guidance=guidance, seed=seed)
                    cells.append((n, method.token, value, image, prompt))
                self._set_knobs(handle, [{knob: None}] if knob and knob in type(method).knobs else [{}])
            return cells

        cells = self.queue.run(work)
        clip_scores = self.queue.run(lambda: self._clip_scores(cells)) if clip else {}
        folder.mkdir(parents=True)
        rows = []
        for i, (n, token, value, image, prompt) in enumerate(cells):
            row = {"concept": n, "knob": knob, "value": value, "image": None, "alignment": None, "fidelity": None}
            if image is not None:
                path = inside(folder, f"{i:02d}-{n}.png")
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                row["image"] = str(path)
                if scorer is not None:
                    row.update(scorer(image, prompt, token))
                row.update(clip_scores.get(i, {}))
            else:
                row["note"] = prompt
            rows.append(row)
        grid = _grid([c[3] for c in cells], len(names), len(sweep),
                     [f"{c[0]}" + (f" {knob}={c[2]}" if knob else "") for c in cells], folder / "grid.png")
        save_json(folder / "scores.json", {"prompt": template, "seed": seed, "steps": steps, "guidance": guidance,
                                           "toy_concept": toy_concept, "rows": rows})
        return {"grid": grid, "rows": rows, "folder": folder}

    def _clip_encoder(self):
        if self._clip is None:
            from ..evaluation import ClipEncoder

            self._clip = ClipEncoder(weights=self.clip_weights, device=self.device)
        return self._clip

    def _dino_encoder(self):
        if self._dino is None:
            from ..evaluation import DinoEncoder

            self._dino = DinoEncoder(weights=self.dino_weights, device=self.device)
        return self._dino

    def _clip_scores(self, cells: list) -> dict[int, dict[str, float | None]]:
        """``{cell index: {"clip_text", "clip_image", "dino_image"}}``; the image scores are None for a concept
        without uploaded photos."""
        from ..evaluation import ClipImageScore, ClipTextScore, DinoImageScore
        from ..images import list_images

        encoder = self._clip_encoder()
        out = {}
        for i, (name, token, _value, image, prompt) in enumerate(cells):
            if image is None:
                continue
            text = ClipTextScore(encoder)
            text.update([image], prompt, token)
            photos = self.folder / "runs" / name / "photos"
            out[i] = {"clip_text": text.compute(), "clip_image": None, "dino_image": None}
            if photos.is_dir():
                for key, metric in (("clip_image", ClipImageScore(encoder)),
                                    ("dino_image", DinoImageScore(self._dino_encoder()))):
                    metric.update(generated=[image], reference=list_images(photos))
                    out[i][key] = metric.compute()
        return out

    def reports(self) -> list[Path]:
        """Benchmark reports in the app folder (``reports/NAME/index.html``, written by ``personalize benchmark``),
        which the page links to (gradio serves the app folder only)."""
        return sorted((self.folder / "reports").glob("*/index.html")) if (self.folder / "reports").is_dir() else []

    def close(self) -> None:
        self.queue.run(self._detach)


def _no_paths(settings: dict[str, Any]) -> None:
    """The settings that name files on the server (``masks`` DIR, a ``segmenter`` folder, ``class_images``) are not
    taken from the page: masks are uploaded with the photos, a segmenter is a hub id, class images generated."""
    from ..base import _HUB_ID

    if settings.get("class_images") is not None:
        raise BadInputError("class_images names folders on the server; leave it out (the class images are "
                            "generated by the base and cached; the page takes no folder on the server)")
    masks = settings.get("masks")
    if masks is not None and str(masks).strip().lower() not in ("none", "auto"):
        raise BadInputError(f"masks={str(masks)[:60]!r}: upload the masks beside the photos, or give masks=auto or "
                            "masks=none (the page takes no folder on the server)")
    segmenter = settings.get("segmenter")
    if segmenter is not None and not (isinstance(segmenter, str) and _HUB_ID.match(segmenter)
                                      and not Path(segmenter).exists()):
        raise BadInputError(f"segmenter={str(segmenter)[:60]!r}: give a hub id such as CIDAS/clipseg-rd64-refined "
                            "(the page takes no folder on the server)")


def _whole(value, flag: str) -> int:
    """A whole number from a widget (gradio's Number gives floats): ``3.0`` is 3; ``3.5`` is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise BadInputError(f"{flag} must be a whole number, not {value!r}")
    return int(value)


def _values(values) -> list:
    """The compare sweep: ``"0.5, 0.7"`` or a list; each value checked by the knob's own parser later."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(v)
    return out


def _toy_scorer(toy_concept: str | None, base: str):
    """``score(image, prompt, token) -> {alignment, fidelity}`` against the toy world's ground truth, or None."""
    if not toy_concept or toy_concept == "none":
        return None
    if base != "toy":
        raise BadInputError(f"toy-world scores need the toy base (this app runs on '{base}'); choose none")
    from ..datasets.toyworld.concepts import get_concept
    from ..datasets.toyworld.measure import score_image

    try:
        get_concept(toy_concept)
    except KeyError as exc:  # the toy world's own message, listing the concepts
        raise BadInputError(str(exc.args[0])) from None

    def score(image, prompt, token):
        result = score_image(image, prompt, placeholder=token, concept=toy_concept)
        return {"alignment": result["alignment"], "fidelity": result["fidelity"]}

    return score


def _grid(images: list, rows: int, cols: int, labels: list[str], path: Path, cell: int = 128) -> Path:
    """The compare grid: ``rows`` x ``cols`` cells, each image scaled to ``cell`` pixels (nearest: the toy base's
    32-pixel images stay crisp) under its label; a missing image is a grey cell."""
    from PIL import Image, ImageDraw

    label_h = 14
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        draw.text((x + 2, y + 1), label[:22], fill="black")
        tile = image.resize((cell, cell), Image.NEAREST) if image is not None else Image.new("RGB", (cell, cell), "#ccc")
        grid.paste(tile, (x, y + label_h))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
