"""Damaged adapter files: a fixed-seed sample of ``bench/fuzz_loader.py`` (every mutation kind, every format we
read), and one test per guarantee the fuzzer found missing: only ``AdapterFileError`` naming the file escapes a
load, pickles never run code, a file cannot make the reader allocate what it does not store, and a failed load
leaves the model as it was."""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_diffusion as pd
import tiny
from peft_diffusion import adapter_files
from peft_diffusion.io import CorruptFileError, UnmatchedKeysError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fuzz_loader.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_loader", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_loader"] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


fz = _fuzz_module()


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """(folder, pipeline, cases, results) of the CI sample: CI_SAMPLE cases drawn with seed 0 from the full
    run's plan (4 per kind and seed file), loaded by one worker process with a 10 s limit per case."""
    folder = tmp_path_factory.mktemp("fuzz")
    pipe, seeds, cases = fz.build(folder, per_kind=4, seed=0, sample=fz.CI_SAMPLE)
    results = fz.run_cases(pipe, seeds, cases, workers=1, timeout=10.0)
    return folder, pipe, cases, results


def test_fuzzed_files_load_equal_or_raise_adapter_file_error(fuzz_run):
    _, _, cases, results = fuzz_run
    assert len(cases) == len(results) == fz.CI_SAMPLE
    assert {c.kind for c in cases} == set(fz.KINDS)  # the sample reaches every mutation kind...
    assert {c.seed.name for c in cases} == {  # ...and every format we read
        "native-lora", "native-loha", "diffusers-lora", "diffusers-nometa", "diffusers-bin", "diffusers-old",
        "dora-diffusers", "kohya-lora", "lycoris-locon", "lycoris-loha", "lycoris-lokr", "ti-diffusers",
        "ti-diffusers-bin", "ti-a1111-pt", "ti-a1111-st"}
    bugs = fz.bug_report(cases, results)
    assert not bugs, fz.table(cases, results) + "\n" + bugs
    outcomes = collections.Counter(r["outcome"] for r in results)
    # all three sane outcomes occur: the classification is not vacuous
    assert outcomes["error"] > 100 and outcomes["ok-equal"] > 5 and outcomes["ok-valid"] > 5, outcomes
    assert max(r["seconds"] for r in results) < 10
    payloads = [c for c in cases if c.kind == "pickle-payload"]
    assert payloads and not any(Path(c.marker).exists() for c in payloads)


def test_large_file_loads_within_twice_its_size(fuzz_run):
    folder, pipe, _, _ = fuzz_run
    size, grew = fz.memory_ratio(pipe, folder, rank=1024, fmt="kohya")
    assert size > 8 * fz.MIB
    # the loader holds the file's tensors and their copies at most once each (the file's are dropped as they
    # are copied); the allocator may keep freed pages resident, so the bound is the sum of both
    assert grew < 2 * size + 8 * fz.MIB, f"peak resident memory grew {grew / fz.MIB:.1f} MiB for a " \
                                         f"{size / fz.MIB:.1f} MiB file"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > {self.marker}",)


