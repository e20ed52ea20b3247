"""Sequence-parallel ring attention over a JAX mesh (Liu et al., 2023).

The sequence axis of the queries, keys and values is sharded over one mesh axis
of ``P`` devices. Each device keeps its ``T / P`` queries and, for ``P`` steps,
attends them to the key/value block it holds with the blockwise path
(:func:`jattn._blockwise.blockwise_attention`), merges the partial result into an
online-softmax accumulator by log-sum-exp, and passes the block to the next
device with ``jax.lax.ppermute``. No device ever holds more than one block of
keys and values, so memory per device grows with ``N / P``.

Differentiation is a ``jax.custom_vjp`` that rings again: each device
recomputes, block by block, the vector-Jacobian product of that block's share of
the output (the blockwise path's own differentiable pieces), and the key/value
gradients travel around the ring with their blocks, arriving home after ``P``
steps. Plain autodiff through the loop would save every visiting block and its
partial output: ``O(N)`` per device, which defeats sequence parallelism. The
price is reverse mode only (``jax.jvp`` of ring attention raises); the
single-device blockwise path serves forward mode.

Reference: Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers
for Near-Infinite Context", arXiv:2310.01889.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import _blockwise, _checks, _masks

Array = jax.Array


class Ring(NamedTuple):
  """Selects ring attention: ``implementation=jattn.Ring(mesh, "seq")``.

  Accepted wherever ``implementation`` is (:func:`jattn.dot_product_attention`,
  :func:`jattn.self_attention`, :func:`jattn.attention`, the modules); the
  fields are those of :func:`ring_attention`.
  """

  mesh: Mesh
  axis_name: str
  batch_axis: str | None = None
  head_axis: str | None = None
  layout: str = "contiguous"


LAYOUTS = ("contiguous", "zigzag")


def zigzag_order(length: int, num_devices: int) -> np.ndarray:
  """Positions in zig-zag order: device ``d`` holds chunks ``d`` and ``2P - 1 - d`` of ``2P``.

  ``x[..., zigzag_order(T, P), :, :]`` lays a ``(..., T, N, H)`` sequence out for
  ``ring_attention(..., layout="zigzag")``; ``np.argsort`` of it undoes that.
  Lay the inputs out once (position-wise layers do not care about the order) and
  every causal ring step then has the same visible work on every device.
  """
  if length % (2 * num_devices):
    raise ValueError(
      f"a zig-zag layout needs the length ({length}) to be a multiple of 2 * {num_devices}."
    )
  chunks = np.arange(length).reshape(2 * num_devices, -1)
  return np.concatenate([np.concatenate([chunks[d], chunks[-1 - d]]) for d in range(num_devices)])


def _merge(out, lse, out_j, lse_j):
  """Log-sum-exp merge of two partial attentions: out ``(..., T, N, D)``, lse ``(..., N, T)``."""
  new = jnp.logaddexp(lse, lse_j)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w_old = jnp.moveaxis(jnp.exp(lse - safe), -2, -1)[..., None]  # (..., T, N, 1)
  w_new = jnp.moveaxis(jnp.exp(lse_j - safe), -2, -1)[..., None]
  return (out * w_old + out_j * w_new).astype(out.dtype), new


def _chunks(layout: str, device, size: int, length: int) -> list[tuple[Any, int, int]]:
  """The chunks of the sequence a device holds: ``(global start, local start, length)``.

  ``"contiguous"``: block ``device`` of ``size``. ``"zigzag"``: chunks ``device`` and
  ``2 * size - 1 - device`` of ``2 * size``, so that under a causal mask every device
  has the same amount of visible work.
  """
  if layout == "contiguous":
    return [(device * length, 0, length)]
  half = length // 2
  return [(device * half, 0, half), ((2 * size - 1 - device) * half, half, half)]


def _ring_fn(cfg: dict[str, Any]):
  """The per-device ring (inside ``shard_map``) with its custom VJP, for static ``cfg``."""
  axis, size, layout = cfg["axis_name"], cfg["size"], cfg["layout"]
  perm = tuple((i, (i + 1) % size) for i in range(size))
  Tl, Sl, offset = cfg["Tl"], cfg["Sl"], cfg["offset"]

  def pairs(src, me, q_len, kv_len):
    """Per (query chunk, key chunk) of this step: slices, an ``attend`` and its visibility."""
    result = []
    for q_start, q_at, q_size in _chunks(layout, me, size, Tl):
      for kv_start, kv_at, kv_size in _chunks(layout, src, size, Sl):
        kv_local = None if kv_len is None else jnp.clip(kv_len - kv_start, 0, kv_size)
        q_local = None if q_len is None else jnp.clip(q_len - q_start, 0, q_size)
        q_first, kv_first = q_start + offset, kv_start
        visible = _masks.ranges_visible(
          q_first,
          q_first + q_size - 1,
          kv_first,
          kv_first + kv_size - 1,
          is_causal=cfg["is_causal"],
          window=cfg["window"],
        )
        if kv_local is not None:
          visible &= jnp.any(kv_local > 0)
        attend = functools.partial(
          _blockwise.blockwise_attention,
          scale=cfg["scale"],
          is_causal=cfg["is_causal"],
          local_window_size=cfg["window"],
          query_seq_lengths=q_local,
          key_value_seq_lengths=kv_local,
          alignment="top_left",
          block_q=cfg["block_q"],
          block_kv=cfg["block_kv"],
          position_offset=q_first - kv_first,
          return_lse=True,
        )
        result.append((slice(q_at, q_at + q_size), slice(kv_at, kv_at + kv_size), attend, visible))
    return result

  def seq(x, index, axis_from_end):  # x[..., index, (rest)] along the sequence axis
    return x[(Ellipsis, index) + (slice(None),) * axis_from_end]

  def empty(q, v):
    out = jnp.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)
    lse = jnp.full((*q.shape[:-3], q.shape[-2], q.shape[-3]), -jnp.inf, jnp.float32)
    return out, lse.astype(_checks.compute_dtype(q.dtype))

  def forward(q, k, v, q_len, kv_len):
    me = jax.lax.axis_index(axis)
    out, lse = empty(q, v)

    def step(carry, s):
      out, lse, k, v = carry
      for qs, ks, attend, visible in pairs((me - s) % size, me, q_len, kv_len):
        q_c, k_c, v_c = seq(q, qs, 2), seq(k, ks, 2), seq(v, ks, 2)
        out_j, lse_j = jax.lax.cond(visible, attend, lambda q, k, v: empty(q, v), q_c, k_c, v_c)
        merged = _merge(seq(out, qs, 2), seq(lse, qs, 0), out_j, lse_j)
        out = out.at[..., qs, :, :].set(merged[0])
        lse = lse.at[..., qs].set(merged[1])
      k, v = jax.lax.ppermute((k, v), axis, perm)
      return (out, lse, k, v), None

    (out, lse, _, _), _ = jax.lax.scan(step, (out, lse, k, v), jnp.arange(size))
    return out, lse

  @jax.custom_vjp
  def ring(q, k, v, q_len, kv_len):
    return forward(q, k, v, q_len, kv_len)

  def ring_fwd(q, k, v, q_len, kv_len):
    out, lse = forward(q, k, v, q_len, kv_len)
    return (out, lse), (q, k, v, q_len, kv_len, out, lse)

  def ring_bwd(residuals, cotangents):
    q, k, v, q_len, kv_len, out, lse = residuals
    g_out, g_lse = cotangents
    me = jax.lax.axis_index(axis)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # out = sum_j exp(lse_j - lse) out_j and lse = logsumexp_j lse_j, so block j's share
    # h_j = (exp(lse_j - lse) out_j, exp(lse_j - lse)) with lse held fixed gets the
    # cotangents (g_out, g_lse - <g_out, out>): the lse's own dependence on block j.
    g_share = g_lse - jnp.moveaxis(jnp.sum(g_out * out, axis=-1), -1, -2).astype(g_lse.dtype)

    def step(carry, s):
      dq, k, v, dk, dv = carry
      for qs, ks, attend, visible in pairs((me - s) % size, me, q_len, kv_len):
        lse_c, g_out_c, g_share_c = seq(lse_safe, qs, 0), seq(g_out, qs, 2), seq(g_share, qs, 0)

        def grads(q, k, v, attend=attend, lse_c=lse_c, g_out_c=g_out_c, g_share_c=g_share_c):
          def share(q, k, v):
            out_j, lse_j = attend(q, k, v)
            w = jnp.exp(lse_j - lse_c)
            return out_j * jnp.moveaxis(w, -2, -1)[..., None].astype(out_j.dtype), w

          return jax.vjp(share, q, k, v)[1]((g_out_c, g_share_c))

        def nothing(q, k, v):
          return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

        dq_j, dk_j, dv_j = jax.lax.cond(
          visible, grads, nothing, seq(q, qs, 2), seq(k, ks, 2), seq(v, ks, 2)
        )
        dq = dq.at[..., qs, :, :].add(dq_j)
        dk = dk.at[..., ks, :, :].add(dk_j)
        dv = dv.at[..., ks, :, :].add(dv_j)
      k, v, dk, dv = jax.lax.ppermute((k, v, dk, dv), axis, perm)
      return (dq, k, v, dk, dv), None

    init = (jnp.zeros_like(q), k, v, jnp.zeros_like(k), jnp.zeros_like(v))
    (dq, _, _, dk, dv), _ = jax.lax.scan(step, init, jnp.arange(size))
    return dq, dk, dv, None, None

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def ring_attention(
  query: Array,
  key: Array,
  value: Array,
  *,
  mesh: Mesh,
  axis_name: str,
  batch_axis: str | None = None,
  head_axis: str | None = None,
  scale: float | None = None,
  is_causal: bool = False,
  local_window_size: int | tuple[int, int] | None = None,
  query_seq_lengths: Array | None = None,
  key_value_seq_lengths: Array | None = None,
  alignment: _masks.Alignment = "bottom_right",
  block_q: int | None = None,
  block_kv: int | None = None,
  layout: str = "contiguous",
  return_lse: bool = False,
) -> Array | tuple[Array, Array]:
  """Attention with the sequence sharded over the mesh axis ``axis_name``.

  Args:
    query: ``(..., T, N, H)``, global (any sharding; it is resharded as needed).
    key: ``(..., S, K, H)``.
    value: ``(..., S, K, D)``.
    mesh: a ``jax.sharding.Mesh`` (single- or multi-process).
    axis_name: the mesh axis of ``P`` devices the sequence is split over.
    batch_axis: optional mesh axis for the first leading batch dimension.
    head_axis: optional mesh axis for the heads (``N`` and ``K`` divisible by its size).
    scale, is_causal, local_window_size, query_seq_lengths,
      key_value_seq_lengths, alignment, block_q, block_kv, return_lse: as in
      :func:`jattn.dot_product_attention` (``block_*`` apply per device).
    layout: ``"contiguous"`` (device ``d`` holds positions ``d * T/P`` onwards) or
      ``"zigzag"``: the inputs (and the output) are in :func:`zigzag_order`, so
      causal work is balanced across devices; ``T`` and ``S`` must then be
      multiples of ``2 * P``. Lengths, causal and window masks always refer to
      the natural positions.

  Lengths ``T`` and ``S`` need not be multiples of ``P``: the sequences are
  padded up to one, the padded keys masked and the padded queries dropped.
  Boolean ``mask`` and ``bias`` arrays (``T x S``, what sequence parallelism
  avoids) are not supported; use lengths, causal and window options.

  Returns:
    The output ``(..., T, N, D)`` sharded like the queries; with ``return_lse``
    also the log-sum-exp ``(..., N, T)``. Equal to single-device attention.

  Examples:
    >>> import jax, jattn
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
    >>> out = jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    >>> bool(jax.numpy.allclose(out, jattn.dot_product_attention(q, k, v, is_causal=True),
    ...                         atol=1e-6))
    True
  """
  query, key, value, dims = _checks.check_qkv(query, key, value)
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}.")
  for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis)):
    if axis is not None and (axis not in mesh.shape or axis == axis_name):
      raise ValueError(f"{name} {axis!r} must be another axis of the mesh {dict(mesh.shape)}.")
  size = mesh.shape[axis_name]
  batch, T, S = dims.batch, dims.T, dims.S
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if layout == "zigzag" and (T % (2 * size) or S % (2 * size)):
    raise ValueError(
      f"layout='zigzag' needs query and key lengths ({T}, {S}) that are multiples of "
      f"2 * {size} devices: the inputs come already in zigzag_order."
    )
  if batch_axis is not None and (not batch or batch[0] % mesh.shape[batch_axis]):
    raise ValueError(
      f"batch_axis {batch_axis!r} ({mesh.shape[batch_axis]} devices) needs a leading batch "
      f"dimension divisible by it; the queries are {query.shape}."
    )
  if head_axis is not None and (dims.N % mesh.shape[head_axis] or dims.K % mesh.shape[head_axis]):
    raise ValueError(
      f"head_axis {head_axis!r} ({mesh.shape[head_axis]} devices) must divide both the query "
      f"heads ({dims.N}) and the key/value heads ({dims.K})."
    )
  is_causal = _checks.check_is_causal(is_causal)
  window = _masks.normalize_window(local_window_size)
  offset = _masks.query_offset(T, S, alignment)  # of the true lengths, before padding
  scale = _checks.check_scale(scale, dims.H)
  if isinstance(scale, jax.core.Tracer):
    raise TypeError("ring_attention needs a static scale (a Python float).")
  q_len = _checks.check_lengths("query_seq_lengths", query_seq_lengths, batch, T)
  kv_len = _checks.check_lengths("key_value_seq_lengths", key_value_seq_lengths, batch, S)
  Tp, Sp = -(-T // size) * size, -(-S // size) * size
  if Sp != S and kv_len is None:
    kv_len = jnp.full(batch, S, jnp.int32)  # masks the padded keys
  axis_of = len(batch)
  query = _pad(query, axis_of, Tp)
  key, value = _pad(key, axis_of, Sp), _pad(value, axis_of, Sp)

  lead = tuple(batch_axis if i == 0 else None for i in range(len(batch)))
  seq_spec = P(*lead, axis_name, head_axis, None)
  len_spec = P(*lead)
  cfg = dict(
    axis_name=axis_name,
    size=size,
    layout=layout,
    Tl=Tp // size,
    Sl=Sp // size,
    offset=offset,
    is_causal=is_causal,
    window=window,
    scale=float(scale),
    block_q=block_q,
    block_kv=block_kv,
  )
  ring = _ring_fn(cfg)
  lengths = [x for x in (q_len, kv_len) if x is not None]
  has_q, has_kv = q_len is not None, kv_len is not None

  def per_device(q, k, v, *lengths):
    lengths = list(lengths)
    ql = lengths.pop(0).astype(jnp.int32) if has_q else None
    kl = lengths.pop(0).astype(jnp.int32) if has_kv else None
    return ring(q, k, v, ql, kl)

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(seq_spec, seq_spec, seq_spec, *(len_spec for _ in lengths)),
    out_specs=(seq_spec, P(*lead, head_axis, axis_name)),
    check_vma=False,
  )
  place = functools.partial(_place, mesh)
  out, lse = sharded(
    place(query, seq_spec),
    place(key, seq_spec),
    place(value, seq_spec),
    *(place(x, len_spec) for x in lengths),
  )
  if Tp != T:  # drop the padded queries (the sequence is gathered to slice it)
    out = jax.lax.slice_in_dim(place(out, P(*lead, None, head_axis, None)), 0, T, axis=axis_of)
    lse = jax.lax.slice_in_dim(place(lse, P(*lead, head_axis, None)), 0, T, axis=lse.ndim - 1)
  return (out, lse) if return_lse else out


def _place(mesh: Mesh, x: Array, spec: P) -> Array:
  """``x`` laid out by ``spec`` on ``mesh``, for meshes of explicit and of automatic axes."""
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _pad(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
