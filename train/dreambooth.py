"""DreamBooth: teach a base pipeline a subject from a few images, with any registered PEFT method.

    python train/dreambooth.py samples/dreambooth.toml [--key=value ...]
    accelerate launch train/dreambooth.py samples/dreambooth.toml [--key=value ...]
    torchrun --nproc_per_node 2 train/dreambooth.py samples/dreambooth.toml      # 2 CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 train/dreambooth.py ...      # the same, or N GPUs (NCCL)

On a machine without a GPU the trainer asks accelerate for the CPU, which then runs torchrun's processes as
one gloo group (MULTI_CPU). ``accelerate launch --cpu --num_processes 2`` starts one process only (it needs
MPI for more); use torchrun or ``--multi_gpu`` as above. ``batch_size`` is the global batch: the processes
split it, so the result matches one process up to float summation order.

The config is ``peft_diffusion.training.dreambooth_config.Config`` (every key, its default and its meaning are listed
there): a TOML file, then ``--key=value`` overrides; ``--method.r=4`` sets a key of the ``[method]`` table.
Unknown keys and out-of-range values stop the run before anything loads. The run loop itself lives in the
library (``training.dreambooth.train``) so that ``peft-diffusion train`` runs the very same code.

Writes to ``output_dir``: ``adapter.safetensors`` (loads with ``peft_diffusion.load_adapter`` and, for
LoRA, diffusers' ``load_lora_weights``), ``validation/step-*.png`` grids, ``logs/`` (CSV or TensorBoard),
``checkpoints/step-*`` (``--resume=latest`` continues the newest one).
"""
import logging
import sys

from peft_diffusion.training.config import ConfigError
from peft_diffusion.training.data import DataError
from peft_diffusion.training.dreambooth import load_config, train

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    path = args.pop(0) if args and not args[0].startswith("--") else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(path, args)
        train(cfg)
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
