"""A spec expanded into units of work: train, generate (one prompt x seed x setting), score.

Every unit has a stable key and the keys of the units it needs, so the runner can
skip what is done and several processes can share what is not. The method label
``base`` is the base model alone: the same prompts with the superclass word in
place of the concept (the Perfusion protocol's text normalisation) and the
leakage prompts without any concept (the leakage reference, shared by all).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from .. import methods as method_registry
from ..errors import BadInputError
from ..templates import check_token, shown, token_problem
from .spec import DEFAULT_LEAKAGE_PROMPTS, DEFAULT_PROMPTS, Spec, setting_label

BASE = "base"
LEAKAGE_CONCEPT = "_leakage"


@dataclass(frozen=True)
class ConceptEntry:
    name: str
    superclass: str
    concept_class: str
    token: str
    templates: tuple[str, ...]   # {} = the concept's subject: how a method writes it (see subject_for)
    source: str                  # toyworld | cc101 | folder
    photos: Optional[str] = None  # folder of training/reference photos (toy-world photos are rendered on demand)
    mirror_symmetric: bool = True

    def subject_for(self, method_type: str) -> str:
        """What fills the templates' {} for ``method_type``, as that method trained and as its paper evaluates
        it (``Method.prompting``): the token in place of the class word ("<new1>": Perfusion, Textual
        Inversion) or before it ("<new1> barn": DreamBooth, Custom Diffusion, Residuals); the superclass word
        for the base alone."""
        if method_type == BASE:
            return self.superclass
        return method_registry.get(method_type).subject(self.token, self.superclass)

    def prompts(self, method_type: str) -> list[str]:
        return [t.replace("{}", self.subject_for(method_type)) for t in self.templates]

    def superclass_prompts(self) -> list[str]:
        """The templates with the superclass word: the base's prompts and every method's CLIP-T text (the
        prompt with its token removed, or the class word back in the token's place)."""
        return self.prompts(BASE)


@dataclass
class Unit:
    key: str
    kind: str                     # train | generate | score
    method: str                   # the spec's method label, or "base"
    method_type: str
    concept: str
    concept_class: str = ""
    setting: dict = field(default_factory=dict)
    prompt: Optional[str] = None
    prompt_index: Optional[int] = None
    seed: Optional[int] = None
    purpose: Optional[str] = None  # generate: concept | leakage | composition
    deps: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # paths relative to the benchmark folder
    payload: dict = field(default_factory=dict)  # what executing it needs beyond the columns

    @property
    def setting_label(self) -> str:
        return setting_label(self.setting)

    def digest(self) -> str:
        """What the unit would compute: a spec change that alters it is caught, not silently mixed in."""
        data = {k: v for k, v in asdict(self).items() if k != "deps"}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=.," else "_" for c in text)


def resolve_concepts(spec: Spec) -> list[ConceptEntry]:
    out: list[ConceptEntry] = []
    for src in spec.sources:
        out.extend(_SOURCES[src["kind"]](spec, src))
    for c in out:  # names become folder and file names of the run, tokens are trained and exported
        name_problem = token_problem(c.name)
        if name_problem:
            raise BadInputError(f"concepts: the name {shown(c.name)} cannot be a file name ({name_problem}); give the "
                                "concept a 'name' of letters, digits, '-' or '_'")
        check_token(c.token, f"concepts: {c.name}'s token")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"concepts: the name(s) {', '.join(dup)} appear twice; give folder concepts a 'name'")
    return out


def _toyworld(spec: Spec, src: dict) -> list[ConceptEntry]:
    from ..claims import RECON, TOKEN, context_prompts
    from ..datasets.toyworld.concepts import get_concept

    out = []
    for name in src["names"]:
        c = get_concept(name)
        templates = tuple(spec.prompts or (RECON + context_prompts(name)))
        out.append(ConceptEntry(name=name, superclass=c.superclass, concept_class=c.superclass, token=TOKEN,
                                templates=templates, source="toyworld",
                                mirror_symmetric=c.mirror_symmetric))
    return out


def _cc101(spec: Spec, src: dict) -> list[ConceptEntry]:
    from ..datasets.customconcept101 import load_customconcept101

    data = load_customconcept101(spec.resolve(src["cc101"]), multiconcept=False)
    concepts = [data.concept(n) for n in src["names"]] if "names" in src else data.concepts
    concepts = concepts[: src["limit"]] if "limit" in src else concepts
    return [cc101_entry(spec, c) for c in concepts]


def cc101_entry(spec: Spec, c) -> ConceptEntry:
    """A CustomConcept101 concept record as a benchmark concept (its own prompts unless the spec gives some)."""
    return ConceptEntry(name=c.name, superclass=c.class_word, concept_class=c.category, token=c.token,
                        templates=tuple(spec.prompts or c.prompt_templates), source="cc101",
                        photos=str(c.instance_dir))


def _folder(spec: Spec, src: dict) -> list[ConceptEntry]:
    folder = spec.resolve(src["folder"])
    if not folder.is_dir():
        raise BadInputError(f"concepts: photo folder not found: {folder}")
    token = src.get("token", "<new1>")
    superclass = src["superclass"]
    return [ConceptEntry(name=src.get("name", folder.name), superclass=superclass, concept_class=superclass,
                         token=token,
                         templates=tuple(src.get("prompts") or spec.prompts or DEFAULT_PROMPTS), source="folder",
                         photos=str(folder))]


_SOURCES = {"toyworld": _toyworld, "cc101": _cc101, "folder": _folder}


