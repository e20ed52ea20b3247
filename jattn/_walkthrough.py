"""The "Illustrated Self-Attention" worked example, with its exact and rounded numbers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

INPUTS = np.array([[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]], dtype=np.float32)
KEY_WEIGHTS = np.array([[0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)
QUERY_WEIGHTS = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float32)
VALUE_WEIGHTS = np.array([[0, 2, 0], [0, 3, 0], [1, 0, 3], [1, 1, 0]], dtype=np.float32)

# What the walkthrough prints (it rounds the softmax to [0, .5, .5] before step 6).
ROUNDED = {
  "keys": [[0, 1, 1], [4, 4, 0], [2, 3, 1]],
  "queries": [[1, 0, 2], [2, 2, 2], [2, 1, 3]],
  "values": [[1, 2, 3], [2, 8, 0], [2, 6, 3]],
  "scores_1": [2, 4, 4],
  "softmax_1": [0.0, 0.5, 0.5],
  "outputs": [[2.0, 7.0, 1.5], [2.0, 8.0, 0.0], [2.0, 7.8, 0.3]],
}


def walkthrough_example():
  """The walkthrough's parameters and inputs.

  Returns:
    ``(params, x)``: ``params`` holds the walkthrough's 4x3 query, key and value
    matrices as 2-D (one-head) kernels, ``x`` its three 4-feature inputs
    ``(3, 4)``. Use ``scale=1.0`` to reproduce its numbers: it does not scale.

  Examples:
    >>> import jattn
    >>> params, x = jattn.walkthrough_example()
    >>> params["key"]["kernel"].shape, x.shape
    ((4, 3), (3, 4))
  """
  params = {
    "query": {"kernel": jnp.asarray(QUERY_WEIGHTS)},
    "key": {"kernel": jnp.asarray(KEY_WEIGHTS)},
    "value": {"kernel": jnp.asarray(VALUE_WEIGHTS)},
  }
  return params, jnp.asarray(INPUTS)
