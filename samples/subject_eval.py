"""What both readers read off a pipeline for the sample subject: shared by the demo and the method table.

Held-out prompts (fixed seeds): N subject prompts ("a sks cross" and "a sks cross on a <bg> background,
<pos>") and N ordinary world prompts ("a red circle" style, shape and colour only). ``measure(pipe)``
generates both sets with fixed seeds and returns the subject rate (a yellow cross is read) and the
accuracy on world prompts (shape and colour as prompted): the drift a fine-tune causes shows as a drop.
Each figure comes from both readers of ``peft_diffusion.shapes.scoring``: the oracle (``subject``,
``class_prompts``) and the analytic reader, which learns nothing and asks for the renderer's own
geometry (``subject_analytic``, ``class_prompts_analytic``).
"""
from pathlib import Path

import numpy as np

from peft_diffusion.shapes import scoring, world
from peft_diffusion.shapes.oracle import Oracle
from peft_diffusion.training.evaluate import generate

REPO = Path(__file__).resolve().parents[1]
N = 100  # prompts per measurement (single seed: about +-4 points)
SUBJECT = {"shape": "cross", "colour": "yellow"}


def prompts(identifier: str = "sks", n: int = N):
    """(subject prompts, world prompts, the world prompts' attributes)."""
    rng = np.random.default_rng(777)
    held = [world.sample(rng).attrs for _ in range(n)]
    class_prompts = [world.caption(a, omit=("size", "background", "position")) for a in held]
    rng = np.random.default_rng(99)
    subject_prompts = [f"a {identifier} cross"] * (n // 2) + [
        world.caption({"shape": "cross", "background": world.BACKGROUNDS[rng.integers(4)],
                       "position": world.POSITIONS[rng.integers(9)]}, identifier=identifier)
        for _ in range(n - n // 2)]
    return subject_prompts, class_prompts, held


def measure(pipe, identifier: str = "sks", n: int = N, oracle: Oracle | None = None):
    """({"subject", "class_prompts" (oracle), "subject_analytic", "class_prompts_analytic"}, subject images,
    world images)."""
    readers = scoring.readers(oracle)
    subject_prompts, class_prompts, held = prompts(identifier, n)
    subject_images = generate(pipe, subject_prompts, seed=1000)
    class_images = generate(pipe, class_prompts, seed=2000)
    subject = scoring.score(subject_images, SUBJECT, reader_map=readers)
    world_prompts = scoring.score(class_images, held, reader_map=readers)
    return ({"subject": subject["oracle"]["all"], "class_prompts": world_prompts["oracle"]["all"],
             "subject_analytic": subject["analytic"]["all"],
             "class_prompts_analytic": world_prompts["analytic"]["all"]}, subject_images, class_images)
