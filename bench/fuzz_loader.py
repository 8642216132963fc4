"""Fuzzed adapter loading: mutated files of every format we read, each loaded into the tiny SD pipeline.

    python bench/fuzz_loader.py [--per-kind N] [--workers N] [--timeout S] [--sample N] [--seed S]

Valid files ("seeds") are written first: native LoRA (U-Net + text encoder) and LoHa, diffusers/peft LoRA with
and without ``lora_adapter_metadata``, DoRA, the older diffusers names, kohya LoRA, LyCORIS LoCon (kohya
naming, two components), LoHa and LoKr (``lycoris_`` naming), textual inversion as diffusers
``learned_embeds`` (.safetensors and .bin), A1111 ``.pt`` and ``.safetensors``, and a diffusers LoRA pickled
to ``.bin``. Each mutation kind (``KINDS``) damages a copy of a seed: truncation, bit flips in the header and
in tensor data, safetensors header edits (dtype, shape, offsets, duplicate keys, huge lengths, metadata),
renamed / dropped / extra keys, wrong ranks, NaN/inf, zero-size tensors, other dtypes and dimensions, and
pickles that would run code. IP-Adapter files are not covered: the library does not read them yet.

Every case loads its file into one pipeline (forked worker processes, each owning a pipeline) and is
classified:

  ok-equal        loaded; the pipeline's state_dict equals that of a load of the intact seed
  ok-valid        loaded, other values or sites (the mutation left a valid file: a flipped mantissa bit, a
                  dropped alpha, a float16 copy...); every adapter tensor finite, and removing it restores
                  the pipeline
  error           AdapterFileError (or a subclass) whose message names the file; the pipeline unchanged

Every fourth case loads into the pipeline's U-Net alone (weight adapters), every third with
``skip_unknown=True``; every load asks for the ``LoadReport``, which must name each
key of the file exactly once, as used, ignored or skipped.
  BUG-*           anything else: another exception type, an error not naming the file, a pipeline changed
                  by a failed load, non-finite adapter values, a hang (over ``--timeout``), a load whose
                  peak resident memory grew by more than 2x the file size + 32 MiB, or a payload that ran

Memory is the peak resident set size (VmHWM, reset per case through /proc/self/clear_refs) above the resident
size before the load. Linux only (fork, /proc). Exit status 1 when any case is a bug.

``tests/test_fuzz_loader.py`` runs a fixed-seed sample of ``CI_SAMPLE`` cases through the same code.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import io
import json
import logging
import multiprocessing
import os
import pickle
import random
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import torch

MIB = 1 << 20
MEMORY_FLOOR = 32 * MIB
CI_SAMPLE = 200
WEIGHT_NAME, TOKEN_NAME = "fz", "<fz>"
PICKLED = (".bin", ".pt")


# ---------------------------------------------------------------------------------------------- seeds

@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    path: str
    adapter: str  # the name to load it under (a token for textual inversion)


def _randomize(pipe, name: str, seed: int) -> None:
    """Non-zero values in every parameter of adapter ``name`` (LoRA's B and LoHa's w2_a start at zero)."""
    from peft_diffusion.api import hosts

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in hosts(pipe):
            if name in host.deltas:
                for p in host.deltas[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_seeds(pipe, folder: Path) -> list[Seed]:
    """Write one valid file per format (and variant) we read; the pipeline is left without adapters."""
    import peft_diffusion as pd
    from peft_diffusion.api import hosts
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    seeds = []

    def add(name, path, adapter=WEIGHT_NAME):
        seeds.append(Seed(name, str(path), adapter))

    pd.inject(pipe, pd.LoRA(r=4, alpha=6), "lora")
    pd.inject(pipe, pd.LoRA(r=2, alpha=3), "lora", components=("text_encoder",))
    _randomize(pipe, "lora", 1)
    add("native-lora", pd.save_adapter(pipe, folder / "native-lora.safetensors", "lora"))
    diffusers = pd.save_adapter(pipe, folder / "diffusers-lora.safetensors", "lora", format="diffusers")
    add("diffusers-lora", diffusers)
    add("kohya-lora", pd.save_adapter(pipe, folder / "kohya-lora.safetensors", "lora", format="kohya"))
    add("lycoris-locon", pd.save_adapter(pipe, folder / "lycoris-locon.safetensors", "lora", format="lycoris"))
    pd.remove(pipe, "lora")

    flat = load_file(diffusers)
    save_file(flat, folder / "diffusers-nometa.safetensors")
    add("diffusers-nometa", folder / "diffusers-nometa.safetensors")
    torch.save(flat, folder / "diffusers-lora.bin")
    add("diffusers-bin", folder / "diffusers-lora.bin")
    old = {}
    for key, t in flat.items():  # the pre-peft names: unet ``.lora.down``, text encoder ``.lora_linear_layer``
        layer = ".lora_linear_layer" if key.startswith("text_encoder.") else ".lora"
        old[key.replace(".lora_A.weight", layer + ".down.weight").replace(".lora_B.weight", layer + ".up.weight")] = t
    save_file(old, folder / "diffusers-old.safetensors")
    add("diffusers-old", folder / "diffusers-old.safetensors")

    pd.inject(pipe, pd.DoRA(r=2, alpha=2), "dora")
    _randomize(pipe, "dora", 2)
    with torch.no_grad():  # magnitudes near the weight norms, as trained ones are
        for _, host in hosts(pipe):
            if "dora" in host.deltas:
                for n, p in host.deltas["dora"].named_parameters():
                    if "magnitude" in n:
                        p.abs_().add_(1.0)
    add("dora-diffusers", pd.save_adapter(pipe, folder / "dora.safetensors", "dora", format="diffusers"))
    pd.remove(pipe, "dora")

    pd.inject(pipe, pd.LoHa(r=2, alpha=2), "loha")
    _randomize(pipe, "loha", 3)
    add("native-loha", pd.save_adapter(pipe, folder / "native-loha.safetensors", "loha"))
    add("lycoris-loha", pd.save_adapter(pipe, folder / "lycoris-loha.safetensors", "loha", format="lycoris"))
    pd.remove(pipe, "loha")
    pd.inject(pipe, pd.LoKr(r=2, alpha=2, factor=-1, decompose_both=True), "lokr")
    _randomize(pipe, "lokr", 4)
    add("lycoris-lokr", pd.save_adapter(pipe, folder / "lycoris-lokr.safetensors", "lokr", format="lycoris"))
    pd.remove(pipe, "lokr")

    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5)) * 0.1
    save_file({"<cat>": vectors}, folder / "ti-learned_embeds.safetensors")
    add("ti-diffusers", folder / "ti-learned_embeds.safetensors", TOKEN_NAME)
    torch.save({"<cat>": vectors.clone()}, folder / "ti-learned_embeds.bin")
    add("ti-diffusers-bin", folder / "ti-learned_embeds.bin", TOKEN_NAME)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vectors.clone()},
                "name": "cat", "step": 1000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1"},
               folder / "ti-a1111.pt")
    add("ti-a1111-pt", folder / "ti-a1111.pt", TOKEN_NAME)
    save_file({"emb_params": vectors.clone()}, folder / "ti-a1111.safetensors")
    add("ti-a1111-st", folder / "ti-a1111.safetensors", TOKEN_NAME)
    return seeds


# ------------------------------------------------------------------------------------- file surgery

def st_split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header: dict | str, body: bytes, length: int | None = None) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def st_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def zip_regions(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """([(start, end)] of a torch zip's pickle records, [(start, end)] of its tensor records)."""
    pickles, tensors = [], []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            off = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[off + 26:off + 30])
            start = off + 30 + name_len + extra_len
            region = (start, start + info.compress_size)
            (pickles if info.filename.endswith(".pkl") else tensors).append(region)
    return pickles, tensors


