"""``flax.linen`` modules: Flax's attention modules, computed by jattn.

:class:`MultiHeadDotProductAttention` (and :class:`MultiHeadAttention`,
:class:`SelfAttention`) take ``flax.linen``'s constructor and call arguments
with Flax's defaults, create the same parameters under the same names from the
same rngs, and compute Flax's numbers, so switching is one line::

  attention = jattn.linen.MultiHeadDotProductAttention(num_heads=8, qkv_features=64)

A Flax checkpoint of a model using ``flax.linen.MultiHeadDotProductAttention``
loads into the same model with this class. jattn's own options (grouped-query
heads, causal and window masks, mods, ALiBi, sinks, the blockwise path, ...) are
extra attributes and call keywords.

The ``params`` collection *is* the jattn pytree (:func:`jattn.init`'s layout), so::

  variables = module.init(rng, x)
  module.apply(variables, x) == jattn.self_attention(variables["params"], x, alignment="top_left")

``__call__`` validates, casts and calls :func:`jattn.attention` (or
:func:`jattn.decode_step` in decode mode); it holds no attention math.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn import _attention, _decode, _flax, _params
from jattn._masks import Alignment

Array = jax.Array

_CACHE = {"key": "cached_key", "value": "cached_value", "index": "cache_index"}  # Flax's names


class _Dense(nn.Module):
  """The parameters of Flax's ``DenseGeneral`` (same names, shapes, rngs, values), unapplied."""

  kernel_shape: tuple[int, ...]
  fan_in_axes: int
  use_bias: bool
  kernel_init: Callable
  bias_init: Callable
  param_dtype: Any

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    init = _params.flat_init(self.kernel_init, self.fan_in_axes)
    entry = {"kernel": self.param("kernel", init, self.kernel_shape, self.param_dtype)}
    if self.use_bias:
      bias_shape = self.kernel_shape[self.fan_in_axes :]
      init = _params.flat_init(self.bias_init, 0)
      entry["bias"] = self.param("bias", init, bias_shape, self.param_dtype)
    return entry


