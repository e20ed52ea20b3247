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

Each (query tile, key tile) pair is HIDDEN, PARTIAL or FULL under the call's mask
(:func:`jattn._masks.tile_state`: positions, lengths, a boolean mask's tiles, a
:class:`jattn.BlockMask`): hidden tiles cost a branch, full tiles skip the
per-element mask, partial ones evaluate it (:func:`jattn._masks.visible`).
A ``score_mod`` is applied to every visible tile's scores; its tangent (and so
its gradient, including with respect to the arrays it closes over) is
``jax.jvp`` of the mod inside the same linear tangent sweep.

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

from jattn import _dropout, _masks
from jattn._masks import FULL, HIDDEN, PARTIAL, BlockMask
from jattn._spec import Call, Dims, Mod, apply_mod, check_mod, compute_dtype, modify_scores

Array = jax.Array

# The internal log-sum-exp of a fully masked row: exp(s - _EMPTY) == 0 for any
# finite or masked score, and no real row reaches it (a finite maximum plus the log
# of at most S keys stays finite; an infinite score makes the row NaN).
_EMPTY = float("inf")


class Config(NamedTuple):
  """Static (hashable) description of one blockwise problem."""

  T: int  # true query and key lengths of the arrays held
  S: int
  bq: int
  bk: int
  nq: int
  nk: int
  G: int  # query heads per key/value head
  K: int
  mask: _masks.Mask  # its array fields replaced by None: they travel as arguments
  masked: bool  # whether any element rule applies (else every tile is FULL)
  scale: float | None  # None: the queries were scaled beforehand
  score_mod: Mod | None  # without its arrays (they travel in Mods)
  mask_mod: Mod | None
  mod_mapped: bool  # whether a block mask gives the mask_mod's tile states
  soft_cap: float | None = None
  dropout_rate: float = 0.0  # 0: no dropout
  dropout_impl: Any = None  # the PRNG implementation of the dropout keys


class Heads(NamedTuple):
  """Per head group (leading ``BK``): keys and values, their tangents, lengths, indices."""

  k: Array  # (BK, nk, bk, H)
  v: Array  # (BK, nk, bk, D)
  b: Array  # (BK,) global batch index
  h0: Array  # (BK,) global index of the group's first query head
  q0: Array  # (BK,) global index of query 0
  kv0: Array  # (BK,) global index of key 0
  q_len: Array | None = None  # (BK,) valid queries (global index bound)
  kv_len: Array | None = None  # (BK,) valid keys, padding included
  kv_seg: Array | None = None  # (BK, nk, bk) segment ids of the keys
  kv_pos: Array | None = None  # (BK, nk, bk) explicit positions of the keys
  slopes: Array | None = None  # (BK, G) ALiBi slopes of the group's query heads
  dk: Array | None = None
  dv: Array | None = None
  dslopes: Array | None = None


class KVTile(NamedTuple):
  """One key tile of a head group (what the key scan slices)."""

  k: Array  # (bk, H)
  v: Array  # (bk, D)
  dk: Array | None
  dv: Array | None
  seg: Array | None  # (bk,)
  pos: Array | None


class QTile(NamedTuple):
  """Per (head group, query tile) (leading ``BK, nq``)."""

  q: Array  # (G, bq, H)
  seg: Array | None = None  # (bq,) segment ids of the queries
  pos: Array | None = None  # (bq,) explicit positions of the queries
  dq: Array | None = None
  o: Array | None = None
  lse: Array | None = None
  rows: Array | None = None  # dropout row keys (G, bq, W)


class Aux(NamedTuple):
  """Broadcastable per-tile data ``(BK', nq', nk', ...)``: each ' dim 1 or full."""

  mask: Array | None = None  # (..., G', bq', bk') bool
  bias: Array | None = None  # (..., G', bq', bk')
  dbias: Array | None = None
  state: Array | None = None  # (BK', nq', nk') tile states of the mask and block mask


class Mods(NamedTuple):
  """The arrays the mods close over (differentiable for ``score_mod``)."""

  score: tuple[Array, ...] = ()
  mask: tuple[Array, ...] = ()


