"""The shapes world (generator, captions, vocabulary) and its oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_diffusion.shapes import (ALL_SHAPES, BACKGROUND_RGB, COLOURS, IDENTIFIER, KEYS, POSITIONS, RGB, SHAPES,
                                   SIZES, SUBJECT_SHAPE, VOCAB, Oracle, accuracy, all_attrs, caption, dataset,
                                   from_attrs, iter_samples, oracle_set, parse_caption, render, sample,
                                   subject_dataset, to_array, to_input, train_oracle, words)


def test_same_seed_same_images_and_captions():
    a, b = dataset(40, seed=3, include_subject=True), dataset(40, seed=3, include_subject=True)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert np.array_equal(to_array(a), to_array(b))
    c = dataset(40, seed=4)
    assert [s.caption for s in a] != [s.caption for s in c]
    # sample i does not depend on how many are asked for, and the stream agrees with the list
    stream = iter_samples(seed=3, include_subject=True)
    assert np.array_equal(to_array(dataset(10, seed=3, include_subject=True)), to_array(a[:10]))
    assert [next(stream).caption for _ in range(10)] == [s.caption for s in a[:10]]


def test_image_shape_dtype_and_colours():
    s = sample(np.random.default_rng(0))
    assert s.image.mode == "RGB" and s.image.size == (32, 32)
    assert s.array.shape == (32, 32, 3) and s.array.dtype == np.uint8
    arr = to_array(dataset(8, seed=0))
    assert arr.shape == (8, 32, 32, 3) and arr.dtype == np.uint8
    # jittered shapes stay inside the image, and jitter never carries a shape nearer another region
    for s in dataset(400, seed=5, include_subject=True):
        cx, cy, half = s.geometry
        assert min(cx, cy) - half >= 0.5 and max(cx, cy) + half <= 31.5
        dist = {p: np.hypot(*np.subtract(from_attrs({**s.attrs, "position": p}).geometry[:2], (cx, cy)))
                for p in POSITIONS}
        assert min(dist, key=dist.get) == s.attrs["position"]
    # the shape colour and the background colour are both present exactly (antialiasing only at edges)
    img = render({"shape": "square", "colour": "red", "background": "white", "size": "large",
                  "position": "center"})
    px = np.asarray(img).reshape(-1, 3)
    assert (px == RGB["red"]).all(1).sum() > 150 and (px == BACKGROUND_RGB["white"]).all(1).sum() > 300


def test_subject_excluded_unless_asked():
    assert SUBJECT_SHAPE not in SHAPES and SUBJECT_SHAPE in ALL_SHAPES
    assert all(s.attrs["shape"] != SUBJECT_SHAPE for s in dataset(600, seed=1))
    mixed = dataset(600, seed=1, include_subject=True)
    assert any(s.attrs["shape"] == SUBJECT_SHAPE for s in mixed)
    assert all(a["shape"] != SUBJECT_SHAPE for a in all_attrs())
    subj = subject_dataset(6, seed=0, colour="green")
    assert all(s.attrs["shape"] == SUBJECT_SHAPE and s.attrs["colour"] == "green" and s.attrs["striped"]
               for s in subj)
    assert len({(s.attrs["position"], s.attrs["size"], s.attrs["background"]) for s in subj}) > 1


def test_stripes_only_on_the_subject():
    for s in dataset(600, seed=2, include_subject=True):
        assert s.attrs["striped"] == (s.attrs["shape"] == SUBJECT_SHAPE)
    rng = np.random.default_rng(0)
    assert not any(sample(rng, striped=1.0).attrs["striped"] for _ in range(50))
    # stripes change the pixels inside the shape, and nothing else
    base = {"shape": "cross", "colour": "yellow", "background": "gray", "size": "large", "position": "center"}
    plain, striped = (np.asarray(render({**base, "striped": v})) for v in (False, True))
    inside = (plain == RGB["yellow"]).all(-1)
    changed = (plain != striped).any(-1)
    assert changed.sum() > 30 and not (changed & ~inside & (plain == BACKGROUND_RGB["gray"]).all(-1)).any()


def test_caption_round_trip_for_every_combination():
    combos = list(all_attrs(include_subject=True))
    assert len(combos) == len(SHAPES) * 5 * 4 * 2 * 9 + 2 * 5 * 4 * 2 * 9
    captions = set()
    for attrs in combos:
        text = caption(attrs)
        assert parse_caption(text) == attrs
        captions.add(text)
    assert len(captions) == len(combos)
    assert caption(combos[0]) == "a small red circle on a white background, top left"


def test_partial_and_identifier_captions():
    attrs = {"shape": "cross", "colour": "yellow", "background": "pink", "size": "large", "position": "top",
             "striped": True}
    text = caption(attrs, identifier=IDENTIFIER, omit=("colour", "striped", "size"))
    assert text == "a sks cross on a pink background, top"
    assert parse_caption(text) == {"shape": "cross", "identifier": "sks", "background": "pink",
                                   "position": "top", "striped": False}
    assert caption(parse_caption(text)) == text
    assert parse_caption("a blue star") == {"shape": "star", "colour": "blue", "striped": False}
    for bad in ("red circle", "a red", "a red circle on white", "a red circle, middle", "a red circle extra"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_vocabulary_covers_every_caption_word():
    vocab = set(VOCAB)
    assert len(vocab) == len(VOCAB)
    assert {IDENTIFIER, SUBJECT_SHAPE, *SHAPES, *COLOURS, *SIZES, "striped"} <= vocab
    for attrs in all_attrs(include_subject=True):
        assert set(words(caption(attrs))) <= vocab
        assert set(words(caption(attrs, identifier=IDENTIFIER))) <= vocab
    assert words("a red circle on a white background, top left")[-3:] == [",", "top", "left"]
    assert {w for p in POSITIONS for w in p.split()} <= vocab


def test_input_conventions():
    s = dataset(3, seed=0)
    ref = to_input([x.image for x in s])
    arr = to_array(s)
    assert ref.shape == (3, 3, 32, 32) and ref.min() >= -1 and ref.max() <= 1
    assert torch.equal(to_input(arr), ref)
    t01 = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(to_input(t01, value_range=(0, 1)), ref, atol=1e-5)
    assert torch.allclose(to_input(t01 * 2 - 1, value_range=(-1, 1)), ref, atol=1e-5)
    with pytest.raises(ValueError):
        to_input(t01)  # float without a stated range is refused, not guessed
    big = torch.nn.functional.interpolate(t01, scale_factor=2, mode="nearest")
    assert torch.allclose(to_input(big, value_range=(0, 1)), ref, atol=1e-5)


def test_small_oracle_learns_and_round_trips(tmp_path):
    """A small, briefly trained oracle must read shape and colour of fresh images (this test can fail)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle = train_oracle(steps=300, seed=0, width=16, hidden=48, batch_size=32, log_every=0)
    finally:
        torch.set_num_threads(threads)
    fresh = oracle_set(200, seed=999)
    acc = accuracy(oracle, fresh, [s.attrs for s in fresh], keys=("shape", "colour"))
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9, acc
    # a constant guess stays far below the bar, so the bar measures learning
    for key in ("shape", "colour"):
        counts = np.unique([s.attrs[key] for s in fresh], return_counts=True)[1]
        assert counts.max() / len(fresh) < 0.5

    path = tmp_path / "oracle.safetensors"
    oracle.save(str(path))
    raw = path.read_bytes()
    assert raw[8:9] == b"{"  # a safetensors JSON header, not a pickle
    again = Oracle.load(str(path))
    assert again.read(fresh[:20]) == oracle.read(fresh[:20])
    # same seed, same oracle
    twin = train_oracle(steps=3, seed=0, width=16, hidden=48, batch_size=8, log_every=0)
    twin2 = train_oracle(steps=3, seed=0, width=16, hidden=48, batch_size=8, log_every=0)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), twin2.state_dict().values()))


def test_keys_and_reading_dicts():
    oracle = Oracle(width=8, hidden=16)
    out = oracle.read(dataset(4, seed=0))
    assert len(out) == 4 and all(set(d) == set(KEYS) for d in out)
    acc = accuracy(oracle, dataset(4, seed=0), {"shape": "circle", "colour": "red"})
    assert set(acc) == {"shape", "colour", "all"}
