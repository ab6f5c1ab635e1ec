"""Scores for generated images: CustomConcept101's CLIP-T / CLIP-I / DINO-I, the Perfusion protocol, leakage."""
from .metrics import (CLIP_TEXT_FACTOR, ClipImageScore, ClipTextScore, DinoImageScore, LeakageScore, Metric,
                      ToyWorldScore, remove_token, score_concept)
from .models import ClipEncoder, DinoEncoder, clip_transform, dino_transform, list_images, load_image
from .protocol import best_h, class_balanced_mean, harmonic_mean, normalized_text_similarity


def build_metrics(clip_weights=None, dino_weights=None, random_weights: bool = False, device="cpu") -> dict:
    """CLIP-T, CLIP-I, DINO-I and leakage metric objects sharing one CLIP and one DINO model."""
    clip = ClipEncoder(weights=clip_weights, random_weights=random_weights, device=device)
    dino = DinoEncoder(weights=dino_weights, random_weights=random_weights, device=device)
    return {"clip_text": ClipTextScore(clip), "clip_image": ClipImageScore(clip),
            "dino_image": DinoImageScore(dino), "leakage_dino": LeakageScore(dino)}


__all__ = ["CLIP_TEXT_FACTOR", "ClipEncoder", "ClipImageScore", "ClipTextScore", "DinoEncoder", "DinoImageScore",
           "LeakageScore", "Metric", "ToyWorldScore", "best_h", "build_metrics", "class_balanced_mean",
           "clip_transform", "dino_transform", "harmonic_mean", "list_images", "load_image",
           "normalized_text_similarity", "remove_token", "score_concept"]
