"""What a published table needs for a benchmark's numbers to stand beside it.

A spec's ``comparability:`` names a preset (``residuals-paper``) or gives the mapping itself; the spec is
checked against it when it is parsed (a mismatch is one line naming what differs), and the report states the
table its numbers may be set beside. Only what changes the numbers is checked: the base, the images per
prompt, the prompts and the sampler.
"""
from __future__ import annotations

from typing import Optional

from ..errors import BadInputError

# Ham et al., "Personalized Residuals for Concept-Driven Text-to-Image Generation" (CVPR 2024), §4 and Table 1:
# "We build upon Stable Diffusion v1.4", "generate 50 samples for each of the 20 prompts given by the
# [CustomConcept101] dataset", "DDIM sampling with N = 50 steps, eta = 0.0, and a guidance scale of 6.0 for all
# methods".
PRESETS: dict[str, dict] = {
    "residuals-paper": {
        "table": "Personalized Residuals (Ham et al., CVPR 2024), Table 1: CustomConcept101, SD 1.4, the "
                 "dataset's 20 prompts x 50 images, DDIM 50 steps, guidance 6",
        "base": "CompVis/stable-diffusion-v1-4",
        "images_per_prompt": 50,
        "prompts": "cc101",
        "sampler": {"scheduler": "ddim", "steps": 50, "guidance": 6.0},
    },
}
KEYS = {"table", "base", "images_per_prompt", "prompts", "sampler"}
PROMPTS = ("cc101", "spec")  # the dataset's own prompt files, or whatever the spec lists


def resolve(value) -> Optional[dict]:
    """The comparability block of a spec (a preset name or a mapping), checked for shape; None without one."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRESETS:
            raise BadInputError(f"comparability: unknown preset {value!r}; presets: {', '.join(PRESETS)} (or a "
                                "mapping with table, base, images_per_prompt, prompts, sampler)")
        return {"preset": value, **PRESETS[value]}
    if not isinstance(value, dict):
        raise BadInputError("comparability must be a preset name (e.g. residuals-paper) or a mapping")
    extra = sorted(set(value) - KEYS)
    if extra:
        raise BadInputError(f"comparability: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(KEYS))}")
    missing = sorted(KEYS - set(value))
    if missing:
        raise BadInputError(f"comparability: missing {', '.join(missing)} (say what the published table used)")
    n = value["images_per_prompt"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInputError(f"comparability.images_per_prompt must be a whole number >= 1, got {n!r}")
    if value["prompts"] not in PROMPTS:
        raise BadInputError(f"comparability.prompts must be one of {', '.join(PROMPTS)}, got {value['prompts']!r}")
    if not isinstance(value["sampler"], dict) or not {"steps", "guidance"} <= set(value["sampler"]) \
            <= {"steps", "guidance", "scheduler"}:
        raise BadInputError("comparability.sampler must be a mapping {steps: N, guidance: G} (and optionally "
                            "scheduler: NAME)")
    return dict(value)


def check(block: Optional[dict], spec) -> None:
    """Refuse (one line) a spec whose numbers could not stand beside ``block``'s table."""
    if block is None:
        return
    name = block.get("preset") or "the table"
    problems = []
    if spec.base != block["base"]:
        problems.append(f"base is {spec.base!r}, the table used {block['base']!r}")
    per_prompt = len(spec.seeds) * spec.samples_per_prompt
    if per_prompt != block["images_per_prompt"]:
        problems.append(f"{per_prompt} images per prompt (seeds x samples_per_prompt), the table used "
                        f"{block['images_per_prompt']}")
    if block["prompts"] == "cc101" and (spec.prompts or spec.max_prompts
                                        or any(s["kind"] != "cc101" for s in spec.sources)):
        problems.append("the table used CustomConcept101's own prompts (cc101 concepts, no prompts: or "
                        "max_prompts:)")
    if (spec.sampler["steps"], float(spec.sampler["guidance"])) != (block["sampler"]["steps"],
                                                                   float(block["sampler"]["guidance"])):
        problems.append(f"sampler {spec.sampler['steps']} steps at guidance {spec.sampler['guidance']}, the table "
                        f"used {block['sampler']['steps']} at {block['sampler']['guidance']}")
    scheduler = block["sampler"].get("scheduler")
    if scheduler is not None and str(scheduler).lower() != spec.sampler["scheduler"]:
        problems.append(f"sampler.scheduler is {spec.sampler['scheduler']}, the table used {scheduler}")
    if problems:
        raise BadInputError(f"comparability ({name}): {problems[0]}" + (f" (and {len(problems) - 1} more)"
                            if len(problems) > 1 else "") + "; change the spec or drop comparability:")


__all__ = ["PRESETS", "check", "resolve"]
