"""Attention maps as labelled heatmaps (needs matplotlib: ``pip install "jattn[plot]"``)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np


def attention_map(
  weights,
  *,
  query_tokens: Sequence[str] | None = None,
  key_tokens: Sequence[str] | None = None,
  title: str | None = "attention map",
  annotate: bool | None = None,
  path: str | None = None,
):
  """Draws attention weights as heatmaps, one panel per head.

  Args:
    weights: ``(T, S)`` (one head) or ``(N, T, S)`` attention weights, e.g. the
      ``"weights"`` of :func:`jattn.explain` or the second output of
      ``return_weights=True`` for one batch element.
    query_tokens: ``T`` labels for the rows (default ``"1".."T"``).
    key_tokens: ``S`` labels for the columns (default: the query labels if ``S == T``).
    title: figure title.
    annotate: write each weight in its cell (default: when ``T, S <= 12``).
    path: if given, save the figure there (PNG by extension) and close it.

  Returns:
    The matplotlib ``Figure``.

  Raises:
    ValueError: if ``weights`` is not 2-D or 3-D, or the labels do not fit.
  """
  import matplotlib

  if path is not None:
    matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  w = np.asarray(weights, dtype=np.float32)
  if w.ndim == 2:
    w = w[None]
  if w.ndim != 3:
    raise ValueError(f"weights must be (T, S) or (heads, T, S); got shape {np.shape(weights)}.")
  heads, t, s = w.shape
  query_tokens = [str(i + 1) for i in range(t)] if query_tokens is None else list(query_tokens)
  if key_tokens is None:
    key_tokens = query_tokens if s == t else [str(i + 1) for i in range(s)]
  key_tokens = list(key_tokens)
  if len(query_tokens) != t or len(key_tokens) != s:
    raise ValueError(
      f"got {len(query_tokens)} query and {len(key_tokens)} key labels for weights "
      f"of shape {w.shape} (heads, T, S)."
    )
  annotate = (t <= 12 and s <= 12) if annotate is None else annotate
  rows, cols = _ticks(t), _ticks(s)
  longest = max(len(query_tokens[i]) for i in rows)
  longest = max(longest, *(len(key_tokens[j]) for j in cols))
  rotate = len(cols) > 12 or longest > 3  # long or many key labels would overlap side by side
  label_room = 0.08 * longest  # inches for the query labels (left) and rotated key labels
  cell = 0.5 if annotate else min(0.5, 10.0 / max(s * heads, t))  # inches: large maps fit a page
  fig, axes = plt.subplots(
    1,
    heads,
    figsize=(1.6 + label_room + cell * max(s, 4) * heads, 1.2 + label_room + cell * max(t, 4)),
    squeeze=False,
    sharey=True,
    layout="constrained",
  )
  for n, ax in enumerate(axes[0]):
    image = ax.imshow(w[n], vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(cols, [key_tokens[j] for j in cols], rotation=90 if rotate else 0)
    ax.set_yticks(rows, [query_tokens[i] for i in rows])
    ax.set_xlabel("key")
    if n == 0:  # the panels share the query axis: label it once
      ax.set_ylabel("query")
    if heads > 1:
      ax.set_title(f"head {n}")
    if annotate:
      for i in range(t):
        for j in range(s):
          color = "black" if w[n, i, j] > 0.6 else "white"
          ax.text(j, i, f"{w[n, i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="weight")
  if title:  # wrapped to the figure's width (about 10 characters an inch at this size)
    fig.suptitle(textwrap.fill(title, max(16, int(9 * fig.get_figwidth()))))
  if path is not None:
    fig.savefig(path, dpi=120, bbox_inches="tight")  # nothing drawn outside is cut off
    plt.close(fig)
  return fig


def _ticks(n: int, every_up_to: int = 32, subset: int = 16) -> list[int]:
  """Tick positions: each of ``n`` up to ``every_up_to``, else ``subset`` spread evenly."""
  if n <= every_up_to:
    return list(range(n))
  return sorted({round(i * (n - 1) / (subset - 1)) for i in range(subset)})
