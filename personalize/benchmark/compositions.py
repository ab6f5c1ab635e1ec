"""CustomConcept101's composition pairs in the benchmark: which recipes compose them, and their units of work.

A cc101 source with ``compositions: true`` (or a count, or a list of ``"conceptA+conceptB"`` names) adds the
pairs of ``dataset_multiconcept.json``. The spec's ``compose:`` lists the recipes, each one of

- ``"A+B"``: two method labels of the spec (the same twice for one method): each concept is trained alone by
  its method (the single-concept training row, shared) and both files are attached together
  (``compose.attach`` with a list; residuals members with ``lag: true``, the paper's multi-concept LAG);
- ``"L"``: one label of a ``multi_concept`` method (Custom Diffusion): one training row trains both concepts
  into one file (joint training, CC101's "CD (joint)").

Without ``compose:``, every spec method composes with itself (joint for a multi-concept method; DreamBooth,
which replaces the UNet, never composes) and the first Perfusion label with the first Residuals label (the
two methods whose edits sit at different seams: K/V and ``proj_out``). Other knobs keep their defaults.

Each pair member keeps the placeholder of the multi-concept json (``<new1>``, ``<new2>``): a separately
trained file is attached with ``token=`` that placeholder. The base alone generates the pair's prompts with
both class words (text normalisation, the Perfusion view). Scores: per concept, each member's image
similarity to its own photos; the composed prompt's text similarity with both tokens removed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .. import methods as method_registry
from ..errors import BadInputError
from .plan import BASE, ConceptEntry, Unit, _evaluator_id, cc101_entry

COMPOSITION = "composition"  # the generate rows' purpose


@dataclass(frozen=True)
class Recipe:
    label: str          # the rows' method label: "A+B" or "L(joint)"
    members: tuple      # method labels: two (attached together) or one (joint training)

    @property
    def joint(self) -> bool:
        return len(self.members) == 1


def _method_of(label: str, methods) -> object:
    return next(m for m in methods if m.label == label)


def check_compose(value, methods) -> list[str]:
    """The spec's ``compose:`` list, checked against its method labels."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadInputError("compose must be a list like [perfusion+perfusion, custom-diffusion, perfusion+residuals]")
    labels = {m.label: m for m in methods}
    for item in value:
        parts = item.split("+")
        bad = [p for p in parts if p not in labels]
        if len(parts) > 2 or bad:
            raise BadInputError(f"compose: {item!r} must be 'A+B' or 'L' with method labels of the spec "
                                f"({', '.join(labels)})")
        classes = [method_registry.get(labels[p].method) for p in parts]
        if any(not c.composable for c in classes):
            raise BadInputError(f"compose: {item!r}: {next(c.name for c in classes if not c.composable)} does not "
                                "compose (it replaces the UNet); leave it out")
        if len(parts) == 1 and not classes[0].multi_concept:
            raise BadInputError(f"compose: {item!r} alone means joint training, which {classes[0].name} does not "
                                f"do; write {item}+{item}")
    if len(set(value)) != len(value):
        raise BadInputError("compose: a recipe repeats; list each once")
    return list(value)


def recipes(spec) -> list[Recipe]:
    if spec.compose is not None:
        items = spec.compose
    else:
        items = []
        for m in spec.methods:
            cls = method_registry.get(m.method)
            if cls.composable:
                items.append(m.label if cls.multi_concept else f"{m.label}+{m.label}")
        first = {name: next((m.label for m in spec.methods if m.method == name), None)
                 for name in ("perfusion", "residuals")}
        if all(first.values()):
            items.append(f"{first['perfusion']}+{first['residuals']}")
    return [Recipe(label=i if "+" in i else f"{i}(joint)", members=tuple(i.split("+"))) for i in items]


def resolve_pairs(spec) -> list[tuple[str, list[ConceptEntry], list[ConceptEntry]]]:
    """[(pair name, [member as trained alone x2], [member as composed x2])] of every cc101 source's pairs."""
    from ..datasets.customconcept101 import load_customconcept101

    out = []
    for src in spec.sources:
        chosen = src.get("compositions")
        if src["kind"] != "cc101" or not chosen:
            continue
        data = load_customconcept101(spec.resolve(src["cc101"]), multiconcept=True)
        comps = data.compositions
        if isinstance(chosen, list):
            known = {c.name: c for c in comps}
            missing = [n for n in chosen if n not in known]
            if missing:
                raise BadInputError(f"compositions: no pair {missing[0]!r} in {data.root}; pairs: "
                                    f"{', '.join(known) or 'none'}")
            comps = [known[n] for n in chosen]
        elif chosen is not True:
            comps = comps[:chosen]
        singles = {c.name: c for c in data.concepts}
        for comp in comps:
            alone, composed = [], []
            for i, c in enumerate(comp.concepts):
                entry = cc101_entry(spec, singles.get(c.name, c))
                token = c.token if len({x.token for x in comp.concepts}) == 2 else f"<new{i + 1}>"
                alone.append(entry)
                composed.append(replace(entry, token=token))
            out.append((comp.name, alone, composed, comp.prompt_templates))
    return out


