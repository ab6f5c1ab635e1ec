"""Edit seams: the places in a pipeline that a method may occupy.

- :mod:`.tokens` — new token vectors appended after the frozen vocabulary;
- :mod:`.sites` — module wrappers that keep ``base_layer`` and add the outputs
  of their occupants (cross-attention ``to_k``/``to_v``, transformer ``proj_out``).

Installing is idempotent per site and removing the last occupant puts the
original module object back, so a pipeline with everything detached is the
pipeline it was before.
"""
from .sites import SiteWrapper, cross_attention_layers, occupy, vacate
from .tokens import TokenSite, base_tokenizer, token_site

__all__ = [
    "SiteWrapper",
    "TokenSite",
    "base_tokenizer",
    "cross_attention_layers",
    "occupy",
    "token_site",
    "vacate",
]
