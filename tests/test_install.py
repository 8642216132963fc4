"""What a user gets from a plain install: the wheel carries the embedded models and its commands run from any
directory; the main install brings what the README and the samples call; the README's set-up and "Use"
lines are true."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _block(text: str, fence: str) -> list[str]:
    """The lines of the first ```fence block in ``text``."""
    start = text.index(f"```{fence}\n") + len(fence) + 4
    return text[start:text.index("```", start)].rstrip("\n").split("\n")


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_readme_starts_with_the_two_setup_commands():
    """The first screen: exactly two commands, the main job (a plain install, then the demo) and the tests."""
    first = README[:README.index("\n## ")]
    commands = [line for line in _block(first, "bash") if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "pip install ." in main_job and "-e" not in main_job and "samples/dreambooth_demo.py" in main_job
    assert 'pip install -e ".[dev]"' in tests and "python -m pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest -q tests" in ci  # what CI runs is the same


def test_readme_use_snippet_runs_on_the_embedded_base(tmp_path, monkeypatch):
    """The first lines of the README's "Use" block, run as written (no dtype argument) on the CPU from an
    unrelated directory: the embedded base loads from package data and draws an image."""
    use = README[README.index("\n## Use\n"):]
    lines = _block(use, "python")
    end = next(i for i, line in enumerate(lines) if line.startswith("image = pipe("))
    code = "\n".join(lines[:end + 1])
    assert 'from_pretrained(path("shapes-base"))' in code and "dtype=" not in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Use)", "exec"), scope)
    pipe, image = scope["pipe"], scope["image"]
    assert pipe.device.type == "cpu"
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert image.size == (size, size) and len(set(image.getdata())) > 1


def test_the_main_install_brings_what_the_readme_and_samples_call():
    """peft: diffusers' ``load_lora_weights`` (README "Use", samples/quickstart.py) raises without it;
    controlnet-aux stays a dependency (the control adapters' preprocessing) but nothing imports it eagerly
    (``test_cli.test_help_and_argument_errors_load_no_model_libraries``)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = _requirement_names(project["dependencies"])
    assert {"peft", "diffusers", "transformers", "torch", "controlnet-aux"} <= names
    assert "peft" not in _requirement_names(project["optional-dependencies"]["dev"])  # one place only
    quickstart = (REPO / "samples" / "quickstart.py").read_text()
    assert "load_lora_weights" in quickstart


def _run(args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{args[:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_runs_generate_and_train_from_any_directory(tmp_path):
    """Build the wheel from a copy of the sources (the working tree stays clean), install it without its
    dependencies (those of this environment serve: a fresh venv would reinstall torch, gigabytes), then run
    the console script from an unrelated directory with only the wheel's files on the path."""
    src, dist, site, elsewhere = (tmp_path / d for d in ("src", "dist", "site", "elsewhere"))
    src.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "peft_diffusion", src / "peft_diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src])
    (wheel,) = dist.glob("peft_diffusion-*.whl")

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    models = {p.relative_to(REPO).as_posix() for p in (REPO / "peft_diffusion" / "models").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert any(m.endswith(".safetensors") for m in models)
    assert not models - names, f"embedded model files missing from the wheel: {sorted(models - names)[:5]}"
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(re.match(r"Requires-Dist: peft\b", r) and "extra ==" not in r for r in requires), requires

    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel])
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = _run([sys.executable, "-c", "import peft_diffusion, peft_diffusion.models as m; "
                  "print(peft_diffusion.__file__); print(m.path('shapes-base'))"], cwd=elsewhere, env=env)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(site), f"{line} is not the installed wheel's"

    command = site / "bin" / "peft-diffusion"
    _run([command, "generate", "--prompt", "a red circle", "--n", "1", "--steps", "2", "--threads", "1"],
         cwd=elsewhere, env=env)
    assert (elsewhere / "out" / "generate" / "00-a-red-circle-0.png").is_file()
    # the repository's sample config from another directory: its subject path is relative to the file
    _run([command, "train", REPO / "samples" / "dreambooth.toml", "--steps=5", "--batch_size=2",
          "--prior_preservation=false", "--validation_every=-1", "--checkpoint_every=0", "--log_with=none",
          "--progress=false", "--threads=1", "--output_dir=run"], cwd=elsewhere, env=env)
    assert (elsewhere / "run" / "adapter.safetensors").is_file()
