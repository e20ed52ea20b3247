"""Shared test settings.

- Silent rank promotion (a hidden broadcast) is an error, as in Equinox.
- Hypothesis runs derandomised by default (profile ``"ci"``): every run, in CI and here, draws
  the same examples, so a red run is reproducible and a green one means the same thing each
  time; the edge cases are pinned with ``@example`` on each property. While developing,
  ``HYPOTHESIS_PROFILE=explore pytest ...`` draws fresh random examples, ``EXPLORE`` times as
  many (tests size their runs with :func:`examples`), to look for new failures; pin any it
  finds with ``@example``.
"""

import os

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXPLORE = 5


def examples(n: int) -> int:
  """``max_examples`` for a property: ``n`` in CI, ``EXPLORE * n`` when exploring."""
  return n * EXPLORE if settings.default.derandomize is False else n


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def normal(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)