def flip_bits(data: bytes, rng: random.Random, lo: int, hi: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        pos = rng.randrange(lo, hi)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def read_tensors(path: Path):
    """(tensors as a nested dict, metadata) of a seed, for the key-level mutations."""
    if path.suffix in PICKLED:
        return torch.load(path, weights_only=True), None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_tensors(tree, metadata, path: Path) -> bytes:
    if path.suffix in PICKLED:
        buf = io.BytesIO()
        torch.save(tree, buf)
        return buf.getvalue()
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tree.items()}, metadata=metadata)


def leaves(tree, prefix=()) -> list[tuple[tuple, object]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += leaves(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


def parent_of(tree, path: tuple):
    for k in path[:-1]:
        tree = tree[k]
    return tree


def tensor_leaves(tree) -> list[tuple[tuple, torch.Tensor]]:
    return [(p, v) for p, v in leaves(tree) if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------------------------------ mutations
# Each takes (rng, the seed's bytes, its path, the folder for markers) and returns (bytes, variant) or None
# when the kind does not apply to that seed.

def m_truncate(rng, data, path, work):
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(data)), rng.randrange(len(data)), len(data) - 1])
    return data[:cut], f"at {cut}/{len(data)}"


def m_bitflip_header(rng, data, path, work):
    if path.suffix in PICKLED:
        regions = zip_regions(data)[0]
        lo, hi = regions[0]
    else:
        lo, hi = 0, st_header_end(data)
    count = rng.choice([1, 1, 2, 4])
    return flip_bits(data, rng, lo, hi, count), f"{count} bits"


def m_bitflip_data(rng, data, path, work):
    if path.suffix in PICKLED:
        regions = zip_regions(data)[1]
        lo, hi = rng.choice(regions)
    else:
        lo, hi = st_header_end(data), len(data)
    count = rng.choice([1, 1, 3, 16])
    return flip_bits(data, rng, lo, hi, count), f"{count} bits"


