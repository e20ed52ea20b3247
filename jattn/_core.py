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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _blockwise, _dropout, _masks, _ring
from jattn._checks import (
  Array,
  _Dims,
  check_broadcast,
  check_is_causal,
  check_lengths,
  check_qkv,
  check_scale,
  compute_dtype,
)
from jattn._masks import Alignment


def build_mask(
  dims: _Dims,
  *,
  mask: Any = None,
  is_causal: bool = False,
  local_window_size: Any = None,
  query_seq_lengths: Any = None,
  key_value_seq_lengths: Any = None,
  alignment: Alignment = "bottom_right",
  q_index: Array | None = None,
) -> Array | None:
  """Combines every masking option into one boolean mask broadcastable to ``(..., N, T, S)``.

  With ``q_index`` (``(T',)`` integer query indices) the mask covers only those
  queries: ``(..., N, T', S)``. Returns None when nothing is masked, so the
  unmasked path costs nothing extra.
  """
  is_causal = check_is_causal(is_causal)
  window = _masks.normalize_window(local_window_size)
  offset = _masks.query_offset(dims.T, dims.S, alignment)
  if mask is not None:
    mask = check_broadcast("mask", mask, dims.weights_shape, boolean=True)
    if q_index is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
      mask = jnp.take(mask, q_index, axis=-2)
  q_lengths = check_lengths("query_seq_lengths", query_seq_lengths, dims.batch, dims.T)
  kv_lengths = check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.batch, dims.S)
  q_index = jnp.arange(dims.T) if q_index is None else q_index
  padding = []
  if kv_lengths is not None:
    padding.append(_masks.length_mask(kv_lengths, dims.S)[..., None, None, :])  # (..., 1, 1, S)
  if q_lengths is not None:
    q_index_b = q_index.reshape((1,) * q_lengths.ndim + q_index.shape)
    q_valid = q_index_b < q_lengths.astype(jnp.int32)[..., None]  # (..., T)
    padding.append(q_valid[..., None, :, None])  # (..., 1, T, 1)
  positions = _masks.position_mask(
    q_index + offset, jnp.arange(dims.S), is_causal=is_causal, window=window
  )
  return _masks.combine_masks(mask, *padding, positions)


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
  unnormalized, _, total = _softmax_parts(logits, mask)
  return unnormalized / jnp.where(total > 0, total, 1.0)


def masked_logsumexp(logits: Array, mask: Array | None = None) -> Array:
  """``log(sum(exp(logits)))`` over the unmasked entries of the last axis; ``-inf`` if none.

  Args:
    logits: ``(..., S)`` scores.
    mask: optional boolean, broadcastable to ``logits``; True = keep.

  Returns:
    ``(...)`` in float32 at least, with finite gradients even for fully masked rows.
  """
  _, row_max, total = _softmax_parts(logits, mask)
  attended = total[..., 0] > 0
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
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
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
  dropout_rate: float = 0.0,
  dropout_rng: Array | None = None,
  deterministic: bool = False,
) -> Steps:
  """Validates the inputs and runs steps 4-7, keeping every intermediate.

  Arguments as in :func:`dot_product_attention`. Under ``jit``, intermediates
  that the caller drops are never computed. With dropout, ``weights`` are the
  weights applied: dropped and rescaled.
  """
  dropout = _dropout.check_dropout(dropout_rate, dropout_rng, deterministic)
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
  if dropout is not None:
    weights = _dropout.apply(dropout, weights, dims.batch)
  return Steps(scores, combined, weights, weighted_sum(weights, value))


IMPLEMENTATIONS = ("auto", "naive", "blockwise")
# "auto" switches to the blockwise path from this many scores per head and batch
# element (T * S) up: measured faster on CPU from 256 x 256 (benchmarks/README.md).
AUTO_BLOCKWISE_MIN_SCORES = 256 * 256


