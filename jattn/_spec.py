"""One validated description of an attention call: every option, checked once.

The public entry points (:func:`jattn.dot_product_attention`, :func:`jattn.attention`,
:func:`jattn.attention_stats`, :func:`jattn.decode_step`, :func:`jattn.ring_attention`,
the modules, ...) hand their keyword options to :func:`describe`, which checks them
against the inputs' shapes at trace time and returns a :class:`Call`. The naive,
blockwise and ring backends read its typed fields and trust them: nothing is
validated twice, and no backend interprets a raw option.

:class:`Options` is the one list of keyword options (their defaults and types).
Shapes use the letters of :mod:`jattn._naive`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jattn import _dropout, _masks

Array = jax.Array


def compute_dtype(dtype) -> np.dtype:
  """The dtype scores and softmax are computed in: float32 at least."""
  return jnp.promote_types(dtype, jnp.float32)


class Dims(NamedTuple):
  """The sizes of one attention problem (letters as in ``jax.nn.dot_product_attention``)."""

  batch: tuple[int, ...]
  T: int
  S: int
  N: int
  K: int
  H: int
  D: int

  @property
  def weights_shape(self) -> tuple[int, ...]:
    return (*self.batch, self.N, self.T, self.S)


@dataclasses.dataclass(frozen=True)
class Options:
  """Every keyword option of jattn's attention functions, with its default: the one list.

  Documented in :func:`jattn.dot_product_attention`.
  """

  bias: Any = None
  mask: Any = None
  scale: Any = None
  is_causal: Any = False
  local_window_size: Any = None
  query_seq_lengths: Any = None
  key_value_seq_lengths: Any = None
  alignment: Any = "bottom_right"
  mask_mod: Callable | None = None
  score_mod: Callable | None = None
  block_mask: Any = None
  q_segment_ids: Any = None
  kv_segment_ids: Any = None
  q_positions: Any = None
  kv_positions: Any = None
  attention_chunk_size: Any = None
  alibi_slopes: Any = None
  logits_soft_cap: Any = None
  sinks: Any = None
  implementation: Any = "auto"
  block_q: Any = None
  block_kv: Any = None
  dropout_rate: Any = 0.0
  dropout_rng: Any = None
  broadcast_dropout: Any = False
  deterministic: Any = False
  return_weights: Any = False
  return_lse: Any = False


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


def options(
  where: str, given: dict[str, Any], *, exclude: tuple[str, ...] = (), why: str = ""
) -> Options:
  """``given`` keyword options as :class:`Options`; unknown or excluded ones raise ``TypeError``."""
  unknown = sorted(set(given) - set(OPTION_NAMES))
  if unknown:
    raise TypeError(
      f"{where} got unknown option(s) {unknown}; the options are {list(OPTION_NAMES)}."
    )
  excluded = sorted(set(given) & set(exclude))
  if excluded:
    raise TypeError(f"{where} does not take {excluded}{why}.")
  return Options(**given)


class Mod(NamedTuple):
  """A user ``score_mod``/``mask_mod`` with the arrays it closes over made explicit.

  ``fn(*args, *consts)``; ``consts`` are the traced values the function captured
  (``jax.closure_convert``), so they can be passed, and differentiated, as arguments.
  """

  fn: Callable
  consts: tuple[Array, ...]
  score_dtype: Any = None  # score_mod: the dtype its score argument is traced with


def check_mod(name: str, fn: Any, score_dtype) -> Mod | None:
  """Validates a mod on scalar arguments and closure-converts it."""
  if fn is None:
    return None
  if not callable(fn):
    raise TypeError(f"{name} must be a callable, got {type(fn).__name__}.")
  example = [jnp.zeros((), jnp.int32)] * 4
  if name == "score_mod":
    example = [jnp.zeros((), score_dtype), *example]
  signature = "(score, b, h, q_idx, kv_idx)" if name == "score_mod" else "(b, h, q_idx, kv_idx)"
  try:
    closed = jax.make_jaxpr(fn)(*example)
  except TypeError as e:
    raise TypeError(
      f"{name} must be a function {signature} of scalars (use jnp.where, not Python if); "
      f"calling it on scalar arguments failed: {e}"
    ) from e
  out = closed.out_avals
  if len(out) != 1 or out[0].shape != ():
    shapes = [tuple(a.shape) for a in out]
    raise ValueError(
      f"{name} must return one scalar per (b, h, q_idx, kv_idx); for scalar arguments it "
      f"returned {shapes[0] if len(shapes) == 1 else shapes}."
    )
  dtype = out[0].dtype
  if name == "mask_mod" and dtype != jnp.bool_:
    raise TypeError(f"mask_mod must return a bool (True = attend), got dtype {dtype}.")
  if name == "score_mod" and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"score_mod must return a floating score, got dtype {dtype}.")
  # Every value the function captured becomes an explicit argument (what
  # jax.closure_convert does for perturbed floats only): traced arrays then enter
  # custom derivative rules and shard_map as inputs, never as closed-over tracers.
  jaxpr, consts = closed.jaxpr, tuple(jnp.asarray(c) for c in closed.consts)

  def converted(*args):
    n = len(args) - len(consts)
    return jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(jaxpr, list(args[n:])))(*args[:n])[0]

  return Mod(converted, consts, score_dtype if name == "score_mod" else None)


def apply_mod(mod: Mod, *args: Array) -> Array:
  """Evaluates a scalar mod on arrays that broadcast together, one ``vmap`` per axis.

  An argument of size 1 along an axis is not mapped over it (never broadcast), so
  an index that varies along one axis of a tile costs that axis only, and no
  reshape separates the mod from the scores it changes.
  """
  shape = np.broadcast_shapes(*(a.shape for a in args))
  rank = len(shape)
  # The indices are int32 as the mod was traced with (also under jax_enable_x64).
  dtypes = [jnp.int32] * 4 if mod.score_dtype is None else [mod.score_dtype, *[jnp.int32] * 4]
  args = [jnp.asarray(a, d) for a, d in zip(args, dtypes, strict=True)]
  args = [a.reshape((1,) * (rank - a.ndim) + a.shape) for a in args]
  mapped = [[a.shape[k] == shape[k] for k in range(rank)] for a in args]
  args = [
    a.reshape([d for d, m in zip(a.shape, mk, strict=True) if m])
    for a, mk in zip(args, mapped, strict=True)
  ]
  n = len(args)

  def fn(*xs):
    return mod.fn(*xs[:n], *xs[n:])

  for k in reversed(range(rank)):
    fn = jax.vmap(
      fn, in_axes=(*(0 if mk[k] else None for mk in mapped), *(None,) * len(mod.consts))
    )
  return fn(*args, *mod.consts)


class Call(NamedTuple):
  """A checked attention call: what every backend receives.

  ``q (..., T, N, H)``, ``k (..., S, K, H)``, ``v (..., S, K, D)`` as arrays of one
  floating dtype; ``bias`` broadcastable to ``(..., N, T, S)``; ``mask`` says which
  (query, key) pairs are visible (:class:`jattn._masks.Mask`).
  """

  q: Array
  k: Array
  v: Array
  dims: Dims
  scale: Any  # a Python float, or a traced scalar
  bias: Array | None
  mask: _masks.Mask
  score_mod: Mod | None
  slopes: Array | None  # ALiBi slopes (..., N), broadcastable to (*batch, N)
  soft_cap: float | None
  sinks: Array | None  # (N,) sink logits
  dropout: _dropout.Dropout | None
  implementation: Any  # "naive", "blockwise" or a jattn.Ring (resolved)
  block_q: int | None
  block_kv: int | None
  return_weights: bool
  return_lse: bool


def check_qkv(q: Any, k: Any, v: Any) -> tuple[Array, Array, Array, Dims]:
  """Validates the layouts ``q (..., T, N, H)``, ``k (..., S, K, H)``, ``v (..., S, K, D)``."""
  q, k, v = (jnp.asarray(a) for a in (q, k, v))
  for name, a in (("query", q), ("key", k), ("value", v)):
    if a.ndim < 3:
      raise ValueError(
        f"{name} must have rank >= 3, laid out (..., seq, heads, head_dim); got shape {a.shape}."
      )
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {a.dtype}.")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(
      f"query, key and value must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}."
    )
  if not q.ndim == k.ndim == v.ndim:
    raise ValueError(
      "query, key and value must have the same rank (..., seq, heads, head_dim); "
      f"got shapes {q.shape}, {k.shape} and {v.shape}."
    )
  if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
    raise ValueError(
      "query, key and value must have the same leading batch dimensions; "
      f"got shapes {q.shape}, {k.shape} and {v.shape}."
    )
  if 0 in q.shape or 0 in k.shape or 0 in v.shape:
    raise ValueError(
      f"query, key and value must not have empty dimensions; got {q.shape}, {k.shape}, {v.shape}."
    )
  *batch, T, N, H = q.shape
  S, K, Hk = k.shape[-3:]
  Sv, Kv, D = v.shape[-3:]
  if H != Hk:
    raise ValueError(
      f"query and key head sizes must match (they are dotted): query {q.shape} has {H}, "
      f"key {k.shape} has {Hk}."
    )
  if S != Sv:
    raise ValueError(
      f"key and value must have the same length: key {k.shape} has {S}, value {v.shape} has {Sv}."
    )
  if K != Kv:
    raise ValueError(
      f"key and value must have the same number of heads: key {k.shape} has {K}, "
      f"value {v.shape} has {Kv}."
    )
  if N % K:
    raise ValueError(
      f"query heads ({N}, query {q.shape}) must be a multiple of key/value heads "
      f"({K}, key {k.shape})."
    )
  return q, k, v, Dims(tuple(batch), T, S, N, K, H, D)


def check_broadcast(name: str, x: Any, target: tuple[int, ...], *, boolean: bool) -> Array:
  """Checks that ``x`` broadcasts to ``target`` (and does not enlarge it)."""
  x = jnp.asarray(x)
  if boolean and x.dtype != jnp.bool_:
    raise TypeError(
      f"{name} must be boolean (True = attend), got dtype {x.dtype}; "
      f"use e.g. `{name} != 0` or the jattn mask helpers."
    )
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
  try:
    ok = np.broadcast_shapes(x.shape, target) == tuple(target)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
      f"{name} of shape {x.shape} does not broadcast to the attention weights' shape "
      f"{tuple(target)} (..., heads, q_len, kv_len)."
    )
  return x


def check_scale(scale: Any, head_dim: int) -> Any:
  """``scale`` as a Python float (concrete) or a traced scalar; default ``1 / sqrt(H)``."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, jax.core.Tracer):
    if scale.shape != () or not jnp.issubdtype(scale.dtype, jnp.floating):
      raise ValueError(f"scale must be a real scalar, got {scale.dtype}{list(scale.shape)}.")
    return scale
  if isinstance(scale, (bool, np.bool_)) or np.ndim(scale) != 0:
    raise ValueError(f"scale must be a real scalar, got {scale!r}.")
  if isinstance(scale, (str, bytes)) or not np.isrealobj(scale):
    raise TypeError(f"scale must be a real scalar, got {scale!r}.")
  try:
    value = float(scale)
  except (TypeError, ValueError):
    raise TypeError(f"scale must be a real scalar, got {scale!r}.") from None
  if not math.isfinite(value):
    # A traced non-finite scale makes every output NaN; a static one is a bug to name now.
    raise ValueError(f"scale must be finite, got {value}.")
  return value