def _torch_zip_with_pickle(body: bytes) -> bytes:
    """A torch zip file whose data.pkl is ``body``."""
    buf, out = io.BytesIO(), io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, body if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("container", ["bare-pickle", "zip-data-pkl", "inside-a1111-dict"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickled_payload_never_runs(container, suffix, text_encoder, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    if container == "bare-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    elif container == "zip-data-pkl":
        path.write_bytes(_torch_zip_with_pickle(pickle.dumps(_Payload(marker), protocol=2)))
    else:
        torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": _Payload(marker)}, path)
    with pytest.raises(CorruptFileError, match="weights-only") as err:
        pd.load_adapter(text_encoder, path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_pickled_tensor_claiming_more_than_it_stores_is_refused_at_once(text_encoder, tmp_path):
    # a stride-0 expansion pickles one value and a shape of 2^31: summing or copying it would take minutes
    # and gigabytes; before the fix it hung the loader (``huge-length`` in the fuzzer)
    path = tmp_path / "huge.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1).expand(1 << 31)}, "name": "x"}, path)
    assert path.stat().st_size < 10_000
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match=r"claims shape \(2147483648,\)"):
        pd.load_adapter(text_encoder, path)
    assert time.perf_counter() - start < 1.0


def _lora_file(model, tmp_path, fmt="diffusers", name="a.safetensors"):
    pd.inject(model, pd.LoRA(r=2), "mine")
    tiny.randomize(model, "mine")
    path = pd.save_adapter(model, tmp_path / name, "mine", format=fmt)
    pd.remove(model, "mine")
    return path


def test_duplicate_header_keys_are_refused(unet, tmp_path):
    # safetensors keeps one of two entries with the same name silently: which tensor loads would depend on
    # the reader (``header-duplicate-key``)
    data = _lora_file(unet, tmp_path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    text = ("{" + json.dumps({key: header[key]})[1:-1] + ", " + json.dumps(header)[1:]).encode()
    text += b" " * (-len(text) % 8)
    bad = tmp_path / "dup.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CorruptFileError, match="duplicate keys") as err:
        pd.load_adapter(unet, bad)
    assert str(bad) in str(err.value) and key in str(err.value)


def test_integer_weights_are_refused(unet, tmp_path):
    # int/bool tensors were cast to float and loaded as if they were weights (``tensor-dtype``)
    sd = load_file(_lora_file(unet, tmp_path))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key] = (sd[key] * 100).to(torch.int32)
    save_file(sd, tmp_path / "int.safetensors")
    before = tiny.snapshot(unet)
    with pytest.raises(pd.AdapterFileError, match="holds torch.int32 values"):
        pd.load_adapter(unet, tmp_path / "int.safetensors")
    assert tiny.snapshot(unet).keys() == before.keys() and pd.adapter_names(unet) == []


@pytest.mark.parametrize("damage", ["0-d lora_A", "alpha of 2 values", "lora_alpha a list", "no lora_A at all"])
def test_damaged_content_names_file_and_key(damage, unet, tmp_path):
    # each of these escaped as IndexError / TypeError / RuntimeError before (``tensor-ndim``, ``metadata``,
    # ``key-drop`` with skip_unknown)
    fmt = "kohya" if damage == "alpha of 2 values" else "diffusers"
    path = _lora_file(unet, tmp_path, fmt)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    if damage == "0-d lora_A":
        key = next(k for k in sd if "lora_A" in k)
        sd[key], expect = sd[key].flatten()[0].clone(), key
    elif damage == "alpha of 2 values":
        key = next(k for k in sd if k.endswith(".alpha"))
        sd[key], expect = torch.ones(2), key
    elif damage == "lora_alpha a list":
        header = json.loads(meta["lora_adapter_metadata"])
        header[next(k for k in header if k.endswith("lora_alpha"))] = [1]
        meta["lora_adapter_metadata"], expect = json.dumps(header), "lora_adapter_metadata"
    else:
        sd, expect = {k: v for k, v in sd.items() if "lora_A" not in k}, "down"
    save_file(sd, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(pd.AdapterFileError) as err:
        pd.load_adapter(unet, tmp_path / "bad.safetensors", skip_unknown=True)
    assert str(tmp_path / "bad.safetensors") in str(err.value) and expect in str(err.value)
    assert pd.adapter_names(unet) == []


def test_unrecognised_file_error_names_the_file(unet, tmp_path):
    save_file({"<cat>": torch.ones(2, 32, dtype=torch.int32)}, tmp_path / "emb.safetensors")
    with pytest.raises(pd.AdapterFileError, match="emb.safetensors: unrecognised adapter file"):
        pd.load_adapter(unet, tmp_path / "emb.safetensors")


def test_components_error_names_the_file(unet, tmp_path):
    sd = load_file(_lora_file(unet, tmp_path))
    sd = {k.replace("unet.", "transformer.", 1): v for k, v in sd.items()}
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(sd, tmp_path / "two.safetensors")
    with pytest.raises(pd.AdapterFileError, match=r"two.safetensors: holds components"):
        pd.load_adapter(unet, tmp_path / "two.safetensors")


def test_failed_placement_leaves_the_pipeline_as_it_was(unet, text_encoder, tmp_path, monkeypatch):
    # all tensors go into their deltas before the first is placed, and a failure while placing (here: the
    # second component) removes what the first got: the pipeline is changed by all of the file or none of it
    pipe = SimpleNamespace(components={"unet": unet, "text_encoder": text_encoder})
    pd.inject(pipe, pd.LoRA(r=2), "mine")
    pd.inject(pipe, pd.LoRA(r=2), "mine", components=("text_encoder",))
    path = pd.save_adapter(pipe, tmp_path / "two.safetensors", "mine")
    pd.remove(pipe)
    before = {c: (tiny.snapshot(m), tiny.module_types(m)) for c, m in pipe.components.items()}
    calls = []
    real = adapter_files.place

    def place_then_fail(model, deltas, name):
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("placing failed")
        real(model, deltas, name)

    monkeypatch.setattr(adapter_files, "place", place_then_fail)
    with pytest.raises(RuntimeError, match="placing failed"):
        pd.load_adapter(pipe, path)
    assert len(calls) == 2
    for c, m in pipe.components.items():
        assert tiny.module_types(m) == before[c][1]
        after = tiny.snapshot(m)
        assert after.keys() == before[c][0].keys()
        assert all(torch.equal(after[k], v) for k, v in before[c][0].items())
    assert pd.adapter_names(pipe) == []


@pytest.mark.parametrize("stem", ["half", "train", "to"])
def test_file_named_like_a_module_method_loads(stem, unet, tmp_path):
    # the default adapter name is the file stem; "half" made the ModuleDict of deltas raise KeyError midway
    path = _lora_file(unet, tmp_path, name=f"{stem}.safetensors")
    before = tiny.module_types(unet)
    name = pd.load_adapter(unet, path)
    assert name == f"{stem}_1" and pd.adapter_names(unet) == [name]
    pd.remove(unet, name)
    assert tiny.module_types(unet) == before


def test_unmatched_keys_error_is_an_adapter_file_error(unet, tmp_path):
    sd = load_file(_lora_file(unet, tmp_path))
    sd["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(2, 4)
    sd["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(4, 2)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(UnmatchedKeysError, match="fit no module") as err:
        pd.load_adapter(unet, tmp_path / "extra.safetensors")
    assert isinstance(err.value, pd.AdapterFileError)
    assert sorted(err.value.report.ignored) == ["unet.no_such_block.to_q.lora_A.weight",
                                               "unet.no_such_block.to_q.lora_B.weight"]
