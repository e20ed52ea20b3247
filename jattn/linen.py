"""``flax.linen`` modules: thin wrappers over the pure functions.

The module's ``params`` collection *is* the jattn pytree (same names, shapes and
optional entries as :func:`jattn.init`), so a pytree moves in and out with no
conversion::

  module = jattn.linen.MultiHeadAttention(num_heads=4, head_dim=16)
  variables = module.init(rng, x)              # variables["params"]: a jattn pytree
  y = module.apply({"params": params}, x)      # any jattn pytree of matching shapes
  y = jattn.self_attention(variables["params"], x, scale=None)  # the same numbers

``__call__`` validates, casts and calls :func:`jattn.attention` (or
:func:`jattn.decode_step` in decode mode); it holds no attention math.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn import _attention, _decode, _params
from jattn._masks import Alignment, alibi_slopes

Array = jax.Array


class MultiHeadAttention(nn.Module):
  """Multi-head (grouped-query, cross- or self-) attention.

  Attributes:
    num_heads: ``N``, query heads.
    head_dim: ``H``, the query/key size of each head.
    num_kv_heads: ``K``, key/value heads (default ``N``; ``K < N`` is grouped-query).
    v_head_dim: ``D``, the value size of each head (default ``H``).
    out_features: ``O`` of the ``"out"`` projection (default: the query inputs'
      features, as in Flax).
    use_out_projection: False drops ``"out"``: the heads are concatenated,
      ``(..., T, N * D)``, as in the walkthrough.
    use_bias: biases on every projection (default False, as :func:`jattn.init`).
    use_sinks: a learnable ``"sinks"`` param, one sink logit per query head
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
    dropout_rate: dropout on the attention weights, drawn from the ``"dropout"``
      rng stream and keyed by position (see :func:`jattn.dot_product_attention`).
    deterministic: default for the call argument of the same name.
    decode: autoregressive mode with a ``"cache"`` collection: the first call
      (``init``) sizes the cache by its inputs' length ``L`` and returns ordinary
      causal attention; each later call (``apply(..., mutable=["cache"])``)
      decodes the next positions with :func:`jattn.decode_step`.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  v_head_dim: int | None = None
  out_features: int | None = None
  use_out_projection: bool = True
  use_bias: bool = False
  use_sinks: bool = False
  kernel_init: str | Callable = "lecun_normal"
  stddev: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale: float | None = None
  is_causal: bool = False
  local_window_size: int | tuple[int, int] | None = None
  alignment: Alignment = "bottom_right"
  attention_chunk_size: int | None = None
  logits_soft_cap: float | None = None
  alibi: bool = False
  implementation: str = "auto"
  block_q: int | None = None
  block_kv: int | None = None
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  decode: bool = False

  def _params(self, features: int, kv_features: int) -> dict[str, dict[str, Array]]:
    def make(rng: Array) -> dict[str, dict[str, Array]]:
      return _params.init(
        rng,
        features,
        self.head_dim,
        num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads,
        v_head_dim=self.v_head_dim,
        kv_features=kv_features,
        out_features=(self.out_features or features) if self.use_out_projection else None,
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        stddev=self.stddev,
        use_sinks=self.use_sinks,
        dtype=self.param_dtype,
      )

    names = ("query", "key", "value", "out") if self.use_out_projection else _params._PROJECTIONS
    names += ("sinks",) if self.use_sinks else ()
    # Each entry is one param (a {"kernel", "bias"} dict) drawn from its own rng.
    return {name: self.param(name, lambda rng, name=name: make(rng)[name]) for name in names}

  @nn.compact
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
    sow_weights: bool = False,
  ) -> Array:
    """Attends ``inputs_q`` to ``inputs_kv`` (default: itself).

    Args:
      inputs_q: ``(..., T, F)``.
      inputs_kv: ``(..., S, Fkv)`` (default ``inputs_q``: self-attention).
      mask, bias, query_seq_lengths, key_value_seq_lengths, mask_mod, score_mod,
        block_mask, q_segment_ids, kv_segment_ids, q_positions, kv_positions: as in
        :func:`jattn.dot_product_attention` (masks and biases broadcast against
        ``(..., N, T, S)``).
      deterministic: True turns dropout off; with ``dropout_rate > 0`` it must be
        given here or as the attribute (Flax's convention).
      sow_weights: store the attention weights ``(..., N, T, S)`` in the
        ``"intermediates"`` collection as ``"attention_weights"`` (naive path).

    Returns:
      ``(..., T, O)``, or ``(..., T, N * D)`` without the out projection.
    """
    inputs_q = jnp.asarray(inputs_q)
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if self_attention else jnp.asarray(inputs_kv)
    if inputs_q.ndim < 2 or inputs_kv.ndim < 2:
      raise ValueError(
        f"inputs must be laid out (..., seq, features); got {inputs_q.shape} and {inputs_kv.shape}."
      )
    params = self._params(inputs_q.shape[-1], inputs_kv.shape[-1])
    params, (inputs_q, inputs_kv) = _params.cast(self.dtype, params, inputs_q, inputs_kv)
    options: dict[str, Any] = dict(
      mask=mask,
      bias=bias,
      scale=self.scale,
      local_window_size=self.local_window_size,
      key_value_seq_lengths=key_value_seq_lengths,
      mask_mod=mask_mod,
      score_mod=score_mod,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      q_positions=q_positions,
      kv_positions=kv_positions,
      attention_chunk_size=self.attention_chunk_size,
      logits_soft_cap=self.logits_soft_cap,
      alibi_slopes=alibi_slopes(self.num_heads) if self.alibi else None,
      implementation=self.implementation,
      block_q=self.block_q,
      block_kv=self.block_kv,
    )
    if block_mask is not None:  # decode_step takes none: its tiles move with the cache
      options["block_mask"] = block_mask
    if self.dropout_rate > 0.0 and not nn.merge_param(
      "deterministic", self.deterministic, deterministic
    ):
      options.update(dropout_rate=self.dropout_rate, dropout_rng=self.make_rng("dropout"))

    if self.decode:
      if not self_attention:
        raise ValueError("decode mode is self-attention: call it without inputs_kv.")
      if sow_weights or query_seq_lengths is not None:
        raise ValueError("decode mode supports neither sow_weights nor query_seq_lengths.")
      initialized = self.has_variable("cache", "index")
      batch, max_len = inputs_q.shape[:-2], inputs_q.shape[-2]
      empty = _decode.init_cache(params, batch, max_len, dtype=inputs_q.dtype)
      cache = {n: self.variable("cache", n, lambda n=n: empty[n]) for n in empty}
      if initialized:
        out, new = _decode.decode_step(
          params, {n: c.value for n, c in cache.items()}, inputs_q, **options
        )
        for n, c in cache.items():
          c.value = new[n]
        return out
      # init: size the cache and run ordinary causal attention.
      return _attention.attention(params, inputs_q, inputs_kv, is_causal=True, **options)

    result = _attention.attention(
      params,
      inputs_q,
      inputs_kv,
      is_causal=self.is_causal,
      alignment=self.alignment,
      query_seq_lengths=query_seq_lengths,
      return_weights=sow_weights,
      **options,
    )
    if sow_weights:
      out, weights = result
      self.sow("intermediates", "attention_weights", weights)
      return out
    return result


class SelfAttention(MultiHeadAttention):
  """:class:`MultiHeadAttention` of its inputs on themselves: ``__call__(x, **kw)``."""

  @nn.compact
  def __call__(self, inputs: Array, **kwargs: Any) -> Array:  # type: ignore[override]
    if "inputs_kv" in kwargs:
      raise TypeError("SelfAttention attends its inputs to themselves: drop inputs_kv.")
    return super().__call__(inputs, None, **kwargs)
