"""peft LoRA layers kept outside the model: the shared piece of Personalized Residuals and DreamBooth-LoRA.

peft's ``inject_adapter_in_model`` runs on a *mirror* module holding frozen
stand-ins of the chosen layers (their weights share storage with the real
ones), so peft builds its ``lora.Linear`` / ``lora.Conv2d`` layers while the
model's modules, ``state_dict()`` and ``requires_grad`` flags stay untouched.
A method's occupant asks :meth:`LoraBank.delta` for ``scale * B A x`` at its
site. Tensor names are peft's state-dict names with a part prefix
(``unet.``, ``transformer.`` on a diffusion transformer): the diffusers LoRA layout.
"""
from __future__ import annotations

import collections

import torch
from torch import nn

from ..errors import BadInputError, ConceptFileError
from .sites import inner_layer

ADAPTER = "residual"
PREFIX = "unet."


def _stand_in(layer: nn.Module) -> nn.Module:
    """A frozen copy of ``layer``'s shape whose weight shares storage with it (no memory, no side effects)."""
    if isinstance(layer, nn.Conv2d):
        stand_in = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             layer.padding, layer.dilation, layer.groups, bias=False, device="meta")
    elif isinstance(layer, nn.Linear):
        stand_in = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    else:
        raise BadInputError(f"a {type(layer).__name__} layer; LoRA layers go on Conv2d and Linear layers only")
    stand_in.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
    return stand_in


def lora_config(ranks: dict[str, int]):
    """The peft LoraConfig for ``ranks`` (alpha = rank everywhere, i.e. scale 1; no dropout, no bias)."""
    from peft import LoraConfig

    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=dict(ranks),
                      alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none")


class LoraBank:
    """peft LoRA layers for the layers in ``ranks`` (``proj_out`` here; any Linear/Conv2d for DreamBooth-LoRA), kept
    outside the model; ``config`` (default: :func:`lora_config`, scale 1) is the peft ``LoraConfig`` to inject."""

    def __init__(self, unet: nn.Module, ranks: dict[str, int], config=None, prefix: str = PREFIX):
        from peft import inject_adapter_in_model

        self.ranks, self.prefix = dict(ranks), prefix
        self.root = nn.Module()
        for name in self.ranks:
            parent = self.root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, _stand_in(inner_layer(unet.get_submodule(name))))
        self.config = config if config is not None else lora_config(self.ranks)
        inject_adapter_in_model(self.config, self.root, adapter_name=ADAPTER)
        self.layers = {name: self.root.get_submodule(name) for name in self.ranks}
        for p in self.parameters():  # trainables stay fp32 whatever the base's dtype
            p.data = p.data.float()

    def parameters(self) -> list[nn.Parameter]:
        pairs = [(layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]) for layer in self.layers.values()]
        return [p for pair in pairs for module in pair for p in module.parameters()]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """dW_i x for the ``proj_out`` called ``name`` (same layout as x; computed in fp32)."""
        layer = self.layers[name]
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        return b(a(x.to(a.weight.dtype))) * layer.scaling[ADAPTER]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(self.root, adapter_name=ADAPTER)
        return {self.prefix + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.state_dict())
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise ConceptFileError(f"residual tensors do not match this base's proj_out layers "
                                   f"(missing {missing[:2]}, unexpected {extra[:2]}); use the base it was trained on")
        device = self.parameters()[0].device
        state = {k[len(self.prefix):]: v.to(device, torch.float32) for k, v in tensors.items()}
        with torch.no_grad():
            set_peft_model_state_dict(self.root, state, adapter_name=ADAPTER)

    @staticmethod
    def ranks_in(tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, int]:
        """The per-layer ranks stored in a concept's tensors (names starting with ``prefix``)."""
        suffix = ".lora_A.weight"
        return {k[len(prefix):-len(suffix)]: v.shape[0] for k, v in tensors.items()
                if k.startswith(prefix) and k.endswith(suffix)}

