"""Ring attention's load balance with packed documents: contiguous vs zig-zag layout.

    python benchmarks/ring_balance.py          # prints the README's balance table

Each device's work under a causal mask within documents is the number of (query, key)
pairs it must attend: for query ``t`` of a document starting at ``start``, ``t - start + 1``
keys. The table gives the busiest device's count over the mean (1.00 = balanced), for
``T`` tokens on ``P`` devices, counted from the definition (no attention is run).

The last row is where zig-zag loses: two documents, the first ending one zig-zag chunk
(``T / 2P`` tokens) past the middle. Device ``P - 1`` holds chunks ``P - 1`` and ``P`` of
``2P``, which are then both the late (dense) end of the first document.
"""

from __future__ import annotations

import argparse

import numpy as np

import jattn


def device_work(lengths: list[int], devices: int, layout: str) -> np.ndarray:
  """Visible (query, key) pairs per device for causal attention within documents."""
  T = int(sum(lengths))
  segment = np.repeat(np.arange(len(lengths)), lengths)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[segment]
  per_query = np.arange(T) - starts + 1
  order = np.arange(T) if layout == "contiguous" else jattn.zigzag_order(T, devices)
  return per_query[order].reshape(devices, -1).sum(axis=1)


def balance_table(T: int = 8192, P: int = 8) -> str:
  """The README's table: busiest device over the mean, contiguous and zig-zag."""
  rng = np.random.default_rng(0)
  random = rng.exponential(700, 64).astype(int) + 1
  random = list(random[np.cumsum(random) <= T])
  random.append(T - sum(random))
  halving = [T // 2**i for i in range(1, 8)]
  halving.append(T - sum(halving))
  straddling = (P + 1) * (T // (2 * P))
  cases = {
    "none (one causal sequence)": [T],
    f"8 equal documents of {T // 8:,}": [T // 8] * 8,
    f"uneven, halving: {halving[0]:,}, {halving[1]:,}, ..., {halving[-1]:,}": halving,
    f"{len(random)} uneven, exponential lengths (mean 700)": random,
    f"2 documents: {straddling:,} and {T - straddling:,}": [straddling, T - straddling],
  }
  lines = ["| documents | contiguous | zigzag |", "|---|---|---|"]
  for name, lengths in cases.items():
    ratios = []
    for layout in ("contiguous", "zigzag"):
      work = device_work(lengths, P, layout)
      ratios.append(f"{work.max() / work.mean():.2f}")
    lines.append(f"| {name} | {' | '.join(ratios)} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--devices", type=int, default=8)
  args = parser.parse_args()
  print(balance_table(args.length, args.devices))


if __name__ == "__main__":
  main()
