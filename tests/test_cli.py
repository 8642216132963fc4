"""The peft-diffusion command on the tiny pipeline: inspect, convert, generate, train, help, errors."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import peft_diffusion as pd
from peft_diffusion.api import hosts
from peft_diffusion.cli import main, parse_adapter, site_kind
from peft_diffusion.shapes import world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter_files(tiny_pipe_dir, tmp_path_factory):
    """The same random LoRA (U-Net attention r=4, text encoder r=2 alpha 4) in the three formats."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.inject(pipe, pd.LoRA(r=4, alpha=4), "subject")
    pd.inject(pipe, pd.LoRA(r=2, alpha=4, target="clip-text"), "subject", components=("text_encoder",))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("adapters")
    return {fmt: pd.save_adapter(pipe, root / f"{fmt}.safetensors", "subject", format=fmt)
            for fmt in ("native", "diffusers", "kohya")}


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
def test_inspect(adapter_files, fmt, capsys):
    assert main(["inspect", str(adapter_files[fmt])]) == 0
    out = capsys.readouterr().out
    assert f"format      {fmt}" in out
    assert "[unet]" in out and "[text_encoder]" in out
    assert "method      lora" in out and "r=4 x" in out and "r=2 x" in out
    assert "alphas      4 x" in out  # text encoder: alpha 4 at rank 2 survives every format
    total = sum(t.numel() for t in pd.io.read_file(adapter_files[fmt])[0].values() if t.ndim == 2)
    assert f"parameters  {total:,}" in out
    assert ("to_q x" in out) and ("q_proj x" in out)
    if fmt == "native":
        assert "name        subject" in out and "fingerprint" in out


def _deltas(pipe, name):
    return {q: h.deltas[name].delta_weight() for q, h in hosts(pipe) if name in h.deltas}


