"""Shared test settings: silent rank promotion (a hidden broadcast) is an error, as in Equinox."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def normal(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)
