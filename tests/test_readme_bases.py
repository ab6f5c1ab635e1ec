"""README's "Supported bases" table says what the code does: the families, the built-in bases, the methods,
each method's export and import formats, the native resolutions. It fails when either side drifts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from personalize import families, methods, text_stack
from personalize.base import BUILTIN_BASES, TINY_FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"
COLUMNS = ["family", "built-in test base", "methods", "export formats (out)", "import formats (in)",
           "native resolution"]
# the real models' native sizes (SD 1.5: 512, SD 2.1: 768, SDXL: 1024, checked against sd_shapes' configs below;
# SD3/3.5: 1024, the pipeline's default of the transformer's sample_size 128 x the VAE's 8, in every published
# transformer/config.json, tests/test_family_sd3.py; Flux.1-dev/schnell: 1024, their VAE's sample_size and
# FluxPipeline's default height)
NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}


def table() -> dict[str, dict[str, str]]:
    """The section's table: family display name -> column -> cell."""
    text = README.read_text()
    section = text.split("\n## Supported bases\n", 1)
    assert len(section) == 2, "README has no '## Supported bases' section"
    body = section[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == COLUMNS
    assert set(rows[1].replace("|", "").strip()) <= set("-: ")
    found = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        found[cells[0]] = dict(zip(COLUMNS, cells))
    return found


def listed(cell: str) -> list[str]:
    """'a, b' -> ['a', 'b']; '—' (nothing) -> []."""
    return [w.strip() for w in cell.split(",") if w.strip() and w.strip() != "—"]


def per_method(cell: str) -> dict[str, list[str]]:
    """'a: x, y; b: z' -> {'a': ['x', 'y'], 'b': ['z']}."""
    out = {}
    for part in filter(None, (p.strip() for p in cell.split(";") if p.strip() != "—")):
        name, _, formats = part.partition(":")
        out[name.strip()] = listed(formats)
    return out


def export_formats(family) -> dict[str, list[str]]:
    return {n: list(methods.export_formats_on(n, family)) for n in methods.names_for(family)
            if methods.export_formats_on(n, family)}


def import_formats(family) -> dict[str, list[str]]:
    """A method with ``import_state`` reads its formats back (``import_formats`` where it declares them)."""
    return {n: methods.import_formats_on(n, family) for n in methods.names_for(family)
            if methods.import_formats_on(n, family)}


@pytest.fixture(scope="module")
def rows():
    return table()


def test_one_row_per_family(rows):
    assert list(rows) == list(text_stack.FAMILIES.values())


@pytest.mark.parametrize("family", list(text_stack.FAMILIES))
def test_row_matches_the_code(rows, family):
    row = rows[text_stack.FAMILIES[family]]
    fam = families.get(family)
    assert listed(row["methods"]) == methods.names_for(fam)
    assert per_method(row["export formats (out)"]) == export_formats(fam)
    assert per_method(row["import formats (in)"]) == import_formats(fam)
    bases = re.findall(r"`([^`]+)`", row["built-in test base"])
    tiny = [spec for spec, fam in TINY_FAMILIES.items() if fam == family]
    assert [b for b in bases if b in TINY_FAMILIES] == tiny and set(bases) <= set(BUILTIN_BASES)
    native = re.fullmatch(r"(\d+) \(tiny: (\d+)\)", row["native resolution"])
    assert native, row["native resolution"]
    assert int(native.group(1)) == NATIVE[family]
    from personalize.base import load_base

    assert all(text_stack.native_resolution(load_base(spec)) == int(native.group(2)) for spec in tiny)


def test_every_built_in_base_is_in_the_table(rows):
    named = {b for row in rows.values() for b in re.findall(r"`([^`]+)`", row["built-in test base"])}
    assert named == set(BUILTIN_BASES)


def test_the_native_sizes_are_the_real_models_and_the_trainer_documents_them():
    """The real-size configs (``sd_shapes``: latent size x the VAE's 8) give the table's sizes, and
    ``--resolution``'s help names them."""
    import dataclasses

    from personalize.sd_shapes import SHAPES
    from personalize.training.config import TrainConfig

    shapes = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
    help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "resolution").metadata["help"]
    for family, size in NATIVE.items():
        assert str(size) in help_text, (family, help_text)
        if family not in shapes:  # no real-size config here (a diffusion transformer's size is checked by its family)
            continue
        unet, vae = SHAPES[shapes[family]][1], SHAPES[shapes[family]][4]
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        assert unet["sample_size"] * vae_scale == vae["sample_size"] == size, family
