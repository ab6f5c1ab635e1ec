"""The evaluator registry: every backend's metrics have a direction, the report and the validator factory read
backends and directions from it, and an unknown backend is a one-line error listing the registered ones."""
from __future__ import annotations

import pytest

from personalize.benchmark.report import metric_info, summarize
from personalize.benchmark.spec import parse_spec
from personalize.errors import BadInputError
from personalize.evaluation import registry
from personalize.evaluation.validation import make_validator


@pytest.fixture
def fake_backend():
    """A registered backend ``fake:<thing>`` with one lower-is-better metric ``wobble``; removed afterwards."""
    calls = []

    def validator(argument, every, reference_images, prompts=None, **options):
        calls.append((argument, every, reference_images, prompts, options))
        return "a validator"

    backend = registry.register(registry.Backend(
        name="fake", metrics=(registry.MetricSpec("wobble", "wobble", False, (0.0, None)),),
        validator=validator, scorer=None, argument="thing"))
    yield backend, calls
    registry.unregister("fake")
    assert "fake" not in registry.names()


def test_every_backend_metric_has_a_direction_label_and_range():
    assert {"clip", "toyworld"} <= set(registry.names())
    for backend in registry.backends():
        assert backend.metrics, backend.name
        for spec in backend.metrics:
            assert spec.higher_is_better in (True, False), (backend.name, spec.name)
            assert spec.label and spec.arrow in (" ↑", " ↓")
            low, high = spec.range
            assert low is None or high is None or low < high
        for pair in backend.plots + ((backend.best_h,) if backend.best_h else ()):
            assert {registry.metric(k) is not None for k in pair} == {True}, pair


def test_a_metric_name_shared_by_backends_agrees():
    seen = {}
    for backend in registry.backends():
        for spec in backend.metrics:
            assert seen.setdefault(spec.name, (spec.label, spec.higher_is_better)) == (spec.label,
                                                                                     spec.higher_is_better)
    with pytest.raises(ValueError, match="disagrees"):
        registry.register(registry.Backend("other", (registry.MetricSpec("leakage", "leakage", True),), None, None))
    assert "other" not in registry.names()


def test_the_reports_directions_come_from_the_registry():
    for backend in registry.backends():
        for spec in backend.metrics:
            info = metric_info(spec.name)
            assert (info.label, info.higher_is_better) == (spec.label, spec.higher_is_better)
    assert metric_info("leakage").header == "leakage ↓" and metric_info("clip_image").header == "CLIP-I ↑"


def _wobble_rows() -> list[dict]:
    return [{"status": "done", "kind": "score", "method": method, "concept": "c", "concept_class": "c",
             "setting_label": "default", "result": {"wobble": value}}
            for method, value in (("base", 0.0), ("a", 0.2), ("b", 0.9), ("c", 0.5))]


def _best_methods(summary: dict) -> list[str]:
    table = summary["results"]
    return [table["rows"][i]["method"] for i in table["best"]["wobble"]]


def test_registering_a_lower_is_better_metric_flips_the_reports_best(fake_backend, tmp_path):
    from personalize.benchmark.report import write_report

    assert _best_methods(summarize(_wobble_rows())) == ["a"]  # lower is better: the smallest, base not ranked
    registry.unregister("fake")
    assert _best_methods(summarize(_wobble_rows())) == []  # unregistered: no direction, nothing highlighted
    registry.register(registry.Backend("fake", (registry.MetricSpec("wobble", "wobble", True),), None, None))
    assert _best_methods(summarize(_wobble_rows())) == ["b"]
    index, md = write_report(_wobble_rows(), tmp_path, tmp_path / "report")
    assert "wobble ↑" in index.read_text() and "| **0.900** |" in md.read_text()


def test_make_validator_dispatches_through_the_registry(fake_backend):
    _, calls = fake_backend
    assert make_validator("fake:blue", 3, "photos/", prompts=["a {}"], steps=2) == "a validator"
    (argument, every, refs, prompts, options) = calls[0]
    assert (argument, every, refs, prompts, options["steps"]) == ("blue", 3, "photos/", ["a {}"], 2)


@pytest.mark.parametrize("evaluator, words", [
    ("clipp", ["--evaluator 'clipp'", "did you mean 'clip'", "'clip'", "'toyworld:<concept>'"]),
    ("foo", ["--evaluator 'foo'", "unknown evaluator", "'clip'", "'toyworld:<concept>'"]),
    ("toyworld", ["needs a concept", "toyworld:<concept>"]),
    ("clip:x", ["takes no ':x'", "use 'clip'"]),
])
def test_unknown_or_misspelt_evaluator_is_one_line(evaluator, words):
    with pytest.raises(BadInputError) as info:
        make_validator(evaluator, 1, [], random_weights=True)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message


def test_unknown_backend_in_a_spec_lists_the_registered_ones(tmp_path, fake_backend):
    spec = {"base": "toy", "concepts": [{"toyworld": ["split_triangle"]}], "methods": [{"method": "perfusion"}],
            "evaluator": {"backend": "toyworl"}}
    with pytest.raises(BadInputError) as info:
        parse_spec(spec, tmp_path)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "did you mean 'toyworld'" in message and "clip, toyworld, fake" in message, message
    assert parse_spec({**spec, "evaluator": {"backend": "fake"}}, tmp_path).evaluator == {"backend": "fake"}


def test_builtin_factories_resolve_and_metric_objects_agree_with_the_specs():
    from personalize.benchmark.scoring import CLIP_SCORER, TOY_SCORER, Scorer
    from personalize.evaluation.validation import clip_validator, toyworld_validator

    clip, toy = registry.get("clip"), registry.get("toyworld")
    assert (clip.load("validator"), toy.load("validator")) == (clip_validator, toyworld_validator)
    assert (clip.load("scorer"), toy.load("scorer")) == (CLIP_SCORER, TOY_SCORER)
    for backend in registry.backends():
        assert isinstance(backend.load("scorer"), Scorer) and callable(backend.load("metric_objects"))
    metrics = toy.load("metric_objects")()
    assert set(metrics) <= {m.name for m in toy.metrics}
    for name, metric in metrics.items():
        assert metric.higher_is_better == registry.higher_is_better(name), name
    assert (clip.evaluator_for("teddy"), toy.evaluator_for("teddy")) == ("clip", "toyworld:teddy")
