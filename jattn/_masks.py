"""Boolean attention masks: True means "this query may attend this key".

Every helper here returns booleans (never the float 0/1 masks of ``flax.linen``'s
helpers), shaped to broadcast against attention weights laid out
``(..., N, T, S)``:

  T  query length          S  key/value length          N  query heads

Positions and alignment
-----------------------
Causal and sliding-window masks depend on where each query sits among the keys.
With ``alignment="bottom_right"`` (the default) the queries are the *last* ``T``
of the ``S`` positions, so query ``i`` is at position ``i + S - T``: this is what
decoding with a key/value cache and chunked prefill need, and what
FlashAttention 2.1+ does. With ``alignment="top_left"`` query ``i`` is at
position ``i``, as in ``jax.nn.dot_product_attention`` and PyTorch's
``is_causal``. The two agree whenever ``T == S``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Alignment = Literal["bottom_right", "top_left"]
_ALIGNMENTS = ("bottom_right", "top_left")


def _check_alignment(alignment: str) -> None:
  if alignment not in _ALIGNMENTS:
    raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}.")


def check_length(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int, got {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}.")
  return int(value)


def check_shape(name: str, value) -> tuple[int, ...]:
  """A tuple of positive ints from a tuple/list of integer-likes or one integer (a 1-tuple)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (value,)
  if not isinstance(value, Sequence) or isinstance(value, str):
    raise TypeError(f"{name} must be a tuple of positive ints, got {value!r}.")
  try:
    return tuple(check_length(f"{name}[{i}]", d) for i, d in enumerate(value))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{name} must be a tuple of positive ints, got {value!r}: {e}") from None


def normalize_window(window) -> tuple[int, int] | None:
  """Turns ``local_window_size`` (None, an int or a ``(left, right)`` pair) into a pair."""
  if window is None:
    return None
  if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
    window = (window, window)
  if (
    not isinstance(window, Sequence)
    or len(window) != 2
    or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window)
  ):
    raise TypeError(
      f"local_window_size must be an int or a pair of ints (left, right), got {window!r}."
    )
  left, right = (int(w) for w in window)
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must be non-negative, got {(left, right)}.")
  return left, right


def query_offset(q_len: int, kv_len: int, alignment: Alignment) -> int:
  """Position of query 0 among the keys: ``kv_len - q_len`` bottom-right, 0 top-left."""
  _check_alignment(alignment)
  return kv_len - q_len if alignment == "bottom_right" else 0


def position_mask(
  q_pos: jax.Array,
  kv_pos: jax.Array,
  *,
  is_causal: bool,
  window: tuple[int, int] | None,
) -> jax.Array | None:
  """The causal/sliding-window mask of query positions against key positions.

  The element rule for positions (:func:`visible` uses it; :func:`tile_state`
  states the same rule for ranges of positions, and a test checks they agree).

  Args:
    q_pos: integer positions of the queries (already offset by alignment), e.g. ``(T, 1)``.
    kv_pos: integer positions of the keys, broadcasting against ``q_pos``, e.g. ``(1, S)``.
    is_causal: whether a query may only attend keys at or before its position.
    window: ``(left, right)``: a query at ``p`` attends keys in ``[p - left, p + right]``.

  Returns:
    The broadcast boolean mask, or None when neither option restricts anything.
  """
  if not is_causal and window is None:
    return None
  delta = kv_pos - q_pos  # key position minus query position
  mask = jnp.ones(delta.shape, dtype=bool)
  if is_causal:
    mask &= delta <= 0
  if window is not None:
    left, right = window
    mask &= (delta >= -left) & (delta <= right)
  return mask


def causal_mask(q_len: int, kv_len: int | None = None, *, alignment: Alignment = "bottom_right"):
  """A causal mask: each query attends only keys at or before its own position.

  Args:
    q_len: ``T``, the number of queries.
    kv_len: ``S``, the number of keys (default ``T``).
    alignment: ``"bottom_right"`` (queries are the last ``T`` positions) or
      ``"top_left"`` (query ``i`` is position ``i``); see the module docstring.

  Returns:
    A ``(T, S)`` boolean array.

  Examples:
    >>> import jattn
    >>> jattn.causal_mask(3).astype(int)
    Array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)
    >>> jattn.causal_mask(2, 4).astype(int)  # the last two of four positions
    Array([[1, 1, 1, 0],
           [1, 1, 1, 1]], dtype=int32)
  """
  return sliding_window_mask(q_len, kv_len, None, is_causal=True, alignment=alignment)


