"""The naive path: the walkthrough's steps 4-7 on the whole ``(..., N, T, S)`` score matrix.

Steps as separate pure functions (scores, masked softmax, weighted sum), and
:func:`run`, the backend that composes them for a checked :class:`jattn._spec.Call`
(the only path that can return the full weights; the reference for the others).

Shapes use the letters of :mod:`jattn._dot_product` (those of ``jax.nn``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _dropout, _masks
from jattn._spec import (
  Array,
  Call,
  check_broadcast,
  check_scale,
  compute_dtype,
  modify_scores,
  sink_logits,
)


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
  scores = scaled_scores(q, k, check_scale(scale, q.shape[-1]))
  if bias is not None:
    bias = check_broadcast("bias", bias, scores.shape, boolean=False)
    scores = scores + jnp.broadcast_to(bias, scores.shape).astype(scores.dtype)
  return scores


def scaled_scores(q: Array, k: Array, scale: Any) -> Array:
  """``scale * q . k`` ``(..., N, T, S)`` of checked ``q (..., T, N, H)``, ``k (..., S, K, H)``."""
  *batch, T, N, H = q.shape
  S, K = k.shape[-3], k.shape[-2]
  q_grouped = q.reshape(*batch, T, K, N // K, H)
  scores = jnp.einsum(
    "...TKGH,...SKH->...KGTS", q_grouped, k, preferred_element_type=compute_dtype(q.dtype)
  )
  return scores.reshape(*batch, N, T, S) * jnp.asarray(scale, scores.dtype)


def masked_softmax(logits: Array, mask: Array | None = None) -> Array:
  """Step 5: a softmax over the last axis that is safe under any mask.

  Computed in float32 at least, with the row maximum subtracted. Masked entries
  get exactly zero weight, and a row whose entries are *all* masked gets all-zero
  weights (not NaN, and not the uniform average that ``jax.nn`` returns), with
  finite (zero) gradients. A NaN (or ``+inf``) among a row's unmasked logits
  makes the whole row NaN; a NaN under the mask is masked like any other entry.

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
  unnormalized, _, total = _softmax_parts(logits, mask)
  # Only an all-masked row (total exactly 0) is guarded: a NaN total stays NaN.
  return unnormalized / jnp.where(total == 0, 1.0, total)


def masked_logsumexp(logits: Array, mask: Array | None = None) -> Array:
  """``log(sum(exp(logits)))`` over the unmasked entries of the last axis; ``-inf`` if none.

  Args:
    logits: ``(..., S)`` scores.
    mask: optional boolean, broadcastable to ``logits``; True = keep.

  Returns:
    ``(...)`` in float32 at least, with finite gradients even for fully masked rows.
  """
  _, row_max, total = _softmax_parts(logits, mask)
  attended = total[..., 0] != 0  # NaN counts as attended, so it propagates
  safe_total = jnp.where(attended, total[..., 0], 1.0)
  return jnp.where(attended, row_max[..., 0] + jnp.log(safe_total), -jnp.inf)


def _softmax_parts(logits: Array, mask: Array | None) -> tuple[Array, Array, Array]:
  """``exp(logits - row_max)`` (zero where masked), the row max and the row sums."""
  logits = jnp.asarray(logits)
  logits = logits.astype(compute_dtype(logits.dtype))
  if mask is not None:
    mask = jnp.broadcast_to(check_broadcast("mask", mask, logits.shape, boolean=True), logits.shape)
    # A finite fill keeps max() finite on fully masked rows; exp() of the filled
    # entries is zeroed below, so they contribute neither value nor gradient.
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  # A row of -inf scores (e.g. from a -inf bias) would otherwise give inf - inf = NaN.
  # Only -inf is replaced: a NaN (or +inf) maximum must make the row NaN, not
  # leave it unnormalised.
  row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)
  unnormalized = jnp.exp(logits - row_max)
  if mask is not None:
    unnormalized = jnp.where(mask, unnormalized, 0.0)
  return unnormalized, row_max, jnp.sum(unnormalized, axis=-1, keepdims=True)


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
  return _weighted_sum(weights, v)