def _split(aux: Aux) -> tuple[Aux, Aux]:
  """Leading axis > 1: scanned over; == 1: broadcast (taken once, outside the loop)."""
  fields = aux._asdict()
  xs = {n: a if a is not None and a.shape[0] > 1 else None for n, a in fields.items()}
  const = {n: a[0] if a is not None and a.shape[0] == 1 else None for n, a in fields.items()}
  return Aux(**xs), Aux(**const)


def _merge(a: Aux, b: Aux) -> Aux:
  return Aux(*(x if x is not None else y for x, y in zip(a, b, strict=True)))


# --- the pieces every tile uses -------------------------------------------------------------


class Tile(NamedTuple):
  """The global indices of one tile, shaped to broadcast against its ``(G, bq, bk)`` scores."""

  b: Array  # (1, 1, 1)
  h: Array  # (G, 1, 1)
  q: Array  # (1, bq, 1)
  kv: Array  # (1, 1, bk)


def _tile(cfg: Config, heads: Heads, i, j) -> Tile:
  i, j = jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)
  q = heads.q0 + i * cfg.bq + jnp.arange(cfg.bq, dtype=jnp.int32)
  kv = heads.kv0 + j * cfg.bk + jnp.arange(cfg.bk, dtype=jnp.int32)
  return Tile(
    jnp.reshape(heads.b, (1, 1, 1)),
    (heads.h0 + jnp.arange(cfg.G, dtype=jnp.int32)).reshape(cfg.G, 1, 1),
    q.reshape(1, cfg.bq, 1),
    kv.reshape(1, 1, cfg.bk),
  )


def _for_mods(cfg: Config, t: Tile) -> tuple[Array, ...]:
  """Indices as the mods see them: padded rows and columns clamped into the problem."""
  return t.b, t.h, jnp.minimum(t.q, cfg.mask.T - 1), jnp.minimum(t.kv, cfg.mask.S - 1)


def _rows(heads: Heads, q_tile: QTile, kv: KVTile) -> tuple[_masks.Rows, _masks.Rows]:
  """The tile's per-row and per-column data, shaped to broadcast against ``(G, bq, bk)``."""

  def shaped(x, shape):
    return None if x is None else x.reshape(shape)

  return (
    _masks.Rows(heads.q_len, shaped(q_tile.seg, (1, -1, 1)), shaped(q_tile.pos, (1, -1, 1))),
    _masks.Rows(heads.kv_len, shaped(kv.seg, (1, 1, -1)), shaped(kv.pos, (1, 1, -1))),
  )


def _range(x: Array | None) -> tuple[Array, Array] | None:
  return None if x is None else (jnp.min(x), jnp.max(x))


def _state(cfg: Config, heads: Heads, i, j, aux: Aux, q_tile: QTile, kv: KVTile) -> Array:
  """HIDDEN, PARTIAL or FULL for tile (i, j) of this head group."""
  q_first = heads.q0 + i * cfg.bq
  kv_first = heads.kv0 + j * cfg.bk
  more = ()
  if aux.state is not None:
    more = ((aux.state != HIDDEN, aux.state == FULL),)
  if cfg.mask_mod is not None and not cfg.mod_mapped:
    more = (*more, (True, False))  # a mask_mod without its tile map: any tile may be partial
  # Padded rows and columns repeat the last segment id and position: ranges are the true ones.
  return _masks.tile_state(
    cfg.mask,
    q_first,
    jnp.minimum(q_first + cfg.bq - 1, heads.q0 + cfg.T - 1),
    kv_first,
    kv_first + cfg.bk - 1,
    q_len=heads.q_len,
    kv_len=heads.kv_len,
    q_range=_range(q_tile.pos),
    kv_range=_range(kv.pos),
    q_segments=_range(q_tile.seg),
    kv_segments=_range(kv.seg),
    more=more,
  )


