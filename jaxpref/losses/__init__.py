"""Every objective, by family, behind one registry (`get`, `register`, `names`)."""

# Importing a family module registers its losses.
from jaxpref.losses import listwise, pairwise, reference_free, token_level, unpaired  # noqa: F401
from jaxpref.losses import strength  # noqa: F401  (OSP, SPO)
from jaxpref.losses import reward  # noqa: F401
from jaxpref.losses import attributes, pal, themis  # noqa: F401  (reward-role losses)
from jaxpref.losses import weighted  # noqa: F401
from jaxpref.losses import advantages, grao, online  # noqa: F401  (online role)
from jaxpref.losses import ppo_loss  # noqa: F401  (online role, with a value head)
from jaxpref.losses import game  # noqa: F401  (online role: Nash-MD, XPO)
from jaxpref.losses.extra_members import member_fields, record_fields
from jaxpref.losses.registry import bind, get, hparams, names, needs_tokens, register, role
from jaxpref.losses.spec import LossSpec, resolve

__all__ = ["LossSpec", "bind", "get", "hparams", "member_fields", "names", "needs_tokens",
           "record_fields", "register", "resolve", "role"]
