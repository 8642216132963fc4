"""The shapes world: a procedural 32x32 image world with captions (``world``) and the oracle that reads it.

``world`` and ``draw`` need only numpy and PIL; ``oracle`` is the torch part.
"""
from . import language  # the shapes LM's question/answer data, tokenizer and evaluate_lm
from .oracle import (HEADS, Oracle, accuracy, augment, evaluate, oracle_attrs, oracle_set, to_input,
                     train_oracle)
from .world import (ALL_SHAPES, BACKGROUND_RGB, BACKGROUNDS, COLOURS, IDENTIFIER, IMAGE_SIZE, KEYS, POSITIONS,
                    RGB, SHAPES, SIZES, SUBJECT, SUBJECT_SHAPE, VOCAB, Sample, all_attrs, caption, dataset,
                    from_attrs, iter_samples, parse_caption, render, sample, sample_at, subject_dataset,
                    to_array, words)

__all__ = [
    # world: vocabulary of attributes and captions
    "SHAPES", "SUBJECT_SHAPE", "ALL_SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "RGB",
    "BACKGROUND_RGB", "IMAGE_SIZE", "IDENTIFIER", "SUBJECT", "KEYS", "VOCAB",
    # world: images and captions
    "Sample", "render", "from_attrs", "caption", "parse_caption", "words", "sample", "sample_at", "dataset",
    "iter_samples", "subject_dataset", "all_attrs", "to_array",
    # oracle
    "HEADS", "Oracle", "oracle_attrs", "oracle_set", "augment", "to_input", "train_oracle", "accuracy",
    "evaluate",
]