def _st_entry(rng, data):
    header, body = st_split(data)
    keys = sorted(k for k in header if k != "__metadata__")
    return header, body, keys, rng.choice(keys)


def m_header_dtype(rng, data, path, work):
    if path.suffix in PICKLED:
        return None
    header, body, _, key = _st_entry(rng, data)
    dtype = rng.choice(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "I8", "I16", "F8_E4M3", "F8_E5M2",
                        "C64", "F4", "Q8", ""])
    header[key]["dtype"] = dtype
    return st_join(header, body), f"{key} -> {dtype or 'empty'}"


def m_header_shape(rng, data, path, work):
    if path.suffix in PICKLED:
        return None
    header, body, _, key = _st_entry(rng, data)
    shape = list(header[key]["shape"])
    numel = 1
    for d in shape:
        numel *= d
    choice = rng.randrange(7)
    if choice == 0 and len(shape) > 1:
        new = shape[::-1]
    elif choice == 1:
        new = [numel]
    elif choice == 2:
        new = shape + [1]
    elif choice == 3:
        new = [0] + shape[1:]
    elif choice == 4:
        new = [-1] + shape[1:]
    elif choice == 5:
        new = [rng.randrange(1, 9) for _ in range(rng.randrange(0, 4))]
    else:
        new = [1] * len(shape) if shape else [2]
    header[key]["shape"] = new
    return st_join(header, body), f"{key} {shape} -> {new}"


def m_header_offsets(rng, data, path, work):
    if path.suffix in PICKLED:
        return None
    header, body, keys, key = _st_entry(rng, data)
    begin, end = header[key]["data_offsets"]
    choice = rng.randrange(6)
    if choice == 0:
        new = [begin + 4, end + 4]
    elif choice == 1:
        new = [end, begin]
    elif choice == 2:
        new = [begin, len(body) + 4]
    elif choice == 3:
        new = [0, end - begin]  # overlaps the first tensor
    elif choice == 4 and len(keys) > 1:  # two tensors of one size trade places: a valid file
        same = [k for k in keys if k != key
                and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == end - begin]
        other = rng.choice(same) if same else rng.choice([k for k in keys if k != key])
        new = header[other]["data_offsets"]
        header[other]["data_offsets"] = [begin, end]
    else:
        new = [begin - 1, end - 1]
    header[key]["data_offsets"] = new
    return st_join(header, body), f"{key} [{begin}, {end}] -> {new}"


def m_header_duplicate(rng, data, path, work):
    if path.suffix in PICKLED:
        return None
    header, body, keys, key = _st_entry(rng, data)
    other = rng.choice(keys)
    text = json.dumps(header)
    # JSON with the key twice: the second copy points at another tensor's bytes (parsers keep one of them)
    extra = json.dumps({key: header[other]})[1:-1]
    text = "{" + extra + ", " + text[1:] if rng.random() < 0.5 else text[:-1] + ", " + extra + "}"
    return st_join(text, body), f"{key} twice"


