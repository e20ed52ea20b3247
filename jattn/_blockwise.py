"""O(N)-memory blockwise attention, differentiable in every AD mode.

The forward pass is the online softmax of Rabe & Staats (2021) and FlashAttention-2:
for each block of queries, stream blocks of keys and values and keep a running
maximum ``m``, sum ``l`` and weighted sum ``acc`` per query; the ``T x S`` scores
never exist at once.

Differentiation goes through one ``jax.custom_jvp`` whose tangent rule is itself
blockwise and *linear* in the tangents. With ``P = softmax(S)``, ``dS`` the
tangent of the scores and ``o`` the output,

  dlse_t = c_t = sum_s P_ts dS_ts
  do_t   = sum_s P_ts dS_ts v_s + sum_s P_ts dv_s - c_t o_t

so forward mode (``jvp``, ``jacfwd``) runs one more blockwise sweep, and reverse
mode is JAX's transpose of that sweep: the scores of each block are recomputed
(``jax.checkpoint``) from the saved log-sum-exp, which yields exactly
FlashAttention-2's backward pass (``dS = P * (dO v^T - rowsum(dO * o))``) with
only O(N) residuals. Hessian-vector products compose the two.

Layout inside: heads-major tiles. With ``B`` the flattened batch and ``K`` key/value
heads, each of the ``B * K`` "head groups" holds ``G = N // K`` query heads that
share one key/value head; queries are cut into ``nq`` blocks of ``bq`` and keys
into ``nk`` blocks of ``bk``::

  q   (BK, nq, G, bq, H)     k (BK, nk, bk, H)     v (BK, nk, bk, D)
  aux (BK', nq', nk', G', bq', bk')  mask and bias, each ' dim either 1 or full

Three nested loops (head groups, query blocks, key blocks) slice every array as
a scan input, so the transposed loops accumulate cotangents without scatters.

References:
  Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory", arXiv:2112.05682.
  Dao, "FlashAttention-2", arXiv:2307.08691.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _checks as _core
from jattn import _dropout, _masks

Array = jax.Array

# Scores of fully masked rows: exp(s - _BIG) == 0 for any finite score.
_BIG = float(np.finfo(np.float32).max) / 4


class Config(NamedTuple):
  """Static (hashable) description of one blockwise problem."""

  T: int  # true query length
  S: int  # true key length
  bq: int
  bk: int
  nq: int
  nk: int
  offset: int  # position of query 0 among the keys (alignment)
  is_causal: bool
  window: tuple[int, int] | None
  scale: float | None  # None: the queries were scaled beforehand (traced scale)
  skip: bool  # skip blocks that the position/length masks hide entirely
  dropout_rate: float = 0.0  # 0: no dropout
  dropout_impl: Any = None  # the PRNG implementation of the dropout keys


def _keep(cfg: Config, j, q_i) -> Array | None:
  """Dropout keep bits of tile (., j): ``(G, bq, bk)`` bool, or None without dropout."""
  if not cfg.dropout_rate:
    return None
  rows = jax.random.wrap_key_data(q_i["rows"], impl=cfg.dropout_impl)  # (G, bq)
  return _dropout.keep_mask(rows, j * cfg.bk + jnp.arange(cfg.bk), cfg.dropout_rate)


# --- the pieces every tile uses -------------------------------------------------------------


def _scores(cfg: Config, qi: Array, kj: Array) -> Array:
  """``(G, bq, H) x (bk, H) -> (G, bq, bk)`` in float32 at least."""
  s = jnp.einsum("gqh,kh->gqk", qi, kj, preferred_element_type=_core.compute_dtype(qi.dtype))
  return s if cfg.scale is None else s * cfg.scale


def _valid(cfg: Config, i, j, lengths, aux, shape) -> Array | None:
  """Which (query, key) pairs of tile (i, j) may attend: ``(G, bq, bk)`` bool, or None."""
  q_pos = i * cfg.bq + jnp.arange(cfg.bq)
  kv_pos = j * cfg.bk + jnp.arange(cfg.bk)
  offset = cfg.offset + lengths.get("offset", 0)
  masks = [_masks.position_mask(q_pos + offset, kv_pos, is_causal=cfg.is_causal, window=cfg.window)]
  kv_limit = lengths.get("kv")
  if kv_limit is not None or cfg.nk * cfg.bk != cfg.S:
    kv_limit = cfg.S if kv_limit is None else jnp.minimum(kv_limit, cfg.S)
    masks.append((kv_pos < kv_limit)[None, :])
  if "q" in lengths:
    masks.append((q_pos < lengths["q"])[:, None])
  if "mask" in aux:
    masks.append(aux["mask"])
  valid = _masks.combine_masks(*masks)
  return None if valid is None else jnp.broadcast_to(valid, shape)


def _visible(cfg: Config, i, j, lengths) -> Array:
  """Whether tile (i, j) holds any pair the position and length masks allow."""
  q_first = i * cfg.bq + cfg.offset + lengths.get("offset", 0)
  q_last = q_first + cfg.bq - 1
  kv_first, kv_last = j * cfg.bk, j * cfg.bk + cfg.bk - 1
  visible = _masks.ranges_visible(
    q_first, q_last, kv_first, kv_last, is_causal=cfg.is_causal, window=cfg.window
  )
  if "kv" in lengths:
    visible &= kv_first < lengths["kv"]
  if "q" in lengths:
    visible &= i * cfg.bq < lengths["q"]
  return visible


def _maybe_skip(cfg: Config, visible_fn, step):
  """Wraps a scan step so that hidden tiles cost a branch, not a tile."""
  if not cfg.skip:
    return step

  def skipping(carry, xs):
    return jax.lax.cond(visible_fn(xs), lambda: step(carry, xs)[0], lambda: carry), None

  return skipping


def _split(aux: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
  """Leading axis > 1: scanned over; == 1: broadcast (taken once, outside the loop)."""
  xs = {n: a for n, a in aux.items() if a.shape[0] > 1}
  const = {n: a[0] for n, a in aux.items() if a.shape[0] == 1}
  return xs, const


def _sweep(tile_fn, q_side: dict, head_side: dict, aux: dict) -> Any:
  """Runs ``tile_fn(i, q_block, kv_blocks, lengths, aux)`` over head groups and query blocks.

  ``q_side`` arrays lead with ``(BK, nq)``, ``head_side`` arrays with ``(BK,)``
  (keys, values, lengths); ``aux`` are the broadcastable mask and bias.
  """
  aux_head, aux_const = _split(aux)

  def per_head(args):
    q_h, kv_h, aux_h = args
    aux_q, aux_hc = _split({**aux_h, **{n: a for n, a in aux_const.items()}})
    nq = jax.tree.leaves(q_h)[0].shape[0]

    def per_q_block(args):
      i, q_i, aux_i = args
      return tile_fn(i, q_i, kv_h, {**aux_hc, **aux_i})

    return jax.lax.map(per_q_block, (jnp.arange(nq), q_h, aux_q))

  return jax.lax.map(per_head, (q_side, head_side, aux_head))


def _kv_scan(cfg, i, kv_h, aux, step, init, remat=False):
  """Scans ``step`` over the key/value blocks of one head group.

  With ``remat``, the whole step, block skipping included, is recomputed in the
  transposed (reverse-mode) sweep, so its only residuals are its inputs: slices
  of the keys and values that the scan forwards without copying. (A checkpoint
  inside the skipping ``cond`` would make the cond save per-tile copies of the
  key and value blocks: O(T * S / block_q) memory.)
  """
  lengths = {n: kv_h[n] for n in ("q", "kv", "offset") if n in kv_h}
  blocks = {n: kv_h[n] for n in ("k", "v", "dk", "dv") if n in kv_h}
  aux_kv, aux_c = _split(aux)
  xs = (jnp.arange(cfg.nk), blocks, aux_kv)

  def visible(xs):
    return _visible(cfg, i, xs[0], lengths)

  def body(carry, xs):
    j, blk, aux_j = xs
    return step(carry, j, blk, lengths, {**aux_c, **aux_j}), None

  body = _maybe_skip(cfg, visible, body)
  if remat:
    body = jax.checkpoint(body)
  carry, _ = jax.lax.scan(body, init, xs)
  return carry


# --- forward: the online softmax ------------------------------------------------------------


def _forward_tile(cfg: Config, i, q_i, kv_h, aux, want_entropy: bool):
  G, bq = q_i["q"].shape[:2]
  D = kv_h["v"].shape[-1]
  f32 = _core.compute_dtype(q_i["q"].dtype)

  def step(carry, j, blk, lengths, aux_j):
    m, l, acc, (ps, mx) = carry
    s = _scores(cfg, q_i["q"], blk["k"])
    if "bias" in aux_j:
      s = s + jnp.broadcast_to(aux_j["bias"], s.shape).astype(f32)
    valid = _valid(cfg, i, j, lengths, aux_j, s.shape)
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(s, axis=-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + jnp.sum(p, axis=-1)
    keep = _keep(cfg, j, q_i)
    p_out = p if keep is None else jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
    pv = jnp.einsum(
      "gqk,kd->gqd", p_out.astype(blk["v"].dtype), blk["v"], preferred_element_type=f32
    )
    acc = acc * correction[..., None] + pv
    if want_entropy:  # running sum of p * s, for the entropy lse - E_p[s]
      ps = ps * correction + jnp.sum(jnp.where(p > 0, p * s, 0.0), axis=-1)
      # The largest score again, differentiable this time (m is not): max_weight's
      # gradient needs d(max s).
      mx = jnp.maximum(mx, jnp.max(s, axis=-1))
    return m_new, l, acc, (ps, mx)

  init = (
    jnp.full((G, bq), -jnp.inf, f32),
    jnp.zeros((G, bq), f32),
    jnp.zeros((G, bq, D), f32),
    (jnp.zeros((G, bq), f32), jnp.full((G, bq), -jnp.inf, f32)),
  )
  m, l, acc, (ps, mx) = _kv_scan(cfg, i, kv_h, aux, step, init)
  attended = l > 0
  l_safe = jnp.where(attended, l, 1.0)
  out = jnp.where(attended[..., None], acc / l_safe[..., None], 0.0)
  lse = jnp.where(attended, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe), _BIG)
  stats = {}
  if want_entropy:
    stats = {
      "entropy": jnp.where(attended, lse - ps / l_safe, 0.0),
      "max_weight": jnp.where(attended, jnp.exp(jnp.where(attended, mx - lse, 0.0)), 0.0),
    }
  return out.astype(q_i["q"].dtype), lse, stats


def _forward(cfg, q, k, v, lengths, aux, drop, want_entropy=False):
  head_side = {"k": k, "v": v, **lengths}
  return _sweep(
    lambda i, q_i, kv_h, aux_i: _forward_tile(cfg, i, q_i, kv_h, aux_i, want_entropy),
    {"q": q, **drop},
    head_side,
    aux,
  )


# --- tangents: one more blockwise sweep, linear in (dq, dk, dv, dbias) ----------------------


def _tangent_tile(cfg: Config, i, q_i, kv_h, aux):
  q, dq, o, lse = q_i["q"], q_i["dq"], q_i["o"], q_i["lse"]
  f32 = _core.compute_dtype(q.dtype)

  def step(carry, j, blk, lengths, aux_j):
    acc, c = carry
    s = _scores(cfg, q, blk["k"])
    if "bias" in aux_j:
      s = s + jnp.broadcast_to(aux_j["bias"], s.shape).astype(f32)
    p = jnp.exp(s - lse[..., None])
    valid = _valid(cfg, i, j, lengths, aux_j, s.shape)
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    ds = _scores(cfg, dq, blk["k"]) + _scores(cfg, q, blk["dk"])
    if "dbias" in aux_j:
      ds = ds + jnp.broadcast_to(aux_j["dbias"], ds.shape).astype(f32)
    pds = p * ds
    c = c + jnp.sum(pds, axis=-1)  # the log-sum-exp tangent: dropout does not enter it
    keep = _keep(cfg, j, q_i)
    if keep is not None:
      p = jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
      pds = p * ds
    acc = acc + jnp.einsum("gqk,kd->gqd", pds, blk["v"].astype(f32))
    acc = acc + jnp.einsum("gqk,kd->gqd", p, blk["dv"].astype(f32))
    return acc, c

  G, bq = q.shape[:2]
  D = kv_h["v"].shape[-1]
  init = (jnp.zeros((G, bq, D), f32), jnp.zeros((G, bq), f32))
  # Rematerialised: reverse mode recomputes P from the saved log-sum-exp.
  acc, c = _kv_scan(cfg, i, kv_h, aux, step, init, remat=True)
  do = acc - c[..., None] * o.astype(f32)
  return do.astype(q.dtype), c


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg: Config, q, k, v, lengths, aux, drop):
  out, lse, _ = _forward(cfg, q, k, v, lengths, aux, drop)
  return out, lse


@_flash.defjvp
def _flash_jvp(cfg: Config, primals, tangents):
  q, k, v, lengths, aux, drop = primals
  dq, dk, dv, _, daux, _ = tangents
  out, lse = _flash(cfg, q, k, v, lengths, aux, drop)
  tan_aux = {n: a for n, a in aux.items() if n != "bias"}
  if "bias" in aux:
    tan_aux["bias"] = aux["bias"]
    tan_aux["dbias"] = daux["bias"]
  head_side = {"k": k, "v": v, "dk": dk, "dv": dv, **lengths}
  do, dlse = _sweep(
    lambda i, q_i, kv_h, aux_i: _tangent_tile(cfg, i, q_i, kv_h, aux_i),
    {"q": q, "dq": dq, "o": out, "lse": lse, **drop},
    head_side,
    tan_aux,
  )
  return (out, lse), (do, dlse)


# --- layout ---------------------------------------------------------------------------------


def _tile_aux(x: Array, dims: _core._Dims, bq: int, bk: int, nq: int, nk: int) -> Array:
  """``(..., N', T', S')`` (broadcastable) to ``(BK', nq', nk', G', bq', bk')``."""
  batch, N, K = dims.batch, dims.N, dims.K
  G = N // K
  x = jnp.asarray(x)
  x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + x.shape)  # full rank, 1s in front
  x_batch, (n_, t_, s_) = x.shape[:-3], x.shape[-3:]
  B = math.prod(batch)
  if any(d != 1 for d in x_batch):
    x = jnp.broadcast_to(x, (*batch, n_, t_, s_))
  Bx = B if any(d != 1 for d in x_batch) else 1
  x = x.reshape(Bx, n_, t_, s_)
  x = x.reshape(Bx, 1, 1, t_, s_) if n_ == 1 else x.reshape(Bx, K, G, t_, s_)
  if Bx > 1 or n_ > 1:
    # The head-group loop runs over B * K: per-batch or per-head data needs both.
    x = jnp.broadcast_to(x, (B, K, x.shape[2], t_, s_))
  BKx, Gx = x.shape[0] * x.shape[1], x.shape[2]
  x = x.reshape(BKx, Gx, t_, s_)
  if t_ != 1:
    x = _pad_axis(x, 2, nq * bq).reshape(BKx, Gx, nq, bq, s_)
  else:
    x = x.reshape(BKx, Gx, 1, 1, s_)
  if s_ != 1:
    x = _pad_axis(x, 4, nk * bk).reshape((*x.shape[:4], nk, bk))
  else:
    x = x.reshape((*x.shape[:4], 1, 1))
  # (BK', G', nq', bq', nk', bk') -> (BK', nq', nk', G', bq', bk')
  return x.transpose(0, 2, 4, 1, 3, 5)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


