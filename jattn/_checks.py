"""Validation shared by every attention path: trace-time shape and dtype checks.

Letters as in :mod:`jattn._core`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def compute_dtype(dtype) -> np.dtype:
  """The dtype scores and softmax are computed in: float32 at least."""
  return jnp.promote_types(dtype, jnp.float32)


class _Dims(NamedTuple):
  batch: tuple[int, ...]
  T: int
  S: int
  N: int
  K: int
  H: int
  D: int

  @property
  def weights_shape(self) -> tuple[int, ...]:
    return (*self.batch, self.N, self.T, self.S)


def check_qkv(q: Any, k: Any, v: Any) -> tuple[Array, Array, Array, _Dims]:
  """Validates the layouts ``q (..., T, N, H)``, ``k (..., S, K, H)``, ``v (..., S, K, D)``."""
  q, k, v = (jnp.asarray(a) for a in (q, k, v))
  for name, a in (("query", q), ("key", k), ("value", v)):
    if a.ndim < 3:
      raise ValueError(
        f"{name} must have rank >= 3, laid out (..., seq, heads, head_dim); got shape {a.shape}."
      )
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {a.dtype}.")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(
      f"query, key and value must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}."
    )
  if not q.ndim == k.ndim == v.ndim:
    raise ValueError(
      "query, key and value must have the same rank (..., seq, heads, head_dim); "
      f"got shapes {q.shape}, {k.shape} and {v.shape}."
    )
  if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
    raise ValueError(
      "query, key and value must have the same leading batch dimensions; "
      f"got shapes {q.shape}, {k.shape} and {v.shape}."
    )
  if 0 in q.shape or 0 in k.shape or 0 in v.shape:
    raise ValueError(
      f"query, key and value must not have empty dimensions; got {q.shape}, {k.shape}, {v.shape}."
    )
  *batch, T, N, H = q.shape
  S, K, Hk = k.shape[-3:]
  Sv, Kv, D = v.shape[-3:]
  if H != Hk:
    raise ValueError(
      f"query and key head sizes must match (they are dotted): query {q.shape} has {H}, "
      f"key {k.shape} has {Hk}."
    )
  if S != Sv:
    raise ValueError(
      f"key and value must have the same length: key {k.shape} has {S}, value {v.shape} has {Sv}."
    )
  if K != Kv:
    raise ValueError(
      f"key and value must have the same number of heads: key {k.shape} has {K}, "
      f"value {v.shape} has {Kv}."
    )
  if N % K:
    raise ValueError(
      f"query heads ({N}, query {q.shape}) must be a multiple of key/value heads "
      f"({K}, key {k.shape})."
    )
  return q, k, v, _Dims(tuple(batch), T, S, N, K, H, D)


def check_broadcast(name: str, x: Any, target: tuple[int, ...], *, boolean: bool) -> Array:
  """Checks that ``x`` broadcasts to ``target`` (and does not enlarge it)."""
  x = jnp.asarray(x)
  if boolean and x.dtype != jnp.bool_:
    raise TypeError(
      f"{name} must be boolean (True = attend), got dtype {x.dtype}; "
      f"use e.g. `{name} != 0` or the jattn mask helpers."
    )
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
  try:
    ok = np.broadcast_shapes(x.shape, target) == tuple(target)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
      f"{name} of shape {x.shape} does not broadcast to the attention weights' shape "
      f"{tuple(target)} (..., heads, q_len, kv_len)."
    )
  return x


def check_scale(scale: Any, head_dim: int) -> Any:
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if np.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar, got shape {np.shape(scale)}.")
  return scale


def check_is_causal(is_causal: Any) -> bool:
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be a Python bool, got {is_causal!r}.")
  return bool(is_causal)


def check_lengths(name: str, lengths: Any, batch: tuple[int, ...], size: int) -> Array | None:
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}.")
  if lengths.shape != batch:
    raise ValueError(
      f"{name} must have the batch shape {batch} of the inputs, got shape {lengths.shape}."
    )
  return lengths
