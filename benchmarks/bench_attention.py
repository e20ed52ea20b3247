"""The full benchmark of the speed issues: jattn against jax.nn, Flax, PyTorch and tokamax.

    python benchmarks/bench_attention.py            # every group; writes benchmarks/results/
    python benchmarks/bench_attention.py --variants plain              # split the run:
    python benchmarks/bench_attention.py --variants causal,bf16,gqa,decode --merge
    python benchmarks/bench_attention.py --shapes 1,256,8,32 --repeats 1 --out /tmp/bench

The groups (variant, modes, shapes, implementations) are in ``--help`` and
``jattn._bench.FULL_GROUPS``; ``--variants``, ``--modes`` and ``--impls`` keep some of
them, ``--shapes`` replaces their shapes. Each case runs in its own process (peak memory is
per case); see benchmarks/README.md.
"""

import sys
from pathlib import Path

from jattn._bench import main

if __name__ == "__main__":
  args = sys.argv[1:]
  if "--out" not in args:
    args += ["--out", str(Path(__file__).parent / "results")]
  sys.exit(main(args, full=True, prog="bench_attention.py"))
