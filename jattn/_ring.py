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

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import _blockwise, _masks, _spec
from jattn._spec import Call, compute_dtype

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


class _Plan(NamedTuple):
  """Static description of the ring (the per-device sizes and the local call's template)."""

  axis_name: str
  size: int
  layout: str
  Tl: int  # local (padded) query and key lengths per device
  Sl: int
  batch_axis: str | None
  head_axis: str | None
  B_local: int  # flattened local batch
  N_local: int


def _ring_fn(plan: _Plan, call: Call):
  """The per-device ring (inside ``shard_map``) with its custom VJP.

  ``call`` is the checked global call; each visible (query chunk, key chunk) pair
  of a step runs the blockwise backend on a local call whose mask carries the
  chunks' global starts, so every rule (positions, lengths, mods) sees global indices.
  """
  axis, size, layout = plan.axis_name, plan.size, plan.layout
  perm = tuple((i, (i + 1) % size) for i in range(size))
  m = call.mask

  def pairs(src, me, q_len, kv_len, consts):
    """Per (query chunk, key chunk) of this step: slices, an ``attend`` and its visibility."""
    b_start = 0 if plan.batch_axis is None else jax.lax.axis_index(plan.batch_axis) * plan.B_local
    h_start = 0 if plan.head_axis is None else jax.lax.axis_index(plan.head_axis) * plan.N_local
    score_consts, mask_consts = consts
    result = []
    for q_start, q_at, q_size in _chunks(layout, me, size, plan.Tl):
      for kv_start, kv_at, kv_size in _chunks(layout, src, size, plan.Sl):
        state = _masks.tile_state(
          m,
          q_start,
          q_start + q_size - 1,
          kv_start,
          kv_start + kv_size - 1,
          q_len=q_len,
          kv_len=kv_len,
        )
        visible = jnp.any(state != _masks.HIDDEN)
        mask = m._replace(
          q_lengths=q_len,
          kv_lengths=kv_len,
          q_start=q_start,
          kv_start=kv_start,
          b_start=b_start,
          h_start=h_start,
          mask_mod=None if m.mask_mod is None else m.mask_mod._replace(consts=mask_consts),
        )

        def attend(q, k, v, score_consts=score_consts, mask=mask):
          score_mod = (
            None if call.score_mod is None else call.score_mod._replace(consts=score_consts)
          )
          _, _, _, dims = _spec.check_qkv(q, k, v)
          local = call._replace(
            q=q, k=k, v=v, dims=dims, mask=mask, score_mod=score_mod, implementation="blockwise"
          )
          return _blockwise.run(local)

        result.append((slice(q_at, q_at + q_size), slice(kv_at, kv_at + kv_size), attend, visible))
    return result

  def seq(x, index, axis_from_end):  # x[..., index, (rest)] along the sequence axis
    return x[(Ellipsis, index) + (slice(None),) * axis_from_end]

  def empty(q, v):
    out = jnp.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)
    lse = jnp.full((*q.shape[:-3], q.shape[-2], q.shape[-3]), -jnp.inf, jnp.float32)
    return out, lse.astype(compute_dtype(q.dtype))

  def forward(q, k, v, q_len, kv_len, consts):
    me = jax.lax.axis_index(axis)
    out, lse = empty(q, v)

    def step(carry, s):
      out, lse, k, v = carry
      for qs, ks, attend, visible in pairs((me - s) % size, me, q_len, kv_len, consts):
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
  def ring(q, k, v, q_len, kv_len, consts):
    return forward(q, k, v, q_len, kv_len, consts)

  def ring_fwd(q, k, v, q_len, kv_len, consts):
    out, lse = forward(q, k, v, q_len, kv_len, consts)
    return (out, lse), (q, k, v, q_len, kv_len, consts, out, lse)

  def ring_bwd(residuals, cotangents):
    q, k, v, q_len, kv_len, consts, out, lse = residuals
    g_out, g_lse = cotangents
    me = jax.lax.axis_index(axis)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # out = sum_j exp(lse_j - lse) out_j and lse = logsumexp_j lse_j, so block j's share
    # h_j = (exp(lse_j - lse) out_j, exp(lse_j - lse)) with lse held fixed gets the
    # cotangents (g_out, g_lse - <g_out, out>): the lse's own dependence on block j.
    g_share = g_lse - jnp.moveaxis(jnp.sum(g_out * out, axis=-1), -1, -2).astype(g_lse.dtype)
    score_consts = consts[0]
    floats = [jnp.issubdtype(c.dtype, jnp.inexact) for c in score_consts]

    float_consts = tuple(x for f, x in zip(floats, score_consts, strict=True) if f)

    def step(carry, s):
      dq, k, v, dk, dv, dc = carry
      for qs, ks, attend, visible in pairs((me - s) % size, me, q_len, kv_len, consts):
        lse_c, g_out_c, g_share_c = seq(lse_safe, qs, 0), seq(g_out, qs, 2), seq(g_share, qs, 0)

        def grads(q, k, v, c, attend=attend, lse_c=lse_c, g_out_c=g_out_c, g_share_c=g_share_c):
          def share(q, k, v, c):
            # Only the score_mod's float arrays are differentiated: the rest are held.
            it = iter(c)
            full = tuple(next(it) if f else x for f, x in zip(floats, score_consts, strict=True))
            out_j, lse_j = attend(q, k, v, full)
            w = jnp.exp(lse_j - lse_c)
            return out_j * jnp.moveaxis(w, -2, -1)[..., None].astype(out_j.dtype), w

          return jax.vjp(share, q, k, v, c)[1]((g_out_c, g_share_c))

        def nothing(q, k, v, c):
          return (
            jnp.zeros_like(q),
            jnp.zeros_like(k),
            jnp.zeros_like(v),
            jax.tree.map(jnp.zeros_like, c),
          )

        dq_j, dk_j, dv_j, dc_j = jax.lax.cond(
          visible, grads, nothing, seq(q, qs, 2), seq(k, ks, 2), seq(v, ks, 2), float_consts
        )
        dq = dq.at[..., qs, :, :].add(dq_j)
        dk = dk.at[..., ks, :, :].add(dk_j)
        dv = dv.at[..., ks, :, :].add(dv_j)
        dc = jax.tree.map(jnp.add, dc, dc_j)
      k, v, dk, dv = jax.lax.ppermute((k, v, dk, dv), axis, perm)
      return (dq, k, v, dk, dv, dc), None

    init = (
      jnp.zeros_like(q),
      k,
      v,
      jnp.zeros_like(k),
      jnp.zeros_like(v),
      jax.tree.map(jnp.zeros_like, float_consts),
    )
    (dq, _, _, dk, dv, dc), _ = jax.lax.scan(step, init, jnp.arange(size))
    # Each device returns its share of the captured arrays' cotangent; shard_map's
    # transpose of their replicated input spec sums the shares over the mesh.
    it = iter(dc)
    d_score = tuple(
      next(it) if f else _zero_cotangent(x) for f, x in zip(floats, score_consts, strict=True)
    )
    d_mask = tuple(_zero_cotangent(x) for x in consts[1])
    return dq, dk, dv, None, None, (d_score, d_mask)

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