def _valid(cfg: Config, t: Tile, rows, aux: Aux, mods: Mods, shape) -> Array:
  """Which (query, key) pairs of a PARTIAL tile may attend: ``(G, bq, bk)`` bool."""
  valid = _masks.visible(
    cfg.mask, t.b, t.h, t.q, t.kv, q=rows[0], kv=rows[1], dense=aux.mask, with_mod=False
  )
  if cfg.mask_mod is not None:
    by_mod = apply_mod(cfg.mask_mod._replace(consts=mods.mask), *_for_mods(cfg, t))
    valid = by_mod if valid is None else valid & by_mod
  return jnp.ones(shape, bool) if valid is None else jnp.broadcast_to(valid, shape)


def _scores(cfg: Config, qi: Array, kj: Array) -> Array:
  """``(G, bq, H) x (bk, H) -> (G, bq, bk)`` in float32 at least."""
  s = jnp.einsum("gqh,kh->gqk", qi, kj, preferred_element_type=compute_dtype(qi.dtype))
  return s if cfg.scale is None else s * cfg.scale


def _score_fn(cfg: Config, t: Tile, rows, bias):
  """``(s, mod arrays, slopes) -> scores``: a tile's scores from ``q . k``
  (:func:`jattn._spec.modify_scores`: bias, ALiBi, score_mod, soft cap)."""

  def fn(s, score_consts, slopes):
    if bias is not None:
      s = s + jnp.broadcast_to(bias, s.shape).astype(s.dtype)
    distance = None
    if slopes is not None:
      q_pos, kv_pos = _masks.positions(cfg.mask, t.q, t.kv, *rows)
      distance = jnp.abs(q_pos - kv_pos)
    return modify_scores(
      s,
      slopes=None if slopes is None else slopes.reshape(-1, 1, 1),
      distance=distance,
      score_mod=None if cfg.score_mod is None else cfg.score_mod._replace(consts=score_consts),
      mod_args=_for_mods(cfg, t),
      soft_cap=cfg.soft_cap,
    )

  return fn


def _keep(cfg: Config, j, q_tile: QTile) -> Array | None:
  """Dropout keep bits of tile (., j): ``(G, bq, bk)`` bool, or None without dropout."""
  if not cfg.dropout_rate:
    return None
  rows = jax.random.wrap_key_data(q_tile.rows, impl=cfg.dropout_impl)  # (G, bq)
  return _dropout.keep_mask(rows, j * cfg.bk + jnp.arange(cfg.bk), cfg.dropout_rate)


def _sweep(tile_fn, q_side: QTile, heads: Heads, aux: Aux, mods: Mods) -> Any:
  """Runs ``tile_fn(i, q_tile, heads, aux)`` over head groups and query tiles."""
  aux_head, aux_const = _split(aux)

  def per_head(args):
    q_h, heads_h, aux_h = args
    aux_q, aux_hc = _split(_merge(aux_h, aux_const))

    def per_q_block(args):
      i, q_i, aux_i = args
      return tile_fn(i, q_i, heads_h, _merge(aux_i, aux_hc), mods)

    return jax.lax.map(per_q_block, (jnp.arange(q_h.q.shape[0]), q_h, aux_q))

  return jax.lax.map(per_head, (q_side, heads, aux_head))


def _kv_scan(cfg: Config, i, q_tile: QTile, heads: Heads, aux: Aux, step, init, remat=False):
  """Scans ``step(carry, j, kv_tile, aux, masked)`` over the key tiles of one head group.

  Hidden tiles keep the carry; full tiles run ``step`` without the element mask. A
  single key tile always runs with the element mask: the three-way ``lax.switch``
  cost more than it can skip there (masked (4, 1024, 8, 64) causal forward+backward
  311 ms with it, 249 without; probe). With ``remat``, the whole step, tile
  skipping included, is recomputed in the transposed (reverse-mode) sweep, so its
  only residuals are its inputs: slices of the keys and values that the scan
  forwards without copying. (A checkpoint inside the branches would make them save
  per-tile copies of the key and value blocks: O(T * S / block_q) memory.)
  """
  aux_kv, aux_c = _split(aux)
  blocks = KVTile(heads.k, heads.v, heads.dk, heads.dv, heads.kv_seg, heads.kv_pos)
  xs = (jnp.arange(cfg.nk), blocks, aux_kv)

  def body(carry, xs):
    j, kv, aux_j = xs
    aux_j = _merge(aux_j, aux_c)
    if not cfg.masked:
      return step(carry, j, kv, aux_j, False), None
    if cfg.nk == 1:  # the element mask alone, no branch
      return step(carry, j, kv, aux_j, True), None
    branches = (
      lambda: carry,  # HIDDEN
      lambda: step(carry, j, kv, aux_j, True),  # PARTIAL
      lambda: step(carry, j, kv, aux_j, False),  # FULL
    )
    return jax.lax.switch(_state(cfg, heads, i, j, aux_j, q_tile, kv), branches), None

  if remat:
    body = jax.checkpoint(body)
  carry, _ = jax.lax.scan(body, init, xs)
  return carry


