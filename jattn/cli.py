"""The ``jattn`` command line: ``jattn demo`` walks through self-attention step by step,
``jattn train`` trains it on a toy task, ``jattn bench`` measures it."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

_FORMAT = {"float_kind": lambda v: f"{v:8.4f}"}


def _fmt(a) -> str:
  return np.array2string(np.asarray(a), formatter=_FORMAT, separator=", ")


def _load_array(path: Path, what: str) -> np.ndarray:
  if path.suffix == ".npy":
    array = np.load(path, allow_pickle=False)
  elif path.suffix == ".json":
    array = np.asarray(json.loads(path.read_text()), dtype=np.float32)
  else:
    raise ValueError(f"{what} file {path} must be .json or .npy")
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{what} in {path} must be a 2-D numeric array, got shape {array.shape}")
  return array.astype(np.float32)


def _load_weights(path: Path) -> dict:
  if path.suffix == ".json":
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
      raise ValueError(f"{path} must hold a JSON object with 'query', 'key' and 'value' matrices")
  elif path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as npz:
      data = {name: npz[name] for name in npz.files}
  else:
    raise ValueError(f"weights file {path} must be .json or .npz")
  missing = [n for n in ("query", "key", "value") if n not in data]
  if missing:
    raise ValueError(f"{path} lacks the matrices {missing} (it has {sorted(data)})")
  params = {n: {"kernel": np.asarray(data[n], dtype=np.float32)} for n in ("query", "key", "value")}
  for name, entry in params.items():
    if entry["kernel"].ndim != 2:
      raise ValueError(
        f"the {name} matrix in {path} must be 2-D (features, size), got {entry['kernel'].shape}"
      )
  return params


def demo(args: argparse.Namespace) -> int:
  import jax

  import jattn
  from jattn import _walkthrough

  params, x = jattn.walkthrough_example()
  default_example = args.inputs is None and args.weights is None
  if args.inputs is not None:
    x = _load_array(args.inputs, "inputs")
  if args.weights is not None:
    params = _load_weights(args.weights)
  head_dim = np.shape(params["key"]["kernel"])[-1]
  scale = 1.0 if args.scale == "none" else 1.0 / math.sqrt(head_dim)
  steps = jax.jit(functools.partial(jattn.explain, scale=scale))(params, x)
  steps = jax.tree.map(np.asarray, steps)
  compare = default_example and args.scale == "none"
  rounded = _walkthrough.ROUNDED

  def show(title, exact, key=None):
    print(f"\n{title}")
    print(_fmt(exact))
    if compare and key is not None:
      print(f"  walkthrough prints: {rounded[key]}")

  origin = " (built-in example)" if default_example else ""
  print(f"Illustrated self-attention, step by step{origin}")
  show("Step 1: inputs x", x)
  for name in ("key", "query", "value"):
    show(f"Step 2: {name} weights", params[name]["kernel"])
  show("Step 3: keys = x @ key weights", steps["keys"], "keys")
  show("Step 3: queries = x @ query weights", steps["queries"], "queries")
  show("Step 3: values = x @ value weights", steps["values"], "values")
  if args.scale == "none":
    scale_note = "unscaled, as in the walkthrough"
  else:
    scale_note = f"scaled by 1/sqrt({head_dim})"
  show(
    f"Step 4: scores of input 1 = query 1 . each key ({scale_note})", steps["scores"][0], "scores_1"
  )
  show("Step 5: softmax of input 1's scores", steps["weights"][0], "softmax_1")
  show(
    "Step 6: weighted values of input 1 (softmax x value, a row per key)",
    steps["weighted_values"][0],
  )
  show("Step 7: output 1 = sum of the weighted values", steps["outputs"][0])
  if compare:
    print(f"  walkthrough prints: {rounded['outputs'][0]} (its softmax rounded to [0, .5, .5])")
  show("Step 8: all outputs (steps 4-7 for every input)", steps["outputs"], "outputs")
  show("The attention map (row i: input i's softmax over every input)", steps["weights"])
  if args.out is not None:
    if importlib.util.find_spec("matplotlib") is None:
      print('\n(matplotlib is not installed: pip install "jattn[plot]" to save the map)')
    else:
      from jattn import plot

      title = f"attention map ({scale_note})"
      plot.attention_map(steps["weights"], title=title, path=str(args.out))
      print(f"\nSaved the attention map to {args.out}")
  return 0


def train(args: argparse.Namespace) -> int:
  import jax
  from tqdm import tqdm

  from jattn import training

  if args.steps < 1:
    raise ValueError(f"--steps must be positive, got {args.steps}")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
  if args.resume and args.checkpoint_dir is None:
    raise ValueError("--resume needs --checkpoint-dir")
  task = training.TASKS[args.task]
  print(f"jattn train: {task.description}; {args.steps} steps on {jax.devices()[0]}")
  with tqdm(total=args.steps, desc=args.task, unit="step") as bar:

    def progress(step: int, metrics: dict[str, float]) -> None:
      if bar.n == 0:
        bar.update(step - 1)  # a resumed run starts part-way
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
      bar.update(1)

    result = training.train(
      task,
      steps=args.steps,
      seed=args.seed,
      batch_size=args.batch_size,
      learning_rate=args.learning_rate,
      checkpoint_dir=args.checkpoint_dir,
      resume=args.resume,
      progress=progress,
    )
  held_out = training.held_out(task, args.seed)
  print(f"held-out accuracy: {result.eval_accuracy:.4f} ({held_out['targets'].shape[0]} sequences)")
  if args.out is not None:
    if importlib.util.find_spec("matplotlib") is None:
      print('(matplotlib is not installed: pip install "jattn[plot]" to save the map)')
      return 0
    from jattn import plot

    inputs = np.asarray(held_out["inputs"][:1])
    _, weights = training.apply_model(result.params, inputs, return_weights=True)
    labels = task.labels(inputs[0])
    plot.attention_map(
      np.asarray(weights[0]),
      query_tokens=labels,
      title=f"{args.task}: attention after {args.steps} steps",
      path=str(args.out),
    )
    print(f"Saved the attention map of one held-out example to {args.out}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jattn", description="Self-attention in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="the Illustrated Self-Attention walkthrough, step by step")
  p.add_argument(
    "--scale",
    choices=("none", "sqrt"),
    default="none",
    help="score scaling: none (as in the walkthrough) or 1/sqrt(head size)",
  )
  p.add_argument("--inputs", type=Path, help="inputs (T, F) as .json or .npy")
  p.add_argument(
    "--weights", type=Path, help="query/key/value matrices (F, H) as a .json object or .npz"
  )
  p.add_argument(
    "--out",
    type=Path,
    default=Path("attention_map.png"),
    help="where to save the attention map PNG (default: attention_map.png)",
  )
  p.add_argument(
    "--no-plot", dest="out", action="store_const", const=None, help="do not save the attention map"
  )
  p.set_defaults(func=demo)
  p = sub.add_parser("train", help="train one attention layer on a toy task with Optax")
  p.add_argument("--task", choices=("recall", "reverse"), default="recall")
  p.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--checkpoint-dir", type=Path, help="save params and optimizer state here")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  p.add_argument(
    "--out",
    type=Path,
    default=Path("train_attention_map.png"),
    help="where to save one example's attention map (default: train_attention_map.png)",
  )
  p.add_argument("--no-plot", dest="out", action="store_const", const=None)
  p.set_defaults(func=train)
  p = sub.add_parser(
    "bench",
    add_help=False,
    help="benchmark jattn against jax.nn, Flax, torch (quick defaults; `jattn bench --help`)",
  )
  p.add_argument("args", nargs=argparse.REMAINDER)
  return parser


def _bench_main(argv: list[str]) -> int:
  from jattn import _bench

  return _bench.main(argv)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["bench"]:  # its own parser: argparse's REMAINDER drops leading options
    return _bench_main(argv[1:])
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except (OSError, ValueError, TypeError) as e:  # bad files and shapes: a message, not a trace
    print(f"jattn {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
