"""A fair, comparable benchmark protocol (issue 24): each method prompted as it trained, the same step selection
for every method, the paper's beta ranges as a union of sweeps, and a comparability block checked against the
spec. Plans only: nothing is trained here."""
from pathlib import Path

import pytest

from personalize import methods as registry
from personalize.benchmark.plan import build_plan
from personalize.benchmark.spec import load_spec, parse_spec
from personalize.errors import BadInputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOY = {"base": "toy", "evaluator": {"backend": "toyworld"}, "concepts": [{"toyworld": ["split_triangle"]}],
       "prompts": ["a {} on the left, on a green background"], "seeds": [0],
       "methods": [{"method": "perfusion"}]}

# What each method's paper (or reference script) writes for the concept: the learned word alone, or before the
# class word. Written from the papers, not read from the code under test.
PAPER_PROMPTING = {"perfusion": "word", "textual-inversion": "word", "dreambooth": "modifier",
                   "dreambooth-lora": "modifier", "custom-diffusion": "modifier", "residuals": "modifier"}


def test_every_method_declares_its_papers_prompting():
    assert {name: registry.get(name).prompting for name in registry.names()} == PAPER_PROMPTING
    assert registry.get("perfusion").subject("<t>", "teddy bear") == "<t>"
    assert registry.get("residuals").subject("<t>", "teddy bear") == "<t> teddy bear"


@pytest.mark.parametrize("name", ["perfusion", "residuals", "dreambooth-lora", "custom-diffusion"])
def test_training_prompts_write_the_concept_as_the_benchmark_does(tiny, name):
    """The trainer's placeholder (what the concept learned from) is the benchmark's subject for the method."""
    cls = registry.get(name)
    method = cls.for_training(tiny, "<cat>", "cat", cls.make_config({}))
    try:
        assert method.placeholders() == [cls.subject("<cat>", "cat")]
    finally:
        method.remove()


def test_the_toy_plan_prompts_each_method_as_it_trained(tmp_path):
    spec = parse_spec({**TOY, "methods": [{"method": "perfusion"}, {"method": "residuals"},
                                          {"method": "textual-inversion"}]}, root=tmp_path)
    prompts = {(u.method, u.purpose): u.prompt for u in build_plan(spec) if u.kind == "generate" and u.seed == 0}
    assert prompts["perfusion", "concept"] == "a <tok> on the left, on a green background"
    assert prompts["textual-inversion", "concept"] == "a <tok> on the left, on a green background"
    assert prompts["residuals", "concept"] == "a <tok> triangle on the left, on a green background"
    assert prompts["base", "concept"] == "a triangle on the left, on a green background"


def test_a_list_of_sweeps_is_their_union_in_order(tmp_path):
    spec = parse_spec({**TOY, "methods": [{"method": "perfusion", "sweep": [
        {"beta": [0.6, 0.7], "lock": ["local"]}, {"beta": [0.4, 0.6], "lock": ["global"]},
        {"beta": [0.6], "lock": ["local"]}]}]}, root=tmp_path)  # the last repeats a setting: kept once
    assert spec.methods[0].settings() == [{"beta": 0.6, "lock": "local"}, {"beta": 0.7, "lock": "local"},
                                          {"beta": 0.4, "lock": "global"}, {"beta": 0.6, "lock": "global"}]
    with pytest.raises(BadInputError, match=r"methods\[0\]\.sweep\[1\]: perfusion has no inference knob 'lag'"):
        parse_spec({**TOY, "methods": [{"method": "perfusion", "sweep": [{"beta": [0.6]}, {"lag": [True]}]}]},
                   root=tmp_path)


def test_the_cc101_example_sweeps_the_papers_beta_per_lock():
    """Perfusion §4.5: beta 0.6-0.75 under local key-locking, 0.4-0.6 under global key-locking."""
    spec = load_spec(EXAMPLES / "cc101_benchmark.yaml")
    settings = next(m for m in spec.methods if m.method == "perfusion").settings()
    for lock, (lo, hi) in {"local": (0.6, 0.75), "global": (0.4, 0.6)}.items():
        betas = [s["beta"] for s in settings if s["lock"] == lock]
        assert betas and all(lo <= b <= hi for b in betas), (lock, betas)
    assert "runwayml" not in spec.base


