"""Shapes-world language: captions with question/answer lines, the LM's tokenizer, and its evaluation.

The embedded causal LM (``peft_diffusion/models/shapes-lm``, built by ``train/pretrain_lm.py``) reads lines
such as::

    a large red circle on a pink background, top left. Q: what colour is the shape? A: red

Every answer is written in the caption, so answering is reading. Some question types are held out of
pretraining (``HELD_OUT_TYPES``): their captions are in the data, so the knowledge is there, but the
question format is new; learning them is the downstream task that PEFT methods are measured on.

Question types (``QUESTIONS``)

==============  ==========================================  ==========================  ===============
type            question                                    answer                      in pretraining
==============  ==========================================  ==========================  ===============
``shape``       what shape is it?                           circle ... cross            yes
``colour``      what colour is the shape?                   red ... purple              yes
``size``        is the shape small or large?                small / large               yes
``striped``     is the shape striped?                       yes / no                    yes
``is_colour``   is the shape <colour>?                      yes / no                    yes
``background``  what colour is the background?              white ... pink              held out
``position``    where is the shape?                         top left ... bottom right   held out
==============  ==========================================  ==========================  ===============

Yes/no types are balanced (half the answers are yes). The attribute combinations (``world.all_attrs``
with the striped subject, 2520 of them) are split once, with a fixed seed, into ``"train"`` (80 %) and
``"test"`` (20 %): pretraining reads only train captions, ``evaluate_lm`` asks about test captions, so
its accuracy is on captions the model never saw.

The tokenizer is word level (a ``tokenizers`` ``WordLevel`` model over ``VOCAB``), written locally, with
LLaMA's special-token conventions: ``<s>`` added in front of every text, ``</s>`` ending each training
line, ``<pad>`` for padding.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import world

__all__ = ["QUESTIONS", "TYPES", "PRETRAINED_TYPES", "HELD_OUT_TYPES", "SPECIALS", "VOCAB", "SPLIT_SEED",
           "TEST_FRACTION", "SHAPES_LM", "combos", "build_tokenizer", "example", "examples", "caption_line", "line",
           "check_vocab", "load_lm", "evaluate_lm", "answer_ids"]


def _is_colour_question(attrs: dict, rng: np.random.Generator) -> tuple[str, str]:
    asked = attrs["colour"] if rng.random() < 0.5 else world.COLOURS[
        (world.COLOURS.index(attrs["colour"]) + 1 + rng.integers(len(world.COLOURS) - 1)) % len(world.COLOURS)]
    return f"is the shape {asked}?", "yes" if asked == attrs["colour"] else "no"


# type -> fn(attrs, rng) -> (question, answer); the rng serves questions that pick a word (is_colour)
QUESTIONS: dict[str, Callable[[dict, np.random.Generator], tuple[str, str]]] = {
    "shape": lambda a, rng: ("what shape is it?", a["shape"]),
    "colour": lambda a, rng: ("what colour is the shape?", a["colour"]),
    "size": lambda a, rng: ("is the shape small or large?", a["size"]),
    "striped": lambda a, rng: ("is the shape striped?", "yes" if a["striped"] else "no"),
    "is_colour": _is_colour_question,
    "background": lambda a, rng: ("what colour is the background?", a["background"]),
    "position": lambda a, rng: ("where is the shape?", a["position"]),
}
TYPES = tuple(QUESTIONS)
HELD_OUT_TYPES = ("background", "position")
PRETRAINED_TYPES = tuple(t for t in TYPES if t not in HELD_OUT_TYPES)

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
_MARKS = (".", "?", "Q:", "A:")
_QUESTION_WORDS = ("what", "is", "it", "the", "shape", "colour", "small", "or", "large", "striped", "yes", "no",
                   "background", "where")
VOCAB = tuple(dict.fromkeys(SPECIALS + world.VOCAB + _MARKS + _QUESTION_WORDS))

SPLIT_SEED = 0
TEST_FRACTION = 0.2
SHAPES_LM = "shapes-lm"  # the embedded LM's folder in peft_diffusion/models


def combos(split: str) -> list[dict]:
    """The attribute dicts of ``split`` ("train", "test" or "all"): every combination of ``world.all_attrs``
    including the striped subject, split once by a fixed permutation (``SPLIT_SEED``)."""
    every = list(world.all_attrs(include_subject=True))
    if split == "all":
        return every
    order = np.random.default_rng(SPLIT_SEED).permutation(len(every))
    n_test = int(round(TEST_FRACTION * len(every)))
    chosen = {"test": order[:n_test], "train": order[n_test:]}.get(split)
    if chosen is None:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return [every[i] for i in sorted(chosen)]


def build_tokenizer(max_length: int = 48):
    """The word-level tokenizer over ``VOCAB`` (a transformers fast tokenizer; ``save_pretrained`` writes
    tokenizer.json). Punctuation (. , ?) splits off words; "Q:" and "A:" are words of their own; text is
    case-sensitive (captions are lower case)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[.,?]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", VOCAB.index("<s>"))])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, re-attaches . , ?
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def _draw(rng: np.random.Generator, qtype: str, pool: Sequence[dict], striped: Sequence[dict]) -> dict:
    # stripes are rare in the world (crosses only): ask about them on a striped shape half the time
    if qtype == "striped" and rng.random() < 0.5:
        return striped[rng.integers(len(striped))]
    return pool[rng.integers(len(pool))]