def m_header_huge(rng, data, path, work):
    if path.suffix in PICKLED:
        # a pickled tensor whose size claims far more than its storage (a stride-0 expansion saves one value)
        tree, _ = read_tensors(path)
        (where, t), = rng.sample(tensor_leaves(tree), 1)
        huge = rng.choice([(1 << 20, 1 << 20), (1 << 31,), (1 << 16, 1 << 16, 1 << 8)])
        parent_of(tree, where)[where[-1]] = t.flatten()[:1].expand(*huge)
        return write_tensors(tree, None, path), f"{'.'.join(map(str, where))} claims {huge} (stride 0)"
    header, body = st_split(data)
    keys = sorted(k for k in header if k != "__metadata__")
    choice = rng.randrange(5)
    if choice == 0:
        length = rng.choice([2 ** 63 - 1, 2 ** 40, 100_000_001, len(data) + 1])
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", length) + text + body, f"header length {length}"
    key = rng.choice(keys)
    if choice == 1:
        header[key]["shape"] = [1 << 31, 1 << 31]
        header[key]["data_offsets"] = [0, (1 << 62) * 4 // 4]
        return st_join(header, body), f"{key} shape 2^31 x 2^31"
    if choice == 2:
        header[key]["data_offsets"] = [header[key]["data_offsets"][0], 2 ** 64 - 1]
        return st_join(header, body), f"{key} end offset 2^64-1"
    if choice == 3:
        header[key]["shape"] = [1 << 40]
        return st_join(header, body), f"{key} shape [2^40]"
    meta = dict(header.get("__metadata__") or {})
    meta["padding"] = "x" * (1 << 20)
    header["__metadata__"] = meta
    return st_join(header, body), "1 MiB metadata value"


def m_metadata(rng, data, path, work):
    if path.suffix in PICKLED:
        return None
    header, body = st_split(data)
    meta = header.get("__metadata__")
    if not meta:
        return None
    key = rng.choice(sorted(meta))
    choice = rng.randrange(8)
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = None
    if choice == 0 or not isinstance(value, dict):
        meta[key] = rng.choice(["{", "", "null", "[1, 2]", "\"text\"", "{\"a\": 1}", "nan"])
        what = f"{key} = {meta[key]!r}"
    elif choice == 1:
        del meta[key]
        what = f"{key} dropped"
    else:
        flat = [(p, v) for p, v in leaves(value)]
        if not flat:
            return None
        where, old = rng.choice(flat)
        new = rng.choice([-1, 0, 99, 2 ** 40, "x", None, [1], {"a": 1}, float("nan"), 1e308, True])
        parent_of(value, where)[where[-1]] = new
        meta[key] = json.dumps(value)
        what = f"{key}: {'.'.join(map(str, where))} {old!r} -> {new!r}"
    header["__metadata__"] = meta
    return st_join(header, body), what


def _key_mutation(rng, path, edit):
    tree, meta = read_tensors(path)
    what = edit(rng, tree)
    if what is None:
        return None
    return write_tensors(tree, meta, path), what


def _rename(rng, tree):
    where, t = rng.choice(tensor_leaves(tree))
    parent, old = parent_of(tree, where), where[-1]
    choice = rng.randrange(5)
    if choice == 0:
        pos = rng.randrange(len(old))
        new = old[:pos] + rng.choice("abz_.019") + old[pos + 1:]
    elif choice == 1:
        new = old.replace("unet", "text_encoder", 1) if "unet" in old else old.replace("text_encoder", "unet", 1)
    elif choice == 2:
        swaps = [("lora_A", "lora_B"), ("lora_B", "lora_A"), ("down", "up"), ("up", "down"), ("w1", "w2"),
                 ("w2", "w1"), ("_a", "_b"), ("_b", "_a")]
        new = next((old.replace(a, b) for a, b in swaps if a in old), old + "_x")
    elif choice == 3:
        new = old.upper()
    else:
        new = "model." + old
    if new in parent or new == old:
        new = old + ".renamed"
    parent[new] = parent.pop(old)
    return f"{old} -> {new}"


def _drop(rng, tree):
    where, _ = rng.choice(tensor_leaves(tree))
    del parent_of(tree, where)[where[-1]]
    return f"dropped {'.'.join(map(str, where))}"


def _extra(rng, tree):
    items = tensor_leaves(tree)
    where, t = rng.choice(items)
    parent = parent_of(tree, where)
    choice = rng.randrange(3)
    if choice == 0:
        new, value = "totally_unrelated.weight", torch.randn(3, 3)
    elif choice == 1:
        new, value = where[-1].replace("weight", "bias") if "weight" in where[-1] else where[-1] + ".bias", t.clone()
    else:
        new, value = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", torch.randn(2, 3)
    if new in parent:
        new += "_extra"
    parent[new] = value
    return f"added {new}"


def _wrong_rank(rng, tree):
    shaped = [(w, t) for w, t in tensor_leaves(tree) if t.ndim >= 1 and t.is_floating_point()]
    if not shaped:
        return None
    where, t = rng.choice(shaped)
    axis = rng.randrange(t.ndim)
    size = max(1, t.shape[axis] + rng.choice([-2, -1, 1, 3]))
    shape = list(t.shape)
    shape[axis] = size
    parent_of(tree, where)[where[-1]] = torch.randn(shape) * 0.1
    return f"{where[-1]} {tuple(t.shape)} -> {tuple(shape)}"


def _nan_inf(rng, tree):
    floats = [(w, t) for w, t in tensor_leaves(tree) if t.is_floating_point() and t.numel()]
    where, t = rng.choice(floats)
    t = t.clone()
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    t.view(-1)[rng.randrange(t.numel())] = value
    parent_of(tree, where)[where[-1]] = t
    return f"{where[-1]} holds {value}"


def _zero_size(rng, tree):
    where, t = rng.choice(tensor_leaves(tree))
    shape = list(t.shape) or [0]
    shape[rng.randrange(len(shape))] = 0
    parent_of(tree, where)[where[-1]] = torch.zeros(shape, dtype=t.dtype)
    return f"{where[-1]} {tuple(t.shape)} -> {tuple(shape)}"


def _dtype(rng, tree):
    where, t = rng.choice(tensor_leaves(tree))
    dtype = rng.choice([torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16,
                        torch.float64, torch.int8])
    parent_of(tree, where)[where[-1]] = (t * 10).to(dtype)
    return f"{where[-1]} {t.dtype} -> {dtype}"


def _ndim(rng, tree):
    where, t = rng.choice(tensor_leaves(tree))
    choice = rng.randrange(3)
    new = t.flatten()[:1].reshape(()) if choice == 0 else t.flatten() if choice == 1 else t.unsqueeze(0)
    parent_of(tree, where)[where[-1]] = new.clone()
    return f"{where[-1]} {tuple(t.shape)} -> {tuple(new.shape)}"


class _Payload:
    """Unpickling this runs a shell command that writes ``marker``; weights-only loading must refuse it."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"echo ran > {self.marker}",)
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').write('ran')",)
        return eval, (f"open({self.marker!r}, 'w').write('ran')",)


def m_pickle_payload(rng, data, path, work):
    marker = str(work / f"marker-{rng.getrandbits(48):012x}")
    how = rng.choice(["system", "exec", "eval"])
    choice = rng.randrange(4)
    if choice == 0:  # a bare pickle (torch's legacy layout)
        return pickle.dumps(_Payload(marker, how), protocol=2), f"bare pickle, {how}", marker
    if choice == 1:  # a torch zip whose data.pkl is the payload
        buf = io.BytesIO()
        torch.save({"x": torch.zeros(2)}, buf)
        src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                body = pickle.dumps(_Payload(marker, how), 2) if info.filename.endswith("data.pkl") else src.read(info)
                dst.writestr(info, body)
        return out.getvalue(), f"torch zip with payload data.pkl, {how}", marker
    # the seed's own content with the payload hidden inside it (torch.save pickles it as it is)
    tree, _ = read_tensors(path)
    if not isinstance(tree, dict) or choice == 3:
        tree = {"string_to_param": {"*": torch.zeros(1, 4)}}
    tree["name" if choice == 2 else "extra"] = _Payload(marker, how)
    buf = io.BytesIO()
    torch.save(tree, buf)
    return buf.getvalue(), f"payload inside the seed's dict, {how}", marker


KINDS = {
    "truncate": m_truncate,
    "bitflip-header": m_bitflip_header,
    "bitflip-data": m_bitflip_data,
    "header-dtype": m_header_dtype,
    "header-shape": m_header_shape,
    "header-offsets": m_header_offsets,
    "header-duplicate-key": m_header_duplicate,
    "huge-length": m_header_huge,
    "metadata": m_metadata,
    "key-rename": lambda rng, data, path, work: _key_mutation(rng, path, _rename),
    "key-drop": lambda rng, data, path, work: _key_mutation(rng, path, _drop),
    "key-extra": lambda rng, data, path, work: _key_mutation(rng, path, _extra),
    "wrong-rank": lambda rng, data, path, work: _key_mutation(rng, path, _wrong_rank),
    "nan-inf": lambda rng, data, path, work: _key_mutation(rng, path, _nan_inf),
    "zero-size": lambda rng, data, path, work: _key_mutation(rng, path, _zero_size),
    "tensor-dtype": lambda rng, data, path, work: _key_mutation(rng, path, _dtype),
    "tensor-ndim": lambda rng, data, path, work: _key_mutation(rng, path, _ndim),
    "pickle-payload": m_pickle_payload,
}


@dataclasses.dataclass
class Case:
    id: int
    seed: Seed
    kind: str
    variant: str
    path: str
    marker: str | None = None


def make_cases(seeds: list[Seed], folder: Path, per_kind: int, seed: int = 0, sample: int = 0) -> list[Case]:
    """``per_kind`` mutated files per (kind, seed) where the kind applies (payloads land in ``.pt``/``.bin``/
    ``.ckpt`` and a ``.safetensors`` name whatever the seed); with ``sample``, only that many of them, drawn
    with ``seed`` (only those files are written). A case's file depends only on (seed, kind, seed file, rep)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(kind, s, rep) for kind in KINDS for s in seeds for rep in range(per_kind)]
    if sample:
        random.Random(seed).shuffle(plan)
    cases = []
    for kind, s, rep in plan:
        if sample and len(cases) == sample:
            break
        src = Path(s.path)
        rng = random.Random(f"{seed}/{kind}/{s.name}/{rep}")
        out = KINDS[kind](rng, src.read_bytes(), src, folder)
        if out is None:  # the kind does not apply to this seed (a header edit on a pickle...)
            continue
        body, variant, *marker = out
        suffix = rng.choice([".pt", ".bin", ".ckpt", ".safetensors"]) if kind == "pickle-payload" else src.suffix
        path = folder / f"{len(cases):05d}-{kind}-{s.name}{suffix}"
        path.write_bytes(body)
        cases.append(Case(len(cases), s, kind, variant, str(path), marker[0] if marker else None))
    return cases


# ---------------------------------------------------------------------------------------------- worker

def _rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _effect(site, delta) -> torch.Tensor:
    """dW of a weight delta (DoRA's needs the base layer)."""
    if "base" in inspect.signature(delta.delta_weight).parameters:
        return delta.delta_weight(site.base).detach().clone()
    return delta.delta_weight().detach().clone()


class State:
    """What a load may change in a pipeline: every component's state_dict, module tree, the tokenizer's
    vocabulary size, the adapter names, and each site's active weights and weight deltas dW (scale included:
    an alpha lives in the config, not in the state_dict)."""

    def __init__(self, pipe, clone: bool = False):
        from peft_diffusion.api import adapter_names, hosts, modules_of

        self.tensors = {f"{c}.{k}": (v.detach().clone() if clone else v) for c, m in modules_of(pipe).items()
                        for k, v in m.state_dict().items()}
        self.active = {q: dict(site.active) for q, site in hosts(pipe)}
        with torch.no_grad():
            self.effects = {f"{q} {n}": _effect(site, d) for q, site in hosts(pipe)
                            for n, d in site.deltas.items() if hasattr(d, "delta_weight")}
        self.tree = [(c, n, type(x).__name__) for c, m in modules_of(pipe).items() for n, x in m.named_modules()]
        self.vocab = len(pipe.tokenizer)
        self.names = adapter_names(pipe)

    def diff(self, other: "State") -> str | None:
        """None when equal, else what differs first."""
        if self.tree != other.tree:
            return "module tree"
        if self.vocab != other.vocab:
            return f"tokenizer size {other.vocab} -> {self.vocab}"
        if self.names != other.names:
            return f"adapters {other.names} -> {self.names}"
        if self.active != other.active:
            return "active adapter weights"
        if self.effects.keys() != other.effects.keys():
            return "weight deltas' sites"
        for k, v in self.effects.items():
            if v.shape != other.effects[k].shape or not torch.equal(v, other.effects[k]):
                return f"weight delta (scale included) of {k}"
        if self.tensors.keys() != other.tensors.keys():
            return f"state_dict keys ({sorted(self.tensors.keys() ^ other.tensors.keys())[:3]})"
        for k, v in self.tensors.items():
            w = other.tensors[k]
            if v.shape != w.shape or v.dtype != w.dtype or not torch.equal(v, w):
                return f"values of {k}"
        return None


class Worker:
    """Owns a pipeline; loads cases into it and classifies them."""

    def __init__(self, pipe, seeds: list[Seed]):
        import peft_diffusion as pd

        self.pd, self.pipe = pd, pipe
        self.reports = "report" in inspect.signature(pd.load_adapter).parameters
        self.base = State(pipe, clone=True)
        self.refs = {}
        for s in seeds:  # what a correct load of each seed gives, into the pipeline and into its lone U-Net
            for lone in (False, True) if self.lone(s) else (False,):
                name = pd.load_adapter(pipe.unet if lone else pipe, s.path, name=s.adapter)
                self.refs[s.name, lone] = State(pipe, clone=True)
                pd.remove(pipe, name)
                assert State(pipe).diff(self.base) is None, f"removing seed {s.name} does not restore the pipeline"

    @staticmethod
    def lone(seed: Seed) -> bool:
        """Whether the seed also loads into the U-Net alone (weight adapters; tokens need the pipeline)."""
        return seed.adapter == WEIGHT_NAME

    def _repair(self) -> None:
        """Back to the base pipeline after a bug left it changed (remove what is there, then restore values)."""
        try:
            self.pd.remove(self.pipe)
        except Exception:  # noqa: BLE001 - best effort: the values are restored below anyway
            logging.exception("remove after a bug failed")
        from peft_diffusion.api import modules_of

        with torch.no_grad():
            for c, m in modules_of(self.pipe).items():
                for k, v in m.state_dict().items():
                    ref = self.base.tensors.get(f"{c}.{k}")
                    if ref is not None and ref.shape == v.shape:
                        v.copy_(ref)

    def run(self, case: Case) -> dict:
        from peft_diffusion.io import AdapterFileError

        path = Path(case.path)
        size = path.stat().st_size
        measured = _reset_peak()
        rss0, _ = _rss()
        start = time.perf_counter()
        outcome, detail, loaded = None, "", None
        skip = case.id % 3 == 0  # a third of the loads skip unknown keys: partial loads and their reports
        lone = case.id % 4 == 1 and self.lone(case.seed)  # a quarter go into the U-Net alone
        target = self.pipe.unet if lone else self.pipe
        try:
            if self.reports:
                report = self.pd.load_adapter(target, path, name=case.seed.adapter, skip_unknown=skip, report=True)
                loaded = report.name
            else:  # a library from before load reports (to fuzz an older checkout)
                report, loaded = None, self.pd.load_adapter(target, path, name=case.seed.adapter,
                                                            skip_unknown=skip)
        except AdapterFileError as e:
            msg = str(e)
            outcome, detail = "error", f"{type(e).__name__}: {msg}"
            if str(path) not in msg and path.name not in msg:
                outcome = "BUG-error-without-file"
        except Exception as e:  # noqa: BLE001 - classifying every escape is the point
            outcome = "BUG-other-exception"
            detail = f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e)[-4:])}"
        seconds = time.perf_counter() - start
        _, peak = _rss()
        grew = max(0, peak - rss0) if measured else 0
        now = State(self.pipe)
        if loaded is None:
            changed = now.diff(self.base)
            if changed:
                outcome, detail = "BUG-model-changed", f"after {detail.splitlines()[0]}: {changed}"
                self._repair()
        else:
            from peft_diffusion.io import read_file

            keys = sorted(read_file(path)[0])
            if now.diff(self.refs[case.seed.name, lone]) is None:
                outcome = "ok-equal"
            else:
                outcome = "ok-valid"
                bad = [k for k, v in now.tensors.items()
                       if k not in self.base.tensors and v.is_floating_point() and not bool(torch.isfinite(v).all())]
                if bad:
                    outcome, detail = "BUG-non-finite-load", f"non-finite {bad[:3]}"
            # the report accounts for every key of the file, once
            told = sorted(report.used + report.ignored + report.skipped) if report is not None else keys
            if told != keys:
                outcome = "BUG-report"
                detail = f"used + ignored + skipped {told[:4]} != file keys {keys[:4]}"
            try:
                self.pd.remove(self.pipe, loaded)
                left = State(self.pipe).diff(self.base)
            except Exception as e:  # noqa: BLE001
                left = f"remove raised {type(e).__name__}: {e}"
            if left:
                outcome, detail = "BUG-not-restored", left
                self._repair()
        if case.marker and Path(case.marker).exists():
            outcome, detail = "BUG-payload-ran", case.marker
        if grew > 2 * size + MEMORY_FLOOR:
            outcome, detail = "BUG-memory", f"peak +{grew / MIB:.1f} MiB for a {size} byte file; {detail}"
        return dict(id=case.id, outcome=outcome, detail=detail, seconds=seconds, grew=grew, size=size)


