"""``flax.nnx`` modules: thin wrappers over the pure functions.

The module's ``nnx.Param`` state *is* the jattn pytree: ``query``/``key``/
``value``/(``out``) each hold a ``kernel`` and optionally a ``bias`` of the
shapes :func:`jattn.init` gives, so::

  module = jattn.nnx.MultiHeadAttention(16, num_heads=4, head_dim=8, rngs=nnx.Rngs(0))
  params = jattn.nnx.get_params(module)        # a plain jattn pytree
  jattn.self_attention(params, x)              # == module(x) (same options)
  jattn.nnx.set_params(module, other_params)   # and back in, no conversion

``__call__`` casts and calls :func:`jattn.attention` (or :func:`jattn.decode_step`
in decode mode); it holds no attention math.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import _attention, _decode, _params
from jattn._masks import Alignment, alibi_slopes

Array = jax.Array


class Projection(nnx.Module):
  """One entry of the pytree: a ``kernel`` and an optional ``bias`` (``nnx.Param``)."""

  def __init__(self, entry: dict[str, Array]):
    self.kernel = nnx.Param(entry["kernel"])
    if "bias" in entry:
      self.bias = nnx.Param(entry["bias"])


def get_params(module: nnx.Module) -> dict[str, dict[str, Array]]:
  """The module's parameters as a plain jattn pytree (arrays, no ``nnx.Param``)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def set_params(module: nnx.Module, params: Any) -> None:
  """Loads a jattn pytree into ``module`` in place; names and shapes must match."""
  state = nnx.state(module, nnx.Param)
  expected = jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
  given = jax.tree.map(jnp.shape, params)
  if given != expected:
    raise ValueError(f"params of shapes {given} do not fit the module's {expected}.")
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)


