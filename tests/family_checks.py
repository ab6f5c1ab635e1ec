"""Checks every family's test file makes of its built-in base (imported by tests/test_family_*.py)."""
from __future__ import annotations

import torch

from personalize import families, text_stack
from personalize.base import load_base, pipeline_class

PROMPTS = ["a photo of a dog", "a red cube on a table, studio light"]


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline's denoiser, VAE and text encoders, by part and name."""
    parts = [families.of(pipe).denoiser, "vae", *(te for _, te in text_stack.pairs(pipe))]
    return {f"{part}.{k}": v for part in parts for k, v in getattr(pipe, part).state_dict().items()}


def same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key, tensor in wa.items():
        assert torch.equal(tensor, wb[key]), key


def saved_folder_loads_as_the_family(pipe, folder, class_name: str):
    """``folder`` (``pipe.save_pretrained``) declares ``class_name`` and loads through ``load_base`` as the same
    class and family, with the same weights and the same encoding of :data:`PROMPTS`; returns the loaded pipeline."""
    assert pipeline_class(str(folder)) == class_name
    loaded = load_base(str(folder))
    assert type(loaded) is type(pipe) and families.of(loaded) is families.of(pipe)
    same_weights(pipe, loaded)
    ours, theirs = text_stack.encode(pipe, PROMPTS), text_stack.encode(loaded, PROMPTS)
    assert torch.equal(ours.ids, theirs.ids) and torch.equal(ours.context, theirs.context)
    return loaded
