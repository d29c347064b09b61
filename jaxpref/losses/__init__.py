"""Every objective, by family, behind one registry (`get`, `register`, `names`)."""

from jaxpref.losses import pairwise  # noqa: F401  (registers the pairwise losses)
from jaxpref.losses.registry import bind, get, hparams, names, register

__all__ = ["bind", "get", "hparams", "names", "register"]
