"""Edit seams: the places in a pipeline that a method may occupy.

- :mod:`.tokens` — new token vectors appended after the frozen vocabulary;
- :mod:`.sites` — module wrappers that keep ``base_layer`` and add the outputs
  of their occupants (cross-attention ``to_k``/``to_v``, transformer ``proj_out``);
- :mod:`.placement` — where each kind of site is (the only code that walks the UNet);
- :mod:`.groups` — concepts sharing one occupant per site, and their join/leave;
- :mod:`.state` — what is attached to a pipeline, in one object per pipeline;
- :mod:`.prompt_rows` — which encoded prompt each UNet context row is (LAG, key lock);
- :mod:`.pooled` — SDXL's pooled text vector read at the superclass for Perfusion's tokens;
- :mod:`.lora_bank` — peft LoRA layers kept outside the model (residuals, DreamBooth-LoRA).

Installing is idempotent per site and removing the last occupant puts the
original module object back, so a pipeline with everything detached is the
pipeline it was before.
"""
from .placement import cross_attention_layers, site_names
from .sites import SiteWrapper, occupy, vacate
from .tokens import TokenSite, base_tokenizer, token_site

__all__ = [
    "SiteWrapper",
    "TokenSite",
    "base_tokenizer",
    "cross_attention_layers",
    "occupy",
    "site_names",
    "token_site",
    "vacate",
]