def _serve(conn, pipe, seeds) -> None:
    logging.disable(logging.WARNING)  # the loader's warnings for skipped keys and foreign fingerprints
    torch.set_num_threads(1)
    try:
        worker = Worker(pipe, seeds)
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(("done", worker.run(case)))


def run_cases(pipe, seeds: list[Seed], cases: list[Case], workers: int = 1, timeout: float = 10.0,
              progress=None) -> list[dict]:
    """Every case's result, loaded by ``workers`` forked processes that share the pipeline built here; a case
    over ``timeout`` seconds is a hang: its worker is killed and another started."""
    ctx = multiprocessing.get_context("fork")
    todo = collections.deque(cases)
    results: list[dict] = []

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, pipe, seeds), daemon=True)
        proc.start()
        kind, info = parent.recv()
        if kind != "ready":
            proc.kill()
            raise RuntimeError(f"fuzz worker failed to start:\n{info}")
        return {"proc": proc, "conn": parent, "case": None, "since": 0.0}

    pool = [start() for _ in range(max(1, min(workers, len(cases))))]
    shown = 0
    try:
        while todo or any(w["case"] for w in pool):
            for i, w in enumerate(pool):
                if w["case"] is None and todo:
                    w["case"], w["since"] = todo.popleft(), time.perf_counter()
                    w["conn"].send(w["case"])
                if w["case"] is None:
                    continue
                if w["conn"].poll(0.005):
                    try:
                        _, result = w["conn"].recv()
                    except EOFError:  # the worker died (a crash in native code)
                        result = dict(id=w["case"].id, outcome="BUG-crash", detail="worker died", seconds=0.0,
                                      grew=0, size=0)
                        w["proc"].kill()
                        pool[i] = start()
                        results.append(result)
                        continue
                    results.append(result)
                    w["case"] = None
                elif not w["proc"].is_alive() or time.perf_counter() - w["since"] > timeout:
                    hung = w["proc"].is_alive()
                    results.append(dict(id=w["case"].id, outcome="BUG-hang" if hung else "BUG-crash",
                                        detail=f"over {timeout} s" if hung else "worker died", seconds=timeout,
                                        grew=0, size=0))
                    w["proc"].kill()
                    w["proc"].join()
                    pool[i] = start()
            if progress and len(results) // 100 > shown:
                shown = len(results) // 100
                progress(len(results))
    finally:
        for w in pool:
            if w["proc"].is_alive():
                try:
                    w["conn"].send(None)
                except (BrokenPipeError, OSError):
                    pass
                w["proc"].join(2)
                if w["proc"].is_alive():
                    w["proc"].kill()
    return sorted(results, key=lambda r: r["id"])


