"""The public entry points on projected queries, keys and values, and the dispatch to backends.

Each function checks its options once (:func:`jattn._spec.describe`) and hands the
checked :class:`jattn._spec.Call` to the naive (:mod:`jattn._naive`), blockwise
(:mod:`jattn._blockwise`) or ring (:mod:`jattn._ring`) backend.

Shapes use the letters of ``jax.nn.dot_product_attention``:

  ...  any number of leading batch dimensions (possibly none)
  T    query length                S    key/value length
  N    query heads                 K    key/value heads (N % K == 0; K < N is
                                        grouped-query, K == 1 multi-query attention)
  H    query/key head size         D    value head size (may differ from H)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _blockwise, _naive, _ring, _spec
from jattn._spec import Array


def dot_product_attention(
  query: Array, key: Array, value: Array, **options: Any
) -> Array | tuple[Array, ...]:
  """Scaled dot-product attention: ``softmax(mod(scale * q k^T + bias), masked) v``.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)`` with ``N % K == 0`` (``K < N``: grouped-query attention).
    value: ``(..., S, K, D)``; ``D`` may differ from ``H``.
    **options: keyword options (the same for every attention function of jattn):

      - ``bias``: float bias added to the scores, broadcastable to ``(..., N, T, S)``;
        finite or ``-inf``.
      - ``mask``: boolean mask broadcastable to ``(..., N, T, S)``; True = attend.
      - ``scale``: multiplies ``q . k``; default ``1 / sqrt(H)``; ``1.0``
        reproduces the walkthrough, which does not scale. May be traced.
      - ``is_causal``: a query attends only keys at or before its position.
      - ``local_window_size``: ``(left, right)`` or an int: a query at position
        ``p`` attends only keys in ``[p - left, p + right]``.
      - ``query_seq_lengths``: ``(...)`` ints; queries at or beyond the length are
        padding and get zero output.
      - ``key_value_seq_lengths``: ``(...)`` ints; keys at or beyond the length are
        never attended.
      - ``alignment``: where the queries sit among the keys for ``is_causal`` and
        windows when ``T != S``: ``"bottom_right"`` (default; query ``i`` is at
        position ``i + S - T``, as in decoding with a cache) or ``"top_left"``
        (query ``i`` at position ``i``, as in ``jax.nn``).
      - ``mask_mod``: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend),
        written for scalars: ``b`` the batch index (row-major over ``...``),
        ``h`` the query head, ``q_idx``/``kv_idx`` the query and key indices.
        Traced, so it may close over arrays (document ids, ...) under ``jit``.
      - ``score_mod``: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied
        to the scaled, biased score before masking; gradients flow into the
        arrays it closes over, in every AD mode.
      - ``block_mask``: a :class:`jattn.BlockMask` from :func:`jattn.block_mask`
        for the same ``mask_mod``: the blockwise path skips the tiles it hides.
      - ``q_segment_ids`` ``(..., T)``, ``kv_segment_ids`` ``(..., S)``: integer
        document ids of packed sequences; a query attends only keys of its own
        segment (with ``is_causal``, causally within it). Tiles whose id
        ranges cannot meet are skipped. With ``T == S`` one of them serves both.
      - ``q_positions`` ``(..., T)``, ``kv_positions`` ``(..., S)``: integer
        positions that replace the index (and ``alignment``) for ``is_causal``,
        windows, chunks and ALiBi, e.g. restarting at each document. Any order
        is allowed: causal means "key position <= query position", element by
        element (tiles are skipped from per-tile ranges, best when sorted).
      - ``attention_chunk_size``: ``C``: a query attends only keys in its own
        chunk of ``C`` positions (``position // C`` equal); with ``is_causal``,
        Llama 4's chunked causal attention.
      - ``alibi_slopes``: ``(N,)`` or ``(..., N)`` floats: ALiBi adds
        ``-slope * |q_pos - kv_pos|`` to the scores (under ``is_causal`` the
        usual one-sided form); :func:`jattn.alibi_slopes` gives the paper's.
      - ``logits_soft_cap``: ``c > 0``: scores become ``c * tanh(s / c)`` (Gemma 2),
        applied last, after bias, ALiBi and ``score_mod``, before masking.
      - ``sinks``: ``(N,)`` float logits, one per query head: each row's softmax
        denominator gets ``exp(sink)``, a key with no value (gpt-oss), so a
        query may attend "nothing". Differentiable; the returned log-sum-exp
        includes it.
      - ``implementation``: ``"naive"`` materialises the ``(..., N, T, S)`` scores
        (the only path that can return them); ``"blockwise"`` streams tiles
        with an online softmax in O(T + S) memory, differentiable in forward
        and reverse mode; ``"auto"`` (default) takes blockwise from 256 x 256
        scores when the weights are not requested; a :class:`jattn.Ring` runs
        :func:`jattn.ring_attention`.
      - ``block_q``, ``block_kv``: tile sizes of the blockwise path (defaults
        depend on ``T``, ``S`` and on whether the mask can hide whole tiles).
      - ``dropout_rate``, ``dropout_rng``, ``deterministic``: drop each weight
        with probability ``dropout_rate`` (kept ones scaled by
        ``1 / (1 - rate)``), keyed by the rng and the (batch, head, query, key)
        position only, so every implementation drops the same weights.
      - ``broadcast_dropout``: True draws one ``(T, S)`` keep mask shared by
        every batch element and head (Flax's ``broadcast_dropout``; its modules'
        default); False (default) drops each weight independently.
      - ``return_weights``: also return the weights as applied (naive path).
      - ``return_lse``: also return the log-sum-exp of each query's scores,
        ``-inf`` for a query that attends nothing.

  Returns:
    The output ``(..., T, N, D)`` in the inputs' dtype, or a tuple of it with the
    weights ``(..., N, T, S)`` if ``return_weights`` and the log-sum-exp
    ``(..., N, T)`` (float32 at least) if ``return_lse``, in that order. A query
    whose keys are all masked gets zero output and zero weights.

  Raises:
    ValueError: if shapes do not fit together (named in the message).
    TypeError: if dtypes or option types are wrong (e.g. a non-boolean mask, a
      ``mask_mod`` that returns floats, an unknown option).

  Examples:
    >>> import jax, jax.numpy as jnp, jattn
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # (B, T, N, H)
    >>> jattn.dot_product_attention(q, k, v, is_causal=True).shape
    (2, 5, 4, 8)
    >>> out, lse = jattn.dot_product_attention(q, k, v, implementation="blockwise",
    ...                                        block_kv=2, return_lse=True)
    >>> lse.shape
    (2, 4, 5)

    A relative-position bias table, captured by a ``score_mod``, with a causal
    ``mask_mod``:

    >>> table = jnp.linspace(0.0, 1.0, 9)  # one bias per distance -4..4
    >>> rel = lambda s, b, h, q_idx, kv_idx: s + table[q_idx - kv_idx + 4]
    >>> causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
    >>> out = jattn.dot_product_attention(q, k, v, score_mod=rel, mask_mod=causal)
    >>> bool(jnp.allclose(out, jattn.dot_product_attention(
    ...     q, k, v, bias=table[jnp.arange(5)[:, None] - jnp.arange(5)[None] + 4], is_causal=True),
    ...     atol=1e-6))
    True

    The table is an array like any other: train it with Optax.

    >>> import optax
    >>> def loss(table):
    ...   mod = lambda s, b, h, q_idx, kv_idx: s + table[q_idx - kv_idx + 4]
    ...   return jnp.sum(jattn.dot_product_attention(q, k, v, score_mod=mod) ** 2)
    >>> optimizer = optax.sgd(0.05)
    >>> trained, state = table, optimizer.init(table)
    >>> for _ in range(5):
    ...   updates, state = optimizer.update(jax.grad(loss)(trained), state)
    ...   trained = optax.apply_updates(trained, updates)
    >>> bool(loss(trained) < loss(table))
    True

    Packed documents (two of 3 and 2 tokens), ALiBi, soft-capping and sinks:

    >>> docs = jnp.array([0, 0, 0, 1, 1])
    >>> out = jattn.dot_product_attention(
    ...     q, k, v, is_causal=True, q_segment_ids=docs, alibi_slopes=jattn.alibi_slopes(4),
    ...     logits_soft_cap=30.0, sinks=jnp.zeros(4))
    >>> out.shape
    (2, 5, 4, 8)
  """
  call = _spec.describe(query, key, value, _spec.options("dot_product_attention", options))
  return run(call)


def run(call: _spec.Call) -> Array | tuple[Array, ...]:
  """Runs a checked call on the backend it names; results as :func:`dot_product_attention`."""
  if isinstance(call.implementation, _ring.Ring):
    return _ring.run(call)
  if call.implementation == "blockwise":
    out, lse = _blockwise.run(call)
    if call.sinks is not None:
      out, lse = _spec.add_sinks(out, lse, call.sinks)
    return (out, lse) if call.return_lse else out
  steps = _naive.run(call)
  results = [steps.output]
  if call.return_weights:
    results.append(steps.weights.astype(steps.output.dtype))
  if call.return_lse:
    lse = _naive.masked_logsumexp(steps.scores, steps.mask)
    if call.sinks is not None:
      lse = jnp.logaddexp(lse, _spec.sink_logits(call.sinks, lse))
    results.append(lse)
  return results[0] if len(results) == 1 else tuple(results)


# Options of the call that a function computing weights or statistics cannot take.
_DROPOUT_AND_RETURNS = (
  "dropout_rate",
  "dropout_rng",
  "broadcast_dropout",
  "deterministic",
  "return_weights",
  "return_lse",
)
_WEIGHT_OPTIONS_EXCLUDED = (
  "implementation",
  "block_q",
  "block_kv",
  "block_mask",
  *_DROPOUT_AND_RETURNS,
)


def attention_weights(
  query: Array, key: Array, *, queries: slice | Array = slice(None), **options: Any
) -> Array:
  """The exact attention weights of a chosen slice of queries, in O(T' * S) memory.

  At lengths where the full ``(T, S)`` map cannot exist, look at the rows you
  care about: the masks, mods and positions are those of the full problem.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)``.
    queries: a ``slice`` of the ``T`` queries or ``(T',)`` integer indices.
    **options: the masking and scoring options of :func:`dot_product_attention`
      (``bias``, ``mask``, ``scale``, ``is_causal``, ``local_window_size``,
      lengths, ``alignment``, ``mask_mod``, ``score_mod``, segment ids and
      positions, ``attention_chunk_size``, ``alibi_slopes``, ``logits_soft_cap``,
      ``sinks``), for the full ``(..., N, T, S)`` problem.

  Returns:
    Weights ``(..., N, T', S)`` in float32 at least.

  Examples:
    >>> import jax, jattn
    >>> q = k = jax.random.normal(jax.random.key(0), (1000, 2, 8))
    >>> w = jattn.attention_weights(q, k, queries=slice(-3, None), is_causal=True)
    >>> w.shape, bool((w[:, -1, -1] > 0).all()), bool((w[:, 0, -2:] == 0).all())
    ((2, 3, 1000), True, True)
  """
  opts = _spec.options("attention_weights", options, exclude=_WEIGHT_OPTIONS_EXCLUDED)
  key = jnp.asarray(key)
  # The values do not enter the weights: a one-wide stand-in, never computed on.
  values = jnp.zeros((*key.shape[:-1], 1), key.dtype)
  call = _spec.describe(query, key, values, opts)
  T = call.dims.T
  if isinstance(queries, slice):
    index = jnp.arange(T)[queries]
  else:
    index = _query_index(queries, T)
  if index.shape[0] == 0:
    raise ValueError(f"queries {queries!r} selects none of the {T} queries.")
  scores, mask = _naive.scores_and_mask(call, index.astype(jnp.int32))
  weights = _naive.masked_softmax(scores, mask)
  share = _naive.sink_share(call, scores, mask)
  return weights if share is None else weights * share


def _query_index(queries: Any, T: int) -> Array:
  """``(T',)`` indices into ``T`` queries, negative ones counted from the end as in Python.

  Concrete indices out of ``[-T, T)`` raise; traced ones cannot be checked at
  trace time, so their rows come out NaN (as ``jnp.take(..., mode="fill")`` does).
  """
  if isinstance(queries, (jax.core.Tracer, jax.Array)):
    index = queries
  else:
    index = np.asarray(queries)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(
      f"queries must be a slice or 1-D integer indices, got shape {index.shape} of {index.dtype}."
    )
  if not isinstance(index, jax.core.Tracer):
    bad = np.asarray(index)[(np.asarray(index) < -T) | (np.asarray(index) >= T)]
    if bad.size:
      raise ValueError(f"queries {bad.tolist()} are out of range for {T} queries.")
  index = jnp.asarray(index, jnp.int32)
  return jnp.where(index < 0, index + T, index)


def attention_stats(query: Array, key: Array, **options: Any) -> dict[str, Array]:
  """Per-query statistics of the attention weights, without the ``(T, S)`` map.

  One blockwise pass (O(T + S) memory) accumulates, per query, the log-sum-exp
  of its scores, the entropy of its weights and its largest weight: what you
  would read off the attention map, at lengths where the map cannot exist.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)``.
    **options: the masking, scoring and tiling options of
      :func:`dot_product_attention` (not dropout, ``implementation`` or ``return_*``).

  Returns:
    A dict of ``(..., N, T)`` float32 arrays: ``"lse"`` (``-inf`` for a query
    that attends nothing), ``"entropy"`` (nats; 0 for one attended key, ``log n``
    for uniform weights over ``n``) and ``"max_weight"`` (0 if nothing is attended).
    With ``sinks`` the log-sum-exp and the entropy count the sink as one more key.

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> q = k = jnp.zeros((6, 1, 4))  # equal scores: uniform weights
    >>> stats = jattn.attention_stats(q, k, is_causal=True)
    >>> [round(float(e), 4) for e in stats["entropy"][0]]
    [0.0, 0.6931, 1.0986, 1.3863, 1.6094, 1.7918]
  """
  excluded = ("implementation", *_DROPOUT_AND_RETURNS)
  opts = _spec.options("attention_stats", options, exclude=excluded)
  key = jnp.asarray(key)
  values = jnp.zeros((*key.shape[:-1], 1), key.dtype)  # the statistics need no values
  call = _spec.describe(query, key, values, opts)._replace(implementation="blockwise")
  _, lse, stats = _blockwise.run(call, want_stats=True)
  if call.sinks is not None:  # the sink takes 1 - share of each row's weight
    sink = _spec.sink_logits(call.sinks, lse)
    share = jax.nn.sigmoid(lse - sink)
    lse = jnp.logaddexp(lse, sink)
    entr = jax.scipy.special.entr
    stats = {
      "entropy": share * stats["entropy"] + entr(share) + entr(1.0 - share),
      "max_weight": share * stats["max_weight"],
    }
  return {"lse": lse, **stats}
