"""Autoregressive decoding with a key/value cache, as two pure functions.

The cache is a plain pytree (so it jits, donates and checkpoints like params)::

  {"key":   (..., L, K, H),    # keys of the positions decoded so far, zeros beyond
   "value": (..., L, K, D),
   "index": ()  int32}         # how many positions are filled: the next position

``L`` is the maximum length. :func:`decode_step` takes the inputs of the next
``T >= 1`` positions (one token, or a chunk of a prompt: chunked prefill), writes
their keys and values at ``index`` and lets each new query attend every cached
position up to its own: causal attention with the queries placed at
``index .. index + T - 1`` among the ``L`` slots. Decoding a sequence token by
token therefore equals causal self-attention over the whole sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jattn import _dot_product, _masks, _params, _spec

Array = jax.Array

# Options that decode_step decides itself (a block mask's tiles would have to move
# with the cache index).
_FIXED = (
  "is_causal",
  "alignment",
  "query_seq_lengths",
  "return_weights",
  "return_lse",
  "block_mask",
)


def init_cache(
  params: Any, batch_shape: tuple[int, ...], max_len: int, *, dtype: Any = None
) -> dict[str, Array]:
  """An empty key/value cache for :func:`decode_step`.

  Args:
    params: a pytree from :func:`jattn.init` (sets ``K``, ``H`` and ``D``).
    batch_shape: the leading batch dimensions ``...`` of the inputs (``()`` for none).
    max_len: ``L``, the most positions the cache can hold.
    dtype: dtype of the cached keys and values (default: that of the key kernel).

  Returns:
    ``{"key": (..., L, K, H), "value": (..., L, K, D), "index": ()}``, zeros.

  Examples:
    >>> import jax, jattn
    >>> p = jattn.init(jax.random.key(0), 8, 4, num_heads=4, num_kv_heads=2)
    >>> jax.tree.map(lambda a: a.shape, jattn.init_cache(p, (3,), 16))
    {'index': (), 'key': (3, 16, 2, 4), 'value': (3, 16, 2, 4)}
  """
  proj = _params.Projections(params)
  max_len = _masks.check_length("max_len", max_len)
  batch_shape = _masks.check_shape("batch_shape", batch_shape)
  kernel = proj.key[0]
  dtype = kernel.dtype if dtype is None else dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"the cache dtype must be floating point, got {dtype}.")
  K = kernel.shape[1]
  return {
    "key": jnp.zeros((*batch_shape, max_len, K, proj.head_dim), dtype),
    "value": jnp.zeros((*batch_shape, max_len, K, proj.v_head_dim), dtype),
    "index": jnp.zeros((), jnp.int32),
  }


def _check_cache(cache: Any, k: Array, v: Array) -> tuple[Array, Array, Array]:
  if not isinstance(cache, dict) or set(cache) != {"key", "value", "index"}:
    raise TypeError("cache must be the dict from jattn.init_cache: keys 'key', 'value', 'index'.")
  keys, values, index = (jnp.asarray(cache[n]) for n in ("key", "value", "index"))
  batch, (T, K, H), D = k.shape[:-3], k.shape[-3:], v.shape[-1]
  L = keys.shape[-3] if keys.ndim >= 3 else 0
  if keys.shape != (*batch, L, K, H) or values.shape != (*batch, L, K, D):
    raise ValueError(
      f"the cache holds keys {keys.shape} and values {values.shape}, but the inputs give keys "
      f"{k.shape} and values {v.shape}: expected (..., L, {K}, {H}) and (..., L, {K}, {D}) "
      f"with the inputs' batch dims {batch}."
    )
  if index.shape != () or not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(f"cache['index'] must be a scalar int, got {index.dtype}{index.shape}.")
  for name, x in (("key", keys), ("value", values)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
        f"cache[{name!r}] must be floating point (it holds projected {name}s), got {x.dtype}."
      )
  if T > L:
    raise ValueError(f"{T} new positions do not fit a cache of max_len {L}.")
  if not isinstance(index, jax.core.Tracer):
    if int(index) < 0:
      raise ValueError(f"cache['index'] must be >= 0 (the positions decoded so far), got {index}.")
    if int(index) + T > L:
      raise ValueError(f"the cache is full: index {int(index)} + {T} new positions > max_len {L}.")
  return keys, values, index


def decode_step(
  params: Any, cache: dict[str, Array], x: Array, **options: Any
) -> tuple[Array, dict[str, Array]]:
  """Attends the next ``T`` positions to everything decoded so far, and updates the cache.

  Args:
    params: a pytree from :func:`jattn.init`.
    cache: from :func:`init_cache` or a previous ``decode_step``.
    x: ``(..., T, F)`` inputs of the next ``T >= 1`` positions.
    **options: options of :func:`jattn.dot_product_attention` (``scale``,
      ``local_window_size``, ``mask`` (broadcast against ``(..., N, T, L)``),
      ``bias``, ``key_value_seq_lengths``, ``implementation``, dropout, ...),
      except those decode fixes: it is always causal, with the queries at
      positions ``index .. index + T - 1``. A ``mask_mod``/``score_mod`` sees
      those positions as ``q_idx`` and the cache slots as ``kv_idx``; segment
      ids and positions are those of the new tokens ``(..., T)`` and of the
      cache's slots ``(..., L)`` (ALiBi and chunks use the same positions).

  Returns:
    ``(outputs, cache)``: outputs ``(..., T, O)`` (or ``(..., T, N * D)``) as
    :func:`jattn.self_attention` gives them, and the cache with ``index + T``.
    Outside ``jit`` a step that overflows the cache, or a negative index,
    raises ``ValueError``; under ``jit`` (a traced index) its outputs are NaN.

  Examples:
    >>> import jax, jax.numpy as jnp, jattn
    >>> p = jattn.init(jax.random.key(0), 8, 4, num_heads=2)
    >>> x = jax.random.normal(jax.random.key(1), (5, 8))
    >>> cache = jattn.init_cache(p, (), max_len=5)
    >>> steps = []
    >>> for t in range(5):
    ...   out, cache = jattn.decode_step(p, cache, x[t:t + 1])
    ...   steps.append(out)
    >>> full = jattn.self_attention(p, x, is_causal=True)
    >>> bool(jnp.allclose(jnp.concatenate(steps), full, atol=1e-6))
    True
  """
  opts = _spec.options(
    "decode_step",
    options,
    exclude=_FIXED,
    why=": it fixes them itself (causal at the cache's index)",
  )
  proj = _params.Projections(params)
  q, k, v = _params.project_qkv(proj, x, x)
  keys, values, index = _check_cache(cache, k, v)
  T, L = q.shape[-3], keys.shape[-3]
  axis = keys.ndim - 3
  keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), index, axis)
  values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), index, axis)
  # The queries are positions index .. index + T - 1 of the sequence the cache holds:
  # causal from a traced start, so the blockwise path skips the tiles past it.
  call = _spec.describe(
    q,
    keys.astype(q.dtype),
    values.astype(q.dtype),
    dataclasses.replace(
      opts, is_causal=True, alignment="top_left", **proj.options({"sinks": opts.sinks})
    ),
    q_start=index,
  )
  heads = _dot_product.run(call)
  bad_index = (index < 0) | (index + T > L)
  heads = jnp.where(bad_index, jnp.nan, heads)
  new_cache = {"key": keys, "value": values, "index": (index + T).astype(jnp.int32)}
  return _params.project_out(proj, heads), new_cache
