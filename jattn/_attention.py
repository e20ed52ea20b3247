"""Self- and cross-attention over a parameter pytree, and the walkthrough as data.

Inputs are laid out ``(..., T, F)`` (queries) and ``(..., S, Fkv)`` (keys and
values); the parameter layout and letters are those of :mod:`jattn._params`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jattn import _dot_product, _naive, _params, _spec

Array = jax.Array


def attention(
  params: Any, x_q: Array, x_kv: Array, x_v: Array | None = None, **options: Any
) -> Array | tuple[Array, Array]:
  """Cross-attention: queries from ``x_q`` attend keys and values from ``x_kv``.

  Args:
    params: a pytree from :func:`jattn.init` (or Flax ``MultiHeadDotProductAttention``).
    x_q: ``(..., T, F)`` query inputs.
    x_kv: ``(..., S, Fkv)`` key/value inputs, with the same leading dimensions.
    x_v: ``(..., S, Fv)`` value inputs when they differ from the keys' (Flax's
      ``inputs_v``); default ``x_kv``.
    **options: the keyword options of :func:`jattn.dot_product_attention`
      (masks, mods, lengths, ``implementation``, dropout, ``return_weights``, ...).

  Returns:
    ``(..., T, O)`` with an ``"out"`` projection, else the heads concatenated,
    ``(..., T, N * D)``; with ``return_weights=True`` and/or ``return_lse=True``
    a tuple that adds the weights ``(..., N, T, S)`` and/or the log-sum-exp
    ``(..., N, T)``, as :func:`jattn.dot_product_attention` does.

  Examples:
    >>> import jax, jattn
    >>> p = jattn.init(jax.random.key(0), 8, 4, num_heads=2, kv_features=6, out_features=8)
    >>> x_q, x_kv = jax.numpy.ones((3, 5, 8)), jax.numpy.ones((3, 7, 6))
    >>> jattn.attention(p, x_q, x_kv).shape
    (3, 5, 8)
  """
  proj = _params.Projections(params)
  q, k, v = _params.project_qkv(proj, x_q, x_kv, x_v)
  result = _dot_product.dot_product_attention(q, k, v, **proj.options(options))
  if isinstance(result, tuple):  # (heads, weights and/or lse)
    return _params.project_out(proj, result[0]), *result[1:]
  return _params.project_out(proj, result)


def self_attention(params: Any, x: Array, **options: Any) -> Array | tuple[Array, Array]:
  """Self-attention: every position of ``x`` attends every position of ``x``.

  Args:
    params: a pytree from :func:`jattn.init`, or the walkthrough's matrices as
      ``{"query": {"kernel": (F, H)}, "key": ..., "value": ...}``.
    x: ``(..., T, F)`` inputs.
    **options: as in :func:`attention`.

  Returns:
    ``(..., T, O)`` or ``(..., T, N * D)``; with ``return_weights=True`` also
    the weights ``(..., N, T, T)``.

  Examples:
    >>> import jattn
    >>> params, x = jattn.walkthrough_example()
    >>> out = jattn.self_attention(params, x, scale=1.0)  # (3, 3)
    >>> [round(float(v), 4) for v in out[0]]  # output 1
    [1.9366, 6.6831, 1.5951]
  """
  return attention(params, x, x, **options)


def explain(params: Any, x: Array, **options: Any) -> dict[str, Array | None]:
  """The walkthrough as data: every intermediate of self-attention on ``x``.

  With 2-D kernels (one head, as in the walkthrough) the head axes are dropped
  from every entry, so the arrays read exactly like the walkthrough's tables.

  Args:
    params: as in :func:`self_attention`.
    x: ``(..., T, F)`` inputs.
    **options: as in :func:`attention`, except ``return_weights``, ``return_lse``
      and ``implementation`` (explain always materialises the map).

  Returns:
    A dict (a pytree, so ``explain`` can be jitted) with

    - ``"queries"`` ``(..., T, N, H)``, ``"keys"`` ``(..., T, K, H)``,
      ``"values"`` ``(..., T, K, D)``: step 3;
    - ``"scores"`` ``(..., N, T, T)``: step 4, scaled, with ``bias``, unmasked;
    - ``"mask"``: the combined boolean mask applied (or None);
    - ``"weights"`` ``(..., N, T, T)``: step 5, the attention map;
    - ``"weighted_values"`` ``(..., N, T, T, D)``: step 6, entry ``[n, t, s]`` is
      weight ``[n, t, s]`` times value ``s``;
    - ``"head_outputs"`` ``(..., T, N, D)``: step 7, the sums of step 6;
    - ``"outputs"``: step 8, what :func:`self_attention` returns.

  Examples:
    >>> import jattn
    >>> params, x = jattn.walkthrough_example()
    >>> steps = jattn.explain(params, x, scale=1.0)
    >>> steps["scores"][0]
    Array([2., 4., 4.], dtype=float32)
  """
  excluded = ("return_weights", "return_lse", "implementation", "block_q", "block_kv")
  opts = _spec.options(
    "explain (which always computes every step naively)", options, exclude=excluded
  )
  x = jnp.asarray(x)
  proj = _params.Projections(params)
  q, k, v = _params.project_qkv(proj, x, x)
  opts = dataclasses.replace(opts, **proj.options({"sinks": opts.sinks}))
  steps = _naive.run(_spec.describe(q, k, v, opts))
  group = proj.num_heads // k.shape[-2]
  v_per_head = jnp.repeat(v, group, axis=-2)  # (..., S, N, D)
  weighted_values = jnp.einsum(
    "...NTS,...SND->...NTSD", steps.weights, v_per_head.astype(steps.weights.dtype)
  )
  result = {
    "queries": q,
    "keys": k,
    "values": v,
    "scores": steps.scores,
    "mask": steps.mask,
    "weights": steps.weights,
    "weighted_values": weighted_values,
    "head_outputs": steps.output,
    "outputs": _params.project_out(proj, steps.output),
  }
  if proj.headless:
    n = x.ndim - 2  # index of the head axis in (..., N, T, ...) entries
    for name in ("queries", "keys", "values", "head_outputs"):
      result[name] = result[name][..., 0, :]
    for name in ("scores", "weights", "weighted_values"):
      result[name] = jnp.squeeze(result[name], axis=n)
    if result["mask"] is not None and result["mask"].ndim > 2:
      result["mask"] = result["mask"][..., 0, :, :]
  return result
