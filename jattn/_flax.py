"""What :mod:`jattn.linen` and :mod:`jattn.nnx` share: Flax's arguments, read once.

Both modules take Flax 0.12's constructor and call arguments with Flax's defaults
and turn them into one call of the pure functions (:func:`jattn.attention` or
:func:`jattn.decode_step`). This module holds that translation, so the two
modules differ only in how Flax stores parameters and state.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _params
from jattn._masks import alibi_slopes

Array = jax.Array

# jattn's options a module takes as attributes (constructor arguments), with defaults.
EXTRAS: dict[str, Any] = dict(
  scale=None,
  is_causal=False,
  local_window_size=None,
  alignment="top_left",
  attention_chunk_size=None,
  logits_soft_cap=None,
  alibi=False,
  implementation="auto",
  block_q=None,
  block_kv=None,
)

# jattn's options a module takes per call, with defaults.
CALL_EXTRAS: dict[str, Any] = dict(
  bias=None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  mask_mod=None,
  score_mod=None,
  block_mask=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  q_positions=None,
  kv_positions=None,
)


def call_options(where: str, given: dict[str, Any]) -> dict[str, Any]:
  """jattn's per-call keywords (:data:`CALL_EXTRAS`), unknown ones a ``TypeError``."""
  unknown = sorted(set(given) - set(CALL_EXTRAS))
  if unknown:
    raise TypeError(
      f"{where} got unknown call arguments {unknown}; jattn's are {sorted(CALL_EXTRAS)}."
    )
  return {**CALL_EXTRAS, **given}


def check_unsupported(where: str, **given: Any) -> None:
  """Flax arguments jattn cannot honour raise when set, never silently ignored."""
  for name, value in given.items():
    if value is not None:
      raise NotImplementedError(
        f"{where} does not support {name} (it computes attention with jattn's own kernels); "
        f"leave it at None, or use Flax's module for it."
      )


def head_dims(
  num_heads: int,
  num_kv_heads: int | None,
  qkv_features: int | None,
  head_dim: int | None,
  in_features: int,
  v_head_dim: int | None,
) -> tuple[int, int, int]:
  """``(K, H, D)``: key/value heads (default ``num_heads``), and ``H`` from Flax's
  ``qkv_features`` (default ``in_features``) or jattn's ``head_dim``."""
  _params._positive("num_heads", num_heads)
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  _params._positive("num_kv_heads", num_kv_heads)
  _params.check_heads(num_heads, num_kv_heads)
  if head_dim is not None:
    _params._positive("head_dim", head_dim)
    if qkv_features is not None and qkv_features != num_heads * head_dim:
      raise ValueError(
        f"qkv_features ({qkv_features}) must be num_heads * head_dim "
        f"({num_heads} * {head_dim}); give one of them."
      )
  else:
    features = in_features if qkv_features is None else qkv_features
    _params._positive("qkv_features", features)
    if features % num_heads:
      raise ValueError(f"qkv_features ({features}) must be divisible by num_heads ({num_heads}).")
    head_dim = features // num_heads
  return num_kv_heads, head_dim, head_dim if v_head_dim is None else v_head_dim


def initializers(
  kernel_init: Any,
  out_kernel_init: Any,
  bias_init: Any,
  out_bias_init: Any,
  stddev: Any,
  dtype: Any,
) -> tuple[Callable, Callable, Callable, Callable]:
  """Kernel and bias initializers as callables (names as in :func:`jattn.get_initializer`)."""
  kernel = _params.kernel_initializer(kernel_init, stddev, dtype)
  out = kernel if out_kernel_init is None else _params.get_initializer(out_kernel_init, dtype=dtype)
  for name, fn in (("bias_init", bias_init), ("out_bias_init", out_bias_init)):
    if fn is not None and not callable(fn):
      raise TypeError(f"{name} must be an initializer (key, shape, dtype) -> Array, got {fn!r}.")
  return kernel, out, bias_init, bias_init if out_bias_init is None else out_bias_init


