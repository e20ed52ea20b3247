"""The parameter pytree, its initialisation, validation and the projections.

The layout is that of ``flax.linen.MultiHeadDotProductAttention`` (and nnx's), so
a pytree moves between jattn and Flax with no conversion::

  {"query": {"kernel": (F, N, H), "bias": (N, H)},     # bias optional
   "key":   {"kernel": (Fkv, K, H), "bias": (K, H)},
   "value": {"kernel": (Fkv, K, D), "bias": (K, D)},
   "out":   {"kernel": (N, D, O), "bias": (O,)},        # "out" optional
   "query_ln": {"scale": (H,)},                          # optional: Flax's normalize_qk
   "key_ln":   {"scale": (H,)},                          #   LayerNorms of queries and keys
   "sinks": (N,)}                                        # optional: gpt-oss's sink logits

  F  query input features     Fkv  key/value input features     O  output features
  N  query heads              K    key/value heads               H  query/key head size
  D  value head size

A 2-D kernel ``(F, H)`` (bias ``(H,)``) is one head, so the walkthrough's 4x3
matrices go in exactly as printed. Without ``"out"`` the heads' outputs are
concatenated: ``(..., T, N * D)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Mapping[str, Mapping[str, Array]]

_PROJECTIONS = ("query", "key", "value")


def _variance_scaling(scale, mode, distribution):
  return lambda in_axis, out_axis, dtype, stddev: jax.nn.initializers.variance_scaling(
    scale, mode, distribution, in_axis=in_axis, out_axis=out_axis, dtype=dtype
  )


# Each entry builds a jax.nn initializer from (in_axis, out_axis, dtype, stddev).
INITIALIZERS: dict[str, Callable[..., jax.nn.initializers.Initializer]] = {
  "normal": lambda i, o, dtype, stddev: jax.nn.initializers.normal(stddev, dtype),
  "xavier_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
  "xavier_normal": _variance_scaling(1.0, "fan_avg", "truncated_normal"),
  "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
  "he_normal": _variance_scaling(2.0, "fan_in", "truncated_normal"),
  "lecun_uniform": _variance_scaling(1.0, "fan_in", "uniform"),
  "lecun_normal": _variance_scaling(1.0, "fan_in", "truncated_normal"),
}
_ALIASES = {
  "gaussian": "normal",
  "glorot_uniform": "xavier_uniform",
  "glorot_normal": "xavier_normal",
  "kaiming_uniform": "he_uniform",
  "kaiming_normal": "he_normal",
}
INITIALIZER_NAMES = tuple(sorted([*INITIALIZERS, *_ALIASES]))


def get_initializer(
  name: str | Callable,
  *,
  in_axis: int | tuple[int, ...] = 0,
  out_axis: int | tuple[int, ...] = -1,
  dtype: Any = jnp.float32,
  stddev: float = 0.02,
) -> Callable:
  """A ``jax.nn.initializers`` initializer chosen by name (or a callable, returned as is).

  The fans of a multi-head kernel ``(F, N, H)`` are ``F`` in and ``N * H`` out,
  exactly as for the equivalent 2-D ``(F, N * H)`` matrix.

  Args:
    name: one of :data:`INITIALIZER_NAMES` (``"normal"``/``"gaussian"``,
      ``"xavier_uniform"``/``"glorot_uniform"``, ``"xavier_normal"``,
      ``"he_uniform"``/``"kaiming_uniform"``, ``"he_normal"``, ``"lecun_uniform"``,
      ``"lecun_normal"``), or an initializer ``(key, shape, dtype) -> Array``.
    in_axis: the kernel axes that are fan-in.
    out_axis: the kernel axes that are fan-out.
    dtype: default dtype of the initializer.
    stddev: standard deviation of ``"normal"``.

  Raises:
    ValueError: for an unknown name, listing the choices.
  """
  if callable(name):
    return name
  if not isinstance(name, str):
    raise TypeError(f"initializer must be a name or a callable, got {type(name).__name__}.")
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in INITIALIZERS:
    raise ValueError(f"unknown initializer {name!r}; choose one of {', '.join(INITIALIZER_NAMES)}.")
  if key == "normal" and not stddev > 0:
    raise ValueError(f"stddev must be positive, got {stddev}.")
  return INITIALIZERS[key](in_axis, out_axis, dtype, stddev)


def kernel_initializer(kernel_init: str | Callable, stddev: float | None, dtype: Any) -> Callable:
  """``kernel_init`` as a callable; ``stddev`` (default 0.02) only with ``"normal"``."""
  name = kernel_init.lower() if isinstance(kernel_init, str) else None
  if stddev is not None and _ALIASES.get(name, name) != "normal":
    raise ValueError(f"stddev applies to kernel_init='normal' only, not {kernel_init!r}.")
  return get_initializer(kernel_init, dtype=dtype, stddev=0.02 if stddev is None else stddev)


def flat_init(initializer: Callable, fan_in_axes: int) -> Callable:
  """``initializer`` applied to the flat matrix of a multi-axis kernel, as Flax does.

  A kernel ``(F, N, H)`` is drawn as the ``(F, N * H)`` matrix it acts as (and
  ``(N, D, O)`` as ``(N * D, O)``; a bias ``(N, H)`` as ``(N * H,)`` with
  ``fan_in_axes=0``), then reshaped, so any ``jax.nn.initializers`` callable sees
  the fan-in and fan-out of that matrix: the parameters of ``DenseGeneral`` /
  ``LinearGeneral`` for the same rng.
  """

  def init(rng: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    shape = tuple(shape)
    if fan_in_axes:
      flat = (math.prod(shape[:fan_in_axes]), math.prod(shape[fan_in_axes:]))
    else:
      flat = (math.prod(shape),)
    return jnp.reshape(initializer(rng, flat, dtype), shape)

  return init


def check_heads(num_heads: int, num_kv_heads: int) -> None:
  """Grouped-query heads: every key/value head serves the same number of query heads."""
  if num_heads % num_kv_heads:
    raise ValueError(
      f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})."
    )


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}.")


def init(
  rng: Array,
  in_features: int,
  head_dim: int,
  *,
  num_heads: int = 1,
  num_kv_heads: int | None = None,
  v_head_dim: int | None = None,
  kv_features: int | None = None,
  out_features: int | None = None,
  use_bias: bool = False,
  kernel_init: str | Callable = "lecun_normal",
  bias_init: Callable | None = None,
  stddev: float | None = None,
  use_sinks: bool = False,
  dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Creates an attention parameter pytree (Flax ``MultiHeadDotProductAttention`` layout).

  Args:
    rng: a PRNG key.
    in_features: ``F``, the features of the query inputs.
    head_dim: ``H``, the query/key size of each head.
    num_heads: ``N``, query heads.
    num_kv_heads: ``K``, key/value heads (default ``N``; a divisor of ``N``).
    v_head_dim: ``D``, the value size of each head (default ``H``).
    kv_features: ``Fkv``, features of the key/value inputs (default ``F``).
    out_features: ``O``: add an ``"out"`` projection ``(N, D, O)``; None (the
      default, as in the walkthrough) concatenates the heads instead.
    use_bias: add biases to every projection.
    kernel_init: an initializer name (see :func:`get_initializer`) or callable,
      applied to each kernel's flat matrix ``(F, N * H)`` / ``(N * D, O)`` and
      reshaped (:func:`flat_init`), so its fans are those Flax gives it.
    bias_init: a ``jax.nn.initializers`` initializer for the biases (default
      zeros), applied to the flat ``(N * H,)``; only with ``use_bias=True``.
    stddev: standard deviation for ``kernel_init="normal"`` (default 0.02); only
      with that initializer.
    use_sinks: add ``"sinks"``, one learnable sink logit per query head
      (zeros): each row's softmax denominator gets ``exp(sink)`` (see the
      ``sinks`` option of :func:`jattn.dot_product_attention`).
    dtype: dtype of every leaf.

  Returns:
    A nested dict of arrays: ``query``/``key``/``value``/(``out``) with
    ``kernel`` and (if ``use_bias``) ``bias``; and ``sinks`` ``(N,)`` with
    ``use_sinks``.

  Examples:
    >>> import jax, jattn
    >>> p = jattn.init(jax.random.key(0), 16, 8, num_heads=4, num_kv_heads=2, out_features=16)
    >>> jax.tree.map(lambda a: a.shape, p)["key"]
    {'kernel': (16, 2, 8)}
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  v_head_dim = head_dim if v_head_dim is None else v_head_dim
  kv_features = in_features if kv_features is None else kv_features
  for name, value in (
    ("in_features", in_features),
    ("head_dim", head_dim),
    ("num_heads", num_heads),
    ("num_kv_heads", num_kv_heads),
    ("v_head_dim", v_head_dim),
    ("kv_features", kv_features),
  ):
    _positive(name, value)
  _positive("out_features", out_features, allow_none=True)
  check_heads(num_heads, num_kv_heads)
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating point, got {dtype}.")
  _check_rng(rng)
  if bias_init is not None and not use_bias:
    raise ValueError("bias_init is given but use_bias=False: there are no biases to initialise.")
  bias_init = jax.nn.initializers.zeros if bias_init is None else bias_init
  kernel_init = kernel_initializer(kernel_init, stddev, dtype)
  shapes = {
    "query": ((in_features, num_heads, head_dim), (num_heads, head_dim)),
    "key": ((kv_features, num_kv_heads, head_dim), (num_kv_heads, head_dim)),
    "value": ((kv_features, num_kv_heads, v_head_dim), (num_kv_heads, v_head_dim)),
  }
  if out_features is not None:
    shapes["out"] = ((num_heads, v_head_dim, out_features), (out_features,))
  keys = jax.random.split(rng, 2 * len(shapes))
  params = {}
  for i, (name, (kernel_shape, bias_shape)) in enumerate(shapes.items()):
    fan_in = 2 if name == "out" else 1
    params[name] = {"kernel": flat_init(kernel_init, fan_in)(keys[2 * i], kernel_shape, dtype)}
    if use_bias:
      params[name]["bias"] = flat_init(bias_init, 0)(keys[2 * i + 1], bias_shape, dtype)
  if use_sinks:
    params["sinks"] = jnp.zeros((num_heads,), dtype)
  return params


_NORMS = ("query_ln", "key_ln")
_KEYS = (*_PROJECTIONS, "out", *_NORMS, "sinks")
_ENTRY_KEYS = ("kernel", "bias")


def _check_keys(params: Any) -> None:
  """Params are a mapping of known keys only: a typo must not silently change the model."""
  if not isinstance(params, Mapping):
    raise TypeError(
      f"params must be a mapping like jattn.init's output, got {type(params).__name__}."
    )
  unknown = sorted(map(str, set(params) - set(_KEYS)))
  if unknown:
    raise ValueError(
      f"params has unknown keys {unknown}; expected 'query', 'key', 'value' and optionally "
      f"'out', 'query_ln', 'key_ln' and 'sinks' (it has {sorted(map(str, params))})."
    )
  for name in set(params) & {*_PROJECTIONS, "out"}:
    entry = params[name]
    extra = sorted(map(str, set(entry) - set(_ENTRY_KEYS))) if isinstance(entry, Mapping) else []
    if extra:
      raise ValueError(
        f"params[{name!r}] has unknown keys {extra}; expected 'kernel' and optionally 'bias'."
      )
  for name in set(params) & set(_NORMS):
    entry = params[name]
    if not isinstance(entry, Mapping) or set(entry) != {"scale"}:
      keys = sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__
      raise ValueError(f"params[{name!r}] must be {{'scale': (head_dim,)}}; got {keys}.")


def _check_rng(rng: Any) -> None:
  """A single PRNG key: typed (``jax.random.key``) or raw (``jax.random.PRNGKey``, uint32)."""
  typed = isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if typed and rng.shape == ():
    return
  if not typed and isinstance(rng, (jax.Array, np.ndarray)) and rng.dtype == np.uint32:
    if rng.ndim == 1:  # raw key data; its length depends on the PRNG implementation
      return
  what = f"{rng.dtype}{list(rng.shape)}" if hasattr(rng, "shape") else type(rng).__name__
  raise TypeError(f"rng must be one PRNG key (jax.random.key(seed)), got {what}.")


def _entry(params: Any, name: str) -> tuple[Array, Array | None]:
  if name not in params:
    raise ValueError(
      f"params is missing the {name!r} entry; it has {sorted(params)}. "
      "Expected keys: 'query', 'key', 'value' and optionally 'out' and 'sinks'."
    )
  entry = params[name]
  if not isinstance(entry, Mapping) or "kernel" not in entry:
    raise ValueError(f"params[{name!r}] must be a mapping with a 'kernel' (and optional 'bias').")
  bias = entry.get("bias")
  return _leaf(name, "kernel", entry["kernel"]), None if bias is None else _leaf(name, "bias", bias)


def _leaf(name: str, part: str, x: Any) -> Array:
  """``params[name][part]`` as a floating-point array, or an error naming it."""
  try:
    x = jnp.asarray(x)
  except (TypeError, ValueError) as e:
    what = type(x).__name__
    raise TypeError(f"params[{name!r}][{part!r}] must be an array, got {what}: {e}") from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"params[{name!r}][{part!r}] must be floating point, got {x.dtype}.")
  return x


def _headed(name: str, kernel: Array, bias: Array | None) -> tuple[Array, Array | None]:
  """Normalises a projection to a kernel ``(F, heads, size)`` and bias ``(heads, size)``."""
  if kernel.ndim not in (2, 3):
    raise ValueError(
      f"params[{name!r}]['kernel'] must be (in, heads, head_dim) or (in, head_dim); "
      f"got shape {kernel.shape}."
    )
  if 0 in kernel.shape:
    raise ValueError(f"params[{name!r}]['kernel'] must not be empty; got shape {kernel.shape}.")
  if bias is not None and bias.shape != kernel.shape[1:]:
    raise ValueError(
      f"params[{name!r}]['bias'] must have shape {kernel.shape[1:]} to match its kernel "
      f"{kernel.shape}; got {bias.shape}."
    )
  if kernel.ndim == 2:
    kernel = kernel[:, None, :]
    bias = None if bias is None else bias[None]
  return kernel, bias


class Projections:
  """A validated view of a params pytree: normalised kernels and their sizes."""

  def __init__(self, params: Any):
    _check_keys(params)
    entries = {name: _headed(name, *_entry(params, name)) for name in _PROJECTIONS}
    self.query, self.key, self.value = (entries[n] for n in _PROJECTIONS)
    (q_kernel, _), (k_kernel, _), (v_kernel, _) = self.query, self.key, self.value
    self.headless = all(jnp.ndim(params[n]["kernel"]) == 2 for n in _PROJECTIONS)
    if q_kernel.shape[-1] != k_kernel.shape[-1]:
      raise ValueError(
        "query and key kernels must project to the same head size (they are dotted): "
        f"query kernel {q_kernel.shape}, key kernel {k_kernel.shape}."
      )
    if k_kernel.shape[1] != v_kernel.shape[1]:
      raise ValueError(
        "key and value kernels must have the same number of heads: "
        f"key kernel {k_kernel.shape}, value kernel {v_kernel.shape}."
      )
    if q_kernel.shape[1] % k_kernel.shape[1]:
      raise ValueError(
        f"query heads ({q_kernel.shape[1]}) must be a multiple of key/value heads "
        f"({k_kernel.shape[1]}): query kernel {q_kernel.shape}, key kernel {k_kernel.shape}."
      )
    self.num_heads, self.head_dim = q_kernel.shape[1:]
    self.v_head_dim = v_kernel.shape[2]
    self.out = None
    if "out" in params:
      kernel, bias = _entry(params, "out")
      expected = (self.num_heads, self.v_head_dim)
      if kernel.ndim == 2 and kernel.shape[0] == self.num_heads * self.v_head_dim:
        kernel = kernel.reshape(*expected, kernel.shape[1])
      if kernel.ndim != 3 or kernel.shape[:2] != expected:
        raise ValueError(
          f"params['out']['kernel'] must be (heads, v_head_dim, out) = {(*expected, 'out')}; "
          f"got {kernel.shape}."
        )
      if bias is not None and bias.shape != kernel.shape[2:]:
        raise ValueError(
          f"params['out']['bias'] must have shape {kernel.shape[2:]}; got {bias.shape}."
        )
      self.out = (kernel, bias)
    self.query_ln, self.key_ln = (
      _norm_scale(params, name, self.head_dim) if name in params else None for name in _NORMS
    )
    self.sinks = None
    if "sinks" in params:
      sinks = jnp.asarray(params["sinks"])
      if sinks.shape != (self.num_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(
          f"params['sinks'] must be ({self.num_heads},) floats, one per query head; "
          f"got {sinks.dtype}{list(sinks.shape)}."
        )
      self.sinks = sinks

  def options(self, options: dict[str, Any]) -> dict[str, Any]:
    """The call's options with the params' sinks (never both: that would be ambiguous)."""
    if self.sinks is None:
      return options
    if options.get("sinks") is not None:
      raise ValueError("params has 'sinks': do not pass sinks= as well.")
    return {**options, "sinks": self.sinks}


def _norm_scale(params: Any, name: str, head_dim: int) -> Array:
  scale = _leaf(name, "scale", params[name]["scale"])
  if scale.shape != (head_dim,):
    raise ValueError(
      f"params[{name!r}]['scale'] must have shape ({head_dim},), the head size; got {scale.shape}."
    )
  return scale


def layer_norm(x: Array, scale: Array, epsilon: float = 1e-6) -> Array:
  """Flax's ``LayerNorm(use_bias=False)`` over the last axis (``normalize_qk``).

  Statistics in float32 at least, with Flax's fast variance
  ``E[x^2] - E[x]^2`` (clipped at 0) and ``epsilon``, so its numbers are Flax's.
  """
  stats = x.astype(jnp.promote_types(jnp.float32, x.dtype))
  mean = jnp.mean(stats, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(stats), axis=-1, keepdims=True) - jnp.square(mean))
  dtype = jnp.result_type(x, scale)
  scale = jnp.reshape(scale, (1,) * (x.ndim - 1) + scale.shape).astype(stats.dtype)
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return ((x.astype(stats.dtype) - mean) * mul).astype(dtype)


def check_real(name: str, x: Any) -> Array:
  """``x`` as an array of real numbers: floats, or integers (promoted to float32 later).

  Complex inputs would lose their imaginary part in the projections, and booleans
  are masks, not features: both are a ``TypeError`` naming ``name``.
  """
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"{name} must hold real numbers (float or int), got dtype {x.dtype}.")
  return x


def _check_input(name: str, x: Any, features: int, kernel_shape: tuple[int, ...]) -> Array:
  x = check_real(name, x)
  if x.ndim < 2:
    raise ValueError(f"{name} must have rank >= 2, laid out (..., seq, features); got {x.shape}.")
  if x.shape[-1] != features:
    raise ValueError(
      f"{name} has {x.shape[-1]} features (shape {x.shape}) but the kernel "
      f"{kernel_shape} expects {features}."
    )
  if 0 in x.shape:
    raise ValueError(f"{name} must not have empty dimensions; got {x.shape}.")
  return x


def project(x: Array, kernel: Array, bias: Array | None) -> Array:
  """``(..., T, F) x (F, N, H) -> (..., T, N, H)``, computed in the promoted float dtype.

  Integer inputs (such as the walkthrough's) are promoted to float32.
  """
  dtype = jnp.result_type(x, kernel)
  if not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.float32
  y = jnp.einsum("...TF,FNH->...TNH", x.astype(dtype), kernel.astype(dtype))
  return y if bias is None else y + jnp.broadcast_to(bias.astype(dtype), y.shape)


def project_qkv(
  proj: Projections, x_q: Any, x_k: Any, x_v: Any = None
) -> tuple[Array, Array, Array]:
  """Step 3: queries ``(..., T, N, H)``, keys ``(..., S, K, H)``, values ``(..., S, K, D)``.

  Keys and values are projected from ``x_k`` (``x_v`` defaults to it); with
  ``"query_ln"``/``"key_ln"`` the queries/keys are then layer-normalised.
  """
  q_kernel, k_kernel, v_kernel = proj.query[0], proj.key[0], proj.value[0]
  if x_v is None:
    names = ("x", "x", "x") if x_q is x_k else ("x_q", "x_kv", "x_kv")
  else:
    names = ("x_q", "x_k", "x_v")
  x_q = _check_input(names[0], x_q, q_kernel.shape[0], q_kernel.shape)
  x_k = _check_input(names[1], x_k, k_kernel.shape[0], k_kernel.shape)
  x_v = x_k if x_v is None else x_v
  x_v = _check_input(names[2], x_v, v_kernel.shape[0], v_kernel.shape)
  if not x_q.shape[:-2] == x_k.shape[:-2] == x_v.shape[:-2] or x_k.shape[-2] != x_v.shape[-2]:
    shapes = " and ".join(
      f"{n} {x.shape}" for n, x in dict(zip(names, (x_q, x_k, x_v), strict=True)).items()
    )
    raise ValueError(
      f"{shapes} must have the same leading batch dimensions (and keys and values the same length)."
    )
  q = project(x_q, *proj.query)
  k = project(x_k, *proj.key)
  v = project(x_v, *proj.value)
  if proj.query_ln is not None:
    q = layer_norm(q, proj.query_ln)
  if proj.key_ln is not None:
    k = layer_norm(k, proj.key_ln)
  dtype = jnp.result_type(q, k, v)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def project_out(proj: Projections, heads: Array) -> Array:
  """Heads ``(..., T, N, D)`` to outputs: ``(..., T, O)`` with ``"out"``, else ``(..., T, N*D)``."""
  if proj.out is None:
    return heads.reshape(*heads.shape[:-2], -1)
  kernel, bias = proj.out
  dtype = jnp.result_type(heads, kernel)
  y = jnp.einsum("...TND,NDO->...TO", heads.astype(dtype), kernel.astype(dtype))
  return y if bias is None else y + jnp.broadcast_to(bias.astype(dtype), y.shape)


def cast(dtype: Any, params: Any, *inputs: Array) -> tuple[Any, list[Array]]:
  """Params and inputs in the computation dtype of a module: ``dtype``, or else the
  promoted dtype of inputs and params (float32 for integer inputs). The inputs are
  arrays already checked by :func:`check_real` (the modules' ``_flax.inputs``)."""
  dtype = dtype or jnp.result_type(*inputs, *jax.tree.leaves(params))
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return params, [jnp.asarray(x, dtype) for x in inputs]