def _measure_load(conn, pipe, warm: str, path: str) -> None:
    import peft_diffusion as pd

    pd.remove(pipe, pd.load_adapter(pipe, warm))  # the first load's lazy imports are not the file's cost
    _reset_peak()
    rss0, _ = _rss()
    pd.load_adapter(pipe, path, name=WEIGHT_NAME)
    conn.send(_rss()[1] - rss0)


def memory_ratio(pipe, folder: Path, rank: int = 2048, fmt: str = "kohya") -> tuple[int, int]:
    """(file bytes, peak resident growth in bytes) of loading a large valid LoRA file (rank ``rank`` on the
    U-Net's attention), measured in a forked process that has loaded a rank-1 file of the format first."""
    import peft_diffusion as pd

    paths = []
    for r in (1, rank):
        pd.inject(pipe, pd.LoRA(r=r, alpha=r), "big")
        _randomize(pipe, "big", 6)
        paths.append(str(pd.save_adapter(pipe, folder / f"r{r}-{fmt}.safetensors", "big", format=fmt)))
        pd.remove(pipe, "big")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_measure_load, args=(child, pipe, *paths))
    proc.start()
    grew = parent.recv()
    proc.join()
    return Path(paths[1]).stat().st_size, grew


def build(folder: Path, per_kind: int, seed: int = 0, sample: int = 0):
    """(pipeline, seeds, cases) under ``folder``: the tiny SD pipeline, the valid files, the mutated ones."""
    from peft_diffusion.tiny import tiny_sd_pipeline

    torch.set_num_threads(1)  # before any op: the workers are forked, and so are threads' pools
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(folder / "tokenizer")
    seeds = make_seeds(pipe, folder / "seeds")
    cases = make_cases(seeds, folder / "cases", per_kind, seed, sample)
    return pipe, seeds, cases


