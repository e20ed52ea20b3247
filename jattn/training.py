"""Training attention with Optax: a pure train step, freezing, and toy tasks that need attention.

Everything here is a pure function of pytrees, so it jits, vmaps and runs on any
backend (``jax.devices()[0]``: CPU, GPU or TPU, whichever jax was installed for)::

  task = jattn.training.TASKS["recall"]
  params = jattn.training.init_model(jax.random.key(0), task)
  optimizer = optax.adamw(3e-3)
  step = jax.jit(jattn.training.make_train_step(jattn.training.loss_fn, optimizer))
  opt_state = optimizer.init(params)
  params, opt_state, metrics = step(params, opt_state, task.sample(jax.random.key(1), 128))

The tasks cannot be solved without attention: each target is a token somewhere
else in the sequence, found by content (``recall``) or by position (``reverse``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattn import _attention, _params, checkpoint

Array = jax.Array
Batch = dict[str, Array]

# --- tasks ----------------------------------------------------------------------------------


class Task(NamedTuple):
  """A toy sequence task: ``sample(rng, batch_size)`` gives a batch.

  A batch is ``{"inputs": (B, T, C) int32, "targets": (B, T) int32}``: ``C``
  token channels per position (their embeddings are summed) drawn from a vocabulary
  of ``vocab_in``; targets in ``[0, vocab_out)``, or ``-1`` where nothing is predicted.
  """

  name: str
  length: int  # T
  vocab_in: int
  vocab_out: int
  sample: Callable[[Array, int], Batch]
  description: str
  labels: Callable[[Any], list[str]]  # token labels of one example's inputs (T, C)


def recall_task(num_pairs: int = 8, num_keys: int = 16, num_values: int = 16) -> Task:
  """Associative recall: ``num_pairs`` (key, value) pairs, then a query key; output its value.

  Position ``i < num_pairs`` holds key ``k_i`` (distinct within a sequence) and
  value ``v_i`` as two channels; the last position holds the query key and a
  marker. Its target is the value paired with the query key: chance accuracy is
  ``1 / num_values`` without attention.
  """
  if num_pairs > num_keys:
    raise ValueError(f"num_pairs ({num_pairs}) distinct keys need num_keys >= num_pairs.")
  marker = num_keys + num_values

  def sample(rng: Array, batch_size: int) -> Batch:
    k_rng, v_rng, q_rng = jax.random.split(rng, 3)
    keys = jax.vmap(lambda r: jax.random.permutation(r, num_keys)[:num_pairs])(
      jax.random.split(k_rng, batch_size)
    )
    values = jax.random.randint(v_rng, (batch_size, num_pairs), 0, num_values)
    which = jax.random.randint(q_rng, (batch_size,), 0, num_pairs)
    query = jnp.take_along_axis(keys, which[:, None], axis=1)
    target = jnp.take_along_axis(values, which[:, None], axis=1)[:, 0]
    key_channel = jnp.concatenate([keys, query], axis=1)
    value_channel = jnp.concatenate([values + num_keys, jnp.full((batch_size, 1), marker)], axis=1)
    inputs = jnp.stack([key_channel, value_channel], axis=-1).astype(jnp.int32)
    targets = jnp.full((batch_size, num_pairs + 1), -1).at[:, -1].set(target)
    return {"inputs": inputs, "targets": targets.astype(jnp.int32)}

  return Task(
    "recall",
    num_pairs + 1,
    marker + 1,
    num_values,
    sample,
    f"associative recall: {num_pairs} key/value pairs of {num_keys} keys and {num_values} "
    "values, then a query key",
    lambda x: [*(f"k{k}:v{v - num_keys}" for k, v in x[:-1]), f"k{x[-1][0]}?"],
  )


def reverse_task(length: int = 8, vocab: int = 16) -> Task:
  """Reverse a sequence of ``length`` tokens: position ``i`` outputs token ``length - 1 - i``."""

  def sample(rng: Array, batch_size: int) -> Batch:
    tokens = jax.random.randint(rng, (batch_size, length), 0, vocab, dtype=jnp.int32)
    return {"inputs": tokens[..., None], "targets": tokens[:, ::-1]}

  return Task(
    "reverse",
    length,
    vocab,
    vocab,
    sample,
    f"reverse {length} tokens of {vocab}",
    lambda x: [str(t) for t in x[:, 0]],
  )


TASKS: dict[str, Task] = {"recall": recall_task(), "reverse": reverse_task()}

# --- the model: embeddings, one attention layer (a jattn pytree), a readout ------------------


def init_model(
  rng: Array,
  task: Task,
  *,
  features: int = 64,
  num_heads: int = 4,
  head_dim: int = 16,
  attention: bool = True,
) -> dict[str, Any]:
  """Parameters of a one-layer attention model for ``task``.

  ``{"embed": {"tokens": (vocab_in, F), "positions": (T, F)}, "attention": a jattn
  pytree (with an ``"out"`` projection F -> F), "readout": {"kernel": (F, vocab_out),
  "bias": (vocab_out,)}}``. ``attention=False`` leaves the attention layer out
  (the control that shows attention is what learns).
  """
  e_rng, p_rng, a_rng, r_rng = jax.random.split(rng, 4)
  normal = jax.nn.initializers.normal(0.02)
  params: dict[str, Any] = {
    "embed": {
      "tokens": normal(e_rng, (task.vocab_in, features)),
      "positions": normal(p_rng, (task.length, features)),
    },
    "readout": {
      "kernel": jax.nn.initializers.lecun_normal()(r_rng, (features, task.vocab_out)),
      "bias": jnp.zeros((task.vocab_out,)),
    },
  }
  if attention:
    params["attention"] = _params.init(
      a_rng, features, head_dim, num_heads=num_heads, out_features=features
    )
  return params


def apply_model(
  params: dict[str, Any], inputs: Array, *, return_weights: bool = False
) -> Array | tuple[Array, Array]:
  """Logits ``(B, T, vocab_out)`` for ``inputs (B, T, C)``; with the weights ``(B, N, T, T)``."""
  x = params["embed"]["tokens"][inputs].sum(axis=-2)  # (B, T, F)
  x = x + jnp.broadcast_to(params["embed"]["positions"], x.shape)
  weights = None
  if "attention" in params:
    result = _attention.self_attention(params["attention"], x, return_weights=return_weights)
    attended, weights = result if return_weights else (result, None)
    x = x + attended
  logits = x @ params["readout"]["kernel"]
  logits = logits + jnp.broadcast_to(params["readout"]["bias"], logits.shape)
  return (logits, weights) if return_weights else logits


def loss_fn(params: dict[str, Any], batch: Batch) -> tuple[Array, dict[str, Array]]:
  """:func:`classification_loss` of :func:`apply_model` on ``batch``."""
  return classification_loss(apply_model(params, batch["inputs"]), batch["targets"])


def classification_loss(logits: Array, targets: Array) -> tuple[Array, dict[str, Array]]:
  """Mean cross-entropy over the predicted positions (``targets >= 0``), and the accuracy.

  Args:
    logits: ``(B, T, vocab_out)`` from any model (pure, linen or nnx).
    targets: ``(B, T)`` ints, ``-1`` where nothing is predicted.

  Returns:
    ``(loss, {"loss": loss, "accuracy": accuracy})``.
  """
  predicted = targets >= 0
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  count = jnp.maximum(predicted.sum(), 1)
  loss = jnp.where(predicted, losses, 0.0).sum() / count
  correct = (jnp.argmax(logits, axis=-1) == targets) & predicted
  return loss, {"loss": loss, "accuracy": correct.sum() / count}


# --- optimisation ---------------------------------------------------------------------------


def make_train_step(
  loss: Callable[[Any, Batch], tuple[Array, dict[str, Array]]],
  optimizer: optax.GradientTransformation,
) -> Callable[[Any, optax.OptState, Batch], tuple[Any, optax.OptState, dict[str, Array]]]:
  """A pure ``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  Args:
    loss: ``loss(params, batch) -> (scalar loss, metrics dict)``, e.g. :func:`loss_fn`.
    optimizer: any ``optax.GradientTransformation`` (``optax.adamw(...)``,
      :func:`freeze` of one, ...).

  Returns:
    The step, unjitted: wrap it in ``jax.jit`` (and donate params and opt_state).
  """

  def train_step(params, opt_state, batch):
    grads, metrics = jax.grad(loss, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return train_step


def freeze(
  optimizer: optax.GradientTransformation,
  params: Any,
  frozen: Sequence[str] | Callable[[tuple[str, ...]], bool],
) -> optax.GradientTransformation:
  """``optimizer`` on every leaf except the frozen ones, whose updates are exactly zero.

  Built from ``optax.multi_transform`` and ``optax.set_to_zero``: frozen leaves
  stay bit-identical however long the training (weight decay included).

  Args:
    optimizer: the transformation for the trained leaves.
    params: the parameter pytree (its structure labels the leaves).
    frozen: path prefixes such as ``["attention"]`` or ``["attention/query"]``,
      or a predicate on a leaf's path, a tuple of its dict keys.
  """

  def key_path(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

  paths = [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if callable(frozen):
    is_frozen = frozen
  else:
    prefixes = [tuple(p.split("/")) for p in frozen]
    for prefix in prefixes:
      if not any(path[: len(prefix)] == prefix for path in paths):
        raise ValueError(f"frozen prefix {'/'.join(prefix)!r} matches no leaf of params.")

    def is_frozen(path: tuple[str, ...]) -> bool:
      return any(path[: len(p)] == p for p in prefixes)

  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if is_frozen(key_path(path)) else "trained", params
  )
  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


# --- the training loop behind `jattn train` and the tests -----------------------------------


class TrainResult(NamedTuple):
  params: Any
  opt_state: Any
  history: list[dict[str, float]]  # one {"step", "loss", "accuracy"} per step run here
  eval_accuracy: float


def batches(task: Task, seed: int, batch_size: int, start: int = 0) -> Iterator[Batch]:
  """The training batches: batch ``s`` depends only on (seed, s), so a resumed run sees the same."""
  data_rng = jax.random.fold_in(jax.random.key(seed), 1)
  sample = jax.jit(lambda step: task.sample(jax.random.fold_in(data_rng, step), batch_size))
  step = start
  while True:
    yield sample(step)
    step += 1


def held_out(task: Task, seed: int, size: int = 2048) -> Batch:
  """A held-out batch, from an rng stream the training batches never use."""
  return jax.jit(task.sample, static_argnums=1)(jax.random.fold_in(jax.random.key(seed), 2), size)


def evaluate(params: Any, batch: Batch) -> float:
  """Accuracy of ``params`` on ``batch``."""
  return float(jax.jit(loss_fn)(params, batch)[1]["accuracy"])


def train(
  task: Task,
  *,
  steps: int,
  seed: int = 0,
  batch_size: int = 128,
  learning_rate: float = 3e-3,
  optimizer: optax.GradientTransformation | None = None,
  params: Any = None,
  checkpoint_dir: str | Path | None = None,
  checkpoint_every: int = 100,
  resume: bool = False,
  progress: Callable[[int, dict[str, float]], None] | None = None,
  metadata: dict[str, Any] | None = None,
) -> TrainResult:
  """Trains the one-layer model on ``task`` with Optax, optionally checkpointing.

  Args:
    task: a :class:`Task`.
    steps: the total number of steps (a resumed run continues up to it).
    seed: seeds the parameters and the data.
    batch_size: sequences per step.
    learning_rate: of the default optimizer, ``optax.adamw`` with a cosine decay.
    optimizer: any ``optax.GradientTransformation`` instead.
    params: initial parameters (default :func:`init_model` of ``seed``).
    checkpoint_dir: save params and optimizer state there every
      ``checkpoint_every`` steps and at the end (:mod:`jattn.checkpoint`), with
      :func:`run_metadata`. Without ``resume`` it must hold no checkpoint yet, so
      two runs never mix in one directory.
    resume: continue from the latest complete checkpoint in ``checkpoint_dir``,
      which must be of this run (equal :func:`run_metadata`).
    progress: called as ``progress(step, metrics)`` after every step.
    metadata: more JSON-serialisable facts that define the run (e.g. a
      description of a custom ``optimizer`` or ``params``), saved and checked
      with the rest.

  Returns:
    A :class:`TrainResult`; ``eval_accuracy`` is measured on :func:`held_out` data.

  Raises:
    ValueError: bad arguments, or a fresh run into a ``checkpoint_dir`` that
      already holds checkpoints.
    jattn.checkpoint.CheckpointError: ``resume`` from a missing, damaged or
      foreign checkpoint.
    FloatingPointError: a non-finite loss, or non-finite parameters or
      optimizer state at a save; nothing from that step on is saved.
  """
  if steps < 1:
    raise ValueError(f"steps must be positive, got {steps}.")
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}.")
  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs a checkpoint_dir.")
  run = run_metadata(
    task,
    steps=steps,
    seed=seed,
    batch_size=batch_size,
    learning_rate=None if optimizer is not None else learning_rate,
    custom_params=params is not None,
    extra=metadata,
  )
  held = [] if checkpoint_dir is None or resume else checkpoint.steps(checkpoint_dir)
  if held:
    raise ValueError(
      f"{checkpoint_dir} already holds checkpoints (steps {held}): "
      "continue that run with resume=True (jattn train --resume), or use another directory."
    )
  if optimizer is None:
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
  if params is None:
    params = jax.jit(init_model, static_argnums=1)(jax.random.key(seed), task)
  opt_state = jax.jit(optimizer.init)(params)
  start = 0
  if resume:
    start, (params, opt_state) = checkpoint.restore(
      checkpoint_dir, (params, opt_state), metadata=run
    )
    if start > steps:
      raise ValueError(f"the checkpoint is at step {start}, past steps={steps}.")
  step_fn = jax.jit(make_train_step(loss_fn, optimizer))
  history = []
  saved = start if resume else None
  data = batches(task, seed, batch_size, start)
  for step in range(start, steps):
    params, opt_state, metrics = step_fn(params, opt_state, next(data))
    done = step + 1
    record = {"step": done, **{k: float(v) for k, v in metrics.items()}}
    if not math.isfinite(record["loss"]):
      raise FloatingPointError(_diverged(f"the loss is {record['loss']}", done, saved))
    history.append(record)
    if progress is not None:
      progress(done, record)
    if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
      state = jax.device_get((params, opt_state))
      if not _all_finite(state):
        raise FloatingPointError(_diverged("params or optimizer state hold NaN/inf", done, saved))
      checkpoint.save(checkpoint_dir, done, state, metadata=run)
      saved = done
  return TrainResult(params, opt_state, history, evaluate(params, held_out(task, seed)))


def run_metadata(
  task: Task,
  *,
  steps: int,
  seed: int,
  batch_size: int,
  learning_rate: float | None,
  custom_params: bool = False,
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """What defines a :func:`train` run, as saved with its checkpoints and checked on resume.

  The task (name and description), seed, batch size, and the default optimizer's
  learning rate and total steps (its cosine schedule depends on them; ``None``
  for a custom optimizer, which only ``extra`` can describe), and whether the
  initial parameters were given rather than drawn from the seed.
  """
  run = {
    "task": task.name,
    "task_description": task.description,
    "seed": int(seed),
    "batch_size": int(batch_size),
    "optimizer": "adamw, cosine decay" if learning_rate is not None else "custom",
    "learning_rate": None if learning_rate is None else float(learning_rate),
    "steps": int(steps) if learning_rate is not None else None,
    "initial_params": "given" if custom_params else "init_model(seed)",
  }
  return {**run, **(extra or {})}


def _diverged(what: str, step: int, saved: int | None) -> str:
  kept = "no checkpoint was saved" if saved is None else f"the last checkpoint is step {saved}"
  return f"{what} at step {step}: training diverged (learning rate too high?); {kept}."


def _all_finite(tree: Any) -> bool:
  """Whether every float leaf of a host (numpy) pytree is finite."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))
