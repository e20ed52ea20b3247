"""Checkpoints: a resumed run repeats the uninterrupted one step for step; damage, crashes,
races, planted links and foreign runs are detected or survived."""

import errno
import json
import math
import os
import subprocess
import sys
import threading
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn import checkpoint, training

TASK = training.TASKS["recall"]


class Interrupted(Exception):
  pass


@pytest.mark.slow
def test_resumed_run_has_the_same_losses_step_for_step(tmp_path):
  straight = training.train(TASK, steps=30, seed=3)

  def crash_after_25(step, metrics):
    if step == 25:
      raise Interrupted

  with pytest.raises(Interrupted):  # this test's own sentinel: its class says it all
    training.train(
      TASK, steps=30, seed=3, checkpoint_dir=tmp_path, checkpoint_every=10, progress=crash_after_25
    )
  assert checkpoint.steps(tmp_path) == [10, 20]
  assert checkpoint.read_metadata(tmp_path)["seed"] == 3
  with pytest.raises(ValueError, match=r"already holds checkpoints .* resume=True"):
    training.train(TASK, steps=30, seed=3, checkpoint_dir=tmp_path)  # a fresh run would mix
  with pytest.raises(checkpoint.CheckpointError, match="from another run: seed 3 saved, 4 here"):
    training.train(TASK, steps=30, seed=4, checkpoint_dir=tmp_path, resume=True)
  # A crash between the data and the sidecar rename of step 30: resume uses step 20.
  (tmp_path / "step_00000030.msgpack").write_bytes(b"half of a save")
  assert checkpoint.steps(tmp_path) == [10, 20]
  resumed = training.train(TASK, steps=30, seed=3, checkpoint_dir=tmp_path, resume=True)
  assert [r["step"] for r in resumed.history] == list(range(21, 31))
  assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[20:]]
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  assert checkpoint.steps(tmp_path) == [10, 20, 30]


@pytest.fixture
def saved(tmp_path):
  params = training.init_model(jax.random.key(0), TASK)
  opt_state = optax.adamw(1e-3).init(params)
  checkpoint.save(tmp_path, 7, (params, opt_state))
  return tmp_path, (params, opt_state)


def test_round_trip_restores_params_and_optimizer_state_exactly(saved):
  directory, state = saved
  step, restored = checkpoint.restore(directory, state)
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)


def test_truncated_file_is_refused(saved):
  directory, state = saved
  path = directory / "step_00000007.msgpack"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(checkpoint.CheckpointError, match="truncated"):
    checkpoint.restore(directory, state)


def test_flipped_byte_is_refused(saved):
  directory, state = saved
  path = directory / "step_00000007.msgpack"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    checkpoint.restore(directory, state)


def test_missing_sidecar_and_missing_checkpoints_are_refused(saved, tmp_path_factory):
  directory, state = saved
  (directory / "step_00000007.json").unlink()
  assert checkpoint.steps(directory) == []  # only complete steps are listed
  with pytest.raises(checkpoint.CheckpointError, match="did not complete"):
    checkpoint.restore(directory, state)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 7 .* did not complete"):
    checkpoint.restore(directory, state, step=7)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
    checkpoint.restore(tmp_path_factory.mktemp("empty"), state)


def test_a_target_of_other_shapes_is_refused(saved):
  directory, (params, _) = saved
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of step 3"):
    checkpoint.restore(directory, (params, None), step=3)
  other = training.init_model(jax.random.key(0), TASK, features=32)
  other_state = (other, optax.adamw(1e-3).init(other))
  with pytest.raises(checkpoint.CheckpointError, match=r"is float32\[64, 4, 16\] in the"):
    checkpoint.restore(directory, other_state)
  state = (params, optax.adamw(1e-3).init(params))
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
  with pytest.raises(checkpoint.CheckpointError, match=r"float32\[.*\] in the .*bfloat16"):
    checkpoint.restore(directory, half)  # the same shapes, another dtype
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"the target's 'only' missing from the checkpoint; the checkpoint's '0', '1' absent",
  ):
    checkpoint.restore(directory, {"only": jnp.zeros(3)})


def test_bad_step_is_refused(tmp_path):
  with pytest.raises(ValueError, match="non-negative int"):
    checkpoint.save(tmp_path, -1, {"a": jnp.zeros(2)})