def example(rng: np.random.Generator, qtype: str, pool: Sequence[dict], striped: Sequence[dict] | None = None
            ) -> tuple[str, str]:
    """One (prompt, answer) of type ``qtype`` about a full caption drawn from ``pool``; the prompt ends with
    "A:" and the answer is the words that follow it."""
    if qtype not in QUESTIONS:
        raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(TYPES)}")
    striped = [a for a in pool if a["striped"]] if striped is None else striped
    attrs = _draw(rng, qtype, pool, striped)
    question, answer = QUESTIONS[qtype](attrs, rng)
    return f"{world.caption(attrs)}. Q: {question} A:", answer


def examples(types: Sequence[str], n: int, seed: int, split: str = "test") -> list[tuple[str, str, str]]:
    """``n`` (type, prompt, answer) triples per type of ``types`` about ``split`` captions, seeded; the data of
    fine-tuning tasks (``split="train"``) and of ``evaluate_lm`` (``split="test"``)."""
    unknown = [t for t in types if t not in QUESTIONS]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {', '.join(TYPES)}")
    pool = combos(split)
    striped = [a for a in pool if a["striped"]]
    out = []
    for qtype in types:  # each type its own stream: a type's examples do not depend on the others asked
        rng = np.random.default_rng((seed, TYPES.index(qtype)))
        out += [(qtype, *example(rng, qtype, pool, striped)) for _ in range(n)]
    return out


def line(prompt: str, answer: str) -> str:
    """The training text of a (prompt, answer) pair: ``prompt + " " + answer``."""
    return f"{prompt} {answer}"


def caption_line(rng: np.random.Generator, pool: Sequence[dict], omit_p: float) -> str:
    """A caption alone, each of size / background / position left out with chance ``omit_p``."""
    attrs = pool[rng.integers(len(pool))]
    return world.caption(attrs, omit=[k for k in ("size", "background", "position") if rng.random() < omit_p]) + "."


def check_vocab(model, tokenizer) -> None:
    """Raise ``ValueError`` naming both sizes unless every tokenizer id has an embedding row and the special
    ids agree with the model config, before any work is done with the pair."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows or model.config.vocab_size != rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model expects vocab_size "
                         f"{model.config.vocab_size} ({rows} embedding rows): use the tokenizer saved with the model")
    for name in ("bos", "eos", "pad"):
        mine, theirs = getattr(tokenizer, f"{name}_token_id"), getattr(model.config, f"{name}_token_id", None)
        if theirs is not None and mine != theirs:
            raise ValueError(f"tokenizer {name}_token_id is {mine} but the model config expects {theirs}")


def load_lm(path: str | Path | None = None):
    """(model, tokenizer) of a saved shapes LM (default: the embedded ``shapes-lm``), in eval mode on the CPU,
    checked to agree on the vocabulary."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if path is None:
        from ..models import path as model_path

        path = model_path(SHAPES_LM)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_vocab(model, tokenizer)
    return model, tokenizer


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The ids the model must produce after "A:": the answer's words, then ``</s>``."""
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[str], max_new: int) -> torch.Tensor:
    """Greedy continuation of left-padded prompts (positions count from each prompt's ``<s>``)."""
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    new = []
    for _ in range(max_new):  # a handful of tokens: no cache needed
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        new.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(new, 1)


def evaluate_lm(model, tokenizer, types: Sequence[str] = TYPES, n: int = 200, seed: int = 777,
                batch: int = 256) -> dict[str, float]:
    """Answer accuracy per question type on ``n`` seeded test-split prompts each, by greedy decoding: an answer
    counts when the model writes exactly its words and then ``</s>``."""
    check_vocab(model, tokenizer)
    was_training = model.training
    model.eval()
    data = examples(types, n, seed, split="test")
    hits: dict[str, list[bool]] = {t: [] for t in types}
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        targets = [answer_ids(tokenizer, a) for _, _, a in chunk]
        out = _greedy(model, tokenizer, [p for _, p, _ in chunk], max(map(len, targets)))
        for (qtype, _, _), want, got in zip(chunk, targets, out.tolist()):
            hits[qtype].append(got[:len(want)] == want)
    model.train(was_training)
    return {t: float(np.mean(h)) for t, h in hits.items()}


def _main(argv=None) -> None:
    """Re-measure a saved LM (default: the embedded one) as its model card reports it."""
    parser = argparse.ArgumentParser(prog="python -m peft_diffusion.shapes.language", description=_main.__doc__)
    parser.add_argument("path", nargs="?", default=None, help="save_pretrained folder (default: shapes-lm)")
    parser.add_argument("--n", type=int, default=200, help="test prompts per question type")
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_lm(args.path)
    acc = evaluate_lm(model, tokenizer, TYPES, n=args.n, seed=args.seed)
    print(json.dumps({"pretrained": {t: acc[t] for t in PRETRAINED_TYPES},
                      "held_out": {t: acc[t] for t in HELD_OUT_TYPES}}, indent=2))


if __name__ == "__main__":
    _main()