class MultiHeadAttention(nnx.Module):
  """Multi-head (grouped-query, cross- or self-) attention.

  Args:
    in_features: ``F``, features of the query inputs.
    num_heads: ``N``, query heads.
    head_dim: ``H``, the query/key size of each head.
    num_kv_heads: ``K``, key/value heads (default ``N``; ``K < N`` is grouped-query).
    v_head_dim: ``D``, the value size of each head (default ``H``).
    kv_features: ``Fkv``, features of the key/value inputs (default ``F``).
    out_features: ``O`` of the ``"out"`` projection (default ``F``, as in Flax).
    use_out_projection: False drops ``"out"``: the heads are concatenated.
    use_bias: biases on every projection (default False, as :func:`jattn.init`).
    use_sinks: a learnable ``sinks`` param, one sink logit per query head
      (gpt-oss; see :func:`jattn.init`).
    kernel_init: an initializer name (:data:`jattn.INITIALIZER_NAMES`) or callable.
    stddev: for ``kernel_init="normal"``.
    dtype: the computation dtype (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters.
    scale, is_causal, local_window_size, alignment, attention_chunk_size,
      logits_soft_cap, implementation, block_q, block_kv: as in
      :func:`jattn.dot_product_attention`.
    alibi: add ALiBi's ``-slope * |q_pos - kv_pos|`` with
      :func:`jattn.alibi_slopes` of ``num_heads``.
    dropout_rate: dropout on the attention weights, keyed by position, drawn
      from the ``dropout`` stream of the call's ``rngs`` or of the ``rngs``
      given here.
    deterministic: default for the call argument of the same name.
    rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for dropout).
  """

  def __init__(
    self,
    in_features: int,
    *,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    v_head_dim: int | None = None,
    kv_features: int | None = None,
    out_features: int | None = None,
    use_out_projection: bool = True,
    use_bias: bool = False,
    use_sinks: bool = False,
    kernel_init: str | Callable = "lecun_normal",
    stddev: float | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    alignment: Alignment = "bottom_right",
    attention_chunk_size: int | None = None,
    logits_soft_cap: float | None = None,
    alibi: bool = False,
    implementation: str = "auto",
    block_q: int | None = None,
    block_kv: int | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool | None = None,
    rngs: nnx.Rngs,
  ):
    params = _params.init(
      rngs.params(),
      in_features,
      head_dim,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      v_head_dim=v_head_dim,
      kv_features=kv_features,
      out_features=(out_features or in_features) if use_out_projection else None,
      use_bias=use_bias,
      kernel_init=kernel_init,
      stddev=stddev,
      use_sinks=use_sinks,
      dtype=param_dtype,
    )
    self.query = Projection(params["query"])
    self.key = Projection(params["key"])
    self.value = Projection(params["value"])
    if use_out_projection:
      self.out = Projection(params["out"])
    if use_sinks:
      self.sinks = nnx.Param(params["sinks"])
    self.dtype = dtype
    self.options = dict(
      scale=scale,
      local_window_size=local_window_size,
      attention_chunk_size=attention_chunk_size,
      logits_soft_cap=logits_soft_cap,
      alibi_slopes=tuple(map(float, alibi_slopes(num_heads))) if alibi else None,  # static
      implementation=implementation,
      block_q=block_q,
      block_kv=block_kv,
    )
    self.is_causal, self.alignment = is_causal, alignment
    self.dropout_rate, self.deterministic = dropout_rate, deterministic
    self.rngs = rngs if dropout_rate > 0 else None
    self.cache: dict[str, nnx.Cache] | None = nnx.data(None)

  def _cast(self, *inputs: Array) -> tuple[dict[str, dict[str, Array]], list[Array]]:
    return _params.cast(self.dtype, get_params(self), *inputs)

  def _dropout(self, deterministic: bool | None, rngs: nnx.Rngs | None) -> dict[str, Any]:
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.dropout_rate == 0.0 or deterministic:
      return {}
    if deterministic is None:
      raise ValueError(
        "dropout_rate > 0: pass deterministic=True/False at construction or call time."
      )
    rngs = rngs or self.rngs
    if rngs is None:
      raise ValueError("dropout needs rngs with a 'dropout' stream, at construction or call.")
    return {"dropout_rate": self.dropout_rate, "dropout_rng": rngs.dropout()}

  def __call__(
    self,
    inputs_q: Array,
    inputs_kv: Array | None = None,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
    block_mask: Any = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | None = None,
    sow_weights: bool = False,
    decode: bool = False,
  ) -> Array:
    """Attends ``inputs_q (..., T, F)`` to ``inputs_kv (..., S, Fkv)`` (default: itself).

    ``mask``, ``bias``, the lengths, ``mask_mod``, ``score_mod``, ``block_mask``,
    the segment ids and positions are as in :func:`jattn.dot_product_attention`;
    ``sow_weights`` stores the weights ``(..., N, T, S)`` as an ``nnx.Intermediate``
    named ``attention_weights``; ``decode`` runs :func:`jattn.decode_step` on the
    cache made by :meth:`init_cache`. Returns ``(..., T, O)`` (or ``(..., T, N * D)``).
    """
    options = dict(
      self.options,
      mask=mask,
      bias=bias,
      key_value_seq_lengths=key_value_seq_lengths,
      mask_mod=mask_mod,
      score_mod=score_mod,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      q_positions=q_positions,
      kv_positions=kv_positions,
    )
    if block_mask is not None:  # decode_step takes none: its tiles move with the cache
      options["block_mask"] = block_mask
    options.update(self._dropout(deterministic, rngs))
    if decode:
      if inputs_kv is not None or sow_weights or query_seq_lengths is not None:
        raise ValueError(
          "decode mode is self-attention without inputs_kv, sow_weights or query_seq_lengths."
        )
      if self.cache is None:
        raise ValueError("decode=True needs a cache: call init_cache(input_shape) first.")
      params, (x,) = self._cast(inputs_q)
      cache = {n: c.get_value() for n, c in self.cache.items()}
      out, new = _decode.decode_step(params, cache, x, **options)
      for n, c in self.cache.items():
        c.set_value(new[n])
      return out
    params, xs = self._cast(inputs_q, inputs_q if inputs_kv is None else inputs_kv)
    result = _attention.attention(
      params,
      *xs,
      is_causal=self.is_causal,
      alignment=self.alignment,
      query_seq_lengths=query_seq_lengths,
      return_weights=sow_weights,
      **options,
    )
    if sow_weights:
      out, weights = result
      self.sow(nnx.Intermediate, "attention_weights", weights)
      return out
    return result

  def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> None:
    """Makes an empty decode cache for inputs ``(..., L, F)``: ``L`` is the max length."""
    if len(input_shape) < 2:
      raise ValueError(f"input_shape must be (..., max_len, features), got {input_shape}.")
    empty = _decode.init_cache(
      get_params(self), tuple(input_shape[:-2]), input_shape[-2], dtype=dtype
    )
    self.cache = nnx.data({n: nnx.Cache(a) for n, a in empty.items()})


class SelfAttention(MultiHeadAttention):
  """:class:`MultiHeadAttention` of its inputs on themselves: ``__call__(x, **kw)``."""

  def __call__(self, inputs: Array, **kwargs: Any) -> Array:  # type: ignore[override]
    if "inputs_kv" in kwargs:
      raise TypeError("SelfAttention attends its inputs to themselves: drop inputs_kv.")
    return super().__call__(inputs, None, **kwargs)
