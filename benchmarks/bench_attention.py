"""The full benchmark of the long-sequences issue: jattn against jax.nn, Flax and PyTorch.

    python benchmarks/bench_attention.py            # writes benchmarks/results/
    python benchmarks/bench_attention.py --shapes 4,1024,8,64 --modes fwd

Each case runs in its own process (peak memory is per case); see benchmarks/README.md.
"""

import sys
from pathlib import Path

from jattn._bench import main

if __name__ == "__main__":
  args = sys.argv[1:]
  if "--out" not in args:
    args += ["--out", str(Path(__file__).parent / "results")]
  sys.exit(main(args, full=True))
