"""The demo writes a page with the training photos and a grid of generations."""
import json

from personalize.demo import BETAS, SCENES, run_demo


def test_demo_writes_index_with_grid(tmp_path):
    index = run_demo(tmp_path / "demo", steps=2, batch_size=2, sample_steps=2)
    page = index.read_text()
    assert page.count("data:image/png;base64,") == 5 + len(BETAS) * len(SCENES)
    prompts = json.loads((tmp_path / "demo" / "samples" / "prompts.json").read_text())
    assert len(prompts) == len(BETAS) * len(SCENES)
    assert (tmp_path / "demo" / "striped-ball.safetensors").is_file()