def check_flag(name: str, value: Any) -> bool:
  """A static bool option: Python or NumPy bools, nothing else."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a Python bool, got {value!r}.")
  return bool(value)


def check_lengths(name: str, lengths: Any, batch: tuple[int, ...]) -> Array | None:
  """``(...)`` integer sequence lengths, as int32 (a narrow dtype would wrap positions)."""
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}.")
  if lengths.shape != batch:
    raise ValueError(
      f"{name} must have the batch shape {batch} of the inputs, got shape {lengths.shape}."
    )
  return lengths.astype(jnp.int32)


def _fits(shape: tuple[int, ...], last: int, batch: tuple[int, ...]) -> bool:
  """Whether ``shape`` is ``(..., last)`` with leading dims that broadcast to ``batch``."""
  if not shape or shape[-1] != last:
    return False
  try:
    return np.broadcast_shapes(shape[:-1], batch) == tuple(batch)
  except ValueError:
    return False


def check_per_token(name: str, x: Any, batch: tuple[int, ...], length: int) -> Array | None:
  """``(..., length)`` integers (segment ids, positions) as int32 ``(*batch, length)``."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers, got dtype {x.dtype}.")
  if not _fits(x.shape, length, batch):
    raise ValueError(
      f"{name} must have shape (..., {length}) (one per position, leading dims broadcasting "
      f"to the batch {tuple(batch)}), got {x.shape}."
    )
  return jnp.broadcast_to(x.astype(jnp.int32), (*batch, length))


