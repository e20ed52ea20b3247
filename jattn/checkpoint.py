"""Checkpoints of any pytree (params, optimizer state), verified on restore.

One pair of files per step: ``step_00000100.msgpack``, the pytree as
``flax.serialization.to_bytes`` writes it, and a JSON sidecar
``step_00000100.json`` holding its step, size, SHA-256 and the run's metadata
(any JSON object, e.g. the task, seed and config that define the run). Steps are
zero-padded to 8 digits; larger steps simply have more.

What a checkpoint promises:

* **A step is complete or absent.** Each file is written to an exclusive,
  unpredictable temporary name in the directory (``tempfile.mkstemp``: it never
  follows a link), fsynced, then renamed over the real name; the sidecar goes
  last, and a re-save removes the old sidecar first. :func:`steps` lists only
  steps with both files, so a crash at any point leaves the previous complete
  steps, and ``restore(step=None)`` takes the latest complete one.
* **Concurrent saves do not tear.** Saves into one directory hold an exclusive
  ``flock`` on its ``.jattn-checkpoint.lock`` (POSIX), so two processes saving
  the same step leave one writer's whole pair; a reader never sees a partly
  written file under a real name.
* **Nothing wrong restores silently.** :func:`restore` checks the sidecar's
  step against the file name, the size and the checksum, the metadata you expect,
  then the tree (every path: missing and extra keys), shapes and dtypes against
  the target, and raises :class:`CheckpointError` naming what is wrong.

Why not orbax-checkpoint: for this (small, single-host) state it offers nothing
``flax.serialization`` does not, and it verifies no content checksum — a
flipped byte in an orbax checkpoint restored, without an error, to different
weights when we tried (orbax-checkpoint 0.12.8). Orbax is the right tool for
sharded arrays on several hosts and asynchronous saves, which jattn's training
loop does not need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

try:
  import fcntl
except ImportError:  # pragma: no cover  (Windows: saves are atomic, not serialised)
  fcntl = None

_NAME = re.compile(r"^step_(\d{8,})\.msgpack$")
_LOCK = ".jattn-checkpoint.lock"


class CheckpointError(ValueError):
  """A checkpoint is missing, truncated, corrupt, from another run, or does not fit the target."""


def _check_step(step: Any, name: str = "step") -> int:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"{name} must be a non-negative int, got {step!r}.")
  return int(step)


def _paths(directory: Path, step: int) -> tuple[Path, Path]:
  stem = f"step_{step:08d}"
  return directory / f"{stem}.msgpack", directory / f"{stem}.json"


def _umask() -> int:
  try:  # Linux reports it without changing it (os.umask would, for every thread)
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return 0o022


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
  """``data`` in a new, exclusively created temporary file beside ``name``, fsynced."""
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      if hasattr(os, "fchmod"):  # mkstemp's 0600, widened as a plain open would
        os.fchmod(f.fileno(), 0o666 & ~_umask())
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return Path(tmp)


def _fsync_directory(directory: Path) -> None:
  if os.name != "posix":  # pragma: no cover
    return
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
  if fcntl is None:  # pragma: no cover
    yield
    return
  fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _json_metadata(metadata: Any) -> dict[str, Any]:
  if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
    raise TypeError(f"metadata must be a dict with str keys, got {metadata!r}.")
  try:  # as it will read back: tuples become lists
    return json.loads(json.dumps(metadata, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata must be JSON-serialisable (finite numbers): {e}") from None


def save(
  directory: str | Path, step: int, state: Any, *, metadata: dict[str, Any] | None = None
) -> Path:
  """Saves ``state`` (any pytree of arrays, e.g. ``(params, opt_state)``) as ``step``.

  Args:
    directory: created if missing.
    step: a non-negative int; saving a step again replaces it whole.
    state: the pytree.
    metadata: a JSON-serialisable dict describing the run (task, seed,
      config), stored in the sidecar; :func:`restore` can require it to match.

  Returns:
    The path of the data file.

  Raises:
    ValueError: ``step`` is not a non-negative int.
    TypeError: ``metadata`` is not a JSON-serialisable dict.
  """
  step = _check_step(step)
  metadata = {} if metadata is None else _json_metadata(metadata)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  data = flax.serialization.to_bytes(jax.device_get(state))
  data_path, meta_path = _paths(directory, step)
  sidecar = {
    "step": step,
    "bytes": len(data),
    "sha256": hashlib.sha256(data).hexdigest(),
    "metadata": metadata,
  }
  data_tmp = _write_temp(directory, data_path.name, data)
  try:
    meta_tmp = _write_temp(directory, meta_path.name, json.dumps(sidecar).encode())
    try:
      with _locked(directory):
        meta_path.unlink(missing_ok=True)  # a re-saved step is incomplete until its new sidecar
        os.replace(data_tmp, data_path)
        _fsync_directory(directory)  # the data's rename is durable before the sidecar's
        os.replace(meta_tmp, meta_path)  # last: its presence marks a complete save
        _fsync_directory(directory)
    finally:
      meta_tmp.unlink(missing_ok=True)
  finally:
    data_tmp.unlink(missing_ok=True)
  return data_path


def _step_files(directory: Path) -> Iterator[tuple[int, Path]]:
  if not directory.is_dir():
    return
  for path in directory.iterdir():
    match = _NAME.match(path.name)
    if match and f"{int(match.group(1)):08d}" == match.group(1):  # the name save writes
      yield int(match.group(1)), path


def steps(directory: str | Path) -> list[int]:
  """The complete steps in ``directory`` (a data file and its sidecar), ascending.

  A step whose save did not complete (no sidecar) is left out, as are directories
  and other files named like checkpoints.
  """
  directory = Path(directory)
  return sorted(
    step
    for step, path in _step_files(directory)
    if path.is_file() and _paths(directory, step)[1].is_file()
  )


def _incomplete(directory: Path) -> list[int]:
  complete = set(steps(directory))
  return sorted(s for s, p in _step_files(directory) if p.is_file() and s not in complete)


def _read_sidecar(directory: Path, step: int) -> dict[str, Any]:
  meta_path = _paths(directory, step)[1]
  try:
    meta = json.loads(meta_path.read_bytes())
    expected = (int(meta["step"]), int(meta["bytes"]), str(meta["sha256"]))
    metadata = meta.get("metadata", {})  # older sidecars have none
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{meta_path} is missing or unreadable ({e}); the save of step {step} did not complete."
    ) from None
  if expected[0] != step:
    raise CheckpointError(
      f"{meta_path} describes step {expected[0]}, its name says step {step}: the files were "
      "renamed or mixed up."
    )
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{meta_path}: its metadata is not a JSON object: {metadata!r}.")
  return {"bytes": expected[1], "sha256": expected[2], "metadata": metadata}


def _choose_step(directory: Path, step: Any) -> int:
  available = steps(directory)
  if step is None:
    if available:
      return available[-1]
    incomplete = _incomplete(directory)
    if incomplete:
      raise CheckpointError(
        f"no complete checkpoint in {directory}: the saves of steps {incomplete} did not "
        "complete (no sidecar)."
      )
    raise CheckpointError(f"no checkpoint in {directory}.")
  step = _check_step(step)
  if step in available:
    return step
  data_path, _ = _paths(directory, step)
  if data_path.is_file():
    raise CheckpointError(f"the save of step {step} in {directory} did not complete (no sidecar).")
  if data_path.exists():
    raise CheckpointError(f"{data_path} is not a file.")
  raise CheckpointError(f"no checkpoint of step {step} in {directory}; it has {available}.")


def read_metadata(directory: str | Path, step: int | None = None) -> dict[str, Any]:
  """The run metadata saved with ``step`` (default: the latest complete step).

  Raises:
    CheckpointError: no such complete step, or an unreadable or mislabelled sidecar.
  """
  directory = Path(directory)
  step = _choose_step(directory, step)
  return _read_sidecar(directory, step)["metadata"]


def restore(
  directory: str | Path,
  target: Any,
  step: int | None = None,
  *,
  metadata: dict[str, Any] | None = None,
) -> tuple[int, Any]:
  """Restores the checkpoint of ``step`` (default: the latest complete one) into ``target``.

  Args:
    directory: where :func:`save` wrote.
    target: a pytree of the expected structure, shapes and dtypes (e.g. freshly
      initialised params and optimizer state).
    step: which step; None for the latest complete one.
    metadata: if given, the checkpoint's metadata must equal it (compared as
      JSON), so a checkpoint of another run is refused.

  Returns:
    ``(step, state)``.

  Raises:
    ValueError: ``step`` is not None or a non-negative int.
    CheckpointError: no (complete) checkpoint; a sidecar that is missing,
      unreadable or describes another step; a size or checksum mismatch
      (truncated or corrupt); metadata that differs (naming the keys); or a tree
      with missing or extra paths, or a shape or dtype, that does not fit ``target``.
  """
  directory = Path(directory)
  step = _choose_step(directory, step)
  data_path, meta_path = _paths(directory, step)
  meta = _read_sidecar(directory, step)
  try:
    data = data_path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"cannot read {data_path}: {e}") from None
  if len(data) != meta["bytes"]:
    raise CheckpointError(
      f"{data_path} is truncated or overwritten: {len(data)} bytes, {meta['bytes']} expected."
    )
  if hashlib.sha256(data).hexdigest() != meta["sha256"]:
    raise CheckpointError(f"{data_path} is corrupt: its SHA-256 does not match {meta_path}.")
  if metadata is not None:
    _check_metadata(meta["metadata"], _json_metadata(metadata), meta_path)
  try:
    raw = flax.serialization.msgpack_restore(data)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{data_path} is not a flax msgpack checkpoint: {e}") from None
  _check_paths(raw, flax.serialization.to_state_dict(target), data_path)
  try:
    state = flax.serialization.from_state_dict(target, raw)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{data_path} does not fit the target's structure: {e}") from None
  _check_fits(state, target, data_path)
  return step, state


def _check_metadata(saved: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
  differ = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
  if not saved and expected:
    raise CheckpointError(
      f"{path} holds no run metadata (saved without it), so it cannot be told to be of this "
      f"run ({', '.join(sorted(expected))})."
    )
  if differ:

    def value(d: dict[str, Any], k: str) -> str:
      return repr(d[k]) if k in d else "absent"

    details = "; ".join(f"{k} {value(saved, k)} saved, {value(expected, k)} here" for k in differ)
    raise CheckpointError(f"{path} is from another run: {details}.")


def _tree_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], bool]:
  """Every path of a state dict, each mapped to whether it is a subtree (a dict)."""
  if not isinstance(tree, dict):
    return {prefix: False}
  found = {prefix: True}
  for key, value in tree.items():
    found.update(_tree_paths(value, (*prefix, str(key))))
  return found


def _check_paths(saved: Any, target: Any, path: Path) -> None:
  got, want = _tree_paths(saved), _tree_paths(target)

  def top(paths: set[tuple[str, ...]]) -> list[str]:  # a missing subtree, not each of its leaves
    tops = sorted(p for p in paths if p[:-1] not in paths)
    return [repr("/".join(p)) if p else "the root" for p in tops]

  def listed(names: list[str]) -> str:
    shown = ", ".join(names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")

  problems = []
  missing, extra = top(set(want) - set(got)), top(set(got) - set(want))
  if missing:
    problems.append(f"the target's {listed(missing)} missing from the checkpoint")
  if extra:
    problems.append(f"the checkpoint's {listed(extra)} absent from the target")
  kinds = sorted(
    repr("/".join(p)) if p else "the root" for p in set(got) & set(want) if got[p] != want[p]
  )
  if kinds:
    problems.append(f"{listed(kinds)} is a subtree in one and a leaf in the other")
  if problems:
    raise CheckpointError(f"{path} does not fit the target: {'; '.join(problems)}.")


def _check_fits(state: Any, target: Any, path: Path) -> None:
  got, want = jax.tree.structure(state), jax.tree.structure(target)
  if got != want:
    raise CheckpointError(f"{path} holds a tree {got}, the target is {want}.")
  leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  for (key_path, t), s in zip(leaves, jax.tree.leaves(state), strict=True):
    t_shape, s_shape = np.shape(t), np.shape(s)
    t_dtype, s_dtype = jnp.asarray(t).dtype, jnp.asarray(s).dtype
    if t_shape != s_shape or t_dtype != s_dtype:
      raise CheckpointError(
        f"{path}: {jax.tree_util.keystr(key_path)} is {s_dtype}{list(s_shape)} in the "
        f"checkpoint, {t_dtype}{list(t_shape)} in the target."
      )
