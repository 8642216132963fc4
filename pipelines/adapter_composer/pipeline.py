"""The adapter composer: a custom diffusers pipeline for ``DiffusionPipeline.from_pretrained``.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/adapter_composer", trust_remote_code=True)
    image = pipe("a red circle", adapters={"subject.safetensors": 0.8}, image_prompt=img,
                 controls=[("controlnet_folder", edges, 1.0, "canny")]).images[0]

Per call it takes this package's adapter files with weights (``pd.load_adapter`` / ``pd.set_adapters``), an
image prompt for a loaded IP-Adapter, and spatial controls (diffusers ``ControlNetModel`` / ``T2IAdapter``
objects or folders, several with weights, condition maps made by ``peft_diffusion.conditions``). See
pipelines/README.md.

diffusers copies this one file into its module cache and imports it, so the code lives in the installed
package (``peft_diffusion/composer.py``, which ``peft-diffusion generate`` runs too); this file names the class.
"""
from peft_diffusion.composer import AdapterComposerPipeline  # the one DiffusionPipeline class diffusers looks for

__all__ = ["AdapterComposerPipeline"]
