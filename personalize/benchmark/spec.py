"""The benchmark spec: a YAML file that says what to train, generate and score.

    name: toy-head-to-head
    base: toy                       # 'tiny', 'toy', a diffusers folder or a hub id
    evaluator: {backend: toyworld}  # or {backend: clip, clip_weights: PATH, dino_weights: PATH}
    concepts:
      - toyworld: [split_triangle, dotted_square]
      - cc101: /data/customconcept101
        names: [scene_barn]         # optional subset (limit: N the first N; limit: 0 none)
        compositions: true          # optional: the dataset's composition pairs (true: all, N: the first N,
                                    # or a list of "conceptA+conceptB" names)
    compose: [perfusion+perfusion, residuals+residuals, custom-diffusion, perfusion+residuals]
                                    # optional: how pairs are composed (see benchmark/compositions.py)
      - folder: photos/teddy
        superclass: teddy
    prompts: ["a photo of a {}", "a {} on the beach"]   # optional; {} = the concept's subject
    seeds: [0, 1]
    samples_per_prompt: 1           # default: 5 with a cc101 source (CustomConcept101's 5 per prompt), else 1
    sampler: {steps: 25, guidance: 4.0, scheduler: ddim}   # scheduler: a --scheduler name; default ddim, the
                                    # sampler every benchmark has used (pinned, never the base's own)
    methods:
      - method: perfusion
        train: {steps: 150, batch_size: 8}
        sweep:                      # a mapping (every combination) or a list of them (their union):
          - {beta: [0.6, 0.7], lock: [local]}      # the paper's beta under local key-locking
          - {beta: [0.4, 0.5, 0.6], lock: [global]}  # and under global key-locking
      - method: residuals
        sweep: {lag: [false, true]}
    comparability: residuals-paper  # optional: the published table these numbers stand beside (a preset, or a
                                    # mapping {table, base, images_per_prompt, sampler}); the spec is checked
                                    # against it and the report states it

Every method keeps its last training step: best-step selection for one method only would favour it, and a
selection scored on the photos that then evaluate it would flatter it. Each method is prompted as it was
trained (``Method.prompting``): "<new1>" in place of the class word, or "<new1> barn".

Unknown keys anywhere are errors, so a typo never silently runs the defaults.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import methods as method_registry
from ..errors import BadInputError
from ..evaluation import registry as evaluators
from ..knobs import parse as parse_knobs
from ..settings import coerce
from . import comparability

TOP_KEYS = {"name", "base", "device", "evaluator", "concepts", "prompts", "max_prompts", "leakage_prompts",
            "seeds", "samples_per_prompt", "sampler", "methods", "compose", "comparability"}
# CustomConcept101's protocol: 20 prompts x 5 images = 100 per concept (its README's reference numbers).
CC101_SAMPLES_PER_PROMPT = 5
SAMPLER_KEYS = {"steps", "guidance", "scheduler"}
DEFAULT_SCHEDULER = "ddim"  # what benchmarks have always sampled with (the Perfusion paper's 50 DDIM steps)
METHOD_KEYS = {"method", "label", "train", "sweep"}
SOURCE_KEYS = {"toyworld": {"toyworld"}, "cc101": {"cc101", "names", "limit", "compositions"},
               "folder": {"folder", "name", "superclass", "token", "prompts"}}
DEFAULT_LEAKAGE_PROMPTS = ("a photo of a beach at sunset", "a bowl of fruit on a wooden table",
                           "a city street at night")
DEFAULT_PROMPTS = ("a photo of a {}", "a {} on the beach", "a {} in a living room", "a painting of a {}")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    train: dict
    sweeps: list[dict]  # each knob -> list of values; the settings are the union of each one's combinations

    def settings(self) -> list[dict]:
        """Every inference setting of the sweeps (each one's cartesian product, in order, each setting once),
        ``[{}]`` without a sweep."""
        out: list[dict] = []
        for sweep in self.sweeps or [{}]:
            keys = sorted(sweep)
            for values in itertools.product(*(sweep[k] for k in keys)):
                setting = dict(zip(keys, values))
                if setting not in out:
                    out.append(setting)
        return out


@dataclass
class Spec:
    name: str
    base: str
    methods: list[MethodSpec]
    sources: list[dict]
    root: Path  # the spec's folder: relative paths in the spec are relative to it
    device: str = "auto"
    evaluator: dict = field(default_factory=lambda: {"backend": "clip"})
    prompts: Optional[list[str]] = None
    max_prompts: Optional[int] = None
    leakage_prompts: Optional[list[str]] = None
    seeds: list[int] = field(default_factory=lambda: [0])
    samples_per_prompt: int = 1
    compose: Optional[list[str]] = None  # composition recipes ("A+B" method labels, or one multi-concept label)
    sampler: dict = field(default_factory=lambda: {"steps": 50, "guidance": 6.0, "scheduler": DEFAULT_SCHEDULER})
    comparability: Optional[dict] = None  # the published table the numbers stand beside (comparability.py)
    raw: dict = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)


def setting_label(setting: dict) -> str:
    """"beta=0.7,lock=local" (sorted keys), "default" for no knobs."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(setting.items())) or "default"


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _unknown(data: dict, allowed: set, where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError(f"{where} must be a mapping (key: value)")
    return value


def _str_list(value, where: str, slot: Optional[bool] = None) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise BadInputError(f"{where} must be a non-empty list of strings")
    for v in value:
        if slot is True and "{}" not in v:
            raise BadInputError(f"{where}: prompt {v!r} has no {{}} slot for the concept")
        if slot is False and "{}" in v:
            raise BadInputError(f"{where}: prompt {v!r} must not mention the concept (no {{}})")
    return list(value)


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"{where} must be a whole number >= 1, got {value!r}")
    return value


MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range; torch takes it too
MAX_SEEDS = 10_000


def _seeds(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if _positive_int(value, "seeds") > MAX_SEEDS:
            raise BadInputError(f"seeds: a count of {value} seeds is more than {MAX_SEEDS:,}; give fewer")
        return list(range(value))
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise BadInputError("seeds must be a count (e.g. 2) or a list of whole numbers (e.g. [0, 1])")
    if not all(0 <= s <= MAX_SEED for s in value):
        raise BadInputError(f"seeds must be whole numbers from 0 to {MAX_SEED}, not {value}")
    if len(set(value)) != len(value):
        raise BadInputError(f"seeds {value} repeat a seed; list each once")
    return list(value)


def _method(entry, i: int) -> MethodSpec:
    from ..training import resolve_settings

    where = f"methods[{i}]"
    entry = _mapping(entry, where)
    if "validate_every" in entry or "validate_every" in _mapping(entry.get("train"), f"{where}.train"):
        raise BadInputError(f"{where}: validate_every (best-step selection) is not used in a benchmark: every "
                            "method keeps its last step, so none is selected on the photos that score it")
    _unknown(entry, METHOD_KEYS, where)
    name = entry.get("method")
    if not isinstance(name, str):
        raise BadInputError(f"{where}: 'method' is required (one of {', '.join(method_registry.names())})")
    try:
        cls = method_registry.get(name)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    train = _mapping(entry.get("train"), f"{where}.train")
    try:
        resolve_settings(cls, train)
    except (BadInputError, TypeError, ValueError) as exc:
        raise BadInputError(f"{where}.train: {exc}") from None
    raw = entry.get("sweep")
    sweeps = [_sweep(cls, _mapping(sw, f"{where}.sweep[{j}]"), f"{where}.sweep[{j}]") for j, sw in enumerate(raw)] \
        if isinstance(raw, list) else [_sweep(cls, _mapping(raw, f"{where}.sweep"), f"{where}.sweep")]
    label = entry.get("label", cls.name)
    if not isinstance(label, str) or not label.replace("-", "").replace("_", "").isalnum() or label == "base":
        raise BadInputError(f"{where}: label {label!r} must be letters, digits, '-' or '_' (and not 'base')")
    return MethodSpec(label=label, method=cls.name, train=dict(train), sweeps=[s for s in sweeps if s])


def _sweep(cls, sweep: dict, where: str) -> dict:
    for knob, values in sweep.items():
        if knob not in cls.knobs:
            known = ", ".join(sorted(cls.knobs)) or "none"
            raise BadInputError(f"{where}: {cls.name} has no inference knob {knob!r} (knobs: {known})")
        if not isinstance(values, list) or not values:
            raise BadInputError(f"{where}.{knob} must be a non-empty list of values, e.g. [0.6, 0.7]")
        for value in values:
            parse_knobs(cls, {knob: value}, f"{where}.")
    return {k: list(v) for k, v in sweep.items()}


def _text(value, where: str, example: str) -> str:
    """A non-empty one-line string from the spec (a path, a class phrase): anything else is one line."""
    if not isinstance(value, str) or not value.strip():
        shown = "an empty string" if isinstance(value, str) else f"a {type(value).__name__}"
        raise BadInputError(f"{where} must be a non-empty string (e.g. {example}), not {shown}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise BadInputError(f"{where} {value!r} has control characters; write it on one line without them")
    return value


def _spec_name(value) -> str:
    """The spec's name names the default output folder ('<name>_out') and titles the report: a file name."""
    name = _text(value, "spec: name", "name: my-benchmark")
    if "/" in name or "\\" in name or name in (".", "..") or len(name) > 100:
        raise BadInputError(f"spec: name {name[:100]!r} must be a file name (at most 100 characters, no '/' or '\\', "
                            "not '.' or '..'): it names the output folder")
    return name


def _source(entry, i: int) -> dict:
    where = f"concepts[{i}]"
    entry = _mapping(entry, where)
    kinds = [k for k in SOURCE_KEYS if k in entry]
    if len(kinds) != 1:
        raise BadInputError(f"{where} must have exactly one of toyworld:, cc101:, folder:")
    kind = kinds[0]
    _unknown(entry, SOURCE_KEYS[kind], where)
    if kind == "toyworld":
        from ..datasets.toyworld.concepts import CONCEPTS

        names = entry["toyworld"]
        names = list(CONCEPTS) if names == "all" else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BadInputError(f"{where}.toyworld must be a list of toy-world concept names or 'all'")
        bad = [n for n in names if n not in CONCEPTS]
        if bad:
            raise BadInputError(f"{where}: unknown toy-world concept(s) {', '.join(map(str, bad))}; known: "
                                f"{', '.join(CONCEPTS)}")
        return {"kind": kind, "names": names}
    if kind == "cc101":
        _text(entry["cc101"], f"{where}.cc101", "cc101: /data/customconcept101")
        if "names" in entry:
            _str_list(entry["names"], f"{where}.names")
        if "limit" in entry and not (type(entry["limit"]) is int and entry["limit"] == 0):
            _positive_int(entry["limit"], f"{where}.limit")
        if "compositions" in entry:
            _compositions(entry["compositions"], f"{where}.compositions")
        return {"kind": kind, **entry}
    _text(entry["folder"], f"{where}.folder", "folder: photos/teddy")
    if not isinstance(entry.get("superclass"), str):
        raise BadInputError(f"{where}: a folder concept needs 'superclass' (e.g. superclass: teddy)")
    _text(entry["superclass"], f"{where}.superclass", "superclass: teddy")
    if "prompts" in entry:
        _str_list(entry["prompts"], f"{where}.prompts", slot=True)
    return {"kind": kind, **entry}


def _compositions(value, where: str) -> None:
    if value is True or value is False:
        return
    if isinstance(value, int):
        _positive_int(value, where)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v.count("+") == 1 for v in value) or not value:
        raise BadInputError(f"{where} must be true, a count (e.g. 3) or a list of 'conceptA+conceptB' names")


def _scheduler(name) -> str:
    """A sampling scheduler name (:mod:`personalize.schedulers`), lower-cased."""
    from ..schedulers import scheduler_class

    scheduler_class(name, "sampler.scheduler")
    return name.lower()


def evaluator_keys() -> set[str]:
    """The keys an ``evaluator:`` mapping may have: ``backend`` and every registered backend's options."""
    return {"backend"}.union(*(b.options for b in evaluators.backends()))


def parse_spec(data: Any, root: Path, name: str = "benchmark") -> Spec:
    """Check a spec mapping (from YAML) and return a :class:`Spec`; every problem is one BadInputError line."""
    data = _mapping(data, "the spec")
    _unknown(data, TOP_KEYS, "spec")
    for key in ("base", "concepts", "methods"):
        if key not in data:
            raise BadInputError(f"spec: '{key}' is required")
    if not isinstance(data["base"], str) or not data["base"].strip():
        raise BadInputError("spec: base must be a string ('tiny', 'toy', a diffusers folder or a hub id)")
    evaluator = _mapping(data.get("evaluator"), "evaluator")
    _unknown(evaluator, evaluator_keys(), "evaluator")
    evaluator = {"backend": "clip", **evaluator}
    backend = evaluators.get(evaluator["backend"], "evaluator.backend")
    sampler = _mapping(data.get("sampler"), "sampler")
    _unknown(sampler, SAMPLER_KEYS, "sampler")
    if not isinstance(data["methods"], list) or not data["methods"]:
        raise BadInputError("spec: methods must be a non-empty list")
    methods = [_method(m, i) for i, m in enumerate(data["methods"])]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise BadInputError(f"methods: labels repeat ({', '.join(labels)}); give each entry its own 'label'")
    if not isinstance(data["concepts"], list) or not data["concepts"]:
        raise BadInputError("spec: concepts must be a non-empty list")
    sources = [_source(s, i) for i, s in enumerate(data["concepts"])]
    if backend.sources is not None and any(s["kind"] not in backend.sources for s in sources):
        others = [b.name for b in evaluators.backends() if b.sources is None]
        raise BadInputError(f"evaluator.backend {backend.name} scores {backend.sources_text or 'its own concepts'} "
                            f"only; use backend: {' or '.join(others)}")
    compose = None
    if "compose" in data:
        from .compositions import check_compose

        compose = check_compose(data["compose"], methods)
    cc101 = any(s["kind"] == "cc101" for s in sources)
    device = data.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise BadInputError(f"device must be auto, cpu or cuda, not {device!r}")
    spec = Spec(
        name=_spec_name(data.get("name", name)), base=data["base"], methods=methods, sources=sources, root=Path(root),
        device=device, evaluator=evaluator,
        prompts=_str_list(data["prompts"], "prompts", slot=True) if "prompts" in data else None,
        max_prompts=_positive_int(data["max_prompts"], "max_prompts") if "max_prompts" in data else None,
        leakage_prompts=(_str_list(data["leakage_prompts"], "leakage_prompts", slot=False)
                         if "leakage_prompts" in data else None),
        seeds=_seeds(data.get("seeds", [0])),
        samples_per_prompt=_positive_int(data.get("samples_per_prompt", CC101_SAMPLES_PER_PROMPT if cc101 else 1),
                                         "samples_per_prompt"),
        compose=compose,
        sampler={"steps": _positive_int(sampler.get("steps", 50), "sampler.steps"),
                 "guidance": coerce("guidance", sampler.get("guidance", 6.0), float, "sampler.guidance"),
                 "scheduler": _scheduler(sampler.get("scheduler", DEFAULT_SCHEDULER))},
        comparability=comparability.resolve(data.get("comparability")),
        raw=data,
    )
    comparability.check(spec.comparability, spec)
    return spec


def load_spec(path: str | Path) -> Spec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path} is not valid YAML ({exc.__class__.__name__}); fix the file") from None
    return parse_spec(data, root=path.resolve().parent, name=path.stem)


__all__ = ["MethodSpec", "Spec", "load_spec", "parse_spec", "setting_label"]