def test_a_target_with_fewer_more_or_other_keys_is_refused_naming_the_paths(saved):
  directory, (params, _) = saved
  without = {k: v for k, v in params.items() if k != "attention"}  # a model without attention
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"the checkpoint's '0/attention', '1/0/mu/attention', '1/0/nu/attention' absent",
  ):
    checkpoint.restore(directory, (without, optax.adamw(1e-3).init(without)))
  bigger = {**params, "extra": {"kernel": jnp.zeros(3)}}
  with pytest.raises(checkpoint.CheckpointError, match=r"the target's '0/extra', .* missing"):
    checkpoint.restore(directory, (bigger, optax.adamw(1e-3).init(bigger)))
  renamed = {("out" if k == "readout" else k): v for k, v in params.items()}
  with pytest.raises(
    checkpoint.CheckpointError, match=r"target's '0/out', .* missing .* checkpoint's '0/readout'"
  ):
    checkpoint.restore(directory, (renamed, optax.adamw(1e-3).init(renamed)))
  with pytest.raises(checkpoint.CheckpointError, match="the root is a subtree in one and a leaf"):
    checkpoint.restore(directory, jnp.zeros(3))


def test_steps_past_eight_digits_are_saved_found_and_latest(tmp_path):
  state = {"w": jnp.arange(3.0)}
  for step in (99_999_999, 10**8, 10**12):
    checkpoint.save(tmp_path, step, {"w": state["w"] + step % 7})
  assert (tmp_path / "step_00000007.msgpack").exists() is False
  assert (tmp_path / "step_100000000.msgpack").is_file()
  assert checkpoint.steps(tmp_path) == [99_999_999, 10**8, 10**12]
  step, restored = checkpoint.restore(tmp_path, state)
  assert step == 10**12
  np.testing.assert_array_equal(restored["w"], state["w"] + 10**12 % 7)
  # A name save never writes (padding beyond 8 digits) is not a checkpoint.
  (tmp_path / "step_000000005.msgpack").write_bytes(b"")
  (tmp_path / "step_000000005.json").write_text("{}")
  assert checkpoint.steps(tmp_path) == [99_999_999, 10**8, 10**12]


def test_run_metadata_is_saved_and_a_foreign_run_is_refused_naming_the_keys(tmp_path):
  state = {"w": jnp.zeros(2)}
  run = {"task": "recall", "seed": 3, "config": {"lr": 0.003, "layers": (1, 2)}}
  checkpoint.save(tmp_path, 5, state, metadata=run)
  assert checkpoint.read_metadata(tmp_path) == {**run, "config": {"lr": 0.003, "layers": [1, 2]}}
  assert checkpoint.restore(tmp_path, state, metadata=run)[0] == 5  # tuples compare as lists
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"step_00000005.json is from another run: extra absent saved, 1 here; seed 3 saved, 4 ",
  ):
    checkpoint.restore(tmp_path, state, metadata={**run, "seed": 4, "extra": 1})
  with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
    checkpoint.save(tmp_path, 6, state, metadata={"lr": math.nan})
  with pytest.raises(TypeError, match="metadata must be a dict with str keys"):
    checkpoint.save(tmp_path, 6, state, metadata={1: "a"})
  # A checkpoint from before metadata existed still restores; it cannot prove its run.
  sidecar = tmp_path / "step_00000005.json"
  sidecar.write_text(
    json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "metadata"})
  )
  assert checkpoint.restore(tmp_path, state)[0] == 5
  assert checkpoint.read_metadata(tmp_path) == {}
  with pytest.raises(checkpoint.CheckpointError, match="holds no run metadata"):
    checkpoint.restore(tmp_path, state, metadata=run)


def test_links_planted_at_the_old_temp_names_and_the_lock_are_not_followed(tmp_path):
  outside = tmp_path / "outside.txt"
  outside.write_text("precious")
  directory = tmp_path / "ck"
  directory.mkdir()
  for name in (".step_00000007.msgpack.tmp", ".step_00000007.json.tmp"):
    (directory / name).symlink_to(outside)
  state = {"w": jnp.arange(4.0)}
  checkpoint.save(directory, 7, state)
  assert outside.read_text() == "precious"
  np.testing.assert_array_equal(checkpoint.restore(directory, state)[1]["w"], state["w"])
  assert not [p for p in directory.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
  (directory / ".jattn-checkpoint.lock").unlink()
  (directory / ".jattn-checkpoint.lock").symlink_to(tmp_path / "created_outside")
  with pytest.raises(OSError, match=r"\.jattn-checkpoint\.lock") as refused:  # O_NOFOLLOW
    checkpoint.save(directory, 8, state)
  assert refused.value.errno == errno.ELOOP
  assert not (tmp_path / "created_outside").exists()


WRITER = """
import pathlib, sys, time
import numpy as np
from jattn import checkpoint
directory, value = pathlib.Path(sys.argv[1]), float(sys.argv[2])
(directory / f"ready{value}").touch()
while not (directory / "go").exists():
  time.sleep(0.001)
for _ in range(50):
  checkpoint.save(directory, 1, {"w": np.full(20000, value, np.float32)})
"""


def test_concurrent_saves_of_one_step_never_tear_or_crash(tmp_path):
  states = [{"w": np.full(20000, v, np.float32)} for v in (1.0, 2.0)]
  complete = {flax.serialization.to_bytes(s) for s in states}
  writers = [
    subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(v)], stderr=subprocess.PIPE)
    for v in (1.0, 2.0)
  ]
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  (tmp_path / "go").touch()
  reads = 0
  while any(w.poll() is None for w in writers):
    try:
      data = (tmp_path / "step_00000001.msgpack").read_bytes()
    except FileNotFoundError:
      continue
    assert data in complete, f"a reader saw {len(data)} bytes under the real name"
    reads += 1
  for w in writers:
    _, err = w.communicate()
    assert w.returncode == 0, err.decode()
  assert reads > 0
  step, restored = checkpoint.restore(tmp_path, {"w": np.zeros(20000, np.float32)})
  assert step == 1 and restored["w"][0] in (1.0, 2.0)
  assert not list(tmp_path.glob(".*.tmp"))


