"""The demo trains a toy concept and writes a page with photos, a grid of generations and a scores table."""
import json
import re

from personalize import claims
from personalize.demo import CONCEPT, SCENES, run_demo


def test_demo_writes_index_with_grid_and_scores(tmp_path):
    out = tmp_path / "demo"
    betas = (0.7, 1.0)
    index = run_demo(out, steps=2, batch_size=2, seeds=1, betas=betas)
    page = index.read_text()
    photos = sorted((out / f"{CONCEPT}.photos").glob("*.png"))
    assert len(photos) >= 4
    # the photos, then one row for the base alone and one per beta: "a photo of" + SCENES new scenes each
    assert page.count("data:image/png;base64,") == len(photos) + (1 + len(betas)) * (1 + SCENES)
    assert re.search(r'<tr class="base"><th>base alone', page)
    for beta in betas:
        prompts = json.loads((out / "samples" / f"beta{beta}" / "context" / "prompts.json").read_text())
        assert sorted(prompts.values()) == sorted(t.format(claims.TOKEN) for t in claims.context_prompts(CONCEPT))
        # one scores row per beta, with numbers in every column
        row = re.search(rf"<tr><th>β = {beta}</th>(.*?)</tr>", page.split("Scores")[1]).group(1)
        assert len(re.findall(r"<td>\d\.\d{3}</td>", row)) == 5
    assert (out / f"{CONCEPT}.safetensors").is_file()