@pytest.mark.parametrize("where", ["entry", "train"])
def test_best_step_selection_for_one_method_is_refused(tmp_path, where):
    entry = {"method": "perfusion", "validate_every": 25} if where == "entry" else \
        {"method": "perfusion", "train": {"validate_every": 25}}
    with pytest.raises(BadInputError, match="every method keeps its last step"):
        parse_spec({**TOY, "methods": [entry]}, root=tmp_path)


def test_benchmark_training_rows_never_ask_for_selection(tmp_path):
    spec = load_spec(EXAMPLES / "toy_benchmark.yaml")
    trains = [u for u in build_plan(spec) if u.kind == "train"]
    assert trains and all("validate_every" not in u.payload and "evaluator" not in u.payload for u in trains)
    assert all("validate_every" not in u.payload["train"] for u in trains)


def test_the_residuals_paper_preset_checks_the_spec(cc101, tmp_path):
    spec = load_spec(EXAMPLES / "cc101_residuals_paper.yaml")
    assert spec.comparability["base"] == "CompVis/stable-diffusion-v1-4" == spec.base
    assert len(spec.seeds) * spec.samples_per_prompt == 50
    good = {"base": "CompVis/stable-diffusion-v1-4", "comparability": "residuals-paper",
            "evaluator": {"backend": "clip"}, "concepts": [{"cc101": str(cc101)}], "seeds": [0],
            "samples_per_prompt": 50, "sampler": {"steps": 50, "guidance": 6}, "methods": [{"method": "residuals"}]}
    assert parse_spec(good, root=tmp_path).comparability["preset"] == "residuals-paper"
    for change, says in (({"samples_per_prompt": 5}, "5 images per prompt"),
                         ({"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "the table used 'CompVis"),
                         ({"max_prompts": 3}, "CustomConcept101's own prompts"),
                         ({"sampler": {"steps": 25, "guidance": 6}}, "sampler 25 steps"),
                         ({"sampler": {"steps": 50, "guidance": 6, "scheduler": "euler"}},
                          "sampler.scheduler is euler, the table used ddim"),
                         ({"comparability": "perfusion-paper"}, "unknown preset 'perfusion-paper'"),
                         ({"comparability": {"table": "x"}}, "missing base")):
        with pytest.raises(BadInputError, match=says):
            parse_spec({**good, **change}, root=tmp_path)


def test_the_report_states_prompting_selection_and_comparability(tmp_path):
    from personalize.benchmark.plan import protocol, resolve_concepts
    from personalize.benchmark.report.summary import comparability_text, summarize

    spec = parse_spec({**TOY, "methods": [{"method": "perfusion"}, {"method": "residuals"}]}, root=tmp_path)
    concept = resolve_concepts(spec)[0]
    rows = [{"kind": "score", "status": "done", "method": m, "concept": concept.name, "result": {"fidelity": 0.5},
             "payload": {"protocol": protocol(spec, m, concept)}} for m in ("perfusion", "residuals")]
    table = summarize(rows)["protocol"]
    cells = {r["cells"][0]: r["cells"][1:] for r in table["rows"]}
    sampler = f"ddim, {spec.sampler['steps']} steps, guidance {spec.sampler['guidance']}"
    assert cells["perfusion"] == ["token in place of the class word", "<tok> (split_triangle)", "last step", sampler]
    assert cells["residuals"] == ["token before the class word", "<tok> triangle (split_triangle)", "last step", sampler]
    assert comparability_text(None).startswith("Comparability: none declared")
    block = load_spec(EXAMPLES / "cc101_residuals_paper.yaml").comparability
    assert "Personalized Residuals" in comparability_text(block) and "50 images per prompt" in comparability_text(block)
