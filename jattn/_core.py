"""Scaled dot-product attention on projected queries, keys and values.

The walkthrough's steps 4-7 as separate pure functions (scores, masked softmax,
weighted sum) and their composition, :func:`dot_product_attention`.

Shapes use the letters of ``jax.nn.dot_product_attention``:

  ...  any number of leading batch dimensions (possibly none)
  T    query length                S    key/value length
  N    query heads                 K    key/value heads (N % K == 0; K < N is
                                        grouped-query, K == 1 multi-query attention)
  H    query/key head size         D    value head size (may differ from H)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _masks
from jattn._masks import Alignment

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


def build_mask(
  dims: _Dims,
  *,
  mask: Any = None,
  is_causal: bool = False,
  local_window_size: Any = None,
  query_seq_lengths: Any = None,
  key_value_seq_lengths: Any = None,
  alignment: Alignment = "bottom_right",
) -> Array | None:
  """Combines every masking option into one boolean mask broadcastable to ``(..., N, T, S)``.

  Returns None when nothing is masked, so the unmasked path costs nothing extra.
  """
  is_causal = check_is_causal(is_causal)
  window = _masks.normalize_window(local_window_size)
  offset = _masks.query_offset(dims.T, dims.S, alignment)
  target = dims.weights_shape
  if mask is not None:
    mask = check_broadcast("mask", mask, target, boolean=True)
  q_lengths = check_lengths("query_seq_lengths", query_seq_lengths, dims.batch, dims.T)
  kv_lengths = check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.batch, dims.S)
  padding = None
  if q_lengths is not None or kv_lengths is not None:
    padding = _masks.padding_mask(kv_lengths, dims.S, q_lengths=q_lengths, q_len=dims.T)
  positions = _masks.position_mask(
    jnp.arange(dims.T) + offset, jnp.arange(dims.S), is_causal=is_causal, window=window
  )
  return _masks.combine_masks(mask, padding, positions)


def attention_scores(q: Array, k: Array, *, scale: Any = None, bias: Array | None = None) -> Array:
  """Step 4: every query dotted with every key (times ``scale``, plus ``bias``).

  Args:
    q: queries ``(..., T, N, H)``.
    k: keys ``(..., S, K, H)``; query head ``n`` uses key head ``n // (N // K)``.
    scale: multiplies the dot products; default ``1 / sqrt(H)``. The walkthrough
      uses ``1.0``.
    bias: optional additive bias broadcastable to ``(..., N, T, S)``.

  Returns:
    Scores ``(..., N, T, S)`` in float32 (or wider if the inputs are).

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> q = jnp.array([[[1., 0., 2.]]])                        # (T=1, N=1, H=3)
    >>> k = jnp.array([[[0., 1., 1.]], [[4., 4., 0.]], [[2., 3., 1.]]])  # (S=3, K=1, H=3)
    >>> jattn.attention_scores(q, k, scale=1.0)
    Array([[[2., 4., 4.]]], dtype=float32)
  """
  q, k = jnp.asarray(q), jnp.asarray(k)
  if (
    q.ndim < 3
    or k.ndim != q.ndim
    or q.shape[:-3] != k.shape[:-3]
    or q.shape[-1] != k.shape[-1]
    or 0 in q.shape
    or 0 in k.shape
    or q.shape[-2] % k.shape[-2]
  ):
    raise ValueError(
      "attention_scores expects query (..., T, N, H) and key (..., S, K, H) with the same "
      f"leading dims, non-empty, and N % K == 0; got {q.shape} and {k.shape}."
    )
  if q.dtype != k.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"query and key must share a floating dtype, got {q.dtype} and {k.dtype}.")
  *batch, T, N, H = q.shape
  S, K = k.shape[-3], k.shape[-2]
  scale = check_scale(scale, H)
  q_grouped = q.reshape(*batch, T, K, N // K, H)
  scores = jnp.einsum(
    "...TKGH,...SKH->...KGTS", q_grouped, k, preferred_element_type=compute_dtype(q.dtype)
  )
  scores = scores.reshape(*batch, N, T, S) * jnp.asarray(scale, scores.dtype)
  if bias is not None:
    bias = check_broadcast("bias", bias, scores.shape, boolean=False)
    scores = scores + jnp.broadcast_to(bias, scores.shape).astype(scores.dtype)
  return scores


def masked_softmax(logits: Array, mask: Array | None = None) -> Array:
  """Step 5: a softmax over the last axis that is safe under any mask.

  Computed in float32 at least, with the row maximum subtracted. Masked entries
  get exactly zero weight, and a row whose entries are *all* masked gets all-zero
  weights (not NaN, and not the uniform average that ``jax.nn`` returns), with
  finite (zero) gradients.

  Args:
    logits: ``(..., S)`` scores.
    mask: optional boolean, broadcastable to ``logits``; True = keep.

  Returns:
    Weights of the shape of ``logits`` in its compute dtype (float32 at least);
    each row sums to 1, or to 0 if fully masked.

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> [round(float(w), 4) for w in jattn.masked_softmax(jnp.array([2., 4., 4.]))]
    [0.0634, 0.4683, 0.4683]
    >>> jattn.masked_softmax(jnp.array([2., 4.]), jnp.array([False, False]))
    Array([0., 0.], dtype=float32)
  """
  logits = jnp.asarray(logits)
  logits = logits.astype(compute_dtype(logits.dtype))
  if mask is not None:
    mask = jnp.broadcast_to(check_broadcast("mask", mask, logits.shape, boolean=True), logits.shape)
    # A finite fill keeps max() finite on fully masked rows; exp() of the filled
    # entries is zeroed below, so they contribute neither value nor gradient.
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  # A row of -inf scores (e.g. from a -inf bias) would otherwise give inf - inf = NaN.
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  unnormalized = jnp.exp(logits - row_max)
  if mask is not None:
    unnormalized = jnp.where(mask, unnormalized, 0.0)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  return unnormalized / jnp.where(total > 0, total, 1.0)


def weighted_sum(weights: Array, v: Array) -> Array:
  """Steps 6-7: each query's output is its weights times the values, summed.

  Args:
    weights: ``(..., N, T, S)`` attention weights.
    v: values ``(..., S, K, D)``; query head ``n`` reads value head ``n // (N // K)``.

  Returns:
    ``(..., T, N, D)`` in the dtype of ``v`` (accumulated in float32 at least).

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> w = jnp.array([[[0., .5, .5]]])                       # (N=1, T=1, S=3)
    >>> v = jnp.array([[[1., 2., 3.]], [[2., 8., 0.]], [[2., 6., 3.]]])  # (S=3, K=1, D=3)
    >>> jattn.weighted_sum(w, v)
    Array([[[2. , 7. , 1.5]]], dtype=float32)
  """
  weights, v = jnp.asarray(weights), jnp.asarray(v)
  if (
    weights.ndim < 3
    or v.ndim != weights.ndim
    or weights.shape[:-3] != v.shape[:-3]
    or weights.shape[-1] != v.shape[-3]
    or 0 in weights.shape
    or 0 in v.shape
    or weights.shape[-3] % v.shape[-2]
  ):
    raise ValueError(
      "weighted_sum expects weights (..., N, T, S) and values (..., S, K, D) with the same "
      f"leading dims, non-empty, and N % K == 0; got {weights.shape} and {v.shape}."
    )
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(f"values must be floating point, got dtype {v.dtype}.")
  *batch, N, T, S = weights.shape
  K, D = v.shape[-2:]
  grouped = weights.reshape(*batch, K, N // K, T, S).astype(v.dtype)
  out = jnp.einsum(
    "...KGTS,...SKD->...TKGD", grouped, v, preferred_element_type=compute_dtype(v.dtype)
  )
  return out.reshape(*batch, T, N, D).astype(v.dtype)


class Steps(NamedTuple):
  """The intermediates of one attention pass (see :func:`attention_steps`)."""

  scores: Array  # (..., N, T, S) scaled scores plus bias, before masking
  mask: Array | None  # boolean, broadcastable to (..., N, T, S); None = nothing masked
  weights: Array  # (..., N, T, S) softmax weights, float32 at least
  output: Array  # (..., T, N, D) in the inputs' dtype


def attention_steps(
  query: Array,
  key: Array,
  value: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: Alignment = "bottom_right",
) -> Steps:
  """Validates the inputs and runs steps 4-7, keeping every intermediate.

  Arguments as in :func:`dot_product_attention`. Under ``jit``, intermediates
  that the caller drops are never computed.
  """
  query, key, value, dims = check_qkv(query, key, value)
  combined = build_mask(
    dims,
    mask=mask,
    is_causal=is_causal,
    local_window_size=local_window_size,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    alignment=alignment,
  )
  scores = attention_scores(query, key, scale=scale, bias=bias)
  weights = masked_softmax(scores, combined)
  return Steps(scores, combined, weights, weighted_sum(weights, value))


def dot_product_attention(
  query: Array,
  key: Array,
  value: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: Alignment = "bottom_right",
  return_weights: bool = False,
) -> Array | tuple[Array, Array]:
  """Scaled dot-product attention: ``softmax(scale * q k^T + bias, masked) v``.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)`` with ``N % K == 0`` (``K < N``: grouped-query attention).
    value: ``(..., S, K, D)``; ``D`` may differ from ``H``.
    bias: optional float bias added to the scores, broadcastable to ``(..., N, T, S)``;
      finite or ``-inf`` (``+inf`` has no meaning as a score).
    mask: optional boolean mask broadcastable to ``(..., N, T, S)``; True = attend.
    scale: multiplies ``q . k``; default ``1 / sqrt(H)``; ``1.0`` reproduces the
      walkthrough, which does not scale.
    is_causal: a query attends only keys at or before its position.
    local_window_size: ``(left, right)`` or an int: a query at position ``p``
      attends only keys in ``[p - left, p + right]``.
    query_seq_lengths: optional ``(...)`` ints; queries at or beyond the length
      are padding and get zero output.
    key_value_seq_lengths: optional ``(...)`` ints; keys at or beyond the length
      are padding and are never attended.
    alignment: where the queries sit among the keys for ``is_causal`` and
      ``local_window_size`` when ``T != S``: ``"bottom_right"`` (default; query
      ``i`` is position ``i + S - T``, as in decoding with a cache) or
      ``"top_left"`` (query ``i`` is position ``i``, as in ``jax.nn``). It uses the
      padded lengths ``T`` and ``S``, not ``query_seq_lengths``/``key_value_seq_lengths``.
    return_weights: also return the attention weights.

  Returns:
    The output ``(..., T, N, D)`` in the inputs' dtype; with ``return_weights``,
    the pair ``(output, weights)`` with weights ``(..., N, T, S)``. A query whose
    keys are all masked gets zero output and zero weights.

  Raises:
    ValueError: if shapes do not fit together (named in the message).
    TypeError: if dtypes are wrong (e.g. a non-boolean mask).

  Examples:
    >>> import jax, jattn
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # (B, T, N, H)
    >>> jattn.dot_product_attention(q, k, v, is_causal=True).shape
    (2, 5, 4, 8)
  """
  steps = attention_steps(
    query,
    key,
    value,
    bias=bias,
    mask=mask,
    scale=scale,
    is_causal=is_causal,
    local_window_size=local_window_size,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    alignment=alignment,
  )
  if return_weights:
    return steps.output, steps.weights.astype(steps.output.dtype)
  return steps.output
