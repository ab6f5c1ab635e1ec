"""The concept loader under fuzzing: every mutant of a real concept file loads the same content (or, when the
checksum was recomputed, a sound concept) or is a one-line ConceptFileError naming the file -- never another
exception and never a hang. The generator is ``benchmarks/fuzz_concepts.py`` (its ``--n 100000`` run is in
docs/PERFORMANCE.md)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from personalize.concept import Concept, _checksum, load_concept, save_concept
from personalize.errors import ConceptFileError

N_MUTANTS = 4_000


def _fuzz():
    path = Path(__file__).parents[1] / "benchmarks" / "fuzz_concepts.py"
    spec = importlib.util.spec_from_file_location("fuzz_concepts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_concepts", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["fuzz_concepts"])
    return sys.modules["fuzz_concepts"]


fuzz = _fuzz()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return fuzz.sample_concepts(tmp_path_factory.mktemp("originals"))


def _refusal(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    with pytest.raises(ConceptFileError) as err:
        load_concept(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --------------------------------------------------------------------------- the reported cases
REPORTED = {  # case -> what the message says
    "empty string": "not valid JSON",
    "null": "the header is null, not a JSON object",
    "a list": "the header is an array, not a JSON object",
    "format_version as a string": "header field 'format_version' is string '1', not an integer",
    "no method": "the header has no 'method' field",
    "100,000 nested brackets": "nested deeper than 64 levels",
}


@pytest.mark.parametrize("case", sorted(REPORTED))
def test_reported_forged_headers_are_refused(samples, tmp_path, case):
    assert set(REPORTED) == set(fuzz.EXACT_CASES)
    for sample in samples:
        data = fuzz.signed(fuzz.EXACT_CASES[case](sample.header), sample.tensors)
        message = _refusal(tmp_path / f"{sample.name}.safetensors", data)
        assert REPORTED[case] in message and "re-train or re-copy" in message, message


@pytest.mark.parametrize("case", sorted(REPORTED))
def test_cli_inspect_refuses_them_in_one_line(samples, tmp_path, capsys, case):
    from test_bad_input import check_error, run_cli

    path = tmp_path / "forged.safetensors"
    path.write_bytes(fuzz.signed(fuzz.EXACT_CASES[case](samples[0].header), samples[0].tensors))
    code, _, err = run_cli(capsys, ["inspect", path, "--json"])
    check_error(code, err, "forged.safetensors", REPORTED[case])


@pytest.mark.parametrize("text, says", [
    ('{"a": 1, "a": 2}', "key 'a' twice"),
    ("NaN", "NaN, which is not a JSON number"),
    ("1e999", "overflows a float"),
    ("1" * 101, "integer with 101 digits"),
    ('"\\ud800"', "lone surrogate"),
    ("[" * 65 + "]" * 65, "nested deeper than 64 levels"),
    ("x" * ((1 << 20) + 1), "characters long"),
])
def test_parse_header_is_strict_and_bounded(text, says):
    from personalize.concept import HeaderError, parse_header

    with pytest.raises(HeaderError) as err:
        parse_header(text)
    assert says in str(err.value)


def _forge(tmp_path, header: dict, tensors: dict) -> Path:
    path = tmp_path / "forged.safetensors"
    path.write_bytes(fuzz.signed(json.dumps(header), tensors))
    return path


@pytest.mark.parametrize("edit, says", [
    (dict(format_version=0), "versions start at 1"),
    (dict(format_version=True), "'format_version' is boolean"),
    (dict(method="Perfusion"), "not a known method"),
    (dict(token=""), "'token' is empty"),
    (dict(token=["<disc>"]), "'token' is array"),
    (dict(superclass=None), "'superclass' is null"),
    (dict(config=[]), "'config' is array"),
    (dict(provenance="x"), "'provenance' is string"),
    (dict(base_fingerprint={"architecture": "a", "tokenizer": "b"}), "'base_fingerprint.text_encoder' is missing"),
    (dict(base_fingerprint={"architecture": "a", "tokenizer": "b", "text_encoder": "c", "digest": 1}),
     "'base_fingerprint.digest' is integer"),
    (dict(covariance="../../x"), "'covariance'"),
    (dict(tokens=["<a>", "<b>"]), "'tokens' and 'superclasses' without the other"),
    (dict(tokens=["<a>", "<b>"], superclasses=["a"]), "2 tokens but 1 superclasses"),
    (dict(pipeline="../elsewhere"), "'pipeline' is '../elsewhere', not a folder name"),
    (dict(pipeline="/abs"), "not a folder name"),
    (dict(composable="false"), "'composable'"),
])
def test_header_schema(samples, tmp_path, edit, says):
    perfusion = samples[0]
    path = _forge(tmp_path, dict(perfusion.header, **edit), perfusion.tensors)
    assert says in _refusal(path, path.read_bytes())


def test_newer_format_asks_for_an_upgrade(samples, tmp_path):
    perfusion = samples[0]
    path = _forge(tmp_path, {"format_version": 2, "everything": "else differs"}, perfusion.tensors)
    assert "has format version 2; upgrade personalize" in _refusal(path, path.read_bytes())


@pytest.mark.parametrize("tensor, says", [
    (torch.tensor([1, 2]), "dtype int64, not a floating-point type"),
    (torch.tensor([True]), "dtype bool"),
    (torch.tensor([1.0, float("nan")]), "NaN or infinite"),
    (torch.tensor([float("-inf")]).half(), "NaN or infinite"),
])
def test_tensors_must_be_finite_floats(samples, tmp_path, tensor, says):
    perfusion = samples[0]
    path = _forge(tmp_path, perfusion.header, dict(perfusion.tensors, embedding=tensor))
    assert says in _refusal(path, path.read_bytes())


def test_a_forged_tensor_with_a_recomputed_checksum_loads(samples, tmp_path):
    """The checksum is unkeyed: it detects corruption, not tampering (README, ARCHITECTURE)."""
    perfusion = samples[0]
    edited = dict(perfusion.tensors, embedding=perfusion.tensors["embedding"] + 0.25)
    concept = load_concept(_forge(tmp_path, perfusion.header, edited))
    assert torch.equal(concept.tensors["embedding"], edited["embedding"])


def test_scalar_tensor_round_trips(samples, tmp_path):
    """A 0-dim tensor used to break the checksum (torch cannot view it as bytes)."""
    perfusion = samples[0]
    path = save_concept(tmp_path / "scalar.safetensors", Concept(perfusion.header, {"s": torch.tensor(0.5)}))
    assert load_concept(path).tensors["s"].item() == 0.5


@pytest.mark.parametrize("edit, says", [
    (dict(token=float("nan")), "not strict JSON"),
    (dict(token=3), "'token' is integer 3, not a string"),
    (dict(method="nope"), "not a known method"),
])
def test_the_writer_refuses_what_the_loader_would(samples, tmp_path, edit, says):
    perfusion = samples[0]
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConceptFileError, match="refusing to write") as err:
        save_concept(out, Concept(dict(perfusion.header, **edit), perfusion.tensors))
    assert says in str(err.value) and str(out) in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the fuzzer
def test_fuzzed_concepts_load_or_are_refused(samples, tmp_path):
    result = fuzz.run(samples, N_MUTANTS, seed=0, folder=tmp_path, timeout=10.0)
    counts = result["counts"]
    assert sum(row["n"] for row in counts.values()) == N_MUTANTS
    assert result["failures"] == [], json.dumps(result["failures"][:10], indent=1)
    # the fuzzer is not degenerate: every kind ran, and each expected outcome happened
    assert all(row["n"] >= 20 for kind, row in counts.items() if kind != "header-exact"), counts
    assert counts["header-exact"]["refused"] == len(fuzz.EXACT_CASES) * len(samples)
    assert counts["header-reformat"]["same"] == counts["header-reformat"]["n"]
    for kind in fuzz.FORGED_KINDS:
        assert counts[kind]["refused"] > 0 and counts[kind]["different"] > 0, (kind, counts[kind])
    for kind in fuzz.BYTE_KINDS:
        assert counts[kind]["different"] == 0 and counts[kind]["refused"] > 0, (kind, counts[kind])


def test_a_mutant_is_rebuilt_from_its_seed_and_index(samples):
    a, b = fuzz.mutant(samples, 7, 123), fuzz.mutant(samples, 7, 123)
    assert (a.kind, a.note, a.data) == (b.kind, b.note, b.data)


def test_the_guard_catches_a_hang():
    import time

    with pytest.raises(fuzz.Hang):
        with fuzz.time_limit(0.05):
            while True:
                time.sleep(0.01)


def test_checksum_helper_matches_the_writer(samples):
    """The fuzzer forges with the loader's own checksum: re-signing an untouched file changes nothing."""
    for sample in samples:
        assert _checksum(sample.header_text, sample.tensors) == sample.st_header["__metadata__"]["checksum"]
        path = sample.path.with_name("resigned.safetensors")
        path.write_bytes(fuzz.signed(sample.header_text, sample.tensors))
        assert fuzz.same_content(load_concept(path), sample)
