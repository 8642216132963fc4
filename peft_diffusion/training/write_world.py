"""``python -m peft_diffusion.training.write_world FOLDER --n 2000 --seed 0 --kind mask``: shapes-world training
images, captions and their exact condition maps for the control methods (``condition_inputs.write_world``)."""
from .condition_inputs import _main

if __name__ == "__main__":
    _main()
