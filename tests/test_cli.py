"""`jattn demo`: the walkthrough printed step by step, the map saved, bad input refused;
`jattn train`: bad flags, divergence, mixed runs and Ctrl-C give one line, never a traceback;
`jattn bench`: what plain and full runs would run (the groups, split and merged), and a tiny
run of each kind of case."""

import importlib.util
import io
import json
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jattn
from jattn import _bench, checkpoint, cli


def run(*args):
  return subprocess.run(
    [sys.executable, "-m", "jattn.cli", *args], capture_output=True, text=True, timeout=120
  )


def test_demo_prints_the_walkthrough_with_exact_and_rounded_numbers(tmp_path):
  out = tmp_path / "map.png"
  result = run("demo", "--out", str(out))
  assert result.returncode == 0, result.stderr
  text = result.stdout
  for step in range(1, 9):
    assert f"Step {step}:" in text
  assert "walkthrough prints: [2, 4, 4]" in text
  assert "0.0634,   0.4683,   0.4683" in text
  assert "walkthrough prints: [0.0, 0.5, 0.5]" in text
  assert "1.9366,   6.6831,   1.5951" in text
  assert "walkthrough prints: [2.0, 7.0, 1.5]" in text
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_sqrt_scale_and_own_files(tmp_path, capsys):
  inputs = tmp_path / "x.npy"
  np.save(inputs, np.eye(4, dtype=np.float32)[:2])
  weights = tmp_path / "w.json"
  eye = np.eye(4, 2).tolist()
  weights.write_text(json.dumps({"query": eye, "key": eye, "value": np.eye(4, 3).tolist()}))
  assert (
    cli.main(
      ["demo", "--inputs", str(inputs), "--weights", str(weights), "--scale", "sqrt", "--no-plot"]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "scaled by 1/sqrt(2)" in text
  assert "walkthrough prints" not in text  # no comparison away from the built-in example
  # x = e1, e2 with identity projections: scores [1/sqrt2, 0] -> softmax of that
  w = np.exp([1 / np.sqrt(2), 0.0])
  assert f"{w[0] / w.sum():8.4f}" in text


def printed(text, title):
  """The numbers the demo printed under the line starting with ``title``."""
  block = text.split(f"\n{title}", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
  return np.array(json.loads(block))


def test_demo_weights_from_an_npz_file_drive_every_step(tmp_path, capsys):
  # The walkthrough's matrices with the value matrix doubled: the same attention map, outputs
  # twice the walkthrough's.
  params, x = jattn.walkthrough_example()
  query, key, value = (np.asarray(params[name]["kernel"]) for name in ("query", "key", "value"))
  path = tmp_path / "w.npz"
  np.savez(path, query=query, key=key, value=2 * value)
  assert cli.main(["demo", "--weights", str(path), "--no-plot"]) == 0
  text = capsys.readouterr().out
  assert "(built-in example)" not in text and "walkthrough prints" not in text
  np.testing.assert_array_equal(printed(text, "Step 2: value weights"), 2 * value)
  np.testing.assert_array_equal(printed(text, "Step 2: query weights"), query)
  out, weights = jattn.self_attention(params, x, scale=1.0, return_weights=True)
  np.testing.assert_allclose(printed(text, "The attention map"), weights[0], atol=1e-4)
  np.testing.assert_allclose(printed(text, "Step 8: all outputs"), 2 * out, atol=1e-4)


def one_line_error(capsys, command, *names):
  """The error the last cli.main printed: one line, naming each of ``names``, no traceback."""
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith(f"jattn {command}: error:")]
  assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err  # the last line, and one
  for name in names:
    assert str(name).replace("\n", " ") in lines[0]
  return lines[0]


@pytest.mark.parametrize(
  "content, suffix, message",
  [
    ("[[1, 2], [3", ".json", "Expecting"),
    ("[[1, 0, 1]]", ".json", r"have 3 features, but the query matrix \(the built-in example\) "),
    ("[1, 2, 3, 4]", ".json", "must be a 2-D numeric array"),
    ("1,2", ".csv", "must be .json or .npy"),
    ("[[1, 2], [3]]", ".json", r"not a \(T, F\) matrix"),
    ('[["a", "b"]]', ".json", "must hold real numbers, got dtype <U1"),
    ("[[NaN, 1, 2, 3]]", ".json", "not finite in float32"),
    ("[[1e39, 1, 2, 3]]", ".json", "not finite in float32"),
    (b"\xff\xfe\xfa", ".json", "cannot read inputs file .*codec can't decode"),
    (np.ones((2, 4), np.complex64), ".npy", "must hold real numbers, got dtype complex64"),
    (np.full((2, 4), 1e39), ".npy", "not finite in float32"),
    (np.full((2, 4), np.nan, np.float32), ".npy", "not finite in float32"),
    (np.ones((cli.MAX_SIZE + 1, 4), np.float32), ".npy", "2049 x 4, more than the demo's limit"),
    (np.ones((2, cli.MAX_SIZE + 1), np.float32), ".npy", "2 x 2049, more than the demo's limit"),
    (np.ones((0, 4), np.float32), ".npy", r"must be a 2-D numeric array \(T, F\), got shape"),
    (b"", ".npy", "cannot read inputs file"),
    (b"not numpy at all", ".npy", "cannot read inputs file"),
    ({"a": np.eye(2)}, ".npy", "not a .npy array file"),  # an .npz named .npy
  ],
)
def test_demo_bad_inputs_exit_nonzero_with_one_line_naming_the_file(
  tmp_path, capsys, content, suffix, message
):
  path = tmp_path / f"x{suffix}"
  if isinstance(content, str):
    path.write_text(content)
  elif isinstance(content, bytes):
    path.write_bytes(content)
  elif isinstance(content, dict):
    with open(path, "wb") as f:
      np.savez(f, **content)
  else:
    np.save(path, content)
  assert cli.main(["demo", "--inputs", str(path), "--no-plot"]) == 2
  assert re.search(message, one_line_error(capsys, "demo", path))


def npz_bytes(**arrays):
  """An .npz file's bytes (cut short, a damaged zip)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@pytest.mark.parametrize(
  "weights, message",
  [
    ({"query": np.eye(4, 3)}, r"lacks the matrices \['key', 'value'\]"),
    ({"query": np.eye(4, 2), "key": np.eye(4, 3), "value": np.eye(4, 3)}, "has 2 columns, the key"),
    ({"query": np.eye(5, 3), "key": np.eye(5, 3), "value": np.eye(5, 3)}, "expects 5"),
    ({"query": np.eye(4, 3) * 1j, "key": np.eye(4, 3), "value": np.eye(4)}, "dtype complex128"),
    ({"query": np.ones((4, 3, 1)), "key": np.eye(4, 3), "value": np.eye(4)}, r"\(F, H\)"),
    (b"garbage", "cannot read weights file"),
    (npz_bytes(query=np.eye(4, 3), key=np.eye(4, 3), value=np.eye(4))[:200], "cannot read weights"),
  ],
)
def test_demo_bad_weights_files_are_named(tmp_path, capsys, weights, message):
  path = tmp_path / "w.npz"
  if isinstance(weights, bytes):
    path.write_bytes(weights)
  else:
    np.savez(path, **weights)
  assert cli.main(["demo", "--weights", str(path), "--no-plot"]) == 2
  assert re.search(message, one_line_error(capsys, "demo", path))


def test_demo_refuses_files_over_the_size_limit_before_reading_them(tmp_path, capsys):
  path = tmp_path / "x.json"
  with open(path, "wb") as f:
    f.truncate(cli.MAX_BYTES + 1)  # sparse: 128 MiB + 1 byte of size, no data written
  assert cli.main(["demo", "--inputs", str(path), "--no-plot"]) == 2
  assert "134217729 bytes, more than the demo's limit of 134217728" in one_line_error(
    capsys, "demo", path
  )


def test_demo_unreadable_paths_and_unsavable_maps_are_named(tmp_path, capsys):
  assert cli.main(["demo", "--inputs", str(tmp_path), "--no-plot"]) == 2  # a directory
  assert "inputs file" in one_line_error(capsys, "demo", tmp_path)
  missing = tmp_path / "two\nlines.json"
  assert cli.main(["demo", "--inputs", str(missing), "--no-plot"]) == 2
  assert "No such file or directory" in one_line_error(capsys, "demo", missing)
  for out in (tmp_path / "no" / "map.png", tmp_path / "map.xyz"):
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert "cannot save the attention map to" in one_line_error(capsys, "demo", out)


def test_saved_maps_fit_their_titles(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  from jattn import plot

  title = "attention map (unscaled, as in the walkthrough)"  # was cut off at both edges
  for weights in (np.full((3, 3), 1 / 3), np.full((4, 9, 9), 1 / 9), np.full((40, 40), 1 / 40)):
    fig = plot.attention_map(weights, title=title)
    fig.canvas.draw()
    box = fig.texts[0].get_window_extent()
    assert fig.texts[0].get_text().replace("\n", " ") == title
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
  plot.attention_map(np.full((3, 3), 1 / 3), title=title, path=str(tmp_path / "map.png"))
  assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_missing_file_and_bad_weights(tmp_path, capsys):
  assert cli.main(["demo", "--inputs", str(tmp_path / "nope.json"), "--no-plot"]) == 2
  assert "No such file" in capsys.readouterr().err
  weights = tmp_path / "w.json"
  weights.write_text(json.dumps({"query": [[1.0]]}))
  assert cli.main(["demo", "--weights", str(weights), "--no-plot"]) == 2
  assert "lacks the matrices ['key', 'value']" in capsys.readouterr().err


def test_bad_arguments_exit_nonzero():
  result = run("demo", "--scale", "cube")
  assert result.returncode == 2
  assert "invalid choice: 'cube'" in result.stderr


@pytest.mark.slow
def test_bench_runs_each_case_in_a_process_and_writes_results(tmp_path):
  result = run(
    "bench",
    "--shapes",
    "1,64,2,8",
    "--impls",
    "jattn-blockwise,jax.nn",
    "--modes",
    "fwd+bwd",
    "--repeats",
    "1",
    "--out",
    str(tmp_path),
  )
  assert result.returncode == 0, result.stderr
  table = (tmp_path / "results.md").read_text()
  assert "| (1, 64, 2, 8) | fwd+bwd | jattn-blockwise |" in table
  assert "| (1, 64, 2, 8) | fwd+bwd | jax.nn |" in table
  assert "GFLOP/s" in table and "skipped" not in table
  records = json.loads((tmp_path / "results.json").read_text())["results"]
  assert all(r["median_ms"] > 0 and r["peak_rss_mb"] > 0 for r in records)
  assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_skips_what_cannot_fit_and_rejects_bad_shapes():
  from jattn import _bench

  skipped = _bench.run_case("jax.nn", (1, 32768, 8, 64), "fwd+bwd", 1, 10, 20.0)
  assert skipped["skipped"].startswith("needs > 128 GB")
  result = run("bench", "--shapes", "1,64,2")
  assert result.returncode == 2 and "four positive sizes" in result.stderr


HAS_TORCH = importlib.util.find_spec("torch") is not None
BENCH_ATTENTION = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture
def planned(monkeypatch):
  """The cases a bench run would run (each takes seconds to minutes), recorded, not run."""
  cases = []

  def run_case(impl, shape, mode, repeats, timeout, memory_limit_gb, variant="plain"):
    cases.append((impl, shape, mode, variant, repeats, timeout, memory_limit_gb))
    return {
      "impl": impl,
      "variant": variant,
      "shape": list(shape),
      "mode": mode,
      "median_ms": 1.0,
      "peak_rss_mb": 1.0,
    }

  monkeypatch.setattr(_bench, "run_case", run_case)
  monkeypatch.setattr(_bench, "matmul_peak_gflops", lambda: 100.0)
  return cases


def plan(shapes, repeats):
  impls = [i for i in _bench.IMPLEMENTATIONS if _bench.available(i)]
  return [
    (i, s, m, "plain", repeats, 900, 20.0)
    for s in shapes
    for m in ("fwd", "fwd+bwd")
    for i in impls
  ]


def test_plain_bench_plans_every_implementation_and_mode_at_the_quick_shape(planned, capsys):
  # Plain `jattn bench` takes minutes on 2 cores; here only its defaults, with the cases faked.
  assert cli.main(["bench"]) == 0
  assert planned == plan([(4, 1024, 8, 64)], repeats=3)
  table = capsys.readouterr().out
  assert table.count("| (4, 1024, 8, 64) |") == len(planned)
  if HAS_TORCH:  # where the README's torch ratios come from
    assert "| (4, 1024, 8, 64) | fwd+bwd | torch-sdpa | 1 |" in table


ALL = (
  "jattn-blockwise",
  "jattn-naive",
  "jax.nn",
  "flax.linen",
  "torch-sdpa",
  "tokamax-xla-chunked",
)
# The speed issue's full run, written out: (variant, modes, shapes, implementations).
ISSUE_CASES = (
  ("plain", ("fwd", "fwd+bwd"), ((4, 1024, 8, 64), (1, 8192, 8, 64), (1, 32768, 8, 64)), ALL),
  ("plain", ("jvp",), ((1, 4096, 8, 64),), ALL),  # torch and tokamax: skipped, no forward mode
  ("causal", ("fwd+bwd",), ((1, 8192, 8, 64),), ("jattn-blockwise", "torch-sdpa", ALL[-1])),
  ("bf16", ("fwd", "fwd+bwd"), ((4, 1024, 8, 64),), ("jattn-blockwise", "jax.nn", "torch-sdpa")),
  ("gqa", ("fwd", "fwd+bwd"), ((4, 1024, 8, 64),), ("jattn-blockwise", *ALL[2:])),  # flax: skipped
  ("decode", ("fwd",), ((1, 8192, 8, 64),), ("jattn.decode_step", "flax.nnx")),
)


def test_the_full_benchmark_script_plans_the_issues_cases(planned, tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", [str(BENCH_ATTENTION), "--repeats", "1", "--out", str(tmp_path)])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_path(str(BENCH_ATTENTION), run_name="__main__")
  assert exit_info.value.code == 0
  expected = [
    (i, s, m, variant, 1, 900, 20.0)
    for variant, modes, shapes, impls in ISSUE_CASES
    for s in shapes
    for m in modes
    for i in impls
    if _bench.available(i)
  ]
  assert planned == expected
  table = (tmp_path / "results.md").read_text()
  # plain fwd/fwd+bwd 6, jvp 1, causal 1, bf16 2, gqa 2
  assert table.count("torch-sdpa |") == (12 if HAS_TORCH else 0)
  assert "| decode | (1, 8192, 8, 64) | fwd | flax.nnx | 1 |" in table


def test_the_full_run_splits_by_variant_and_merges(planned, tmp_path):
  def bench(*args):
    assert _bench.main([*args, "--repeats", "1", "--out", str(tmp_path)], full=True) == 0
    return json.loads((tmp_path / "results.json").read_text())["results"]

  first = bench("--variants", "plain,causal", "--modes", "fwd+bwd", "--impls", "jattn-blockwise")
  assert [(r["variant"], r["shape"][1]) for r in first] == [
    ("plain", 1024),
    ("plain", 8192),
    ("plain", 32768),
    ("causal", 8192),
  ]
  # The second part adds its cases; one run again replaces its earlier record.
  merged = bench("--variants", "decode,causal", "--impls", "jattn-blockwise,flax.nnx", "--merge")
  assert [(r["variant"], r["impl"]) for r in merged] == [
    ("plain", "jattn-blockwise"),
    ("plain", "jattn-blockwise"),
    ("plain", "jattn-blockwise"),
    ("causal", "jattn-blockwise"),
    ("decode", "flax.nnx"),
  ]
  assert len(planned) == 6
  table = (tmp_path / "results.md").read_text()
  assert table.count("| causal |") == 1 and "| decode |" in table


def test_the_full_benchmark_help_lists_its_groups_and_filters(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", [str(BENCH_ATTENTION), "--help"])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_path(str(BENCH_ATTENTION), run_name="__main__")
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith("usage: bench_attention.py")
  for flag in ("--variants", "--modes", "--impls", "--shapes", "--merge"):
    assert flag in text
  assert "gqa     fwd/fwd+bwd  (4,1024,8,64): jattn-blockwise, jax.nn," in text
  assert "decode  fwd          (1,8192,8,64): jattn.decode_step, flax.nnx" in text


def test_bench_rejects_unknown_names_and_empty_selections(capsys):
  for args, message in (
    (["--variants", "sparse"], "--variants: unknown ['sparse']"),
    (["--modes", "jvp,hvp"], "--modes: unknown ['hvp']"),
    (["--variants", "decode", "--impls", "jax.nn"], "no case of the set matches"),
  ):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_torch_case_times_the_attention_jattn_computes(monkeypatch):
  pytest.importorskip("torch")
  import torch.nn.functional as F

  sdpa, calls = F.scaled_dot_product_attention, []

  def recording(q, k, v, *args, **kwargs):
    out = sdpa(q, k, v, *args, **kwargs)
    call = {"qkv": (q, k, v), "out": out}
    if out.requires_grad:
      out.register_hook(lambda g: call.update(g=g))
    calls.append(call)
    return out

  monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
  B, T, N, H = shape = (2, 16, 3, 8)

  def as_jax(t):  # torch's (B, N, T, H) -> jattn's (B, T, N, H)
    return t.detach().numpy().transpose(0, 2, 1, 3)

  for mode in ("fwd", "fwd+bwd"):
    calls.clear()
    record = _bench.worker("torch-sdpa", shape, mode, 2)
    assert record["median_ms"] > 0 and len(record["times_ms"]) == 2
    assert len(calls) == 3  # the warm-up and two timed calls
    q, k, v = calls[-1]["qkv"]
    assert q.shape == k.shape == v.shape == (B, N, T, H)  # the same work as jattn's (B, T, N, H)
    q_, k_, v_ = (as_jax(t) for t in (q, k, v))
    out, vjp = jax.vjp(jattn.dot_product_attention, q_, k_, v_)
    np.testing.assert_allclose(as_jax(calls[-1]["out"]), out, atol=1e-5)
    if mode == "fwd":
      assert not calls[-1]["out"].requires_grad  # no autograd graph is built or timed
    else:  # one backward per timed call, of the same attention
      assert "g" in calls[-1], "the timed fwd+bwd call ran no backward pass"
      grads = vjp(as_jax(calls[-1]["g"]))
      for t, grad in zip((q, k, v), grads, strict=True):
        np.testing.assert_allclose(as_jax(t.grad), grad, atol=1e-5)
  # `jattn bench` runs it in its own process, as every case
  result = _bench.run_case("torch-sdpa", (1, 64, 2, 8), "fwd+bwd", 1, 120, 20.0)
  assert "skipped" not in result and result["median_ms"] > 0, result


@pytest.mark.slow
def test_train_reaches_the_accuracy_with_defaults_and_saves_the_map(tmp_path):
  out = tmp_path / "map.png"
  result = run("train", "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"))
  assert result.returncode == 0, result.stderr
  accuracy = float(re.search(r"held-out accuracy: ([\d.]+)", result.stdout).group(1))
  assert accuracy >= 0.99
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "step/s" in result.stderr and "acc=" in result.stderr  # the progress bar
  assert sorted(p.name for p in (tmp_path / "ck").iterdir())[-1] == "step_00000500.msgpack"


@pytest.mark.parametrize(
  ("flag", "value", "expected"),
  [
    ("--learning-rate", "nan", "a positive finite number"),
    ("--learning-rate", "inf", "a positive finite number"),
    ("--learning-rate", "0", "a positive finite number"),
    ("--learning-rate", "-1", "a positive finite number"),
    ("--learning-rate", "fast", "a positive finite number"),
    ("--steps", "0", "a positive integer"),
    ("--steps", "1.5", "a positive integer"),
    ("--batch-size", "-1", "a positive integer"),
    ("--checkpoint-every", "0", "a positive integer"),
    ("--seed", "-1", "a non-negative integer below 2**63"),
  ],
)
def test_train_bad_numbers_are_refused_by_the_parser_naming_the_flag(capsys, flag, value, expected):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--no-plot", flag, value])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"jattn train: error: argument {flag}: must be {expected}, got {value!r}" in err


def test_train_resume_needs_a_directory(capsys):
  assert cli.main(["train", "--no-plot", "--resume"]) == 2
  assert "--resume needs --checkpoint-dir" in one_line_error(capsys, "train")


def test_train_stops_on_divergence_and_refuses_to_mix_runs(tmp_path, capsys):
  args = ["train", "--no-plot", "--steps", "4", "--batch-size", "8", "--checkpoint-every", "1"]
  args += ["--checkpoint-dir", str(tmp_path)]
  assert cli.main([*args, "--learning-rate", "1e30"]) == 2
  line = one_line_error(capsys, "train")
  assert re.search(r"the loss is nan at step 2: .* the last checkpoint is step 1\.$", line)
  assert checkpoint.steps(tmp_path) == [1]  # nothing saved from the diverged step on
  assert cli.main(args) == 2  # a fresh run into that directory
  line = one_line_error(capsys, "train", tmp_path)
  assert "already holds checkpoints (up to step 1): add --resume" in line
  assert cli.main([*args, "--resume", "--learning-rate", "1e-3"]) == 2  # another run's
  assert re.search(
    r"from another run: learning_rate 1e\+30 saved, 0.001 here", one_line_error(capsys, "train")
  )
  same = [*args, "--resume", "--learning-rate", "1e30"]
  for flag, value, field in [
    ("--task", "reverse", "task 'recall' saved, 'reverse' here"),
    ("--seed", "5", "seed 0 saved, 5 here"),
    ("--batch-size", "16", "batch_size 8 saved, 16 here"),
    ("--steps", "9", "steps 4 saved, 9 here"),
  ]:
    assert cli.main([*same, flag, value]) == 2
    assert f"from another run: {field}" in one_line_error(capsys, "train")


SLOW_TRAIN = """
import sys, time
from jattn import cli, training
batches = training.batches
def slow(*args):  # 50 ms a step, so the test can interrupt it mid-run
  for batch in batches(*args):
    time.sleep(0.05)
    yield batch
training.batches = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_during_train_prints_one_line_exits_130_and_resume_finishes(tmp_path, capsys):
  args = ["train", "--no-plot", "--steps", "60", "--batch-size", "8", "--checkpoint-every", "5"]
  args += ["--checkpoint-dir", str(tmp_path)]
  proc = subprocess.Popen(
    [sys.executable, "-c", SLOW_TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
  )
  deadline = time.monotonic() + 120
  while not checkpoint.steps(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  err = err.decode()
  assert proc.returncode == 130, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  [line] = [line for line in err.splitlines() if "interrupted" in line]
  match = re.fullmatch(
    r"jattn train: interrupted at step (\d+); the latest checkpoint is step (\d+): "
    r"resume with --resume",
    line,
  )
  assert match and int(match[2]) == checkpoint.steps(tmp_path)[-1] <= int(match[1]) < 60
  assert cli.main([*args, "--resume"]) == 0
  assert "held-out accuracy" in capsys.readouterr().out
  assert checkpoint.steps(tmp_path)[-1] == 60


def test_train_unknown_task_and_corrupt_checkpoint(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--task", "sort"])
  assert exit_info.value.code == 2
  assert "argument --task: invalid choice: 'sort'" in capsys.readouterr().err
  (tmp_path / "step_00000001.msgpack").write_bytes(b"junk")
  (tmp_path / "step_00000001.json").write_text('{"step": 1, "bytes": 4, "sha256": "0"}')
  code = cli.main(["train", "--no-plot", "--checkpoint-dir", str(tmp_path), "--resume"])
  assert code == 2
  assert "corrupt" in capsys.readouterr().err