def table(cases: list[Case], results: list[dict]) -> str:
    """Markdown: per mutation kind, the count of each outcome, the slowest load and the largest memory growth."""
    by_id = {c.id: c for c in cases}
    outcomes = ["ok-equal", "ok-valid", "error"]
    bugs = sorted({r["outcome"] for r in results} - set(outcomes))
    cols = outcomes + bugs
    rows = collections.defaultdict(collections.Counter)
    slow, grew = collections.defaultdict(float), collections.defaultdict(int)
    for r in results:
        kind = by_id[r["id"]].kind
        rows[kind][r["outcome"]] += 1
        slow[kind] = max(slow[kind], r["seconds"])
        grew[kind] = max(grew[kind], r["grew"])
    lines = ["| mutation | cases | " + " | ".join(cols) + " | slowest load | peak memory growth |",
             "|---" * (len(cols) + 4) + "|"]
    total = collections.Counter()
    for kind in KINDS:
        if kind not in rows:
            continue
        row = rows[kind]
        total.update(row)
        lines.append(f"| {kind} | {sum(row.values())} | " + " | ".join(str(row[c]) for c in cols)
                     + f" | {slow[kind] * 1000:.0f} ms | {grew[kind] / MIB:.1f} MiB |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[c]) for c in cols)
                 + f" | {max(slow.values()) * 1000:.0f} ms | {max(grew.values()) / MIB:.1f} MiB |")
    return "\n".join(lines)


