"""The toy world: procedural scenes, held-out concepts, caption parsing and measurers (data only).

    from personalize.datasets.toyworld import list_concepts, render_concept_examples, score_folder

The tiny base model trained on it lives in :mod:`personalize.toybase`; the Perfusion claims measured in it in
:mod:`personalize.claims`. See docs/TOYWORLD.md.
"""
from .captions import parse_prompt
from .concepts import CONCEPTS, get_concept, list_concepts, render_concept_examples
from .measure import detect_scene, score_folder, score_image
from .world import Scene, SceneObject, caption, heldout_scenes, render_scene, sample_scene

__all__ = ["CONCEPTS", "Scene", "SceneObject", "caption", "detect_scene", "get_concept", "heldout_scenes",
           "list_concepts", "parse_prompt", "render_concept_examples", "render_scene", "sample_scene",
           "score_folder", "score_image"]