# --- forward: the online softmax ------------------------------------------------------------


def _forward_tile(cfg: Config, i, q_tile: QTile, heads: Heads, aux: Aux, mods: Mods, stats: bool):
  q = q_tile.q
  G, bq = q.shape[:2]
  D = heads.v.shape[-1]
  f32 = compute_dtype(q.dtype)

  def step(carry, j, kv, aux_j, masked):
    m, l, acc, (ps, mx) = carry
    t = _tile(cfg, heads, i, j)
    rows = _rows(heads, q_tile, kv)
    s = _score_fn(cfg, t, rows, aux_j.bias)(_scores(cfg, q, kv.k), mods.score, heads.slopes)
    if masked:
      s = jnp.where(_valid(cfg, t, rows, aux_j, mods, s.shape), s, -jnp.inf)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(s, axis=-1)))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # NaN stays NaN: it must propagate
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + jnp.sum(p, axis=-1)
    keep = _keep(cfg, j, q_tile)
    p_out = p if keep is None else jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
    pv = jnp.einsum("gqk,kd->gqd", p_out.astype(kv.v.dtype), kv.v, preferred_element_type=f32)
    acc = acc * correction[..., None] + pv
    if stats:  # running sum of p * s, for the entropy lse - E_p[s]
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
  m, l, acc, (ps, mx) = _kv_scan(cfg, i, q_tile, heads, aux, step, init)
  # Only a row that saw no key (l exactly 0) is special; a NaN l means a NaN
  # score, query or scale, and must give NaN out, lse and stats, not a masked row.
  attended = l != 0
  l_safe = jnp.where(attended, l, 1.0)
  out = jnp.where(attended[..., None], acc / l_safe[..., None], 0.0)
  lse = jnp.where(attended, m + jnp.log(l_safe), _EMPTY)
  extra = {}
  if stats:
    extra = {
      "entropy": jnp.where(attended, lse - ps / l_safe, 0.0),
      "max_weight": jnp.where(attended, jnp.exp(jnp.where(attended, mx - lse, 0.0)), 0.0),
    }
  return out.astype(q.dtype), lse, extra


def _forward(cfg, q_side: QTile, heads: Heads, aux: Aux, mods: Mods, stats=False):
  return _sweep(
    lambda i, q_i, heads_h, aux_i, mods: _forward_tile(cfg, i, q_i, heads_h, aux_i, mods, stats),
    q_side,
    heads,
    aux,
    mods,
  )


# --- tangents: one more blockwise sweep, linear in (dq, dk, dv, dbias, d mod arrays) --------


