"""The sites (the only structural changes peft-diffusion makes to a model) and the deltas they hold.

Three kinds of site behind one lifecycle (``Site``): ``Host`` around a leaf layer, ``Annex`` beside any
module, ``ParamSite`` on one named parameter; ``inputs`` carries per-call inputs to the deltas.
"""
from .annex import Annex
from .delta import AnnexDelta, Delta, ParamDelta, WeightDelta
from .host import Host
from .inputs import fit_batch, lookup
from .layers import SUPPORTED_LAYERS, WEIGHT_LAYERS, is_transposed, layer_dims, weight_op
from .param_site import ParamSite
from .site import Site

SITE_KINDS = {"host": Host, "annex": Annex, "param": ParamSite}

__all__ = ["Delta", "WeightDelta", "AnnexDelta", "ParamDelta", "Site", "Host", "Annex", "ParamSite", "SITE_KINDS",
           "layer_dims", "weight_op", "is_transposed", "SUPPORTED_LAYERS", "WEIGHT_LAYERS", "fit_batch", "lookup"]