def _weighted_sum(weights: Array, v: Array) -> Array:
  *batch, N, T, S = weights.shape
  K, D = v.shape[-2:]
  grouped = weights.reshape(*batch, K, N // K, T, S).astype(v.dtype)
  out = jnp.einsum(
    "...KGTS,...SKD->...TKGD", grouped, v, preferred_element_type=compute_dtype(v.dtype)
  )
  return out.reshape(*batch, T, N, D).astype(v.dtype)


class Steps(NamedTuple):
  """The intermediates of one attention pass (see :func:`run`)."""

  scores: Array  # (..., N, T, S) scaled scores plus bias (and score_mod), before masking
  mask: Array | None  # boolean, broadcastable to (..., N, T, S); None = nothing masked
  weights: Array  # (..., N, T, S) softmax weights, float32 at least
  output: Array  # (..., T, N, D) in the inputs' dtype


def _full_rank(x: Array, rank: int) -> Array:
  return x.reshape((1,) * (rank - x.ndim) + x.shape)


def indices(call: Call, q_index: Array | None = None) -> tuple[Array, Array, Array, Array]:
  """Global ``b, h, q_idx, kv_idx`` of every score, full rank, broadcast to ``(..., N, T', S)``."""
  batch, T, S, N = call.dims.batch, call.dims.T, call.dims.S, call.dims.N
  m, rank = call.mask, len(batch) + 3
  q_idx = (jnp.arange(T, dtype=jnp.int32) if q_index is None else q_index) + m.q_start
  b = jnp.arange(math.prod(batch), dtype=jnp.int32).reshape(batch) + m.b_start
  return (
    b.reshape(*batch, 1, 1, 1),
    _full_rank((jnp.arange(N, dtype=jnp.int32) + m.h_start)[:, None, None], rank),
    _full_rank(q_idx[:, None], rank),
    _full_rank(jnp.arange(S, dtype=jnp.int32)[None, :] + m.kv_start, rank),
  )


def scores_and_mask(call: Call, q_index: Array | None = None) -> tuple[Array, Array | None]:
  """Scores ``(..., N, T', S)`` (scaled, biased, modded) and their visibility mask, or None.

  ``q_index`` (``(T',)`` ints) keeps only those queries.
  """
  dims, m = call.dims, call.mask
  q, bias, dense = call.q, call.bias, m.dense
  rank = len(dims.batch) + 3

  def per_query(x):  # (..., T) -> (..., 1, T', 1)
    x = x if q_index is None else jnp.take(x, q_index, axis=-1)
    return x[..., None, :, None]

  def per_key(x):  # (..., S) -> (..., 1, 1, S)
    return x[..., None, None, :]

  def each(f, x):
    return None if x is None else f(x)

  if q_index is not None:
    q = jnp.take(q, q_index, axis=-3)
    take = lambda x: x if x.shape[-2] == 1 else jnp.take(x, q_index, axis=-2)  # noqa: E731
    bias = None if bias is None else take(_full_rank(bias, rank))
    dense = None if dense is None else take(_full_rank(dense, rank))
  scores = scaled_scores(q, call.k, call.scale)
  if bias is not None:
    scores = scores + jnp.broadcast_to(bias, scores.shape).astype(scores.dtype)
  b, h, q_idx, kv_idx = indices(call, q_index)
  lengths = [
    None if x is None else x.reshape(*x.shape, 1, 1, 1) for x in (m.q_lengths, m.kv_lengths)
  ]
  rows_q = _masks.Rows(lengths[0], each(per_query, m.q_segments), each(per_query, m.q_positions))
  rows_kv = _masks.Rows(lengths[1], each(per_key, m.kv_segments), each(per_key, m.kv_positions))
  slopes = None
  if call.slopes is not None:
    slopes = _full_rank(call.slopes, rank - 2)[..., None, None]  # (..., N, 1, 1)
  q_pos, kv_pos = _masks.positions(m, q_idx, kv_idx, rows_q, rows_kv)
  scores = modify_scores(
    scores,
    slopes=slopes,
    distance=None if slopes is None else jnp.abs(q_pos - kv_pos),
    score_mod=call.score_mod,
    mod_args=(b, h, q_idx, kv_idx),
    soft_cap=call.soft_cap,
  )
  mask = _masks.visible(
    m,
    b,
    h,
    q_idx,
    kv_idx,
    q=rows_q,
    kv=rows_kv,
    dense=None if dense is None else _full_rank(dense, rank),
  )
  return scores, mask


def sink_share(call: Call, scores: Array, mask: Array | None) -> Array | None:
  """``(..., N, T, 1)``: the share of each row's weight left by the sinks, or None."""
  if call.sinks is None:
    return None
  lse = masked_logsumexp(scores, mask)
  return jax.nn.sigmoid(lse - sink_logits(call.sinks, lse))[..., None]


def run(call: Call) -> Steps:
  """Runs steps 4-7 of a checked call on the whole score matrix, keeping every intermediate.

  Under ``jit``, intermediates that the caller drops are never computed. With
  dropout, ``weights`` are the weights applied: dropped and rescaled.
  """
  scores, mask = scores_and_mask(call)
  weights = masked_softmax(scores, mask)
  share = sink_share(call, scores, mask)
  if share is not None:
    weights = weights * share
  if call.dropout is not None:
    weights = _dropout.apply(call.dropout, weights, call.dims.batch)
  return Steps(scores, mask, weights, _weighted_sum(weights, call.v))