def _tangent_tile(cfg: Config, d_score: tuple, i, q_tile: QTile, heads: Heads, aux: Aux, mods):
  q, dq, o, lse = q_tile.q, q_tile.dq, q_tile.o, q_tile.lse
  f32 = compute_dtype(q.dtype)

  def step(carry, j, kv, aux_j, masked):
    acc, c = carry
    t = _tile(cfg, heads, i, j)
    rows = _rows(heads, q_tile, kv)
    raw = _scores(cfg, q, kv.k)
    d_raw = _scores(cfg, dq, kv.k) + _scores(cfg, q, kv.dk)
    if aux_j.dbias is not None:
      d_raw = d_raw + jnp.broadcast_to(aux_j.dbias, d_raw.shape).astype(f32)
    s, ds = jax.jvp(
      _score_fn(cfg, t, rows, aux_j.bias),
      (raw, mods.score, heads.slopes),
      (d_raw, d_score, heads.dslopes),
    )
    p = jnp.exp(s - lse[..., None])
    if masked:  # both: a NaN score or tangent under the mask must not reach the row
      valid = _valid(cfg, t, rows, aux_j, mods, s.shape)
      p, ds = jnp.where(valid, p, 0.0), jnp.where(valid, ds, 0.0)
    pds = p * ds
    c = c + jnp.sum(pds, axis=-1)  # the log-sum-exp tangent: dropout does not enter it
    keep = _keep(cfg, j, q_tile)
    if keep is not None:
      p = jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
      pds = p * ds
    acc = acc + jnp.einsum("gqk,kd->gqd", pds, kv.v.astype(f32))
    acc = acc + jnp.einsum("gqk,kd->gqd", p, kv.dv.astype(f32))
    return acc, c

  G, bq = q.shape[:2]
  D = heads.v.shape[-1]
  init = (jnp.zeros((G, bq, D), f32), jnp.zeros((G, bq), f32))
  # Rematerialised: reverse mode recomputes P from the saved log-sum-exp.
  acc, c = _kv_scan(cfg, i, q_tile, heads, aux, step, init, remat=True)
  do = acc - c[..., None] * o.astype(f32)
  return do.astype(q.dtype), c


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg: Config, q_side: QTile, heads: Heads, aux: Aux, mods: Mods):
  out, lse, _ = _forward(cfg, q_side, heads, aux, mods)
  return out, lse


def _float_tangent(x, dx):
  """The tangent of a mod's captured array, as ``jax.jvp`` wants it (float0 for integers)."""
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return dx
  return np.zeros(x.shape, jax.dtypes.float0)


@_flash.defjvp
def _flash_jvp(cfg: Config, primals, tangents):
  q_side, heads, aux, mods = primals
  d_q_side, d_heads, d_aux, d_mods = tangents
  out, lse = _flash(cfg, q_side, heads, aux, mods)
  tan_aux = aux._replace(dbias=None if aux.bias is None else d_aux.bias)
  tan_heads = heads._replace(
    dk=d_heads.k, dv=d_heads.v, dslopes=None if heads.slopes is None else d_heads.slopes
  )
  tan_q = q_side._replace(dq=d_q_side.q, o=out, lse=lse)
  d_score = tuple(map(_float_tangent, mods.score, d_mods.score))
  do, dlse = _sweep(functools.partial(_tangent_tile, cfg, d_score), tan_q, tan_heads, tan_aux, mods)
  return (out, lse), (do, dlse)


# --- layout ---------------------------------------------------------------------------------


def _tile_aux(x: Array, dims: Dims, bq: int, bk: int, nq: int, nk: int, fill=0) -> Array:
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
    x = _pad_axis(x, 2, nq * bq, fill).reshape(BKx, Gx, nq, bq, s_)
  else:
    x = x.reshape(BKx, Gx, 1, 1, s_)
  if s_ != 1:
    x = _pad_axis(x, 4, nk * bk, fill).reshape((*x.shape[:4], nk, bk))
  else:
    x = x.reshape((*x.shape[:4], 1, 1))
  # (BK', G', nq', bq', nk', bk') -> (BK', nq', nk', G', bq', bk')
  return x.transpose(0, 2, 4, 1, 3, 5)


def _block_states(bm: BlockMask, dims: Dims) -> Array:
  """A block mask's ``(B', N', nq, nk)`` tiles to ``(BK', nq, nk)`` head-group states."""
  tiles = bm.tiles
  B, K, G = math.prod(dims.batch), dims.K, dims.N // dims.K
  Bx, Nx = tiles.shape[:2]
  if Nx == 1:
    grouped = tiles[:, None]  # (Bx, 1, 1, nq, nk)
  else:
    grouped = tiles.reshape(Bx, K, G, *tiles.shape[2:])
  any_ = jnp.any(grouped != HIDDEN, axis=2)
  all_ = jnp.all(grouped == FULL, axis=2)
  state = jnp.where(any_, jnp.where(all_, FULL, PARTIAL), HIDDEN).astype(jnp.int8)
  if Bx > 1 or Nx > 1:
    state = jnp.broadcast_to(state, (B, K, *state.shape[2:]))
  return state.reshape(-1, *state.shape[2:])