def check_token_pair(
  names: tuple[str, str], q_x: Any, kv_x: Any, dims: Dims
) -> tuple[Array | None, Array | None]:
  """Per-query and per-key integers; one of them alone serves both when ``T == S``."""
  if (q_x is None) != (kv_x is None):
    given, missing = names if kv_x is None else names[::-1]
    if dims.T != dims.S:
      raise ValueError(
        f"{given} needs {missing} too: the query and key lengths differ ({dims.T} != {dims.S})."
      )
    q_x = kv_x = q_x if kv_x is None else kv_x
  return (
    check_per_token(names[0], q_x, dims.batch, dims.T),
    check_per_token(names[1], kv_x, dims.batch, dims.S),
  )


def check_slopes(slopes: Any, dims: Dims) -> Array | None:
  """ALiBi slopes ``(N,)`` or ``(..., N)``, floating."""
  if slopes is None:
    return None
  slopes = jnp.asarray(slopes)
  if not jnp.issubdtype(slopes.dtype, jnp.floating):
    raise TypeError(f"alibi_slopes must be floating point, got dtype {slopes.dtype}.")
  if not _fits(slopes.shape, dims.N, dims.batch):
    raise ValueError(
      f"alibi_slopes must have shape (N,) or (..., N) for the {dims.N} query heads and batch "
      f"{dims.batch}, got {slopes.shape}."
    )
  return slopes


