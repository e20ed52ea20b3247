"""Executes every notebook in notebooks/ (at small sizes), so a notebook that breaks fails CI.

Each notebook reads JATTN_NOTEBOOK_SMALL in its first cell and shrinks its sizes. The kernel is
the interpreter running pytest (a kernelspec written to a temporary folder points at
``sys.executable``), so the notebooks see exactly the environment under test, whatever other
``python3`` kernels are installed. nbclient, nbformat and ipykernel are in the ``test`` extra.
"""

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "jattn-test-python"


def test_the_notebooks_are_there():
  expected = {
    "01_illustrated_self_attention",
    "02_jit_vmap_grad",
    "03_training_with_optax",
    "04_long_sequences",
    "05_attention_variants",
  }
  assert expected <= {path.stem for path in NOTEBOOKS.glob("*.ipynb")}


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
  """A kernelspec manager that only knows a kernel running ``sys.executable``."""
  folder = tmp_path_factory.mktemp("kernels")
  spec = folder / KERNEL
  spec.mkdir()
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  kernel = {"argv": argv, "display_name": "jattn tests", "language": "python"}
  (spec / "kernel.json").write_text(json.dumps(kernel))
  return KernelSpecManager(kernel_dirs=[str(folder)], ensure_native_kernel=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_specs):
  nb = nbformat.read(path, as_version=4)  # an in-memory copy: the file is never written
  env = {
    **os.environ,
    "JATTN_NOTEBOOK_SMALL": "1",
    "MPLBACKEND": "Agg",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences the debugger's frozen-modules note
  }
  km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  client = nbclient.NotebookClient(
    nb, km=km, timeout=120, record_timing=False, shutdown_kernel="immediate"
  )
  # A failing cell raises CellExecutionError with the cell's source and traceback;
  # cleanup_kc: stop the kernel afterwards, passed or failed (we own its manager).
  client.execute(cleanup_kc=True, cwd=str(NOTEBOOKS), env=env)
  errors = [
    output
    for cell in nb.cells
    if cell.cell_type == "code"
    for output in cell.outputs
    if output.output_type == "error"
  ]
  assert not errors, errors
