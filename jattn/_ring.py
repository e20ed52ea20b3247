"""Sequence-parallel ring attention over a JAX mesh (Liu et al., 2023).

The sequence axis of the queries, keys and values is sharded over one mesh axis
of ``P`` devices. Each device keeps its ``T / P`` queries and, for ``P`` steps,
attends them to the key/value block it holds with the blockwise path
(:func:`jattn._blockwise.run`), merges the partial result into an
online-softmax accumulator by log-sum-exp, and passes the block to the next
device with ``jax.lax.ppermute``. No device ever holds more than one block of
keys and values, so memory per device grows with ``N / P``.

Differentiation is one ``jax.custom_jvp``, as in the blockwise path: its tangent
sweep is linear in the tangents (with ``w_j = exp(lse_j - lse)`` the share of
key block ``j``, ``lse' = sum_j w_j lse_j'`` and ``out' = sum_j w_j (out_j' +
lse_j' out_j) - lse' out``, each block's tangents from the blockwise path's own
JVP), so forward mode (``jax.jvp``, ``jacfwd``) is that sweep and reverse mode is
JAX's transpose of it. Step ``s`` of the sweep fetches key block ``me - s`` and its
tangent straight from their owner inside a rematerialised scan body, so the
transpose keeps no visiting block: ``O(T / P)`` residuals per device. (Plain
autodiff through the forward ring would save every visiting block: ``O(T)`` per
device, which defeats sequence parallelism.)

Packed documents: segment ids and positions are sharded with the sequence and
travel with their key blocks; a (query chunk, key chunk) pair whose id or
position ranges cannot meet is skipped, like a blockwise tile.

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
  safe = jnp.where(new == -jnp.inf, 0.0, new)  # NaN propagates
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


class _Side(NamedTuple):
  """One side's per-token data on a device: ``(..., L, heads, dim)`` arrays and
  ``(..., L)`` segment ids and positions (None when absent). The key side travels."""

  x: tuple[Array, ...]  # (q,) or (k, v)
  seg: Array | None = None
  pos: Array | None = None


def _ring_fn(plan: _Plan, call: Call):
  """The per-device ring (inside ``shard_map``), differentiable in every AD mode.

  ``call`` is the checked global call; each visible (query chunk, key chunk) pair
  of a step runs the blockwise backend on a local call whose mask carries the
  chunks' global starts and per-token data, so every rule (positions, lengths,
  segments, mods) sees global indices.

  A ``jax.custom_jvp``: the forward pass passes the key blocks around the ring;
  the tangent sweep is linear in the tangents and fetches step ``s``'s key block
  (and its tangent) straight from device ``me - s`` inside a rematerialised scan
  body, so JAX's transpose of it (reverse mode) keeps O(T / P) residuals per
  device, like the forward pass, and needs no hand-written backward.
  """
  axis, size, layout = plan.axis_name, plan.size, plan.layout
  m = call.mask

  def pairs(src, me, q_side: _Side, kv_side: _Side, q_len, kv_len, consts):
    """Per (query chunk, key chunk) of this step: slices, an ``attend`` and its visibility."""
    b_start = 0 if plan.batch_axis is None else jax.lax.axis_index(plan.batch_axis) * plan.B_local
    h_start = 0 if plan.head_axis is None else jax.lax.axis_index(plan.head_axis) * plan.N_local
    _, mask_consts, _ = consts
    result = []
    for q_start, q_at, q_size in _chunks(layout, me, size, plan.Tl):
      for kv_start, kv_at, kv_size in _chunks(layout, src, size, plan.Sl):
        qs, ks = slice(q_at, q_at + q_size), slice(kv_at, kv_at + kv_size)
        part = lambda x, sl: None if x is None else x[..., sl]  # noqa: E731
        q_seg, q_pos = part(q_side.seg, qs), part(q_side.pos, qs)
        kv_seg, kv_pos = part(kv_side.seg, ks), part(kv_side.pos, ks)
        span = lambda x: None if x is None else (jnp.min(x), jnp.max(x))  # noqa: E731
        state = _masks.tile_state(
          m,
          q_start,
          q_start + q_size - 1,
          kv_start,
          kv_start + kv_size - 1,
          q_len=q_len,
          kv_len=kv_len,
          q_range=span(q_pos),
          kv_range=span(kv_pos),
          q_segments=span(q_seg),
          kv_segments=span(kv_seg),
        )
        visible = jnp.any(state != _masks.HIDDEN)
        mask = m._replace(
          q_lengths=q_len,
          kv_lengths=kv_len,
          q_segments=q_seg,
          kv_segments=kv_seg,
          q_positions=q_pos,
          kv_positions=kv_pos,
          q_start=q_start,
          kv_start=kv_start,
          b_start=b_start,
          h_start=h_start,
          mask_mod=None if m.mask_mod is None else m.mask_mod._replace(consts=mask_consts),
        )

        def attend(q, k, v, score_consts, slopes, mask=mask):
          score_mod = (
            None if call.score_mod is None else call.score_mod._replace(consts=score_consts)
          )
          _, _, _, dims = _spec.check_qkv(q, k, v)
          local = call._replace(
            q=q,
            k=k,
            v=v,
            dims=dims,
            mask=mask,
            score_mod=score_mod,
            slopes=slopes[0] if slopes else None,
            sinks=None,  # added once to the merged result
            implementation="blockwise",
          )
          return _blockwise.run(local)

        result.append((qs, ks, attend, visible))
    return result

  def seq(x, index, axis_from_end):  # x[..., index, (rest)] along the sequence axis
    return x[(Ellipsis, index) + (slice(None),) * axis_from_end]

  def empty(q, v):
    out = jnp.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)
    lse = jnp.full((*q.shape[:-3], q.shape[-2], q.shape[-3]), -jnp.inf, jnp.float32)
    return out, lse.astype(compute_dtype(q.dtype))

  def forward(q_side, kv_side, q_len, kv_len, consts):
    me = jax.lax.axis_index(axis)
    (q,), v = q_side.x, kv_side.x[1]
    out, lse = empty(q, v)
    out = out.astype(lse.dtype)  # merged in float32 (at least), rounded once at the end
    perm = tuple((i, (i + 1) % size) for i in range(size))

    def step(carry, s):
      out, lse, kv_side = carry
      k, v = kv_side.x
      for qs, ks, attend, visible in pairs(
        (me - s) % size, me, q_side, kv_side, q_len, kv_len, consts
      ):
        out_j, lse_j = jax.lax.cond(
          visible,
          attend,
          lambda q, k, v, *_: empty(q, v),
          seq(q, qs, 2),
          seq(k, ks, 2),
          seq(v, ks, 2),
          consts[0],
          consts[2],
        )
        merged = _merge(seq(out, qs, 2), seq(lse, qs, 0), out_j, lse_j)
        out = out.at[..., qs, :, :].set(merged[0])
        lse = lse.at[..., qs].set(merged[1])
      return (out, lse, jax.lax.ppermute(kv_side, axis, perm)), None

    (out, lse, _), _ = jax.lax.scan(step, (out, lse, kv_side), jnp.arange(size))
    return out.astype(q.dtype), lse

  def fetch(x, s):
    """``x`` as held by device ``me - s`` (one transfer; linear, so it transposes)."""
    shifted = [
      lambda x, t=t: jax.lax.ppermute(x, axis, tuple((i, (i + t) % size) for i in range(size)))
      for t in range(1, size)
    ]
    return jax.lax.switch(s, [lambda x: x, *shifted], x)

  @jax.custom_jvp
  def ring(q_side, kv_side, q_len, kv_len, consts):
    return forward(q_side, kv_side, q_len, kv_len, consts)

  @ring.defjvp
  def ring_jvp(primals, tangents):
    q_side, kv_side, q_len, kv_len, consts = primals
    d_q, d_kv, _, _, d_consts = tangents
    out, lse = forward(q_side, kv_side, q_len, kv_len, consts)
    me = jax.lax.axis_index(axis)
    f32 = lse.dtype
    (q,), (dq,) = q_side.x, d_q.x
    d_consts = jax.tree.map(_blockwise._float_tangent, consts, d_consts)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)

    # With w_j = exp(lse_j - lse): lse' = sum_j w_j lse_j', and
    # out' = sum_j w_j (out_j' + lse_j' out_j) - lse' out. Each step adds its blocks' terms.
    @jax.checkpoint
    def step(carry, s):
      acc, c = carry
      kv_s, d_kv_s = fetch(kv_side, s), fetch(d_kv.x, s)
      (k, v), (dk, dv) = kv_s.x, d_kv_s
      for qs, ks, attend, visible in pairs(
        (me - s) % size, me, q_side, kv_s, q_len, kv_len, consts
      ):
        lse_c = seq(lse_safe, qs, 0)

        def terms(q, k, v, dq, dk, dv, d_consts, attend=attend, lse_c=lse_c):
          primal = (q, k, v, consts[0], consts[2])
          tangent = (dq, dk, dv, d_consts[0], d_consts[2])
          (out_j, lse_j), (dout_j, dlse_j) = jax.jvp(attend, primal, tangent)
          w = jnp.exp(lse_j - lse_c)  # (..., N, T) share of block j
          w_t = jnp.moveaxis(w, -2, -1)[..., None]
          a = w_t * (dout_j + jnp.moveaxis(dlse_j, -2, -1)[..., None] * out_j)
          return a.astype(f32), (w * dlse_j).astype(f32)

        def nothing(q, *_):
          return (
            jnp.zeros((*q.shape[:-1], out.shape[-1]), f32),
            jnp.zeros((*q.shape[:-3], q.shape[-2], q.shape[-3]), f32),
          )

        a, c_j = jax.lax.cond(
          visible,
          terms,
          nothing,
          seq(q, qs, 2),
          seq(k, ks, 2),
          seq(v, ks, 2),
          seq(dq, qs, 2),
          seq(dk, ks, 2),
          seq(dv, ks, 2),
          d_consts,
        )
        acc = acc.at[..., qs, :, :].add(a)
        c = c.at[..., qs].add(c_j)
      return (acc, c), None

    init = (jnp.zeros(out.shape, f32), jnp.zeros(lse.shape, f32))
    (acc, c), _ = jax.lax.scan(step, init, jnp.arange(size))
    d_out = acc - jnp.moveaxis(c, -2, -1)[..., None] * out.astype(f32)
    return (out, lse), (d_out.astype(out.dtype), c)

  return ring


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
    mesh: a ``jax.sharding.Mesh`` (single- or multi-process), with automatic
      axes (``jax.sharding.Mesh(devices, names)``) or explicit ones
      (``jax.make_mesh``), inside a ``jax.set_mesh`` context or not.
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
      ``score_mod``, segment ids and positions ``(..., T)``/``(..., S)`` in the
      same layout as the inputs, ``attention_chunk_size``, ``alibi_slopes``,
      ``logits_soft_cap``, ``sinks``, ``block_q``/``block_kv`` per device,
      ``return_lse``); not the ``(T, S)``-sized ``mask``, ``bias`` or weights
      that sequence parallelism avoids, nor dropout or ``block_mask``.

  Lengths ``T`` and ``S`` need not be multiples of ``P``: the sequences are
  padded up to one, the padded keys masked and the padded queries dropped.

  Returns:
    The output ``(..., T, N, D)`` sharded like the queries; with ``return_lse``
    also the log-sum-exp ``(..., N, T)``. Equal to single-device attention, and
    differentiable in forward and reverse mode.

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
  if jax.sharding.get_abstract_mesh().empty and not any(
    _typed(x) for x in (call.q, call.k, call.v)
  ):
    # Outside a jax.set_mesh context, explicit axes would type the outputs with the mesh,
    # and differentiating the caller's loss would then need one: unless the inputs are
    # already typed with explicit shardings (then their cotangents must be too), the same
    # devices and layout with automatic axes serve every caller.
    mesh = Mesh(
      mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * mesh.devices.ndim
    )
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

  def tokens(x, size):  # (..., L) per-token ints, padded with the last (ranges stay tight)
    if x is None or x.shape[-1] == size:
      return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])], mode="edge")

  lead = tuple(batch_axis if i == 0 else None for i in range(len(batch)))
  seq_spec = P(*lead, axis_name, head_axis, None)
  tok_spec = P(*lead, axis_name)
  len_spec = P(*lead)
  q_side = _Side((_pad(call.q, axis_of, Tp),), tokens(m.q_segments, Tp), tokens(m.q_positions, Tp))
  kv_side = _Side(
    (_pad(call.k, axis_of, Sp), _pad(call.v, axis_of, Sp)),
    tokens(m.kv_segments, Sp),
    tokens(m.kv_positions, Sp),
  )

  def side_spec(side):
    return _Side(
      tuple(seq_spec for _ in side.x), *(None if x is None else tok_spec for x in side[1:])
    )

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
  ring = _ring_fn(plan, call._replace(mask=m.without_token_arrays()))
  consts = (
    () if call.score_mod is None else call.score_mod.consts,
    () if m.mask_mod is None else m.mask_mod.consts,
    () if call.slopes is None else (jnp.broadcast_to(call.slopes, (*batch, dims.N)),),
  )
  # Every argument of the shard_map is an array (absent ones are left out of the lists).
  args = [q_side, kv_side, q_len, kv_len, consts]
  const_specs = jax.tree.map(lambda _: P(), consts[:2])
  # The slopes are per batch element and head: split like the queries.
  const_specs = (*const_specs, tuple(P(*lead, head_axis) for _ in consts[2]))
  specs = [side_spec(q_side), side_spec(kv_side), len_spec, len_spec, const_specs]
  present = [i for i, a in enumerate(args) if a is not None]

  def per_device(*given):
    full = [None] * len(args)
    for i, a in zip(present, given, strict=True):
      full[i] = a
    return ring(*full)

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=tuple(specs[i] for i in present),
    out_specs=(seq_spec, P(*lead, head_axis, axis_name)),
    check_vma=False,
  )
  place = functools.partial(_place, mesh)
  placed = [
    jax.tree.map(place, args[i], specs[i], is_leaf=lambda x: isinstance(x, P)) for i in present
  ]
  out, lse = sharded(*placed)
  if Tp != T:  # drop the padded queries (the sequence is gathered to slice it)
    out = jax.lax.slice_in_dim(place(out, P(*lead, None, head_axis, None)), 0, T, axis=axis_of)
    lse = jax.lax.slice_in_dim(place(lse, P(*lead, head_axis, None)), 0, T, axis=lse.ndim - 1)
  if call.sinks is not None:
    out, lse = _spec.add_sinks(out, lse, call.sinks)
  return (out, lse) if call.return_lse else out


def _typed(x: Array) -> bool:
  """Whether ``x``'s type carries a sharding over explicit mesh axes."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return sharding is not None and any(p is not None for p in getattr(sharding, "spec", ()))


def _place(mesh: Mesh, x: Array, spec: P) -> Array:
  """``x`` laid out by ``spec`` on ``mesh``, for meshes of explicit and of automatic axes."""
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _pad(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