class _Scale(nn.Module):
  """The parameter of Flax's ``LayerNorm(use_bias=False)``: ``scale``, ones."""

  size: int
  param_dtype: Any

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    return {"scale": self.param("scale", nn.initializers.ones, (self.size,), self.param_dtype)}


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head dot-product attention with ``flax.linen``'s arguments and defaults.

  Attributes (Flax's, in Flax's order):
    num_heads: ``N``, query heads.
    dtype: the computation dtype (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters.
    qkv_features: ``N * H``, the query/key/value features (default: the query
      inputs' features ``F``); ``H = qkv_features // num_heads``.
    out_features: ``O`` of the ``"out"`` projection (default ``F``).
    broadcast_dropout: True (default) shares one dropout mask ``(T, S)`` over
      the batch and the heads, as Flax does.
    dropout_rate: dropout on the attention weights, keyed by position (see
      :func:`jattn.dot_product_attention`): the masks are not Flax's bits.
    deterministic: default for the call argument of the same name.
    precision: the precision of every matmul of the call (a ``jax.lax.Precision``
      or its name), applied with ``jax.default_matmul_precision``.
    kernel_init, out_kernel_init, bias_init, out_bias_init: ``jax.nn``
      initializers, applied to the flat ``(F, N * H)`` / ``(N * H, O)`` matrix as
      Flax's ``DenseGeneral`` does; ``kernel_init`` may also be a name of
      :data:`jattn.INITIALIZER_NAMES`.
    use_bias: biases on every projection (default True).
    attention_fn: None (default) computes with jattn; a Flax-compatible
      function ``fn(query, key, value, **kwargs)`` is called instead, with the
      keyword arguments of Flax's that its signature names.
    decode: autoregressive mode with Flax's ``"cache"`` collection
      (``cached_key``, ``cached_value``, ``cache_index``): ``init`` sizes the cache
      by its inputs' length; each ``apply(..., mutable=["cache"])`` decodes the
      next positions with :func:`jattn.decode_step` (one or several at a time).
    normalize_qk: layer-normalise queries and keys (``query_ln``/``key_ln``
      scales, as Flax).
    force_fp32_for_softmax: accepted; jattn always computes the softmax in
      float32 at least, then rounds the weights to the computation dtype (for
      ``P V`` and ``sow_weights``), with or without it.
    qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls,
      qk_attn_weights_einsum_cls, attn_weights_value_einsum_cls: not supported
      (``NotImplementedError`` if set).

  Attributes (jattn's):
    head_dim: ``H``, instead of ``qkv_features``.
    num_kv_heads: ``K``, key/value heads (default ``N``; ``K < N`` is grouped-query).
    v_head_dim: ``D``, the value size of each head (default ``H``).
    use_out_projection: False drops ``"out"``: the heads are concatenated,
      ``(..., T, N * D)``, as in the walkthrough.
    use_sinks: a learnable ``"sinks"`` param, one sink logit per query head.
    stddev: for ``kernel_init="normal"``.
    scale, is_causal, local_window_size, alignment, attention_chunk_size,
      logits_soft_cap, implementation, block_q, block_kv: as in
      :func:`jattn.dot_product_attention`, except ``alignment``, which defaults
      to ``"top_left"`` as Flax's and ``jax.nn``'s causal masks do.
    alibi: add ALiBi's ``-slope * |q_pos - kv_pos|`` (:func:`jattn.alibi_slopes`).
  """

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: str | Callable = nn.initializers.lecun_normal()
  out_kernel_init: str | Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  attention_fn: Callable | None = None
  decode: bool = False
  normalize_qk: bool = False
  force_fp32_for_softmax: bool = False
  qkv_dot_general: Any = None
  out_dot_general: Any = None
  qkv_dot_general_cls: Any = None
  out_dot_general_cls: Any = None
  qk_attn_weights_einsum_cls: Any = None
  attn_weights_value_einsum_cls: Any = None
  # jattn's
  head_dim: int | None = None
  num_kv_heads: int | None = None
  v_head_dim: int | None = None
  use_out_projection: bool = True
  use_sinks: bool = False
  stddev: float | None = None
  scale: float | None = None
  is_causal: bool = False
  local_window_size: int | tuple[int, int] | None = None
  alignment: Alignment = "top_left"
  attention_chunk_size: int | None = None
  logits_soft_cap: float | None = None
  alibi: bool = False
  implementation: str = "auto"
  block_q: int | None = None
  block_kv: int | None = None

  def _params(self, features: int, k_features: int, v_features: int) -> dict[str, Any]:
    _flax.check_unsupported(
      type(self).__name__,
      qkv_dot_general=self.qkv_dot_general,
      out_dot_general=self.out_dot_general,
      qkv_dot_general_cls=self.qkv_dot_general_cls,
      out_dot_general_cls=self.out_dot_general_cls,
      qk_attn_weights_einsum_cls=self.qk_attn_weights_einsum_cls,
      attn_weights_value_einsum_cls=self.attn_weights_value_einsum_cls,
    )
    N = self.num_heads
    K, H, D = _flax.head_dims(
      N, self.num_kv_heads, self.qkv_features, self.head_dim, features, self.v_head_dim
    )
    kernel_init, out_init, bias_init, out_bias_init = _flax.initializers(
      self.kernel_init,
      self.out_kernel_init,
      self.bias_init,
      self.out_bias_init,
      self.stddev,
      self.param_dtype,
    )
    dense = dict(use_bias=self.use_bias, param_dtype=self.param_dtype, bias_init=bias_init)
    shapes = {"query": (features, N, H), "key": (k_features, K, H), "value": (v_features, K, D)}
    params: dict[str, Any] = {
      name: _Dense(shape, 1, kernel_init=kernel_init, name=name, **dense)()
      for name, shape in shapes.items()
    }
    if self.normalize_qk:
      for name in ("query_ln", "key_ln"):
        params[name] = _Scale(H, self.param_dtype, name=name)()
    if self.use_out_projection:
      shape = (N, D, self.out_features or features)
      dense.update(bias_init=out_bias_init)
      params["out"] = _Dense(shape, 2, kernel_init=out_init, name="out", **dense)()
    if self.use_sinks:
      params["sinks"] = self.param("sinks", nn.initializers.zeros, (N,), self.param_dtype)
    return params

  @nn.compact
  def __call__(
    self,
    inputs_q: Array,
    inputs_k: Array | None = None,
    inputs_v: Array | None = None,
    *,
    inputs_kv: Array | None = None,
    mask: Array | None = None,
    deterministic: bool | None = None,
    dropout_rng: Array | None = None,
    sow_weights: bool = False,
    **jattn_options: Any,
  ) -> Array:
    """Attends ``inputs_q`` to ``inputs_k``/``inputs_v``, Flax's way.

    Args:
      inputs_q: ``(..., T, F)``.
      inputs_k: ``(..., S, Fk)`` (default ``inputs_q``: self-attention).
      inputs_v: ``(..., S, Fv)`` (default ``inputs_k``).
      inputs_kv: Flax's older spelling of ``inputs_k`` and ``inputs_v`` together.
      mask: broadcastable to ``(..., N, T, S)``; nonzero (or True) attends, so
        Flax's float masks (``make_attention_mask``, ``make_causal_mask``) work.
      deterministic: True turns dropout off; with ``dropout_rate > 0`` it must be
        given here or as the attribute (Flax's ``merge_param`` rule).
      dropout_rng: the dropout key (default: ``make_rng("dropout")``).
      sow_weights: store the attention weights ``(..., N, T, S)``, as applied
        (after dropout), in ``"intermediates"`` as ``"attention_weights"``.
      **jattn_options: ``bias``, ``query_seq_lengths``, ``key_value_seq_lengths``,
        ``mask_mod``, ``score_mod``, ``block_mask``, ``q_segment_ids``,
        ``kv_segment_ids``, ``q_positions``, ``kv_positions``, as in
        :func:`jattn.dot_product_attention`.

    Returns:
      ``(..., T, O)``, or ``(..., T, N * D)`` without the out projection.
    """
    call = _flax.call_options(type(self).__name__, jattn_options)
    xs = _flax.inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
    params = self._params(*(x.shape[-1] for x in xs))
    params, xs = _params.cast(self.dtype, params, *xs)
    if self.dropout_rate > 0.0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      deterministic = True
    attributes = {name: getattr(self, name) for name in _flax.EXTRAS}
    dropout = _flax.Dropout(self.dropout_rate, self.broadcast_dropout, deterministic, dropout_rng)
    opts = _flax.options(attributes, self.num_heads, call, mask, dropout)
    self_attention = inputs_k is None and inputs_v is None and inputs_kv is None
    with _flax.precision(self.precision):
      if self.attention_fn is not None:
        if self.decode:
          raise NotImplementedError("decode=True with a custom attention_fn is not supported.")
        flax_kwargs = _flax.attention_fn_kwargs(
          mask,
          dropout,
          self.dtype,
          self.precision,
          force_fp32_for_softmax=self.force_fp32_for_softmax,
          **({"module": self} if sow_weights else {}),
        )
        return _flax.call_attention_fn(
          self.attention_fn, params, tuple(xs), attributes, call, flax_kwargs
        )
      if self.decode and self.has_variable("cache", "cached_key"):
        if not self_attention or sow_weights:
          raise ValueError("decode mode is self-attention: no inputs_k/inputs_v, no sow_weights.")
        cache = {n: self.variable("cache", name) for n, name in _CACHE.items()}
        for name in ("is_causal", "alignment"):  # decode_step is causal from the cache index
          del opts[name]
        out, new = _decode.decode_step(
          params, {n: c.value for n, c in cache.items()}, xs[0], **opts
        )
        for n, c in cache.items():
          c.value = new[n]
        return out
      if self.decode:  # init: size the cache by the inputs, attend as without decode (Flax)
        x = xs[0]
        empty = _decode.init_cache(params, x.shape[:-2], x.shape[-2], dtype=x.dtype)
        for n, name in _CACHE.items():
          self.variable("cache", name, lambda n=n: empty[n])
      result = _attention.attention(params, *xs, return_weights=sow_weights, **opts)
    if sow_weights:
      out, weights = result
      self.sow("intermediates", "attention_weights", weights)
      return out
    return result


class MultiHeadAttention(MultiHeadDotProductAttention):
  """:class:`MultiHeadDotProductAttention` under Flax's other name (auto-named
  ``MultiHeadAttention_0``, as ``flax.linen.MultiHeadAttention`` is)."""


class SelfAttention(MultiHeadDotProductAttention):
  """Self-attention with ``flax.linen.SelfAttention``'s call: ``(inputs_q, mask, ...)``."""

  @nn.compact
  def __call__(  # type: ignore[override]
    self,
    inputs_q: Array,
    mask: Array | None = None,
    deterministic: bool | None = None,
    dropout_rng: Array | None = None,
    sow_weights: bool = False,
    **jattn_options: Any,
  ) -> Array:
    return super().__call__(
      inputs_q,
      mask=mask,
      deterministic=deterministic,
      dropout_rng=dropout_rng,
      sow_weights=sow_weights,
      **jattn_options,
    )
