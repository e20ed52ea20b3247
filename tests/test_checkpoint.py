"""Checkpoints: a resumed run repeats the uninterrupted one step for step; damage is detected."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn import checkpoint, training

TASK = training.TASKS["recall"]


class Interrupted(Exception):
  pass


def test_resumed_run_has_the_same_losses_step_for_step(tmp_path):
  straight = training.train(TASK, steps=30, seed=3)

  def crash_after_25(step, metrics):
    if step == 25:
      raise Interrupted

  with pytest.raises(Interrupted):
    training.train(
      TASK, steps=30, seed=3, checkpoint_dir=tmp_path, checkpoint_every=10, progress=crash_after_25
    )
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
  with pytest.raises(checkpoint.CheckpointError, match="did not complete"):
    checkpoint.restore(directory, state)
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
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(directory, {"only": jnp.zeros(3)})


def test_bad_step_is_refused(tmp_path):
  with pytest.raises(ValueError, match="non-negative int"):
    checkpoint.save(tmp_path, -1, {"a": jnp.zeros(2)})