def sliding_window_mask(
  q_len: int,
  kv_len: int | None = None,
  window: int | tuple[int, int] | None = None,
  *,
  is_causal: bool = False,
  alignment: Alignment = "bottom_right",
):
  """A local-attention mask: a query at position ``p`` attends keys in ``[p - left, p + right]``.

  Args:
    q_len: ``T``, the number of queries.
    kv_len: ``S``, the number of keys (default ``T``).
    window: ``(left, right)`` non-negative ints, or one int for both sides, as
      ``local_window_size`` in ``jax.nn.dot_product_attention``.
    is_causal: also forbid keys after the query (as ``right = 0``).
    alignment: see :func:`causal_mask`.

  Returns:
    A ``(T, S)`` boolean array.

  Examples:
    >>> import jattn
    >>> jattn.sliding_window_mask(4, window=(1, 0)).astype(int)
    Array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]], dtype=int32)
  """
  q_len = check_length("q_len", q_len)
  kv_len = q_len if kv_len is None else check_length("kv_len", kv_len)
  window = normalize_window(window)
  offset = query_offset(q_len, kv_len, alignment)
  mask = position_mask(
    jnp.arange(q_len)[:, None] + offset,
    jnp.arange(kv_len)[None, :],
    is_causal=is_causal,
    window=window,
  )
  return jnp.ones((q_len, kv_len), dtype=bool) if mask is None else mask


def alibi_slopes(num_heads: int) -> jax.Array:
  """ALiBi's per-head slopes (Press et al., 2022), for any number of heads.

  For ``N`` a power of two, the geometric sequence ``2^(-8/N), 2^(-16/N), ...,
  2^(-8)``; otherwise those of the power of two below ``N`` followed by every
  other slope of twice that, as in the paper's reference code. Pass them as
  ``alibi_slopes=`` to add ``-slope * |q_pos - kv_pos|`` to the scores.

  Args:
    num_heads: ``N``, the number of query heads.

  Returns:
    ``(N,)`` float32 slopes.

  Examples:
    >>> import jattn
    >>> jattn.alibi_slopes(4)  # 2^-2, 2^-4, 2^-6, 2^-8
    Array([0.25      , 0.0625    , 0.015625  , 0.00390625], dtype=float32)

  References:
    Press, Smith & Lewis, "Train Short, Test Long: Attention with Linear Biases
    Enables Input Length Extrapolation", arXiv:2108.12409.
  """
  n = check_length("num_heads", num_heads)

  def geometric(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  below = 2 ** math.floor(math.log2(n))
  slopes = geometric(below) + geometric(2 * below)[0::2][: n - below]
  return jnp.asarray(slopes, jnp.float32)


def length_mask(lengths: jax.Array, size: int) -> jax.Array:
  """``(..., size)`` boolean: position ``j`` is valid iff ``j < lengths[...]``."""
  lengths = jnp.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"sequence lengths must be integers, got dtype {lengths.dtype}.")
  lengths = lengths.astype(jnp.int32)  # a narrow dtype (uint8) would wrap the positions
  positions = jax.lax.broadcasted_iota(lengths.dtype, (*lengths.shape, size), lengths.ndim)
  return positions < lengths[..., None]