def check_soft_cap(cap: Any) -> float | None:
  """``logits_soft_cap``: a positive, finite Python number."""
  if cap is None:
    return None
  if (
    isinstance(cap, (jax.core.Tracer, bool, np.bool_)) or np.ndim(cap) != 0 or not np.isrealobj(cap)
  ):
    raise TypeError(f"logits_soft_cap must be a positive Python float, got {cap!r}.")
  cap = float(cap)
  if not (cap > 0 and math.isfinite(cap)):
    raise ValueError(f"logits_soft_cap must be positive and finite, got {cap}.")
  return cap


def check_sinks(sinks: Any, dims: Dims) -> Array | None:
  """Sink logits ``(N,)``, floating: one per query head."""
  if sinks is None:
    return None
  sinks = jnp.asarray(sinks)
  if not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise TypeError(f"sinks must be floating point, got dtype {sinks.dtype}.")
  if sinks.shape != (dims.N,):
    raise ValueError(
      f"sinks must have shape (N,) = ({dims.N},), one per query head, got {sinks.shape}."
    )
  return sinks


def modify_scores(
  s: Array,
  *,
  slopes: Array | None,
  distance: Array | None,
  score_mod: Mod | None,
  mod_args: tuple[Array, ...],
  soft_cap: float | None,
) -> Array:
  """What every path does to ``scale * q . k + bias``: ALiBi, ``score_mod``, the soft cap.

  ``slopes`` and ``distance`` (``|q_pos - kv_pos|``) broadcast against ``s``;
  ``mod_args`` are the ``(b, h, q_idx, kv_idx)`` the mod sees.
  """
  if slopes is not None:
    s = s - slopes.astype(s.dtype) * distance.astype(s.dtype)
  if score_mod is not None:
    s = apply_mod(score_mod, s, *mod_args).astype(s.dtype)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  return s


def sink_logits(sinks: Array, lse: Array) -> Array:
  """Sinks ``(N,)`` shaped ``(1.., N, 1)`` against a log-sum-exp ``(..., N, T)``."""
  return sinks.astype(lse.dtype).reshape((1,) * (lse.ndim - 2) + (-1, 1))


