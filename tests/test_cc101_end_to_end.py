"""CustomConcept101 end to end through the CLI: a CC101-shaped folder (multi-word class phrases, a composition
pair), random weights for CLIP, DINO and CLIPSeg, every method, `benchmark run` -> `report`; the report shows
intervals and the composition table. One training step per method, one image per prompt, one prompt."""
from __future__ import annotations


import pytest
import yaml

from conftest import make_photos, write_cc101_json
from personalize import methods
from personalize.cli import main

CONCEPTS = (("plushie_penguin", "penguin plushie", "plushie.txt", "<new1>"),
            ("actionfigure_1", "action figure", "figure.txt", "<new2>"))
FAST = {"steps": 1, "batch_size": 1, "checkpoint_every": 0}


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture(scope="module")
def cc101_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc101e2e") / "cc101"
    (root / "prompts").mkdir(parents=True)
    for i, (name, phrase, prompts, _) in enumerate(CONCEPTS):
        make_photos(root / "benchmark_dataset" / name, n=2, size=40 + 8 * i)
        (root / "prompts" / prompts).write_text("{} on a sunny beach.\na watercolor painting of the {}.\n")
    (root / "prompts" / "pair.txt").write_text("A {0} next to a {1} in a garden.\n")
    entries = [(tok, phrase, name, f"prompts/{prompts}") for name, phrase, prompts, tok in CONCEPTS]
    write_cc101_json(root, entries[:1], [(*entries, "prompts/pair.txt")])
    return root


def test_every_method_runs_and_reports_with_intervals_and_compositions(cc101_root, tmp_path, capsys, clip_weights_file,
                                                                      dino_weights_file, tiny_segmenter):
    names = methods.names()
    train = {name: {**FAST, **({"prior_loss_weight": 0.0} if name in ("dreambooth", "custom-diffusion") else {}),
                    **({"segmenter": str(tiny_segmenter)} if name == "perfusion" else {})} for name in names}
    spec = {"name": "cc101-e2e", "base": "tiny", "device": "cpu",
            "evaluator": {"backend": "clip", "clip_weights": str(clip_weights_file),
                          "dino_weights": str(dino_weights_file)},
            "concepts": [{"cc101": str(cc101_root), "compositions": True}],
            "max_prompts": 1, "seeds": [0], "samples_per_prompt": 1, "sampler": {"steps": 2, "guidance": 4.0},
            "leakage_prompts": ["a photo of a beach"],
            "methods": [{"method": name, "train": train[name]} for name in names],
            "compose": ["perfusion+residuals", "custom-diffusion"]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    code, _, err = cli(["benchmark", "run", path, "--out", out], capsys)
    assert code == 0, err
    code, status, err = cli(["benchmark", "status", out / "benchmark.sqlite"], capsys)
    assert code == 0, err
    done, total = status.split(" done")[0].split("/")
    assert done == total and int(total) > 0 and "failed " not in status, status
    report = tmp_path / "report"
    code, _, err = cli(["benchmark", "report", out / "benchmark.sqlite", "--out", report], capsys)
    assert code == 0, err
    page = (report / "index.html").read_text()
    for name in names:  # every method trained on the multi-word classes and is in the results
        assert f">{name}<" in page, name
    for text in ("Compositions", "perfusion+residuals", "custom-diffusion(joint)", "Head to head", "Perfusion view"):
        assert text in page, text
    md = (report / "report.md").read_text()
    assert "## Compositions" in md and " [" in md  # values carry [lo, hi] intervals
    from personalize import load_concept

    penguin = load_concept(out / "concepts" / "perfusion" / "plushie_penguin.safetensors")
    assert penguin.superclass == "penguin plushie" and penguin.header["provenance"]["masks"] == "auto"