def test_saves_into_one_directory_wait_for_each_other(tmp_path):
  fcntl = pytest.importorskip("fcntl")  # POSIX: the save holds the directory's lock
  checkpoint.save(tmp_path, 1, {"w": jnp.zeros(2)})
  with open(tmp_path / ".jattn-checkpoint.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # as another process's save would
    saver = threading.Thread(target=checkpoint.save, args=(tmp_path, 2, {"w": jnp.ones(2)}))
    saver.start()
    saver.join(timeout=0.3)
    assert saver.is_alive() and checkpoint.steps(tmp_path) == [1]
  saver.join(timeout=10)
  assert checkpoint.steps(tmp_path) == [1, 2]


@pytest.mark.parametrize("resave", [False, True], ids=["new step", "re-saved step"])
@pytest.mark.parametrize("crash_at", [1, 2], ids=["data rename", "sidecar rename"])
def test_a_crash_at_any_rename_leaves_only_complete_steps(tmp_path, monkeypatch, crash_at, resave):
  old, new = {"w": jnp.full(3, 1.0)}, {"w": jnp.full(3, 9.0)}
  checkpoint.save(tmp_path, 1, old)
  checkpoint.save(tmp_path, 2, old)
  replace, calls = os.replace, []

  def crashing_replace(src, dst):
    calls.append(dst)
    if len(calls) == crash_at:
      raise OSError("simulated crash")
    replace(src, dst)

  monkeypatch.setattr(os, "replace", crashing_replace)
  with pytest.raises(OSError, match="simulated crash"):
    checkpoint.save(tmp_path, 2 if resave else 3, new)
  monkeypatch.undo()
  listed = checkpoint.steps(tmp_path)
  assert (listed in ([1], [1, 2])) if resave else (listed == [1, 2])
  for step in listed:  # each listed step restores whole: the old state or the new one
    restored = checkpoint.restore(tmp_path, old, step=step)[1]["w"]
    assert np.array_equal(restored, old["w"]) or (step == 2 and np.array_equal(restored, new["w"]))
  assert checkpoint.restore(tmp_path, old)[0] == listed[-1]  # the latest complete step
  assert not list(tmp_path.glob(".*.tmp"))


def test_renamed_pairs_directories_and_bad_steps_are_refused(saved):
  directory, state = saved
  for suffix in ("msgpack", "json"):
    os.replace(directory / f"step_00000007.{suffix}", directory / f"step_00000009.{suffix}")
  with pytest.raises(checkpoint.CheckpointError, match="describes step 7, its name says step 9"):
    checkpoint.restore(directory, state)
  (directory / "step_00000011.msgpack").mkdir()
  (directory / "step_00000011.json").mkdir()
  assert checkpoint.steps(directory) == [9]
  with pytest.raises(checkpoint.CheckpointError, match=r"step_00000011\.msgpack is not a file"):
    checkpoint.restore(directory, state, step=11)
  for bad in (2.0, True, "9", -3):
    with pytest.raises(ValueError, match=f"step must be a non-negative int, got {bad!r}"):
      checkpoint.restore(directory, state, step=bad)


def test_train_refuses_to_save_a_diverged_state(tmp_path):
  with pytest.raises(FloatingPointError, match=r"NaN/inf at step 1: .* no checkpoint was saved"):
    training.train(
      TASK,
      steps=2,
      batch_size=8,
      optimizer=optax.sgd(jnp.nan),
      checkpoint_dir=tmp_path,
      checkpoint_every=1,
    )
  assert checkpoint.steps(tmp_path) == []