# Default tiles: all keys in one block up to this length, and about this many
# scores per tile (8 MB in float32). Measured on CPU (benchmarks/README.md): one key
# block beats several by ~40% in reverse mode, and small query blocks keep a tile
# in cache.
MAX_BLOCK_KV = 32768
TILE_SCORES = 1 << 21


def default_blocks(T: int, S: int) -> tuple[int, int]:
  """``(block_q, block_kv)`` for ``T`` queries and ``S`` keys."""
  bk = min(S, MAX_BLOCK_KV)
  bq = max(16, min(256, TILE_SCORES // bk))
  return min(T, bq), bk


def blockwise_attention(
  query: Array,
  key: Array,
  value: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: _masks.Alignment = "bottom_right",
  block_q: int | None = None,
  block_kv: int | None = None,
  dropout_rate: float = 0.0,
  dropout_rng: Array | None = None,
  deterministic: bool = False,
  return_lse: bool = False,
  return_stats: bool = False,
  position_offset: Array | None = None,
):
  """Blockwise attention; arguments and results as :func:`jattn.dot_product_attention`.

  ``position_offset`` (a scalar int, may be traced) is added to every query's
  position for the causal and window masks, on top of ``alignment``: the ring
  path uses it to place a device's queries against another device's keys.
  """
  query, key, value, dims = _core.check_qkv(query, key, value)
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}.")
  window = _masks.normalize_window(local_window_size)
  offset = _masks.query_offset(dims.T, dims.S, alignment)
  target = dims.weights_shape
  scale = _core.check_scale(scale, dims.H)
  batch, T, S, N, K, H, D = dims
  G, B = N // K, math.prod(batch)
  d_bq, d_bk = default_blocks(T, S)
  bq = d_bq if block_q is None else _masks._check_length("block_q", block_q)
  bk = d_bk if block_kv is None else _masks._check_length("block_kv", block_kv)
  bq, bk = min(bq, T), min(bk, S)
  nq, nk = -(-T // bq), -(-S // bk)

  lengths = {}
  for name, value_, size in (("q", query_seq_lengths, T), ("kv", key_value_seq_lengths, S)):
    checked = _core.check_lengths(
      "query_seq_lengths" if name == "q" else "key_value_seq_lengths", value_, batch, size
    )
    if checked is not None:
      lengths[name] = jnp.repeat(checked.reshape(B), K)  # one per head group
  if position_offset is not None:
    lengths["offset"] = jnp.broadcast_to(jnp.asarray(position_offset, jnp.int32), (B * K,))
  aux = {}
  if mask is not None:
    aux["mask"] = _tile_aux(
      _core.check_broadcast("mask", mask, target, boolean=True), dims, bq, bk, nq, nk
    )
  if bias is not None:
    bias = _core.check_broadcast("bias", bias, target, boolean=False)
    aux["bias"] = _tile_aux(bias, dims, bq, bk, nq, nk)

  static_scale = None
  concrete = isinstance(scale, (int, float, np.number)) or (
    isinstance(scale, (np.ndarray, jax.Array)) and not isinstance(scale, jax.core.Tracer)
  )
  if concrete and query.dtype in (jnp.bfloat16, jnp.float16):
    static_scale = float(scale)  # scale the float32 scores: no rounding of q * scale
  else:
    # Fold the scale into the queries (O(T) work instead of a pass over every tile);
    # JAX differentiates the product for us, also for a traced scale.
    query = query * jnp.asarray(scale, query.dtype)
  skip = is_causal or window is not None or bool(lengths)
  dropout = _dropout.check_dropout(dropout_rate, dropout_rng, deterministic)
  drop, rate, impl = {}, 0.0, None
  if dropout is not None:
    rate, impl = dropout.rate, jax.random.key_impl(dropout.rng)
    rows = _dropout.row_keys(_dropout.head_keys(dropout.rng, batch, N), jnp.arange(nq * bq))
    rows = jax.random.key_data(rows)  # (B, N, nq * bq, W)
    W = rows.shape[-1]
    rows = rows.reshape(B * K, G, nq, bq, W).transpose(0, 2, 1, 3, 4)
    drop = {"rows": rows}  # (BK, nq, G, bq, W), laid out like the queries
  cfg = Config(T, S, bq, bk, nq, nk, offset, is_causal, window, static_scale, skip, rate, impl)

  q = query.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
  q = _pad_axis(q, 3, nq * bq).reshape(B * K, G, nq, bq, H).transpose(0, 2, 1, 3, 4)
  k = key.reshape(B, S, K, H).transpose(0, 2, 1, 3)  # (B, K, S, H)
  k = _pad_axis(k, 2, nk * bk).reshape(B * K, nk, bk, H)
  v = value.reshape(B, S, K, D).transpose(0, 2, 1, 3)
  v = _pad_axis(v, 2, nk * bk).reshape(B * K, nk, bk, D)

  if return_stats:
    out, lse, stats = _forward(cfg, q, k, v, lengths, aux, drop, want_entropy=True)
  else:
    out, lse = _flash(cfg, q, k, v, lengths, aux, drop)
    stats = {}

  def untile(x, last):  # (BK, nq, G, bq, *last) -> (..., N, T, *last) heads-major
    x = x.transpose(0, 2, 1, 3, *range(4, x.ndim)).reshape(B, K * G, nq * bq, *last)
    return x[:, :, :T].reshape(*batch, N, T, *last)

  out = jnp.moveaxis(untile(out, (D,)), -3, -2)  # (..., T, N, D)
  results = [out]
  if return_lse or return_stats:
    lse = untile(lse, ())
    results.append(jnp.where(lse >= _BIG / 2, -jnp.inf, lse))
  if return_stats:
    results.append({n: untile(s, ()) for n, s in stats.items()})
  return results[0] if len(results) == 1 else tuple(results)


def attention_stats(
  query: Array,
  key: Array,
  *,
  bias: Array | None = None,
  mask: Array | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: _masks.Alignment = "bottom_right",
  block_q: int | None = None,
  block_kv: int | None = None,
) -> dict[str, Array]:
  """Per-query statistics of the attention weights, without the ``(T, S)`` map.

  One blockwise pass (O(T + S) memory) accumulates, per query, the log-sum-exp
  of its scores, the entropy of its weights and its largest weight: what you
  would read off the attention map, at lengths where the map cannot exist.

  Args:
    query: ``(..., T, N, H)``.
    key: ``(..., S, K, H)``.
    bias, mask, scale, is_causal, local_window_size, query_seq_lengths,
      key_value_seq_lengths, alignment, block_q, block_kv: as in
      :func:`jattn.dot_product_attention`.

  Returns:
    A dict of ``(..., N, T)`` float32 arrays: ``"lse"`` (``-inf`` for a query
    that attends nothing), ``"entropy"`` (nats; 0 for one attended key, ``log n``
    for uniform weights over ``n``) and ``"max_weight"`` (0 if nothing is attended).

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> q = k = jnp.zeros((6, 1, 4))  # equal scores: uniform weights
    >>> stats = jattn.attention_stats(q, k, is_causal=True)
    >>> [round(float(e), 4) for e in stats["entropy"][0]]
    [0.0, 0.6931, 1.0986, 1.3863, 1.6094, 1.7918]
  """
  key = jnp.asarray(key)
  values = jnp.zeros((*key.shape[:-1], 1), key.dtype)  # the statistics need no values
  _, lse, stats = blockwise_attention(
    query,
    key,
    values,
    bias=bias,
    mask=mask,
    scale=scale,
    is_causal=is_causal,
    local_window_size=local_window_size,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    alignment=alignment,
    block_q=block_q,
    block_kv=block_kv,
    return_stats=True,
  )
  return {"lse": lse, **stats}
