"""The toy world: procedural scenes, held-out concepts, measurers and a tiny SD-1.x-shaped base model.

    from personalize.datasets.toyworld import list_concepts, render_concept_examples, score_folder
    from personalize.datasets.toyworld.evaluate import load_base_pipeline, evaluate_base, export_from_checkpoint
    from personalize.datasets.toyworld.train_base import main as train_base_main

See docs/TOYWORLD.md.
"""
from .captions import parse_prompt
from .concepts import CONCEPTS, get_concept, list_concepts, render_concept_examples
from .measure import detect_scene, score_folder, score_image
from .world import Scene, SceneObject, caption, heldout_scenes, render_scene, sample_scene

__all__ = ["CONCEPTS", "Scene", "SceneObject", "caption", "detect_scene", "get_concept", "heldout_scenes",
           "list_concepts", "parse_prompt", "render_concept_examples", "render_scene", "sample_scene",
           "score_folder", "score_image"]