def padding_mask(
  kv_lengths: jax.Array | None,
  kv_len: int,
  *,
  q_lengths: jax.Array | None = None,
  q_len: int | None = None,
) -> jax.Array:
  """A padding mask from the number of valid (leading) positions in each sequence.

  Args:
    kv_lengths: ``(...)`` integers, the valid keys of each batch element, or None
      for "all valid".
    kv_len: ``S``, the padded key length.
    q_lengths: optional ``(...)`` integers, the valid queries; padded queries
      attend nothing, so their output is zero.
    q_len: ``T``, the padded query length (required with ``q_lengths``).

  Returns:
    A boolean array ``(..., 1, 1, S)`` or, with ``q_lengths``, ``(..., 1, T, S)``,
    ready to broadcast against weights ``(..., N, T, S)``.

  Examples:
    >>> import jax.numpy as jnp, jattn
    >>> jattn.padding_mask(jnp.array([2, 3]), 4)[:, 0, 0].astype(int)
    Array([[1, 1, 0, 0],
           [1, 1, 1, 0]], dtype=int32)
  """
  kv_len = check_length("kv_len", kv_len)
  kv_valid = jnp.ones((kv_len,), bool) if kv_lengths is None else length_mask(kv_lengths, kv_len)
  mask = kv_valid[..., None, None, :]  # (..., 1, 1, S)
  if q_lengths is not None:
    if q_len is None:
      raise ValueError("padding_mask: q_len is required when q_lengths is given.")
    q_valid = length_mask(q_lengths, check_length("q_len", q_len))
    mask = combine_masks(mask, q_valid[..., None, :, None])  # (..., 1, T, S)
  return mask


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of boolean masks, broadcast together; Nones are skipped.

  Args:
    *masks: boolean arrays that broadcast against one another, or None.

  Returns:
    The broadcast AND of the masks, or None if every mask is None.

  Raises:
    TypeError: if a mask is not boolean.
    ValueError: if the masks do not broadcast together.

  Examples:
    >>> import jattn
    >>> m = jattn.combine_masks(jattn.causal_mask(3), None, jattn.sliding_window_mask(3, window=1))
    >>> m.astype(int)
    Array([[1, 0, 0],
           [1, 1, 0],
           [0, 1, 1]], dtype=int32)
  """
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  for m in present:
    if m.dtype != jnp.bool_:
      raise TypeError(f"masks must be boolean (True = attend), got dtype {m.dtype}.")
  try:
    shape = np.broadcast_shapes(*(m.shape for m in present))
  except ValueError:
    shapes = ", ".join(str(m.shape) for m in present)
    raise ValueError(f"combine_masks: mask shapes {shapes} do not broadcast together.") from None
  out = jnp.broadcast_to(present[0], shape)
  for m in present[1:]:
    out = out & jnp.broadcast_to(m, shape)
  return out


# --- the description of a call's mask: one element rule, one tile rule -----------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Which tiles of the ``(T, S)`` score matrix a ``mask_mod`` hides, shows or cuts.

  Made by :func:`jattn.block_mask`; pass it as ``block_mask=`` together with the
  same ``mask_mod`` so the blockwise path skips the hidden tiles and drops the
  per-element mask on the fully visible ones. A pytree (its tile map is an
  array), so it crosses ``jit`` and can be reused across layers and steps.

  Attributes:
    tiles: ``(B', N', nq, nk)`` int8, one per (batch, head, query tile, key
      tile): 0 hidden, 1 partly visible, 2 fully visible. ``B'`` is 1 or the
      flattened batch, ``N'`` 1 or the query heads.
    q_len, kv_len, block_q, block_kv: the lengths and tile sizes it was built for.
  """

  tiles: jax.Array
  q_len: int = dataclasses.field(metadata=dict(static=True))
  kv_len: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))

  def check_blocks(self, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    """The tile sizes of a call that uses this map: its own, or the same ones given again."""
    for name, given, own, length in (
      ("block_q", block_q, self.block_q, self.q_len),
      ("block_kv", block_kv, self.block_kv, self.kv_len),
    ):
      if given is not None and min(given, length) != own:  # tiles are clamped to the lengths
        raise ValueError(f"{name}={given} differs from the block_mask's tiles ({name}={own}).")
    return self.block_q, self.block_kv


HIDDEN, PARTIAL, FULL = 0, 1, 2
# The Mask fields that hold per-batch or per-token arrays.
TOKEN_ARRAYS = (
  "q_lengths",
  "kv_lengths",
  "q_segments",
  "kv_segments",
  "q_positions",
  "kv_positions",
)


class Mask(NamedTuple):
  """Every rule that decides whether a query may attend a key, for one call.

  Indices are global: query ``i`` of the arrays a backend holds is query
  ``q_start + i`` of the problem (and key ``j`` is key ``kv_start + j``), so the
  ring's shards and decoding at a cache index see the same mask as the whole
  problem. Query ``t`` sits at position ``t + offset`` among the keys (alignment).
  """

  T: int  # global query and key lengths
  S: int
  offset: int
  is_causal: bool
  window: tuple[int, int] | None
  q_lengths: jax.Array | None  # (...) int32
  kv_lengths: jax.Array | None  # (...) int32
  dense: jax.Array | None  # bool, broadcastable to (..., N, T, S)
  mask_mod: Any  # jattn._spec.Mod | None
  block_mask: BlockMask | None
  q_segments: jax.Array | None = None  # (..., T) int32 document ids; (..., S) for the keys
  kv_segments: jax.Array | None = None
  q_positions: jax.Array | None = None  # (..., T) int32: replace index + offset
  kv_positions: jax.Array | None = None  # (..., S) int32: replace the key index
  chunk: int | None = None  # attention_chunk_size
  q_start: Any = 0  # ints, or traced scalars
  kv_start: Any = 0
  b_start: Any = 0
  h_start: Any = 0

  @property
  def structured(self) -> bool:
    """Whether a rule with a tile rule can hide whole tiles: then smaller key tiles pay."""
    return (
      self.is_causal
      or self.window is not None
      or self.q_lengths is not None
      or self.kv_lengths is not None
      or self.dense is not None
      or self.block_mask is not None
      or self.q_segments is not None
      or self.chunk is not None
    )

  @property
  def anything(self) -> bool:
    """Whether any rule restricts anything (else no backend masks at all)."""
    return self.structured or self.mask_mod is not None

  def without_token_arrays(self) -> Mask:
    """The mask without its per-batch and per-token arrays (lengths, segment ids,
    positions): for a backend that passes them separately."""
    return self._replace(**dict.fromkeys(TOKEN_ARRAYS))


def describe(
  dims,
  *,
  mask: Any,
  is_causal: bool,
  window: tuple[int, int] | None,
  q_lengths: jax.Array | None,
  kv_lengths: jax.Array | None,
  alignment: Any,
  mask_mod: Any,
  block_mask: Any,
  segments: tuple[Any, Any] = (None, None),
  positions: tuple[Any, Any] = (None, None),
  chunk: int | None = None,
  q_start: Any = 0,
) -> Mask:
  """The :class:`Mask` of a call, checked against its dims (see :func:`jattn._spec.describe`,
  which has already checked ``mask``)."""
  if block_mask is not None:
    if not isinstance(block_mask, BlockMask):
      raise TypeError(
        f"block_mask must come from jattn.block_mask, got {type(block_mask).__name__}."
      )
    if mask_mod is None:
      raise ValueError("block_mask needs the mask_mod it was built from (pass both).")
    if (block_mask.q_len, block_mask.kv_len) != (dims.T, dims.S):
      raise ValueError(
        f"block_mask was built for (q_len, kv_len) = {(block_mask.q_len, block_mask.kv_len)}, "
        f"but the call has {(dims.T, dims.S)}."
      )
    B, N = math.prod(dims.batch), dims.N
    Bm, Nm = block_mask.tiles.shape[:2]
    if Bm not in (1, B) or Nm not in (1, N):
      raise ValueError(
        f"block_mask tiles {block_mask.tiles.shape} (batch, heads, nq, nk) do not fit "
        f"{B} batch elements and {N} heads."
      )
  return Mask(
    T=dims.T,
    S=dims.S,
    offset=query_offset(dims.T, dims.S, alignment),
    is_causal=is_causal,
    window=window,
    q_lengths=q_lengths,
    kv_lengths=kv_lengths,
    dense=mask,
    mask_mod=mask_mod,
    block_mask=block_mask,
    q_segments=segments[0],
    kv_segments=segments[1],
    q_positions=positions[0],
    kv_positions=positions[1],
    chunk=chunk,
    q_start=q_start,
  )


class Rows(NamedTuple):
  """Per-row (or per-column) data of the queries (keys) at hand, already taken for them,
  shaped to broadcast against their scores: lengths bound the global index, segment
  ids and explicit positions belong to each row."""

  length: jax.Array | None = None
  segment: jax.Array | None = None
  position: jax.Array | None = None


def positions(m: Mask, q_idx, kv_idx, q: Rows, kv: Rows) -> tuple[Any, Any]:
  """Query and key positions: the explicit ones, else index (plus alignment offset)."""
  q_pos = q_idx + m.offset if q.position is None else q.position
  kv_pos = kv_idx if kv.position is None else kv.position
  return q_pos, kv_pos


def visible(
  m: Mask,
  b: jax.Array,
  h: jax.Array,
  q_idx: jax.Array,
  kv_idx: jax.Array,
  *,
  q: Rows,
  kv: Rows,
  dense: jax.Array | None,
  with_mod: bool = True,
) -> jax.Array | None:
  """Whether query ``q_idx`` may attend key ``kv_idx``: the element rule of every path.

  ``b``, ``h``, ``q_idx``, ``kv_idx`` are global indices that broadcast together
  (e.g. ``(G, 1, 1)``, ``(bq, 1)``, ``(bk,)``); ``q``/``kv`` hold the lengths,
  segment ids and positions of these rows and columns, ``dense`` the boolean mask
  taken for them. Returns None if nothing is masked.
  """
  parts = []
  q_pos, kv_pos = positions(m, q_idx, kv_idx, q, kv)
  by_position = position_mask(q_pos, kv_pos, is_causal=m.is_causal, window=m.window)
  if by_position is not None:
    parts.append(by_position)
  if m.chunk is not None:
    parts.append(jnp.floor_divide(q_pos, m.chunk) == jnp.floor_divide(kv_pos, m.chunk))
  if q.segment is not None:
    parts.append(q.segment == kv.segment)
  if kv.length is not None:
    parts.append(kv_idx < kv.length)
  if q.length is not None:
    parts.append(q_idx < q.length)
  if dense is not None:
    parts.append(dense)
  if with_mod and m.mask_mod is not None:
    from jattn._spec import apply_mod

    parts.append(apply_mod(m.mask_mod, b, h, q_idx, kv_idx))
  if not parts:
    return None
  out = parts[0]
  for p in parts[1:]:
    out = out & p
  return out


def tile_state(
  m: Mask,
  q_first: Any,
  q_last: Any,
  kv_first: Any,
  kv_last: Any,
  *,
  q_len: Any = None,
  kv_len: Any = None,
  q_range: tuple[Any, Any] | None = None,
  kv_range: tuple[Any, Any] | None = None,
  q_segments: tuple[Any, Any] | None = None,
  kv_segments: tuple[Any, Any] | None = None,
  more: tuple[tuple[Any, Any], ...] = (),
) -> jax.Array:
  """The tile rule: HIDDEN, PARTIAL or FULL for queries ``[q_first, q_last]`` against
  keys ``[kv_first, kv_last]`` (global indices, may be traced).

  Positions, causal order, windows, chunks, segments and lengths state their tile
  rule here directly, from ranges: ``q_range``/``kv_range`` are the ``(min, max)``
  explicit positions of the tile's rows and columns (default: their indices,
  offset by alignment), ``q_segments``/``kv_segments`` the ``(min, max)`` segment
  ids. ``more`` adds ``(any visible, all visible)`` of other rules (a boolean
  mask's tiles, a block mask's). A tile is hidden if any rule hides it and full if
  every rule shows all of it; from ranges, "hidden" and "full" are exact for
  sorted ids and positions and conservative otherwise.
  """
  anys, alls = list(m_any for m_any, _ in more), list(m_all for _, m_all in more)
  qf, ql = (q_first + m.offset, q_last + m.offset) if q_range is None else q_range
  kf, kl = (kv_first, kv_last) if kv_range is None else kv_range
  if m.is_causal:
    anys.append(kf <= ql)
    alls.append(kl <= qf)
  if m.window is not None:
    left, right = m.window
    anys.append((kf <= ql + right) & (kl >= qf - left))
    alls.append((kf >= ql - left) & (kl <= qf + right))
  if m.chunk is not None:
    cq = [jnp.floor_divide(x, m.chunk) for x in (qf, ql)]
    ck = [jnp.floor_divide(x, m.chunk) for x in (kf, kl)]
    anys.append((ck[0] <= cq[1]) & (cq[0] <= ck[1]))
    alls.append((cq[0] == cq[1]) & (ck[0] == ck[1]) & (cq[0] == ck[0]))
  if q_segments is not None:
    (sq0, sq1), (sk0, sk1) = q_segments, kv_segments
    anys.append((sk0 <= sq1) & (sq0 <= sk1))
    alls.append((sq0 == sq1) & (sk0 == sk1) & (sq0 == sk0))
  if kv_len is not None:
    anys.append(kv_first < kv_len)
    alls.append(kv_last < kv_len)
  if q_len is not None:
    anys.append(q_first < q_len)
    alls.append(q_last < q_len)
  any_ = functools.reduce(jnp.logical_and, anys, jnp.asarray(True))
  all_ = functools.reduce(jnp.logical_and, alls, jnp.asarray(True))
  return jnp.where(any_, jnp.where(all_, FULL, PARTIAL), HIDDEN).astype(jnp.int32)