def leakage_prompts(spec: Spec) -> list[str]:
    if spec.leakage_prompts:
        return list(spec.leakage_prompts)
    if all(s["kind"] == "toyworld" for s in spec.sources):
        from ..claims import NO_CONCEPT

        return list(NO_CONCEPT)
    return list(DEFAULT_LEAKAGE_PROMPTS)


def image_paths(method: str, concept: str, setting: dict, stem: str, samples: int) -> list[str]:
    folder = f"images/{method}/{concept}/{_slug(setting_label(setting))}"
    return [f"{folder}/{stem}_{k}.png" for k in range(samples)]


def build_plan(spec: Spec) -> list[Unit]:
    """Every unit of the benchmark in a good execution order (training first, then sampling, then scoring)."""
    concepts = resolve_concepts(spec)
    leak = leakage_prompts(spec)
    n = spec.samples_per_prompt
    units: list[Unit] = []

    def generate(method, method_type, concept, setting, prompt, index, seed, purpose, deps, payload) -> Unit:
        stem = f"{'l' if purpose == 'leakage' else 'p'}{index}_s{seed}"
        u = Unit(key=f"generate/{method}/{concept.name if concept else LEAKAGE_CONCEPT}/"
                     f"{setting_label(setting)}/{stem}",
                 kind="generate", method=method, method_type=method_type,
                 concept=concept.name if concept else LEAKAGE_CONCEPT,
                 concept_class=concept.concept_class if concept else "", setting=setting, prompt=prompt,
                 prompt_index=index, seed=seed, purpose=purpose, deps=deps,
                 outputs=image_paths(method, concept.name if concept else LEAKAGE_CONCEPT, setting, stem, n),
                 payload={**payload, "sampler": spec.sampler, "samples": n})
        units.append(u)
        return u

    def prompts_of(c: ConceptEntry, method_type: str) -> list[tuple[int, str]]:
        return list(enumerate(c.prompts(method_type)))[: spec.max_prompts or None]

    base_leak = [generate(BASE, BASE, None, {}, p, j, s, "leakage", [], {}) for j, p in enumerate(leak)
                 for s in spec.seeds]
    for c in concepts:
        base_gen = [generate(BASE, BASE, c, {}, sp, i, s, "concept", [], {"concept": asdict(c)})
                    for i, sp in prompts_of(c, BASE) for s in spec.seeds]
        base_score = Unit(key=f"score/{BASE}/{c.name}/default", kind="score", method=BASE, method_type=BASE,
                          concept=c.name, concept_class=c.concept_class, deps=[u.key for u in base_gen],
                          payload={"concept": asdict(c), "evaluator": _evaluator_id(spec)})
        units.append(base_score)
        for m in spec.methods:
            concept_file = f"concepts/{m.label}/{c.name}.safetensors"
            train = Unit(key=f"train/{m.label}/{c.name}", kind="train", method=m.label, method_type=m.method,
                         concept=c.name, concept_class=c.concept_class, outputs=[concept_file],
                         payload={"concept": asdict(c), "train": m.train, "base": spec.base})
            units.append(train)
            for setting in m.settings():
                payload = {"concept_file": concept_file, "concept": asdict(c)}
                gens = [generate(m.label, m.method, c, setting, p, i, s, "concept", [train.key], payload)
                        for i, p in prompts_of(c, m.method) for s in spec.seeds]
                leaks = [generate(m.label, m.method, c, setting, p, j, s, "leakage", [train.key], payload)
                         for j, p in enumerate(leak) for s in spec.seeds]
                units.append(Unit(
                    key=f"score/{m.label}/{c.name}/{setting_label(setting)}", kind="score", method=m.label,
                    method_type=m.method, concept=c.name, concept_class=c.concept_class, setting=setting,
                    deps=[u.key for u in gens + leaks] + [base_score.key] + [u.key for u in base_leak],
                    payload={"concept": asdict(c), "evaluator": _evaluator_id(spec),
                             "generated": [u.key for u in gens], "leakage": [u.key for u in leaks],
                             "base_leakage": [u.key for u in base_leak], "base_score": base_score.key,
                             "protocol": protocol(spec, m.method, c)}))
    from .compositions import plan_compositions

    plan_compositions(spec, units, generate)
    order = {"train": 0, "generate": 1, "score": 2}
    units.sort(key=lambda u: (order[u.kind], u.method != BASE))
    return units


SELECTION = "last step"  # every method alike: no best-step search (see spec.py)


def protocol(spec: Spec, method_type: str, concept: ConceptEntry) -> dict:
    """How a method's numbers were made, for the report: its prompting (``Method.prompting``) with the
    concept's subject, the step selection (the same for every method), the sampler (scheduler, steps, guidance)
    and the comparability block."""
    return {"prompting": method_registry.get(method_type).prompting, "subject": concept.subject_for(method_type),
            "selection": SELECTION, "sampler": spec.sampler, "comparability": spec.comparability}


def _evaluator_id(spec: Spec) -> dict:
    """What identifies the scores (weights paths matter, the random-weights test switch too)."""
    return {k: (str(v) if v is not None else None) for k, v in sorted(spec.evaluator.items())}


def concept_from_payload(payload: dict) -> ConceptEntry:
    data = dict(payload["concept"])
    data["templates"] = tuple(data["templates"])
    return ConceptEntry(**data)


__all__ = ["BASE", "SELECTION", "ConceptEntry", "protocol", "cc101_entry", "LEAKAGE_CONCEPT", "Unit", "build_plan", "concept_from_payload",
           "leakage_prompts", "resolve_concepts"]