def bug_report(cases: list[Case], results: list[dict]) -> str:
    by_id = {c.id: c for c in cases}
    out = []
    for r in results:
        if r["outcome"].startswith("BUG"):
            c = by_id[r["id"]]
            out.append(f"{r['outcome']} {c.kind} on {c.seed.name} ({c.variant}): {r['detail']}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-kind", type=int, default=4, help="mutated files per (kind, seed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a load counts as a hang")
    ap.add_argument("--sample", type=int, default=0, help="run only this many cases, drawn with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the files here and keep them")
    ap.add_argument("--results", type=Path, default=None, help="write every case's result here (JSON lines)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        t0 = time.perf_counter()
        pipe, seeds, cases = build(folder, args.per_kind, args.seed, args.sample)
        print(f"{len(seeds)} seed files, {len(cases)} mutated files ({time.perf_counter() - t0:.1f} s to write)",
              flush=True)
        t0 = time.perf_counter()
        results = run_cases(pipe, seeds, cases, workers=args.workers, timeout=args.timeout,
                            progress=lambda n: print(f"  {n}/{len(cases)}", flush=True))
        print(f"loaded in {time.perf_counter() - t0:.1f} s with {args.workers} workers\n")
        print(table(cases, results))
        for fmt in ("kohya", "diffusers", "native"):
            size, grew = memory_ratio(pipe, folder, fmt=fmt)
            print(f"\nlarge valid {fmt} file: {size / MIB:.1f} MiB, peak resident growth while loading "
                  f"{grew / MIB:.1f} MiB ({grew / size:.2f}x the file)", end="")
        print()
        if args.results:
            by_id = {c.id: c for c in cases}
            with open(args.results, "w") as f:
                for r in results:
                    c = by_id[r["id"]]
                    f.write(json.dumps({**r, "kind": c.kind, "seed": c.seed.name, "variant": c.variant}) + "\n")
        bugs = bug_report(cases, results)
        if bugs:
            print("\n" + bugs)
        return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
