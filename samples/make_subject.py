"""Write the sample DreamBooth subject: 5 images of a yellow cross, a shape the base never saw.

    python samples/make_subject.py                  # writes samples/subject/subject-{0..4}.png + .txt captions
    python samples/make_subject.py --class-prompts  # prints the class_prompts array of samples/dreambooth.toml

The images come from the shapes-world generator (``world.subject_dataset``, seed 4: all four backgrounds,
both sizes, five positions; varied poses keep the fine-tune from copying them).

No stripes: the embedded base's VAE never saw stripes and cannot reproduce them: it decodes a striped
yellow cross as an orange-red blob, which the oracle reads as cross-and-yellow only 24 % of the time
(unstriped: 94 %), so no fine-tune of the U-Net could score on a striped subject. ``--striped`` writes the
striped subject anyway.

Captions, one per line (the trainer draws one per training item): the full caption without the colour,
"a small sks cross on a gray background, top", and shortened ones ("a sks cross", "a sks cross on a gray
background", "a small sks cross"), as the base saw shortened captions in pretraining: with full captions
only, "a sks cross" alone did not show the subject.

Class prompts: the base never saw a cross, so "a cross" class images would be noise. Prior preservation
protects what the base does know instead: for each of the 25 shape x colour pairs a full caption with
random size, background and position and the short caption ("a red circle"), so the prior images cover the
world's distribution and the prompts people write; the "class-prompt accuracy" is the oracle's accuracy on
ordinary world prompts.
"""
import argparse
import itertools
from pathlib import Path

import numpy as np

from peft_diffusion.shapes import world

SEED, N, COLOUR, IDENTIFIER = 4, 5, "yellow", "sks"
CLASS_SEED = 2024

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=str(Path(__file__).parent / "subject"))
parser.add_argument("--class-prompts", action="store_true", help="print the class prompts as a TOML array")
parser.add_argument("--striped", action="store_true", help="the striped subject (the base's VAE blurs it)")
args = parser.parse_args()

if args.class_prompts:
    rng = np.random.default_rng(CLASS_SEED)
    prompts = []
    for shape, colour in itertools.product(world.SHAPES, world.COLOURS):
        attrs = {"shape": shape, "colour": colour, "size": world.SIZES[rng.integers(2)],
                 "background": world.BACKGROUNDS[rng.integers(4)], "position": world.POSITIONS[rng.integers(9)]}
        prompts.append(world.caption(attrs))
        prompts.append(world.caption(attrs, omit=("size", "background", "position")))
    print("class_prompts = [\n" + "".join(f'    "{p}",\n' for p in prompts) + "]")
    raise SystemExit

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for i, sample in enumerate(world.subject_dataset(N, SEED, colour=COLOUR, striped=args.striped)):
    hidden = ("colour", "striped")  # what the identifier has to carry
    captions = [world.caption(sample.attrs, identifier=IDENTIFIER, omit=hidden + extra)
                for extra in ((), ("size", "background", "position"), ("size", "position"), ("background", "position"))]
    sample.image.save(out / f"subject-{i}.png", optimize=True)
    (out / f"subject-{i}.txt").write_text("\n".join(captions) + "\n")
    print(f"subject-{i}.png  " + " | ".join(captions))