def _fill(template: str, a: str, b: str) -> str:
    return template.replace("{0}", a).replace("{1}", b)


def plan_compositions(spec, units: list[Unit], generate) -> None:
    """Add the composition rows to ``units`` (``generate``: build_plan's generate-unit maker)."""
    pairs = resolve_pairs(spec)
    if not pairs:
        return
    by_key = {u.key: u for u in units}
    evaluator = _evaluator_id(spec)
    for name, alone, composed, templates in pairs:
        a, b = composed
        pair = ConceptEntry(name=name, superclass=f"{a.superclass} + {b.superclass}",
                            concept_class=f"{a.concept_class}+{b.concept_class}", token=f"{a.token} {b.token}",
                            templates=tuple(templates), source="cc101-composition")
        prompts = list(enumerate(templates))[: spec.max_prompts or None]
        info = {"names": [a.name, b.name], "concepts": [asdict(a), asdict(b)], "templates": list(templates)}
        base_gen = [generate(BASE, BASE, pair, {}, _fill(t, a.superclass, b.superclass), i, s, COMPOSITION, [],
                             {"composition": info}) for i, t in prompts for s in spec.seeds]
        base_score = Unit(key=f"score/{BASE}/{name}/default", kind="score", method=BASE, method_type=BASE,
                          concept=name, concept_class=pair.concept_class, deps=[u.key for u in base_gen],
                          payload={"composition": info, "evaluator": evaluator, "generated": [u.key for u in base_gen]})
        units.append(base_score)
        for recipe in recipes(spec):
            members, trains = _members(spec, recipe, alone, composed, units, by_key)
            subjects = [c.subject_for(_method_of(label, spec.methods).method)
                        for c, label in zip(composed, recipe.members * (2 if recipe.joint else 1))]
            gens = [generate(recipe.label, "compose", pair, {}, _fill(t, *subjects), i, s, COMPOSITION,
                             trains, {"members": members, "composition": info})
                    for i, t in prompts for s in spec.seeds]
            units.append(Unit(key=f"score/{recipe.label}/{name}/default", kind="score", method=recipe.label,
                              method_type="compose", concept=name, concept_class=pair.concept_class,
                              deps=[u.key for u in gens] + [base_score.key],
                              payload={"composition": info, "evaluator": evaluator, "generated": [u.key for u in gens],
                                       "base_score": base_score.key, "members": members}))


def _members(spec, recipe: Recipe, alone, composed, units: list[Unit], by_key: dict) -> tuple[list[dict], list[str]]:
    """What a recipe attaches for one pair ({concept_file, token, knobs} each) and the training rows it needs."""
    if recipe.joint:
        m = _method_of(recipe.members[0], spec.methods)
        name = "+".join(c.name for c in composed)
        key, out = f"train/{m.label}/{name}", f"concepts/{m.label}/{name}.safetensors"
        if key not in by_key:
            unit = Unit(key=key, kind="train", method=m.label, method_type=m.method, concept=name,
                        concept_class="+".join(c.concept_class for c in composed), outputs=[out],
                        payload={"concepts": [asdict(c) for c in composed], "train": m.train, "base": spec.base})
            units.append(unit)
            by_key[key] = unit
        return [{"concept_file": out, "token": None, "knobs": {}}], [key]
    members, keys = [], []
    for label, trained, used in zip(recipe.members, alone, composed):
        m = _method_of(label, spec.methods)
        key, out = f"train/{m.label}/{trained.name}", f"concepts/{m.label}/{trained.name}.safetensors"
        if key not in by_key:  # a pair member that is not benchmarked alone
            unit = Unit(key=key, kind="train", method=m.label, method_type=m.method, concept=trained.name,
                        concept_class=trained.concept_class, outputs=[out],
                        payload={"concept": asdict(trained), "train": m.train, "base": spec.base})
            units.append(unit)
            by_key[key] = unit
        knobs = {"lag": True} if "lag" in method_registry.get(m.method).knobs else {}
        members.append({"concept_file": out, "token": used.token, "knobs": knobs})
        keys.append(key)
    return members, keys


__all__ = ["COMPOSITION", "Recipe", "check_compose", "plan_compositions", "recipes", "resolve_pairs"]
