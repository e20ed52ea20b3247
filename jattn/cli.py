"""The ``jattn`` command line: ``jattn demo`` walks through self-attention step by step,
``jattn train`` trains it on a toy task, ``jattn bench`` measures it."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

_FORMAT = {"float_kind": lambda v: f"{v:8.4f}"}


def _fmt(a) -> str:
  return np.array2string(np.asarray(a), formatter=_FORMAT, separator=", ")


# `jattn demo` computes, prints and plots a T x T map: larger inputs are refused, not hung on.
MAX_SIZE = 2048  # rows and columns of any matrix the demo reads (inputs T x F, weights F x H)
MAX_BYTES = 128 * 2**20  # files larger than any such matrix needs are refused before reading
# (JSON and Unicode errors are ValueErrors; deep nesting is a RecursionError)
_READ_ERRORS = (OSError, ValueError, EOFError, RecursionError, zipfile.BadZipFile)


def _read(path: Path, what: str, suffixes: tuple[str, ...]):
  """The raw content of ``path`` (.json: parsed; .npy: memory-mapped; .npz: a dict of arrays)."""
  if path.suffix not in suffixes:
    raise ValueError(f"{what} file {path} must be {' or '.join(suffixes)}, not {path.suffix!r}")
  try:
    size = path.stat().st_size
    if size > MAX_BYTES:
      raise ValueError(f"{size} bytes, more than the demo's limit of {MAX_BYTES}")
    if path.suffix == ".json":
      return json.loads(path.read_bytes())
    if path.suffix == ".npy":
      with open(path, "rb") as f:  # np.load leaves a file open when a zip inside is damaged
        if f.read(6) != b"\x93NUMPY":
          raise ValueError("not a .npy array file")
      return np.load(path, mmap_mode="r", allow_pickle=False)  # the shape, before any data
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # f: closed on any error
      return {name: npz[name] for name in npz.files}
  except _READ_ERRORS as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise ValueError(f"cannot read {what} file {path}: {reason}") from None


def _matrix(value, what: str, path: Path, layout: str) -> np.ndarray:
  """``value`` as a float32 matrix, or a ValueError naming ``path``."""
  try:
    array = np.asarray(value)
  except ValueError as e:  # ragged nested lists
    raise ValueError(f"{what} in {path}: not a {layout} matrix ({e})") from None
  real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
  if not real:
    raise ValueError(f"{what} in {path} must hold real numbers, got dtype {array.dtype}")
  if array.ndim != 2 or 0 in array.shape:
    raise ValueError(
      f"{what} in {path} must be a 2-D numeric array {layout}, got shape {array.shape}"
    )
  if max(array.shape) > MAX_SIZE:
    raise ValueError(
      f"{what} in {path}: {array.shape[0]} x {array.shape[1]}, more than the demo's limit of "
      f"{MAX_SIZE} rows or columns"
    )
  wide = array.astype(np.float64)
  if not np.isfinite(wide).all() or np.abs(wide).max() > np.finfo(np.float32).max:
    raise ValueError(f"{what} in {path}: not finite in float32 (NaN, inf, or beyond +-3.4e38)")
  return wide.astype(np.float32)


def _load_array(path: Path, what: str) -> np.ndarray:
  return _matrix(_read(path, what, (".json", ".npy")), f"the {what}", path, "(T, F)")


def _load_weights(path: Path) -> dict:
  data = _read(path, "weights", (".json", ".npz"))
  if not isinstance(data, dict):
    raise ValueError(f"{path} must hold a JSON object with 'query', 'key' and 'value' matrices")
  missing = [n for n in ("query", "key", "value") if n not in data]
  if missing:
    raise ValueError(f"{path} lacks the matrices {missing} (it has {sorted(data)})")
  return {
    n: {"kernel": _matrix(data[n], f"the {n} matrix", path, "(F, H)")}
    for n in ("query", "key", "value")
  }


def _check_fit(x: np.ndarray, params: dict, inputs: str, weights: str) -> None:
  """The shapes explain needs, named by file: x (T, F); query, key (F, H); value (F, V)."""
  for name in ("query", "key", "value"):
    features = params[name]["kernel"].shape[0]
    if features != x.shape[1]:
      raise ValueError(
        f"the inputs ({inputs}) have {x.shape[1]} features, but the {name} matrix ({weights}) "
        f"expects {features}"
      )
  q, k = params["query"]["kernel"].shape[1], params["key"]["kernel"].shape[1]
  if q != k:
    raise ValueError(f"the query matrix ({weights}) has {q} columns, the key matrix {k}")


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
  builtin = "the built-in example"
  _check_fit(x, params, str(args.inputs or builtin), str(args.weights or builtin))
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
      title = f"attention map ({scale_note})"
      _save_map(args.out, steps["weights"], title=title)
      print(f"\nSaved the attention map to {args.out}")
  return 0


def _save_map(path: Path, weights, **options) -> None:
  from jattn import plot

  try:
    plot.attention_map(weights, path=str(path), **options)
  except (OSError, ValueError) as e:  # a missing folder, an unknown image format
    raise ValueError(f"cannot save the attention map to {path}: {e}") from None


def train(args: argparse.Namespace) -> int:
  import jax
  from tqdm import tqdm

  from jattn import checkpoint, training

  if args.resume and args.checkpoint_dir is None:
    raise ValueError("--resume needs --checkpoint-dir")
  task = training.TASKS[args.task]
  held = [] if args.checkpoint_dir is None else checkpoint.steps(args.checkpoint_dir)
  if held and not args.resume:
    raise ValueError(
      f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints (up to step "
      f"{held[-1]}): add --resume to continue that run, or choose another directory"
    )
  print(f"jattn train: {task.description}; {args.steps} steps on {jax.devices()[0]}")
  done = [held[-1] if held else 0]  # the last step run, reported on Ctrl-C
  try:
    with tqdm(total=args.steps, desc=args.task, unit="step") as bar:

      def progress(step: int, metrics: dict[str, float]) -> None:
        if bar.n == 0:
          bar.update(step - 1)  # a resumed run starts part-way
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        bar.update(1)
        done[0] = step

      result = training.train(
        task,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=progress,
      )
  except KeyboardInterrupt:
    saved = checkpoint.steps(args.checkpoint_dir) if args.checkpoint_dir is not None else []
    if saved:
      hint = f"the latest checkpoint is step {saved[-1]}: resume with --resume"
    elif args.checkpoint_dir is not None:
      hint = "no checkpoint saved yet: start again"
    else:
      hint = "nothing saved (no --checkpoint-dir)"
    print(f"jattn train: interrupted at step {done[0]}; {hint}", file=sys.stderr)
    return 130
  held_out = training.held_out(task, args.seed)
  print(f"held-out accuracy: {result.eval_accuracy:.4f} ({held_out['targets'].shape[0]} sequences)")
  if args.out is not None:
    if importlib.util.find_spec("matplotlib") is None:
      print('(matplotlib is not installed: pip install "jattn[plot]" to save the map)')
      return 0
    inputs = np.asarray(held_out["inputs"][:1])
    _, weights = training.apply_model(result.params, inputs, return_weights=True)
    _save_map(
      args.out,
      np.asarray(weights[0]),
      query_tokens=task.labels(inputs[0]),
      title=f"{args.task}: attention after {args.steps} steps",
    )
    print(f"Saved the attention map of one held-out example to {args.out}")
  return 0


def _flag_type(kind: type, what: str, accept):
  """An argparse type: a finite ``kind`` that ``accept`` takes, else an error naming the flag."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and accept(value)):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value

  return parse


