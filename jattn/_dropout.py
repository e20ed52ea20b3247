"""Dropout on the attention weights, keyed by position.

Each keep bit is a function of the rng and the (batch, head, query, key) position
of the weight alone::

  bits(b, n, t, s) = key_data(fold_in(fold_in(fold_in(fold_in(rng, b), n), t), s))[0]
  keep(b, n, t, s) = bits(b, n, t, s) >= round(rate * 2**32)

where ``b`` is the index into the flattened leading batch dimensions and ``n``
the query head; with ``broadcast`` (Flax's ``broadcast_dropout``) ``b = n = 0``
everywhere, so one ``(T, S)`` mask is shared by every batch element and head.
No single random draw over a ``(..., N, T, S)`` array is made,
so the naive path, the blockwise path (whatever its block sizes) and a sharded
path drop exactly the same weights for the same rng. Kept weights are scaled by
``1 / (1 - rate)``, as in Flax and PyTorch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_fold_each = jax.vmap(jax.random.fold_in, in_axes=(None, 0))  # one key, many data


class Dropout(NamedTuple):
  """A validated dropout request: ``rate`` in ``(0, 1)`` and the rng it is keyed on."""

  rate: float
  rng: Array  # a typed PRNG key, shape ()
  broadcast: bool = False  # one mask shared over batch and heads


def check_dropout(
  rate: Any, rng: Any, deterministic: Any, broadcast: Any = False
) -> Dropout | None:
  """Validates the dropout options; None when nothing is dropped."""
  for name, flag in (("deterministic", deterministic), ("broadcast_dropout", broadcast)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {type(flag).__name__}.")
  if isinstance(rate, jax.core.Tracer):
    raise TypeError("dropout_rate must be a Python float (static), not a traced value.")
  if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.number)):
    raise TypeError(f"dropout_rate must be a float, got {rate!r}.")
  rate = float(rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}.")
  if rate == 0.0 or deterministic:
    return None
  if rng is None:
    raise ValueError(
      f"dropout_rate={rate} needs a dropout_rng (a jax.random.key), or deterministic=True."
    )
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.dtype != jnp.uint32 or rng.ndim != 1:
      raise TypeError(
        f"dropout_rng must be a PRNG key (jax.random.key), got dtype {rng.dtype} shape {rng.shape}."
      )
    rng = jax.random.wrap_key_data(rng)  # a legacy jax.random.PRNGKey
  if rng.shape != ():
    raise ValueError(f"dropout_rng must be a single key, got a key array of shape {rng.shape}.")
  return Dropout(rate, rng, bool(broadcast))


def head_keys(dropout: Dropout, batch: tuple[int, ...], num_heads: int) -> Array:
  """Keys of every (batch element, query head): ``(B, N)`` with ``B = prod(batch)``."""
  B = math.prod(batch)
  if dropout.broadcast:  # every (b, n) folds in (0, 0): one mask for all
    b, n = jnp.zeros(B, jnp.int32), jnp.zeros(num_heads, jnp.int32)
  else:
    b, n = jnp.arange(B), jnp.arange(num_heads)
  per_batch = _fold_each(dropout.rng, b)
  return jax.vmap(lambda key: _fold_each(key, n))(per_batch)


def row_keys(keys: Array, q_pos: Array) -> Array:
  """``keys (...)`` and query positions ``(T,)`` to the keys of each row: ``(..., T)``."""
  flat = keys.reshape(-1)
  rows = jax.vmap(lambda key: _fold_each(key, q_pos))(flat)
  return rows.reshape(*keys.shape, q_pos.shape[0])


def keep_mask(rows: Array, kv_pos: Array, rate: float) -> Array:
  """``rows (...)`` row keys and key positions ``(S,)`` to keep bits ``(..., S)``."""
  threshold = np.uint32(min(round(rate * 2**32), 2**32 - 1))

  def row(key):
    return jax.random.key_data(_fold_each(key, kv_pos))[..., 0] >= threshold

  flat = rows.reshape(-1)
  return jax.vmap(row)(flat).reshape(*rows.shape, kv_pos.shape[0])


def apply(dropout: Dropout, weights: Array, batch: tuple[int, ...]) -> Array:
  """Drops and rescales ``weights (..., N, T, S)`` (the naive path)."""
  N, T, S = weights.shape[-3:]
  keys = head_keys(dropout, batch, N)  # (B, N)
  keep = keep_mask(row_keys(keys, jnp.arange(T)), jnp.arange(S), dropout.rate)
  keep = keep.reshape(*batch, N, T, S)
  return jnp.where(keep, weights / (1.0 - dropout.rate), 0.0).astype(weights.dtype)
