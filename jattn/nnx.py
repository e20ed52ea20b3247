"""``flax.nnx`` module: Flax's ``MultiHeadAttention``, computed by jattn.

:class:`MultiHeadAttention` takes ``flax.nnx.MultiHeadAttention``'s constructor
and call arguments with Flax's defaults and holds the same state: its
``query``/``key``/``value``/``out`` are Flax's own ``nnx.LinearGeneral`` (and
``query_ln``/``key_ln`` its ``nnx.LayerNorm``), drawn from the same rngs, and its
decode cache is ``cached_key``/``cached_value``/``cache_index``. So switching is
one line, and an nnx checkpoint of a model using Flax's attention loads::

  attention = jattn.nnx.MultiHeadAttention(8, 64, rngs=nnx.Rngs(0))

Those submodules only hold parameters: ``__call__`` reads them as a plain jattn
pytree (:func:`get_params`) and calls :func:`jattn.attention` (or
:func:`jattn.decode_step`); it holds no attention math::

  params = jattn.nnx.get_params(module)        # a plain jattn pytree
  jattn.self_attention(params, x, alignment="top_left")  # == module(x)
  jattn.nnx.set_params(module, other_params)   # and back in, no conversion
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from jattn import _attention, _decode, _flax, _params
from jattn._masks import Alignment

Array = jax.Array

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_LECUN_NORMAL = nnx.initializers.lecun_normal()  # Flax's defaults
_ZEROS = nnx.initializers.zeros_init()
_CACHE = {"key": "cached_key", "value": "cached_value", "index": "cache_index"}  # Flax's names


def get_params(module: nnx.Module) -> dict[str, Any]:
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


def _flax_default(fn: Any) -> Any:
  """None for Flax's default ``promote_dtype`` (what jattn does), else ``fn``."""
  return None if fn is None or fn is dtypes.promote_dtype else fn


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with ``flax.nnx.MultiHeadAttention``'s arguments and defaults.

  Args (Flax's, in Flax's order):
    num_heads: ``N``, query heads.
    in_features: ``F``, features of the query inputs.
    qkv_features: ``N * H`` (default ``F``); ``H = qkv_features // num_heads``.
    out_features: ``O`` of the ``out`` projection (default ``F``).
    num_kv_heads: ``K``, key/value heads (default ``N``; ``K < N`` is grouped-query).
    in_kv_features: ``Fkv``, features of the key/value inputs (default ``F``).
    dtype: the computation dtype (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters.
    broadcast_dropout: True (default) shares one dropout mask ``(T, S)`` over
      the batch and the heads.
    dropout_rate: dropout on the attention weights, keyed by position (see
      :func:`jattn.dot_product_attention`): the masks are not Flax's bits.
    deterministic: default for the call argument of the same name.
    precision: the precision of every matmul of the call.
    kernel_init, out_kernel_init, bias_init, out_bias_init: initializers of the
      flat matrices, as Flax's ``LinearGeneral`` applies them (``kernel_init``
      may also be a name of :data:`jattn.INITIALIZER_NAMES`).
    use_bias: biases on every projection (default True).
    attention_fn: None (default) computes with jattn; a Flax-compatible
      ``fn(query, key, value, **kwargs)`` is called instead.
    decode: default for the call's ``decode`` (None: False; Flax requires one).
    normalize_qk: layer-normalise queries and keys (``query_ln``/``key_ln``).
    qkv_promote_dtype, out_promote_dtype, ln_promote_dtype, qkv_dot_general,
      out_dot_general, qkv_dot_general_cls, out_dot_general_cls: only Flax's
      defaults (``NotImplementedError`` otherwise).
    rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for dropout).
    keep_rngs: keep a fork of ``rngs.dropout`` for dropout (Flax's rule).
    kernel_metadata, out_kernel_metadata, bias_metadata, out_bias_metadata,
      query_ln_scale_metadata, key_ln_scale_metadata: ``nnx.Param`` metadata
      (sharding annotations), as Flax.

  Args (jattn's, keywords):
    head_dim: ``H``, instead of ``qkv_features``.
    v_head_dim: ``D``, the value size of each head (default ``H``).
    use_out_projection: False drops ``out``: the heads are concatenated.
    use_sinks: a learnable ``sinks`` param, one sink logit per query head.
    stddev: for ``kernel_init="normal"``.
    scale, is_causal, local_window_size, alignment, attention_chunk_size,
      logits_soft_cap, implementation, block_q, block_kv: as in
      :func:`jattn.dot_product_attention`; ``alignment`` defaults to
      ``"top_left"``, as Flax's ``is_causal``.
    alibi: add ALiBi's ``-slope * |q_pos - kv_pos|`` (:func:`jattn.alibi_slopes`).
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    qkv_features: int | None = None,
    out_features: int | None = None,
    num_kv_heads: int | None = None,
    in_kv_features: int | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    broadcast_dropout: bool = True,
    dropout_rate: float = 0.0,
    deterministic: bool | None = None,
    precision: Any = None,
    kernel_init: str | Callable = _LECUN_NORMAL,
    out_kernel_init: str | Callable | None = None,
    bias_init: Callable = _ZEROS,
    out_bias_init: Callable | None = None,
    use_bias: bool = True,
    attention_fn: Callable | None = None,
    decode: bool | None = None,
    normalize_qk: bool = False,
    qkv_promote_dtype: Callable | None = None,
    out_promote_dtype: Callable | None = None,
    ln_promote_dtype: Callable | None = None,
    qkv_dot_general: Any = None,
    out_dot_general: Any = None,
    qkv_dot_general_cls: Any = None,
    out_dot_general_cls: Any = None,
    rngs: nnx.Rngs,
    keep_rngs: bool = True,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
    query_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
    key_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    use_out_projection: bool = True,
    use_sinks: bool = False,
    stddev: float | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    alignment: Alignment = "top_left",
    attention_chunk_size: int | None = None,
    logits_soft_cap: float | None = None,
    alibi: bool = False,
    implementation: str = "auto",
    block_q: int | None = None,
    block_kv: int | None = None,
  ):
    _flax.check_unsupported(
      type(self).__name__,
      qkv_promote_dtype=_flax_default(qkv_promote_dtype),
      out_promote_dtype=_flax_default(out_promote_dtype),
      ln_promote_dtype=_flax_default(ln_promote_dtype),
      qkv_dot_general=qkv_dot_general,
      out_dot_general=out_dot_general,
      qkv_dot_general_cls=qkv_dot_general_cls,
      out_dot_general_cls=out_dot_general_cls,
    )
    _params._positive("in_features", in_features)
    self.num_heads, self.in_features = num_heads, in_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.out_features = in_features if out_features is None else out_features
    self.num_kv_heads, self.head_dim, self.v_head_dim = _flax.head_dims(
      num_heads, num_kv_heads, qkv_features, head_dim, in_features, v_head_dim
    )
    self.qkv_features = num_heads * self.head_dim
    kernel_init, out_init, bias_init, out_bias_init = _flax.initializers(
      kernel_init, out_kernel_init, bias_init, out_bias_init, stddev, param_dtype
    )
    linear = dict(
      use_bias=use_bias,
      param_dtype=param_dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
      rngs=rngs,
    )
    K, H, D = self.num_kv_heads, self.head_dim, self.v_head_dim
    # Flax's own layers hold the parameters (same paths, shapes, rngs and values).
    self.query = nnx.LinearGeneral(in_features, (num_heads, H), **linear)
    self.key = nnx.LinearGeneral(self.in_kv_features, (K, H), **linear)
    self.value = nnx.LinearGeneral(self.in_kv_features, (K, D), **linear)
    self.query_ln: nnx.LayerNorm | None = nnx.data(None)
    self.key_ln: nnx.LayerNorm | None = nnx.data(None)
    if normalize_qk:
      norm = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
      self.query_ln = nnx.LayerNorm(H, scale_metadata=query_ln_scale_metadata, **norm)
      self.key_ln = nnx.LayerNorm(H, scale_metadata=key_ln_scale_metadata, **norm)
    if use_out_projection:
      linear.update(
        kernel_init=out_init,
        bias_init=out_bias_init,
        kernel_metadata=out_kernel_metadata or kernel_metadata,
        bias_metadata=out_bias_metadata or bias_metadata,
      )
      self.out = nnx.LinearGeneral((num_heads, D), self.out_features, axis=(-2, -1), **linear)
    if use_sinks:
      self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype))
    self.dtype, self.precision, self.attention_fn = dtype, precision, attention_fn
    self.broadcast_dropout, self.dropout_rate = broadcast_dropout, dropout_rate
    self.deterministic, self.decode, self.normalize_qk = deterministic, decode, normalize_qk
    self.use_bias = use_bias
    self.attributes = dict(
      scale=scale,
      is_causal=is_causal,
      local_window_size=local_window_size,
      alignment=alignment,
      attention_chunk_size=attention_chunk_size,
      logits_soft_cap=logits_soft_cap,
      alibi=alibi,
      implementation=implementation,
      block_q=block_q,
      block_kv=block_kv,
    )
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def __call__(
    self,
    inputs_q: Array,
    inputs_k: Array | None = None,
    inputs_v: Array | None = None,
    *,
    mask: Array | None = None,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | nnx.RngStream | None = None,
    sow_weights: bool = False,
    decode: bool | None = None,
    is_causal: bool | None = None,
    out_sharding: Any = None,
    qkv_sharding: Any = None,
    **jattn_options: Any,
  ) -> Array:
    """Attends ``inputs_q (..., T, F)`` to ``inputs_k (..., S, Fkv)`` / ``inputs_v``.

    Flax's arguments: ``inputs_k`` defaults to ``inputs_q``, ``inputs_v`` to
    ``inputs_k``; ``mask`` broadcasts against ``(..., N, T, S)``, nonzero (or
    True) attends; ``deterministic``, ``rngs`` and ``decode`` override the
    constructor's; ``is_causal`` adds a causal mask (aligned by ``alignment``);
    ``sow_weights`` stores the weights ``(..., N, T, S)`` as applied as an
    ``nnx.Intermediate`` named ``attention_weights``; ``out_sharding`` and
    ``qkv_sharding`` are not supported (``NotImplementedError`` if set).
    ``**jattn_options``: ``bias``, the lengths, ``mask_mod``, ``score_mod``,
    ``block_mask``, the segment ids and positions, as in
    :func:`jattn.dot_product_attention`. Returns ``(..., T, O)`` (or
    ``(..., T, N * D)`` without ``out``).
    """
    name = type(self).__name__
    _flax.check_unsupported(name, out_sharding=out_sharding, qkv_sharding=qkv_sharding)
    call = _flax.call_options(name, jattn_options)
    xs = _flax.inputs(inputs_q, inputs_k, inputs_v)
    if xs[0].shape[-1] != self.in_features:
      raise ValueError(
        f"inputs_q has {xs[0].shape[-1]} features (shape {xs[0].shape}); "
        f"the module expects in_features={self.in_features}."
      )
    rngs = self.rngs if rngs is None else rngs
    rngs = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
    dropout_rng = None
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.dropout_rate > 0.0:
      if deterministic is None:
        raise ValueError(
          "dropout_rate > 0: pass deterministic=True/False at construction or call time."
        )
      if not deterministic:
        if rngs is None:
          raise ValueError("dropout needs rngs with a 'dropout' stream, at construction or call.")
        dropout_rng = rngs()
    else:
      deterministic = True
    attributes = dict(self.attributes)
    if is_causal is not None:
      attributes["is_causal"] = is_causal
    dropout = _flax.Dropout(self.dropout_rate, self.broadcast_dropout, deterministic, dropout_rng)
    opts = _flax.options(attributes, self.num_heads, call, mask, dropout)
    params, xs = _params.cast(self.dtype, get_params(self), *xs)
    decode = bool(self.decode if decode is None else decode)
    with _flax.precision(self.precision):
      if self.attention_fn is not None:
        if decode:
          raise NotImplementedError("decode with a custom attention_fn is not supported.")
        flax_kwargs = _flax.attention_fn_kwargs(
          mask,
          dropout,
          self.dtype,
          self.precision,
          module=self if sow_weights else None,
          is_causal=attributes["is_causal"],
        )
        checked = {**attributes, "is_causal": False}  # passed on to attention_fn, as Flax does
        return _flax.call_attention_fn(
          self.attention_fn, params, tuple(xs), checked, call, flax_kwargs
        )
      if decode:
        if inputs_k is not None or inputs_v is not None or sow_weights:
          raise ValueError("decode mode is self-attention: no inputs_k/inputs_v, no sow_weights.")
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
          raise ValueError("decode needs a cache: call init_cache(input_shape) first.")
        for option in ("is_causal", "alignment"):  # decode_step is causal from the cache index
          del opts[option]
        cache = {n: getattr(self, name) for n, name in _CACHE.items()}
        out, new = _decode.decode_step(params, {n: c[...] for n, c in cache.items()}, xs[0], **opts)
        for n, c in cache.items():
          c[...] = new[n]
        return out
      result = _attention.attention(params, *xs, return_weights=sow_weights, **opts)
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
    for n, name in _CACHE.items():
      setattr(self, name, nnx.Cache(empty[n]))

  def set_view(
    self,
    deterministic: bool | None = None,
    decode: bool | None = None,
    batch_size: int | tuple[int, ...] | None = None,
    max_length: int | None = None,
  ) -> None:
    """For ``nnx.view``: sets ``deterministic``/``decode``; a new decode cache needs
    ``batch_size`` and ``max_length`` (Flax's rule)."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode
      if decode and self.cached_key is None:
        if batch_size is None or max_length is None:
          raise TypeError("batch_size and max_length must be given to make a decode cache.")
        batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
        self.init_cache((*batch, max_length, self.in_features), self.dtype or jnp.float32)


class SelfAttention(MultiHeadAttention):
  """:class:`MultiHeadAttention` of its inputs on themselves: ``__call__(x, **kw)``."""

  def __call__(self, inputs: Array, **kwargs: Any) -> Array:  # type: ignore[override]
    for name in ("inputs_k", "inputs_v"):
      if name in kwargs:
        raise TypeError(f"SelfAttention attends its inputs to themselves: drop {name}.")
    return super().__call__(inputs, **kwargs)