_NOT_ON_THE_RING = ("mask", "bias", "block_mask")


def ring_attention(
  query: Array,
  key: Array,
  value: Array,
  *,
  mesh: Mesh,
  axis_name: str,
  batch_axis: str | None = None,
  head_axis: str | None = None,
  layout: str = "contiguous",
  **options: Any,
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
    layout: ``"contiguous"`` (device ``d`` holds positions ``d * T/P`` onwards) or
      ``"zigzag"``: the inputs (and the output) are in :func:`zigzag_order`, so
      causal work is balanced across devices; ``T`` and ``S`` must then be
      multiples of ``2 * P``. Lengths, causal and window masks and the mods'
      indices always refer to the natural positions.
    **options: as in :func:`jattn.dot_product_attention` (``scale``,
      ``is_causal``, ``local_window_size``, lengths, ``alignment``, ``mask_mod``,
      ``score_mod``, ``block_q``/``block_kv`` per device, ``return_lse``);
      not the ``(T, S)``-sized ``mask``, ``bias`` or weights that sequence
      parallelism avoids, nor dropout or ``block_mask``.

  Lengths ``T`` and ``S`` need not be multiples of ``P``: the sequences are
  padded up to one, the padded keys masked and the padded queries dropped.

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
  ring = Ring(mesh, axis_name, batch_axis, head_axis, layout)
  opts = _spec.options("ring_attention", options, exclude=("implementation", "return_weights"))
  opts = dataclasses.replace(opts, implementation=ring)
  return run(_spec.describe(query, key, value, opts))


def run(call: Call) -> Array | tuple[Array, Array]:
  """Ring attention of a checked call whose ``implementation`` is a :class:`Ring`."""
  mesh, axis_name, batch_axis, head_axis, layout = call.implementation
  dims, m = call.dims, call.mask
  given = [n for n, x in (("mask", m.dense), ("bias", call.bias)) if x is not None]
  given += ["block_mask"] if m.block_mask is not None else []
  given += ["return_weights"] if call.return_weights else []
  given += ["dropout"] if call.dropout is not None else []
  if given:
    raise ValueError(
      f"ring attention does not support {given}: (T, S)-sized masks, biases and weights are "
      "what sequence parallelism avoids; use lengths, is_causal, local_window_size and mods."
    )
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
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
      f"dimension divisible by it; the queries are {call.q.shape}."
    )
  if head_axis is not None and (dims.N % mesh.shape[head_axis] or dims.K % mesh.shape[head_axis]):
    raise ValueError(
      f"head_axis {head_axis!r} ({mesh.shape[head_axis]} devices) must divide both the query "
      f"heads ({dims.N}) and the key/value heads ({dims.K})."
    )
  if not isinstance(call.scale, float):
    raise TypeError("ring_attention needs a static scale (a Python float).")
  q_len, kv_len = m.q_lengths, m.kv_lengths
  Tp, Sp = -(-T // size) * size, -(-S // size) * size
  if Sp != S and kv_len is None:
    kv_len = jnp.full(batch, S, jnp.int32)  # masks the padded keys
  axis_of = len(batch)
  query = _pad(call.q, axis_of, Tp)
  key, value = _pad(call.k, axis_of, Sp), _pad(call.v, axis_of, Sp)

  lead = tuple(batch_axis if i == 0 else None for i in range(len(batch)))
  seq_spec = P(*lead, axis_name, head_axis, None)
  len_spec = P(*lead)
  batch_shards = 1 if batch_axis is None else mesh.shape[batch_axis]
  plan = _Plan(
    axis_name=axis_name,
    size=size,
    layout=layout,
    Tl=Tp // size,
    Sl=Sp // size,
    batch_axis=batch_axis,
    head_axis=head_axis,
    B_local=math.prod(batch) // batch_shards,
    N_local=dims.N // (1 if head_axis is None else mesh.shape[head_axis]),
  )
  ring = _ring_fn(plan, call._replace(mask=m._replace(q_lengths=None, kv_lengths=None)))
  lengths = [x for x in (q_len, kv_len) if x is not None]
  has_q, has_kv = q_len is not None, kv_len is not None
  consts = (
    () if call.score_mod is None else call.score_mod.consts,
    () if m.mask_mod is None else m.mask_mod.consts,
  )

  def per_device(q, k, v, consts, *lengths):
    lengths = list(lengths)
    ql = lengths.pop(0) if has_q else None
    kl = lengths.pop(0) if has_kv else None
    return ring(q, k, v, ql, kl, consts)

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(seq_spec, seq_spec, seq_spec, P(), *(len_spec for _ in lengths)),
    out_specs=(seq_spec, P(*lead, head_axis, axis_name)),
    check_vma=False,
  )
  place = functools.partial(_place, mesh)
  out, lse = sharded(
    place(query, seq_spec),
    place(key, seq_spec),
    place(value, seq_spec),
    jax.tree.map(lambda c: place(c, P()), consts),
    *(place(x, len_spec) for x in lengths),
  )
  if Tp != T:  # drop the padded queries (the sequence is gathered to slice it)
    out = jax.lax.slice_in_dim(place(out, P(*lead, None, head_axis, None)), 0, T, axis=axis_of)
    lse = jax.lax.slice_in_dim(place(lse, P(*lead, head_axis, None)), 0, T, axis=lse.ndim - 1)
  return (out, lse) if call.return_lse else out


def _place(mesh: Mesh, x: Array, spec: P) -> Array:
  """``x`` laid out by ``spec`` on ``mesh``, for meshes of explicit and of automatic axes."""
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _pad(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
