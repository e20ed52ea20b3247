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

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Alignment = Literal["bottom_right", "top_left"]
_ALIGNMENTS = ("bottom_right", "top_left")


def _check_alignment(alignment: str) -> None:
  if alignment not in _ALIGNMENTS:
    raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}.")


def _check_length(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int, got {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}.")
  return int(value)


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

  The single place where position-based masking is defined; the naive and the
  blockwise paths both call it (the latter on one tile of positions at a time).

  Args:
    q_pos: ``(T,)`` integer positions of the queries (already offset by alignment).
    kv_pos: ``(S,)`` integer positions of the keys.
    is_causal: whether a query may only attend keys at or before its position.
    window: ``(left, right)``: a query at ``p`` attends keys in ``[p - left, p + right]``.

  Returns:
    A ``(T, S)`` boolean mask, or None when neither option restricts anything.
  """
  if not is_causal and window is None:
    return None
  delta = kv_pos[None, :] - q_pos[:, None]  # (T, S): key position minus query position
  mask = jnp.ones(delta.shape, dtype=bool)
  if is_causal:
    mask &= delta <= 0
  if window is not None:
    left, right = window
    mask &= (delta >= -left) & (delta <= right)
  return mask


def ranges_visible(
  q_first, q_last, kv_first, kv_last, *, is_causal: bool, window: tuple[int, int] | None
) -> jax.Array:
  """Whether queries at positions ``[q_first, q_last]`` may attend any key in
  ``[kv_first, kv_last]`` under the causal/window rules of :func:`position_mask`.

  The blockwise path asks it per tile and the ring path per device block, to skip
  work that is hidden entirely. Positions may be traced.
  """
  visible = jnp.asarray(True)
  if is_causal:
    visible &= kv_first <= q_last
  if window is not None:
    left, right = window
    visible &= (kv_first <= q_last + right) & (kv_last >= q_first - left)
  return visible


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
  q_len = _check_length("q_len", q_len)
  kv_len = q_len if kv_len is None else _check_length("kv_len", kv_len)
  window = normalize_window(window)
  offset = query_offset(q_len, kv_len, alignment)
  mask = position_mask(
    jnp.arange(q_len) + offset, jnp.arange(kv_len), is_causal=is_causal, window=window
  )
  return jnp.ones((q_len, kv_len), dtype=bool) if mask is None else mask


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
  kv_len = _check_length("kv_len", kv_len)
  kv_valid = jnp.ones((kv_len,), bool) if kv_lengths is None else length_mask(kv_lengths, kv_len)
  mask = kv_valid[..., None, None, :]  # (..., 1, 1, S)
  if q_lengths is not None:
    if q_len is None:
      raise ValueError("padding_mask: q_len is required when q_lengths is given.")
    q_valid = length_mask(q_lengths, _check_length("q_len", q_len))
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
