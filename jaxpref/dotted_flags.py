"""Dotted flags derived from the code rather than listed by hand: `--<prefix>.<field>` for
a config dataclass's fields, and `--loss.<hparam>` for every hyperparameter of every
registered loss (including losses a `--loss_module` registers before parsing)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Sequence

from absl import flags

from jaxpref import losses

FLAGS = flags.FLAGS

_DEFINE_BY_TYPE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                   float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_dotted(prefix: str, fields: dict[str, Any], owner: str) -> None:
  for name, default in fields.items():
    define = _DEFINE_BY_TYPE.get(type(default))
    if define is not None and f"{prefix}.{name}" not in FLAGS:
      define(f"{prefix}.{name}", None, f"{owner} {name} (default {default!r}).")


def define_loss_flags() -> None:
  """Defines --loss.<hparam> for every registered loss (call again after registering more).

  One flag serves every loss that has a hyperparameter of that name; its help lists them.
  """
  takers: dict[str, list[str]] = {}
  defaults: dict[str, Any] = {}
  for name in losses.names():
    for hp, default in losses.hparams(name).items():
      takers.setdefault(hp, []).append(f"{name}={default!r}")
      defaults.setdefault(hp, default)
  for hp, default in defaults.items():
    define = _DEFINE_BY_TYPE.get(type(default))
    if define is not None and f"loss.{hp}" not in FLAGS:
      define(f"loss.{hp}", None, "Loss hyperparameter; default per loss: " + ", ".join(takers[hp]))



def import_loss_modules(args: Sequence[str]) -> None:
  """Imports every --loss_module=... in `args` (before parsing), then defines its loss flags."""
  for arg in args:
    if not arg.startswith("--loss_module="):
      continue
    target = arg.split("=", 1)[1]
    if target.endswith(".py"):
      if not os.path.isfile(target):
        raise flags.Error(f"--loss_module: no such file {target!r}")
      name = "jaxpref_user_" + os.path.splitext(os.path.basename(target))[0]
      spec = importlib.util.spec_from_file_location(name, target)
      module = importlib.util.module_from_spec(spec)
      sys.modules[name] = module
      spec.loader.exec_module(module)
    else:
      importlib.import_module(target)
  define_loss_flags()


def loss_flag_hint(error: str, args: Sequence[str], default_loss: str) -> str:
  """For an unknown --loss.X: the selected loss's hyperparameters, with defaults."""
  if "'loss." not in error:
    return ""
  name = default_loss
  for arg in args:
    if arg.startswith("--loss="):
      name = arg.split("=", 1)[1]
  try:
    valid = losses.hparams(name)
  except ValueError:
    return ""
  return f"\nLoss {name!r} takes: " + ", ".join(f"--loss.{k}={v!r}" for k, v in valid.items())


def dotted_values(prefix: str) -> dict[str, Any]:
  return {n[len(prefix) + 1:]: FLAGS[n].value for n in FLAGS
          if n.startswith(prefix + ".") and FLAGS[n].present}