_POSITIVE_INT = _flag_type(int, "a positive integer", lambda v: v > 0)
_SEED = _flag_type(int, "a non-negative integer below 2**63", lambda v: 0 <= v < 2**63)
_LEARNING_RATE = _flag_type(float, "a positive finite number", lambda v: v > 0)


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
  p.add_argument("--steps", type=_POSITIVE_INT, default=500, help="training steps (default 500)")
  p.add_argument("--seed", type=_SEED, default=0)
  p.add_argument("--batch-size", type=_POSITIVE_INT, default=128)
  p.add_argument("--learning-rate", type=_LEARNING_RATE, default=3e-3)
  p.add_argument(
    "--checkpoint-dir",
    type=Path,
    help="save params and optimizer state here (a new or empty directory, unless --resume)",
  )
  p.add_argument(
    "--checkpoint-every", type=_POSITIVE_INT, default=100, help="steps between checkpoints"
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --checkpoint-dir from its latest complete checkpoint "
    "(refused if the task, seed or config differ)",
  )
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
  args = parser.parse_args(argv)  # bad flags: argparse's usage line and exit 2
  try:
    return args.func(args)
  except (OSError, ValueError, TypeError, FloatingPointError) as e:  # CheckpointError included
    message = " ".join(str(e).split("\n"))  # one line, never a traceback
    print(f"jattn {args.command}: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jattn {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