def test_convert_round_trip(adapter_files, tiny_pipe_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    kohya, diffusers_file, native = tmp_path / "k.safetensors", tmp_path / "d.safetensors", tmp_path / "n.safetensors"
    base = ["--base", str(tiny_pipe_dir)]
    assert main(["convert", str(adapter_files["native"]), str(kohya), "--to", "kohya"] + base) == 0
    assert main(["convert", str(kohya), str(diffusers_file), "--to", "diffusers"] + base) == 0
    assert main(["convert", str(diffusers_file), str(native), "--to", "native"] + base) == 0
    assert "(native)" in capsys.readouterr().out
    before, after = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir), StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    a, b = _deltas(before, pd.load_adapter(before, adapter_files["native"])), _deltas(after, pd.load_adapter(after, native))
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_generate_writes_pngs_and_a_grid(adapter_files, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--base", str(tiny_pipe_dir), "--adapter", f"{adapter_files['native']}:0.5",
            "--adapter", str(adapter_files["kohya"]), "--prompt", "a sks cat", "--prompt", "a dog", "--n", "2",
            "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00-a-sks-cat-0.png", "00-a-sks-cat-1.png", "01-a-dog-0.png", "01-a-dog-1.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)
    assert "weight 0.5" in capsys.readouterr().out


def test_train_command(tiny_pipe_dir, tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    for i, s in enumerate(world.subject_dataset(2, seed=4)):
        s.image.save(folder / f"{i}.png")
    toml = tmp_path / "db.toml"
    toml.write_text(f'base = "{tiny_pipe_dir}"\ninstance_dir = "{folder}"\ninstance_prompt = "a sks cross"\n'
                    f'output_dir = "{tmp_path / "out"}"\nprior_preservation = false\nprogress = false\n'
                    f'validation_every = -1\nlog_with = "none"\ncheckpoint_every = 0\n[method]\nmethod = "lora"\nr = 2\n')
    assert main(["train", str(toml), "--steps=2", "--batch_size", "2", "--method.target=unet-attn"]) == 0
    info = pd.io.read_file(tmp_path / "out/adapter.safetensors")[0]
    assert any("attn1" in k for k in info)  # the override reached the method table


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("stepz = 1\n")
    assert main(["train", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config keys ['stepz']; valid keys:") and "steps" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    assert main(["inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {junk}") and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_parse_adapter_and_site_kind():
    assert parse_adapter("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_adapter("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert parse_adapter("dir:with:colons/a.safetensors:-1") == ("dir:with:colons/a.safetensors", -1.0)
    assert site_kind("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0") == "attn2.to_out.0"
    assert site_kind("text_model.encoder.layers.1.self_attn.q_proj") == "self_attn.q_proj"
    assert site_kind("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q") == "attn2_to_q"


# ---------------------------------------------------------------- --help, --version, startup

def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_the_override_syntax_and_every_config_key(capsys):
    import dataclasses

    from peft_diffusion.training.dreambooth_config import Config, describe_keys

    out = _help(["train", "--help"], capsys)
    assert "--key=value" in out and "--method.r=4" in out and "--resume=latest" in out
    rows = describe_keys()
    assert [k for k, _, _ in rows] == [f.name for f in dataclasses.fields(Config)]
    flat = " ".join(out.split())  # the listing wraps long lines
    for key, default, meaning in rows:
        assert meaning, f"config key {key} has no help"
        assert f" {key} " in flat and f"{' '.join(meaning.split())} (default: {default})" in flat
    assert "(default: 400)" in flat and '(default: "out/dreambooth")' in flat  # steps, output_dir
    assert "lora" in out and "textual-inversion" in out  # the methods a [method] table may name


def test_generate_help_has_help_and_defaults_for_every_option(capsys):
    from peft_diffusion.cli import build_parser

    top = _help(["--help"], capsys)
    assert "``" not in top and "peft-diffusion: train, generate with, inspect and convert" in top
    out = " ".join(_help(["generate", "--help"], capsys).split())
    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "help").container
    for action in generate._actions:
        assert action.help, f"generate {action.option_strings} has no help"
        if action.default not in (None, [], "==SUPPRESS==") and not action.required:
            assert f"(default: {action.default})" in out, action.dest
    for option in ("--negative-prompt", "--guidance", "--seed", "--height", "--width", "--dtype", "--scheduler"):
        assert option in out
    assert "grid.png" in out  # where the images go


def test_version(capsys):
    assert _help(["--version"], capsys).strip() == f"peft-diffusion {pd.__version__}"


def test_help_and_argument_errors_load_no_model_libraries():
    """--help and a bad argument answer without importing diffusers / transformers / controlnet-aux (6-10 s
    of imports before; torch, which the package needs, is the floor)."""
    import subprocess
    import sys

    code = ("import sys\nfrom peft_diffusion.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['generate', '--help'], ['generate'], ['convert', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'controlnet_aux') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- generate: checks and options

@pytest.mark.parametrize("args, message", [
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--n", "0"], "--n must be >= 1"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--height", "30"], "--height 30: this base needs a multiple of"),
])
def test_generate_rejects_bad_values_in_one_line(args, message, tiny_pipe_dir, tmp_path, capsys):
    code = main(["generate", "--base", str(tiny_pipe_dir), "--prompt", "a", "--out", str(tmp_path / "g")] + args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "g").exists()


def test_generate_without_a_gpu_says_so(tiny_pipe_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--base", str(tiny_pipe_dir), "--prompt", "a", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err


def test_generate_options_reach_the_pipeline(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    import peft_diffusion.training.evaluate as evaluate

    seen, real = {}, evaluate.generate

    def spy(pipe, prompts, **kw):
        seen.update(kw, scheduler=type(pipe.scheduler).__name__, dtype=pipe.unet.dtype)
        return real(pipe, prompts, **kw)

    monkeypatch.setattr(evaluate, "generate", spy)
    out = tmp_path / "g"
    assert main(["generate", "--base", str(tiny_pipe_dir), "--prompt", "a cat", "--n", "1", "--steps", "2",
                 "--negative-prompt", "blurry", "--guidance", "6", "--seed", "7", "--height", "32", "--width", "48",
                 "--scheduler", "euler", "--dtype", "bfloat16", "--device", "cpu", "--out", str(out)]) == 0
    assert seen["scheduler"] == "EulerDiscreteScheduler" and seen["dtype"] == torch.bfloat16
    assert (seen["negative_prompt"], seen["guidance"], seen["seed"]) == ("blurry", 6.0, 7)
    assert Image.open(out / "00-a-cat-0.png").size == (48, 32)
    assert str(out.resolve()) in capsys.readouterr().out


# ---------------------------------------------------------------- train: stopping, resuming, output folders

def _subject(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir(exist_ok=True)
    for i, s in enumerate(world.subject_dataset(2, seed=4)):
        s.image.save(folder / f"{i}.png")
    return folder


def _toml(tmp_path, tiny_pipe_dir, **extra):
    values = dict(base=str(tiny_pipe_dir), instance_dir=str(_subject(tmp_path)), instance_prompt="a sks cross",
                  output_dir=str(tmp_path / "out"), prior_preservation=False, progress=False, validation_every=-1,
                  log_with="none", checkpoint_every=0, steps=6, batch_size=2, **extra)
    toml = tmp_path / "db.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
                            for k, v in values.items()) + '[method]\nmethod = "lora"\nr = 2\n')
    return toml


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_step_and_resume_finishes(signum, tiny_pipe_dir, tmp_path, monkeypatch,
                                                                    capsys):
    import peft_diffusion.training.dreambooth as db
    from peft_diffusion.training import checkpoint

    toml = _toml(tmp_path, tiny_pipe_dir)
    real, calls = db.diffusion_loss, []
    handler_before = signal.getsignal(signal.SIGINT)

    def signalled(*a, **k):  # the user presses Ctrl-C (or a scheduler sends SIGTERM) during step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(db, "diffusion_loss", signalled)
    assert main(["train", str(toml), "--lr=1e-3"]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "out"
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-000003"]
    assert err[-1].startswith(f"stopped by {signal.Signals(signum).name} at step 3 of 6: checkpoint ")
    assert f"resume with: peft-diffusion train {toml} --lr=1e-3 --resume=latest" in err[-1]
    assert "Traceback" not in "\n".join(err) and not (out / "adapter.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored (SIG_IGN under nohup)
    monkeypatch.setattr(db, "diffusion_loss", real)
    assert main(["train", str(toml), "--lr=1e-3", "--resume=latest"]) == 0
    assert len(calls) == 3 and (out / "adapter.safetensors").is_file()
    mode = 0o666 & ~_umask()
    for f in (out / "adapter.safetensors", out / "checkpoints/step-000003/trainable.safetensors"):
        assert f.stat().st_mode & 0o777 == mode, f  # not mkstemp's / safetensors' 0600


def test_an_output_dir_holding_a_run_needs_resume_or_overwrite(tiny_pipe_dir, tmp_path, capsys):
    toml = _toml(tmp_path, tiny_pipe_dir)
    out = tmp_path / "out"
    assert main(["train", str(toml), "--steps=2", "--checkpoint_every=1", "--checkpoints_keep=0"]) == 0
    assert main(["train", str(toml), "--steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} already holds a run" in err and "--resume=latest" in err and "--overwrite" in err
    (out / "keep.txt").write_text("the user's")
    assert main(["train", str(toml), "--steps=1", "--checkpoint_every=1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no mix of runs
    assert (out / "keep.txt").read_text() == "the user's"
    assert main(["train", str(toml), "--resume=latest", "--overwrite"]) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err


def test_config_paths_resolve_against_the_config_file(tiny_pipe_dir, tmp_path, monkeypatch):
    from peft_diffusion.training.dreambooth import load_config

    (tmp_path / "cfg").mkdir()
    _subject(tmp_path / "cfg")
    base = os.path.relpath(tiny_pipe_dir, tmp_path / "cfg")
    toml = tmp_path / "cfg" / "run.toml"
    toml.write_text(f'base = "{base}"\ninstance_dir = "subject"\noutput_dir = "../runs/a"\n'
                    f'class_cache = "cache"\nprior_preservation = false\nprogress = false\nvalidation_every = -1\n'
                    f'log_with = "none"\ncheckpoint_every = 0\nsteps = 1\nbatch_size = 2\ninstance_prompt = "a sks cross"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(toml)
    assert Path(cfg.base).resolve() == tiny_pipe_dir.resolve()
    assert Path(cfg.instance_dir) == tmp_path / "cfg" / "subject"
    assert Path(cfg.output_dir).resolve() == (tmp_path / "runs" / "a").resolve()
    assert Path(cfg.class_cache) == tmp_path / "cfg" / "cache"
    over = load_config(toml, ["--output_dir=mine", "--resume=latest"])
    assert over.output_dir == "mine" and over.resume == "latest"  # command-line paths: the working directory
    assert load_config(None, {"base": "org/model", "prior_preservation": False}).base == "org/model"
    assert main(["train", str(toml)]) == 0
    assert (tmp_path / "runs" / "a" / "adapter.safetensors").is_file()


def test_the_sample_config_and_the_demo_share_subject_and_class_cache(tmp_path, monkeypatch):
    from peft_diffusion.training.dreambooth import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "samples" / "dreambooth.toml")
    assert Path(cfg.instance_dir) == REPO / "samples" / "subject" and any(Path(cfg.instance_dir).glob("*.png"))
    assert Path(cfg.class_cache).resolve() == REPO / "out" / "class-cache"
    assert Path(cfg.output_dir).resolve() == REPO / "out" / "dreambooth"
    demo = (REPO / "samples" / "dreambooth_demo.py").read_text()
    call = demo[demo.index("cfg = load_config("):].split("\n")[0]
    assert "class_cache" not in call and "instance_dir" not in call  # the demo keeps the TOML's


@pytest.mark.parametrize("name", ["t2i_adapter", "controlnet", "controlnext", "ip_adapter"])
def test_the_control_and_image_prompt_sample_configs_load(name, tmp_path, monkeypatch):
    """The sample configs behind the README's control / image-prompt table are valid configs (every key known,
    every value in range, the method registered) and train on the world folder write_world makes."""
    from peft_diffusion.training.dreambooth import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "samples" / f"{name}.toml")
    assert cfg.method["method"] == name.replace("_", "-") and not cfg.prior_preservation
    assert Path(cfg.instance_dir).resolve() == REPO / "out" / "world-mask"
    assert cfg.steps == (2000 if name == "ip_adapter" else 1000)


# ---------------------------------------------------------------- convert: a1111, --list-formats

def test_convert_to_a1111_writes_the_kohya_layout_for_a_lora(adapter_files, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "a1111.safetensors"
    assert main(["convert", str(adapter_files["native"]), str(out), "--to", "a1111", "--base", str(tiny_pipe_dir)]) == 0
    assert "A1111 reads kohya's key layout" in capsys.readouterr().out
    tensors, metadata = pd.io.read_file(out)
    assert pd.io.detect(tensors, metadata) == "kohya" and all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)


def test_list_formats_says_which_targets_a_file_has(adapter_files, tiny_pipe_dir, capsys):
    assert main(["convert", "--list-formats", str(adapter_files["native"]), "--base", str(tiny_pipe_dir)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert set(rows) == set(pd.io.writable())
    for fmt in ("native", "diffusers", "kohya", "lycoris", "a1111"):
        assert rows[fmt] == "yes", (fmt, rows[fmt])
    assert rows["ti-diffusers"].startswith("no: ")


# ---------------------------------------------------------------- wrong-architecture adapters

def test_an_adapter_for_another_model_is_one_error_pointing_at_base(tiny_pipe_dir, tmp_path, capsys):
    """The tiny pipeline's LoRA on the embedded base: one line (no warning before it), naming --base, and
    the model the file names when it does (kohya's ss_sd_model_name)."""
    from safetensors.torch import load_file, save_file

    from peft_diffusion.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "src")
    pd.inject(pipe, pd.LoRA(r=2), "x")
    native = pd.save_adapter(pipe, tmp_path / "n.safetensors", "x")
    kohya = pd.save_adapter(pipe, tmp_path / "k.safetensors", "x", format="kohya")
    _, meta = pd.io.read_file(kohya)
    save_file(load_file(kohya), kohya, metadata={**meta, "ss_sd_model_name": "tiny-sd-test"})
    for file, named in ((native, None), (kohya, "tiny-sd-test")):
        code = main(["generate", "--prompt", "a", "--n", "1", "--steps", "1", "--adapter", str(file),
                     "--out", str(tmp_path / "g")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {file}"), err
        assert "--base" in err and "shape" in err
        assert (f"the file names its model: {named!r}" in err) if named else ("made for another model" in err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saved_adapters_get_the_usual_file_mode(tiny_pipe, tmp_path):
    """0666 less the umask (0644 usually), as any other file the user writes; was 0600 (mkstemp and
    safetensors' own writer)."""
    pd.inject(tiny_pipe, pd.LoRA(r=2), "x")
    for fmt in ("native", "kohya"):
        path = pd.save_adapter(tiny_pipe, tmp_path / f"{fmt}.safetensors", "x", format=fmt)
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), fmt
