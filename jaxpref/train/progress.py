"""One line of progress for a person at a terminal (and the absl log)."""

from __future__ import annotations

import jax
from absl import logging
from tqdm import tqdm


def say(msg: str) -> None:
  """Progress for a person at a terminal; absl logging keeps the full record."""
  if jax.process_index() == 0:
    tqdm.write(msg)  # keeps an active progress bar intact
  logging.info(msg)