def add_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
  """Adds ``exp(sink)`` to each row's softmax denominator (a key with no value).

  ``out (..., T, N, D)`` and ``lse (..., N, T)`` of the attention without sinks
  become those with them: the weights shrink by ``exp(lse) / (exp(lse) + exp(sink))``,
  in float32 at least (so the sinks' gradient accumulates in it).
  """
  sink = sink_logits(sinks, lse)
  share = jax.nn.sigmoid(lse - sink)  # exp(lse - logaddexp(lse, sink)); 0 for lse = -inf
  scaled = out.astype(lse.dtype) * jnp.moveaxis(share, -1, -2)[..., None]
  return scaled.astype(out.dtype), jnp.logaddexp(lse, sink)


def check_block(name: str, value: Any) -> int | None:
  return None if value is None else _masks.check_length(name, value)


IMPLEMENTATIONS = ("auto", "naive", "blockwise")
# "auto" switches to the blockwise path from this many scores per head and batch
# element (T * S) up: measured faster on CPU from 256 x 256 (benchmarks/README.md).
AUTO_BLOCKWISE_MIN_SCORES = 256 * 256


def _resolve(implementation: Any, dims: Dims, return_weights: bool) -> Any:
  """Resolves ``implementation="auto"`` and rejects impossible combinations."""
  from jattn._ring import Ring  # the ring needs this module; import it lazily

  if isinstance(implementation, Ring):
    return implementation
  if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be one of {IMPLEMENTATIONS} or a jattn.Ring, got {implementation!r}."
    )
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


def describe(
  query: Any,
  key: Any,
  value: Any,
  opts: Options,
  *,
  q_start: Any = 0,
) -> Call:
  """Checks ``opts`` against the inputs and returns the :class:`Call` every backend runs.

  ``q_start`` (an int, may be traced) is the index of the first query in the
  sequence the keys belong to, on top of ``alignment``: :func:`jattn.decode_step`
  places its queries at the cache's index with it.
  """
  query, key, value, dims = check_qkv(query, key, value)
  return_weights = check_flag("return_weights", opts.return_weights)
  return_lse = check_flag("return_lse", opts.return_lse)
  dtype = compute_dtype(query.dtype)
  bias = opts.bias
  if bias is not None:
    bias = check_broadcast("bias", bias, dims.weights_shape, boolean=False)
  mask = opts.mask
  if mask is not None:
    mask = check_broadcast("mask", mask, dims.weights_shape, boolean=True)
  mask = _masks.describe(
    dims,
    mask=mask,
    is_causal=check_flag("is_causal", opts.is_causal),
    window=_masks.normalize_window(opts.local_window_size),
    q_lengths=check_lengths("query_seq_lengths", opts.query_seq_lengths, dims.batch),
    kv_lengths=check_lengths("key_value_seq_lengths", opts.key_value_seq_lengths, dims.batch),
    alignment=opts.alignment,
    mask_mod=check_mod("mask_mod", opts.mask_mod, dtype),
    block_mask=opts.block_mask,
    segments=check_token_pair(
      ("q_segment_ids", "kv_segment_ids"), opts.q_segment_ids, opts.kv_segment_ids, dims
    ),
    positions=check_token_pair(
      ("q_positions", "kv_positions"), opts.q_positions, opts.kv_positions, dims
    ),
    chunk=check_block("attention_chunk_size", opts.attention_chunk_size),
    q_start=q_start,
  )
  block_q, block_kv = check_block("block_q", opts.block_q), check_block("block_kv", opts.block_kv)
  if mask.block_mask is not None:
    block_q, block_kv = mask.block_mask.check_blocks(block_q, block_kv)
  return Call(
    q=query,
    k=key,
    v=value,
    dims=dims,
    scale=check_scale(opts.scale, dims.H),
    bias=bias,
    mask=mask,
    score_mod=check_mod("score_mod", opts.score_mod, dtype),
    slopes=check_slopes(opts.alibi_slopes, dims),
    soft_cap=check_soft_cap(opts.logits_soft_cap),
    sinks=check_sinks(opts.sinks, dims),
    dropout=_dropout.check_dropout(
      opts.dropout_rate, opts.dropout_rng, opts.deterministic, opts.broadcast_dropout
    ),
    implementation=_resolve(opts.implementation, dims, return_weights),
    block_q=block_q,
    block_kv=block_kv,
    return_weights=return_weights,
    return_lse=return_lse,
  )