def inputs(
  inputs_q: Any, inputs_k: Any, inputs_v: Any, inputs_kv: Any = None
) -> tuple[Array, Array, Array]:
  """Flax's input rules: ``inputs_k`` defaults to ``inputs_q``, ``inputs_v`` to ``inputs_k``;
  the older ``inputs_kv=`` sets both."""
  if inputs_kv is not None:
    if inputs_k is not None or inputs_v is not None:
      raise ValueError("give inputs_kv or inputs_k/inputs_v, not both.")
    inputs_k = inputs_kv
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_v is given without inputs_k: pass the keys' inputs too.")
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  names = ("inputs_q", "inputs_k", "inputs_v")
  xs = [
    _params.check_real(n, x) for n, x in zip(names, (inputs_q, inputs_k, inputs_v), strict=True)
  ]
  for name, x in zip(names, xs, strict=True):
    if x.ndim < 2:
      raise ValueError(f"{name} must be laid out (..., seq, features); got shape {x.shape}.")
  return xs[0], xs[1], xs[2]


def boolean_mask(mask: Any) -> Array | None:
  """A Flax mask as jattn's boolean one: nonzero attends (``make_attention_mask``'s floats)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if jnp.issubdtype(mask.dtype, jnp.complexfloating):
    raise TypeError(f"mask must be boolean or real (nonzero attends), got dtype {mask.dtype}.")
  return mask if mask.dtype == jnp.bool_ else mask != 0


@contextlib.contextmanager
def precision(value: Any) -> Iterator[None]:
  """Flax's ``precision`` for every matmul of the call, via ``jax.default_matmul_precision``."""
  if value is None:
    yield
    return
  if isinstance(value, (tuple, list)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"precision must be one value for every operand, got {value!r}.")
    value = value[0]
  name = value.name if isinstance(value, jax.lax.Precision) else value
  if not isinstance(name, str):
    raise TypeError(f"precision must be a jax.lax.Precision or its name, got {value!r}.")
  with jax.default_matmul_precision(name.lower()):
    yield


class Dropout(NamedTuple):
  """A call's dropout, as Flax decides it (``deterministic`` merged, the rng drawn)."""

  rate: float
  broadcast: bool
  deterministic: bool
  rng: Any


def options(
  attributes: dict[str, Any], num_heads: int, call: dict[str, Any], mask: Any, dropout: Dropout
) -> dict[str, Any]:
  """The keyword options of :func:`jattn.dot_product_attention` for one module call."""
  opts = {name: attributes[name] for name in EXTRAS if name != "alibi"}
  opts.update({name: value for name, value in call.items() if value is not None})
  opts["mask"] = boolean_mask(mask)
  if attributes["alibi"]:
    opts["alibi_slopes"] = tuple(map(float, alibi_slopes(num_heads)))  # static
  if dropout.rate > 0.0 and not dropout.deterministic:
    opts.update(
      dropout_rate=dropout.rate, dropout_rng=dropout.rng, broadcast_dropout=dropout.broadcast
    )
  return opts


def attention_fn_kwargs(
  mask: Any, dropout: Dropout, dtype: Any, precision: Any, **extra: Any
) -> dict[str, Any]:
  """The keyword arguments Flax's modules give their ``attention_fn``."""
  return dict(
    mask=mask,
    dropout_rng=dropout.rng,
    dropout_rate=dropout.rate,
    broadcast_dropout=dropout.broadcast,
    deterministic=dropout.deterministic,
    dtype=dtype,
    precision=precision,
    **extra,
  )


def call_attention_fn(
  fn: Callable,
  params: Any,
  xs: tuple[Array, Array, Array],
  attributes: dict[str, Any],
  call: dict[str, Any],
  flax_kwargs: dict[str, Any],
) -> Array:
  """Flax's ``attention_fn`` hook: ``fn(q, k, v, **kwargs)`` between jattn's projections.

  ``kwargs`` are Flax's (``mask``, dropout, ``dtype``, ``precision``, ...), kept
  when ``fn``'s signature names them, as Flax does; jattn's own options cannot
  reach ``fn``, so setting one is an error.
  """
  used = [n for n, default in EXTRAS.items() if attributes[n] != default]
  used += [n for n, value in call.items() if value is not None]
  proj = _params.Projections(params)
  used += ["use_sinks"] if proj.sinks is not None else []
  if used:
    raise ValueError(f"a custom attention_fn cannot apply jattn's options {sorted(used)}.")
  accepted = inspect.signature(fn).parameters
  kwargs = {k: v for k, v in flax_kwargs.items() if k in accepted or k == "module"}
  q, k, v = _params.project_qkv(proj, *xs)
  return _params.project_out(proj, fn(q, k, v, **kwargs))