def _pad_axis(x: Array, axis: int, size: int, fill=0) -> Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=fill)


# Default tiles (benchmarks/README.md, "Tile sizes"). Without a mask that can hide
# tiles: all keys in one block up to MAX_BLOCK_KV (several key blocks cost 1.6x to
# 2.5x more per tile in reverse mode on XLA:CPU), and as many query rows as make about
# TILE_SCORES scores per tile (16 MB in float32), at most MAX_TILE_ROWS. A tile's rows
# are its block_q queries times the query heads sharing a key/value head (grouped-query
# attention), which its dots process at once. Measured best on 2 cores: 1,024 x 1,024,
# 512 x 8,192, 128 x 32,768; 8 heads x 256 queries x 1,024. A mask that can hide whole
# tiles takes STRUCTURED_BLOCK_Q x STRUCTURED_BLOCK_KV tiles: the skipped work then pays
# for the extra key blocks.
MAX_BLOCK_KV = 32768
MAX_TILE_ROWS = 2048
TILE_SCORES = 1 << 22
STRUCTURED_BLOCK_Q = 256
STRUCTURED_BLOCK_KV = 1024


def default_blocks(T: int, S: int, structured: bool = False, group: int = 1) -> tuple[int, int]:
  """``(block_q, block_kv)`` for ``T`` queries, ``S`` keys and ``group`` query heads per
  key/value head (the rule above)."""
  if structured:
    return min(T, STRUCTURED_BLOCK_Q), min(S, STRUCTURED_BLOCK_KV)
  bk = min(S, MAX_BLOCK_KV)
  bq = max(16, min(MAX_TILE_ROWS, TILE_SCORES // bk) // group)
  return min(T, bq), bk


def run(call: Call, want_stats: bool = False):
  """Blockwise attention of a checked call: ``(out (..., T, N, D), lse (..., N, T))``,
  and with ``want_stats`` also a dict of per-query statistics."""
  query, key, value, dims, m = call.q, call.k, call.v, call.dims, call.mask
  batch, T, S, N, K, H, D = dims
  G, B = N // K, math.prod(batch)
  d_bq, d_bk = default_blocks(T, S, m.structured, G)
  bq = min(call.block_q or d_bq, T)
  bk = min(call.block_kv or d_bk, S)
  nq, nk = -(-T // bq), -(-S // bk)

  def per_group(x):  # (...) per batch element -> (BK,) per head group
    return jnp.repeat(jnp.broadcast_to(jnp.asarray(x, jnp.int32), batch).reshape(B), K)

  kv_len = m.kv_lengths
  if kv_len is not None or nk * bk != S:  # padded keys are never visible
    limit = jnp.asarray(m.kv_start, jnp.int32) + S
    kv_len = limit if kv_len is None else jnp.minimum(kv_len, limit)
  group = jnp.arange(B * K, dtype=jnp.int32)

  def per_token(x, n, size):  # (..., L) -> (BK, n, size), padded with the last value
    if x is None:
      return None
    x = jnp.repeat(x.reshape(B, x.shape[-1]), K, axis=0)
    return jnp.pad(x, ((0, 0), (0, n * size - x.shape[-1])), mode="edge").reshape(-1, n, size)

  slopes = None
  if call.slopes is not None:
    slopes = jnp.broadcast_to(call.slopes, (*batch, N)).reshape(B * K, G)
  heads_extra = dict(
    kv_seg=per_token(m.kv_segments, nk, bk),
    kv_pos=per_token(m.kv_positions, nk, bk),
    slopes=slopes,
    b=group // K + jnp.asarray(m.b_start, jnp.int32),
    h0=(group % K) * G + jnp.asarray(m.h_start, jnp.int32),
    q0=per_group(m.q_start),
    kv0=per_group(m.kv_start),
    q_len=None if m.q_lengths is None else per_group(m.q_lengths),
    kv_len=None if kv_len is None else per_group(kv_len),
  )
  aux = Aux()
  states = []
  if m.dense is not None:
    tiled = _tile_aux(m.dense, dims, bq, bk, nq, nk, fill=True)
    aux = aux._replace(mask=tiled)
    any_, all_ = jnp.any(tiled, axis=(3, 4, 5)), jnp.all(tiled, axis=(3, 4, 5))
    states.append(jnp.where(any_, jnp.where(all_, FULL, PARTIAL), HIDDEN).astype(jnp.int8))
  if m.block_mask is not None:
    states.append(_block_states(m.block_mask, dims))
  if states:
    aux = aux._replace(state=functools.reduce(jnp.minimum, states))
  if call.bias is not None:
    aux = aux._replace(bias=_tile_aux(call.bias, dims, bq, bk, nq, nk))

  scale, static_scale = call.scale, None
  if isinstance(scale, float) and query.dtype in (jnp.bfloat16, jnp.float16):
    static_scale = scale  # scale the float32 scores: no rounding of q * scale
  else:
    # Fold the scale into the queries (O(T) work instead of a pass over every tile);
    # JAX differentiates the product for us, also for a traced scale.
    query = query * jnp.asarray(scale, query.dtype)
  rows, rate, impl = None, 0.0, None
  if call.dropout is not None:
    rate, impl = call.dropout.rate, jax.random.key_impl(call.dropout.rng)
    keys = _dropout.row_keys(_dropout.head_keys(call.dropout, batch, N), jnp.arange(nq * bq))
    keys = jax.random.key_data(keys)  # (B, N, nq * bq, W)
    W = keys.shape[-1]
    rows = keys.reshape(B * K, G, nq, bq, W).transpose(0, 2, 1, 3, 4)  # like the queries
  score_mod, mask_mod = call.score_mod, m.mask_mod
  cfg = Config(
    T=T,
    S=S,
    bq=bq,
    bk=bk,
    nq=nq,
    nk=nk,
    G=G,
    K=K,
    mask=_static(m),
    masked=m.anything or nk * bk != S,
    scale=static_scale,
    score_mod=None if score_mod is None else score_mod._replace(consts=()),
    mask_mod=None if mask_mod is None else mask_mod._replace(consts=()),
    mod_mapped=m.block_mask is not None,
    soft_cap=call.soft_cap,
    dropout_rate=rate,
    dropout_impl=impl,
  )
  mods = Mods(
    score=() if score_mod is None else score_mod.consts,
    mask=() if mask_mod is None else mask_mod.consts,
  )

  q = query.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
  q = _pad_axis(q, 3, nq * bq).reshape(B * K, G, nq, bq, H).transpose(0, 2, 1, 3, 4)
  k = key.reshape(B, S, K, H).transpose(0, 2, 1, 3)  # (B, K, S, H)
  k = _pad_axis(k, 2, nk * bk).reshape(B * K, nk, bk, H)
  v = value.reshape(B, S, K, D).transpose(0, 2, 1, 3)
  v = _pad_axis(v, 2, nk * bk).reshape(B * K, nk, bk, D)
  q_side = QTile(
    q=q, seg=per_token(m.q_segments, nq, bq), pos=per_token(m.q_positions, nq, bq), rows=rows
  )
  heads = Heads(k=k, v=v, **heads_extra)

  if want_stats:
    out, lse, stats = _forward(cfg, q_side, heads, aux, mods, stats=True)
  else:
    out, lse = _flash(cfg, q_side, heads, aux, mods)
    stats = {}

  def untile(x, last):  # (BK, nq, G, bq, *last) -> (..., N, T, *last) heads-major
    x = x.transpose(0, 2, 1, 3, *range(4, x.ndim)).reshape(B, K * G, nq * bq, *last)
    return x[:, :, :T].reshape(*batch, N, T, *last)

  out = jnp.moveaxis(untile(out, (D,)), -3, -2)  # (..., T, N, D)
  lse = untile(lse, ())
  lse = jnp.where(lse == _EMPTY, -jnp.inf, lse)
  if want_stats:
    return out, lse, {n: untile(s, ()) for n, s in stats.items()}
  return out, lse


def _static(m: _masks.Mask) -> Any:
  """The mask as a hashable config: arrays travel as arguments, traced starts in Heads."""
  return m.without_token_arrays()._replace(
    dense=None,
    mask_mod=None,
    block_mask=None,
    q_start=0,
    kv_start=0,
    b_start=0,
    h_start=0,
  )


def block_mask(
  mask_mod: Any,
  q_len: int,
  kv_len: int | None = None,
  *,
  batch_shape: tuple[int, ...] = (),
  num_heads: int | None = None,
  block_q: int | None = None,
  block_kv: int | None = None,
) -> BlockMask:
  """Evaluates ``mask_mod`` once, tile by tile, into a map of hidden/partial/full tiles.

  Pass the result as ``block_mask=`` with the same ``mask_mod`` to
  :func:`jattn.dot_product_attention` (and the functions built on it): the
  blockwise path then skips the hidden tiles and drops the per-element mask on
  the full ones, so its work grows with the visible tiles. The ``(T, S)`` mask is
  never held at once: one row of tiles at a time. Traced like the call itself, so
  a ``mask_mod`` may close over arrays (document ids) under ``jit``; the map is a
  pytree to reuse across layers and steps.

  Args:
    mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend).
    q_len: ``T``, the number of queries.
    kv_len: ``S``, the number of keys (default ``T``).
    batch_shape: the leading batch dims ``...`` if the mask depends on ``b``
      (default ``()``: evaluated at ``b = 0`` and shared by every batch element).
    num_heads: ``N`` if the mask depends on ``h`` (default: evaluated at ``h = 0``
      and shared by every head).
    block_q, block_kv: tile sizes; default those the blockwise path takes for a
      mask that hides tiles. A call that uses the map runs with these tiles.

  Returns:
    A :class:`jattn.BlockMask`.

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> doc = jnp.arange(8) // 4  # two documents of 4
    >>> same_doc = lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]
    >>> bm = jattn.block_mask(same_doc, 8, block_q=2, block_kv=2)
    >>> bm.tiles[0, 0]  # 2 = full, 0 = hidden
    Array([[2, 2, 0, 0],
           [2, 2, 0, 0],
           [0, 0, 2, 2],
           [0, 0, 2, 2]], dtype=int8)
  """
  T = _masks.check_length("q_len", q_len)
  S = T if kv_len is None else _masks.check_length("kv_len", kv_len)
  batch_shape = _masks.check_shape("batch_shape", batch_shape)
  B = math.prod(batch_shape)
  Nm = 1 if num_heads is None else _masks.check_length("num_heads", num_heads)
  d_bq, d_bk = default_blocks(T, S, structured=True)
  bq = min(d_bq if block_q is None else _masks.check_length("block_q", block_q), T)
  bk = min(d_bk if block_kv is None else _masks.check_length("block_kv", block_kv), S)
  nq, nk = -(-T // bq), -(-S // bk)
  mod = check_mod("mask_mod", mask_mod, jnp.float32)
  kv_idx = jnp.arange(nk * bk, dtype=jnp.int32)
  b = jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1)
  h = jnp.arange(Nm, dtype=jnp.int32).reshape(1, Nm, 1, 1)

  def row(i):  # one row of tiles: (B, Nm, nk)
    q_idx = i * bq + jnp.arange(bq, dtype=jnp.int32)
    inside = ((q_idx < T)[:, None] & (kv_idx < S)[None, :])[None, None]
    visible = apply_mod(
      mod,
      b,
      h,
      jnp.minimum(q_idx, T - 1).reshape(1, 1, bq, 1),
      jnp.minimum(kv_idx, S - 1).reshape(1, 1, 1, nk * bk),
    )
    shape = (B, Nm, bq, nk, bk)
    any_ = jnp.any((visible & inside).reshape(shape), axis=(2, 4))
    all_ = jnp.all((visible | ~inside).reshape(shape), axis=(2, 4))
    return jnp.where(any_, jnp.where(all_, FULL, PARTIAL), HIDDEN).astype(jnp.int8)

  tiles = jnp.moveaxis(jax.lax.map(row, jnp.arange(nq)), 0, 2)  # (B, Nm, nq, nk)
  return BlockMask(tiles, T, S, bq, bk)