def choose_implementation(implementation: str, dims: _Dims, return_weights: bool) -> str:
  """Resolves ``implementation="auto"`` and rejects impossible combinations."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation == "auto":
    big = dims.T * dims.S >= AUTO_BLOCKWISE_MIN_SCORES
    return "blockwise" if big and not return_weights else "naive"
  if implementation == "blockwise" and return_weights:
    raise ValueError(
      "implementation='blockwise' never materialises the (T, S) weights; use "
      "implementation='naive' for return_weights, or jattn.attention_weights for a slice "
      "of queries and jattn.attention_stats for per-query statistics."
    )
  return implementation


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
  implementation: str | _ring.Ring = "auto",
  block_q: int | None = None,
  block_kv: int | None = None,
  dropout_rate: float = 0.0,
  dropout_rng: Array | None = None,
  deterministic: bool = False,
  return_weights: bool = False,
  return_lse: bool = False,
) -> Array | tuple[Array, ...]:
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
    implementation: ``"naive"`` materialises the ``(..., N, T, S)`` scores (the
      only path that can return them); ``"blockwise"`` streams blocks of keys
      with an online softmax in O(T + S) memory, differentiable in forward and
      reverse mode; ``"auto"`` (default) takes blockwise when ``T * S`` is large
      and the weights are not requested; a :class:`jattn.Ring` runs
      :func:`jattn.ring_attention` with the sequence sharded over a mesh axis.
    block_q: query block size of the blockwise path (default: 16 to 256).
    block_kv: key/value block size of the blockwise path (default: all keys up
      to 32768).
    dropout_rate: probability of dropping each attention weight (kept weights
      are scaled by ``1 / (1 - rate)``); a static float in ``[0, 1)``.
    dropout_rng: the PRNG key dropout is drawn from; required when
      ``dropout_rate > 0`` and not ``deterministic``. Each keep bit depends only
      on this key and the (batch, head, query, key) position, so every
      implementation and block size drops the same weights.
    deterministic: turn dropout off (evaluation).
    return_weights: also return the attention weights, as applied (after
      dropout), naive path only.
    return_lse: also return the log-sum-exp of each query's scores, ``-inf`` for
      a query that attends nothing (to combine partial attentions).

  Returns:
    The output ``(..., T, N, D)`` in the inputs' dtype, or a tuple of it with the
    weights ``(..., N, T, S)`` if ``return_weights`` and the log-sum-exp
    ``(..., N, T)`` (float32 at least) if ``return_lse``, in that order. A query
    whose keys are all masked gets zero output and zero weights.

  Raises:
    ValueError: if shapes do not fit together (named in the message).
    TypeError: if dtypes are wrong (e.g. a non-boolean mask).

  Examples:
    >>> import jax, jattn
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # (B, T, N, H)
    >>> jattn.dot_product_attention(q, k, v, is_causal=True).shape
    (2, 5, 4, 8)
    >>> out, lse = jattn.dot_product_attention(q, k, v, implementation="blockwise",
    ...                                        block_kv=2, return_lse=True)
    >>> lse.shape
    (2, 4, 5)
  """
  query, key, value, dims = check_qkv(query, key, value)
  options = dict(
    bias=bias,
    mask=mask,
    scale=scale,
    is_causal=is_causal,
    local_window_size=local_window_size,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    alignment=alignment,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
  )
  if isinstance(implementation, _ring.Ring):
    given = [n for n, x in (("mask", mask), ("bias", bias)) if x is not None]
    given += ["return_weights"] if return_weights else []
    given += ["dropout"] if dropout_rate and not deterministic else []
    if given:
      raise ValueError(
        f"ring attention does not support {given}: (T, S)-sized masks, biases and weights are "
        "what sequence parallelism avoids; use lengths, is_causal and local_window_size."
      )
    unused = ("bias", "mask", "dropout_rate", "dropout_rng", "deterministic")  # checked above
    ring_options = {n: x for n, x in options.items() if n not in unused}
    return _ring.ring_attention(
      query,
      key,
      value,
      **implementation._asdict(),
      **ring_options,
      block_q=block_q,
      block_kv=block_kv,
      return_lse=return_lse,
    )
  if choose_implementation(implementation, dims, return_weights) == "blockwise":
    return _blockwise.blockwise_attention(
      query, key, value, **options, block_q=block_q, block_kv=block_kv, return_lse=return_lse
    )
  steps = attention_steps(query, key, value, **options)
  results = [steps.output]
  if return_weights:
    results.append(steps.weights.astype(steps.output.dtype))
  if return_lse:
    results.append(masked_logsumexp(steps.scores, steps.mask))
  return results[0] if len(results) == 1 else tuple(results)


def attention_weights(
  query: Array,
  key: Array,
  *,
  queries: slice | Array = slice(None),
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: Alignment = "bottom_right",
) -> Array:
  """The exact attention weights of a chosen slice of queries, in O(T' * S) memory.

  At lengths where the full ``(T, S)`` map cannot exist, look at the rows you
  care about: the masks and positions are those of the full problem.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)``.
    queries: a ``slice`` of the ``T`` queries or ``(T',)`` integer indices.
    bias, mask, scale, is_causal, local_window_size, query_seq_lengths,
      key_value_seq_lengths, alignment: as in :func:`dot_product_attention`,
      for the full ``(..., N, T, S)`` problem.

  Returns:
    Weights ``(..., N, T', S)`` in float32 at least.

  Examples:
    >>> import jax, jattn
    >>> q = k = jax.random.normal(jax.random.key(0), (1000, 2, 8))
    >>> w = jattn.attention_weights(q, k, queries=slice(-3, None), is_causal=True)
    >>> w.shape, bool((w[:, -1, -1] > 0).all()), bool((w[:, 0, -2:] == 0).all())
    ((2, 3, 1000), True, True)
  """
  query, key = jnp.asarray(query), jnp.asarray(key)
  # The values do not enter the weights: validate with a one-wide stand-in.
  stand_in = jax.ShapeDtypeStruct((*key.shape[:-1], 1), key.dtype)
  _, _, _, dims = check_qkv(query, key, jnp.zeros(stand_in.shape, stand_in.dtype))
  if isinstance(queries, slice):
    index = jnp.arange(dims.T)[queries]
  else:
    index = jnp.asarray(queries)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
      raise TypeError(f"queries must be a slice or 1-D integer indices, got {index.shape}.")
  if index.shape[0] == 0:
    raise ValueError(f"queries {queries!r} selects none of the {dims.T} queries.")
  combined = build_mask(
    dims,
    mask=mask,
    is_causal=is_causal,
    local_window_size=local_window_size,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    alignment=alignment,
    q_index=index,
  )
  if bias is not None:
    bias = check_broadcast("bias", bias, dims.weights_shape, boolean=False)
    if bias.ndim >= 2 and bias.shape[-2] != 1:
      bias = jnp.take(bias, index, axis=-2)
  scores = attention_scores(jnp.take(query, index, axis=-3), key, scale=scale, bias=bias)
  return masked_softmax(scores, combined)
