"""The full benchmark of the speed issue: jattn against jax.nn, Flax, PyTorch and tokamax.

    python benchmarks/bench_attention.py            # writes benchmarks/results/
    python benchmarks/bench_attention.py --shapes 4,1024,8,64 --modes fwd
    python benchmarks/bench_attention.py --summary  # benchmarks/README.md's table (results.json)

Each case runs in its own process (peak memory is per case); see benchmarks/README.md.
"""

import json
import sys
from pathlib import Path

from jattn._bench import main

RESULTS = Path(__file__).parent / "results"
PEERS = ("torch-sdpa", "tokamax-xla-chunked", "jax.nn", "flax.linen")


def summary_table(path: Path = RESULTS / "results.json") -> str:
  """benchmarks/README.md's table: each peer's time over jattn-blockwise's, per case."""
  records = json.loads(Path(path).read_text())["results"]
  by_case = {}
  for r in records:
    if "median_ms" in r:
      key = (r.get("variant", "plain"), tuple(r["shape"]), r["mode"])
      by_case.setdefault(key, {})[r["impl"]] = r
  lines = [
    "| variant | shape (B, T, N, H) | mode | torch SDPA | tokamax | jax.nn | flax.linen "
    "| jattn peak RSS MB | jax.nn peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for (variant, shape, mode), impls in by_case.items():
    ours = impls.get("jattn-blockwise") or impls.get("jattn.decode_step")
    if ours is None:
      continue
    cells = []
    for peer in PEERS:
      if variant == "decode" and peer == "jax.nn":  # flax.nnx's decode step in this column
        peer = "flax.nnx"
      other = impls.get(peer)
      ratio = "—" if other is None else f"{other['median_ms'] / ours['median_ms']:.2f}x"
      cells.append(f"{ratio} (flax.nnx)" if peer == "flax.nnx" and other else ratio)
    theirs = impls.get("jax.nn")
    rss = "—" if theirs is None else f"{theirs['peak_rss_mb']:.0f}"
    lines.append(
      f"| {variant} | {shape} | {mode} | {' | '.join(cells)} | {ours['peak_rss_mb']:.0f} | {rss} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  args = sys.argv[1:]
  if args == ["--summary"]:
    print(summary_table(), end="")
    sys.exit(0)
  if "--out" not in args:
    args += ["--out", str(RESULTS)]
  sys.exit(main(args, full=True, prog="bench_attention.py"))
