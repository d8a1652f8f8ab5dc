"""Executes experiments/notebooks/quickstart.ipynb; any cell error fails.

The notebook is stored with its outputs, made by the same code:

  python tests/notebook_test.py     # re-executes and rewrites the notebook
"""

import os
import sys

import nbformat
from nbclient import NotebookClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")
TIMEOUT_S = 600   # per cell; the whole notebook takes 1-2 min on 2 CPUs


def _kernel_env():
  """This process's environment, less the tests' fake devices.

  The notebook then runs as a user runs it, on the default CPU device.
  """
  env = dict(os.environ)
  flags = env.pop("XLA_FLAGS", "").split()
  flags = [f for f in flags
           if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def execute(path=NOTEBOOK):
  """Runs every cell of the notebook at `path` in a fresh kernel.

  The kernel is this interpreter (ipykernel's native "python3" kernel, found
  with no kernel directories, so no other installed "python3" kernel can take
  its place), started in the notebook's folder.

  Returns:
    The executed notebook (`nbformat.NotebookNode`).

  Raises:
    nbclient.exceptions.CellExecutionError: a cell raised; the message holds
      the cell's source and traceback.
  """
  nb = nbformat.read(path, as_version=4)
  km = KernelManager(kernel_name="python3",
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  client = NotebookClient(
      nb, km=km, timeout=TIMEOUT_S, record_timing=False,
      resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute(env=_kernel_env())
  return nb


def _outputs(nb, output_type):
  return [o for cell in nb.cells if cell.cell_type == "code"
          for o in cell.outputs if o.output_type == output_type]


def test_stored_notebook_has_outputs_and_no_errors():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code_cells), (
      "The stored notebook was not executed; run python tests/notebook_test.py")
  assert not _outputs(nb, "error")
  figures = [o for o in _outputs(nb, "display_data")
             if "image/png" in o.get("data", {})]
  assert len(figures) >= 3


def test_notebook_runs_without_errors():
  nb = execute()
  assert not _outputs(nb, "error")
  assert any("image/png" in o.get("data", {})
             for o in _outputs(nb, "display_data"))


if __name__ == "__main__":
  executed = execute()
  nbformat.write(executed, NOTEBOOK)
  print(f"Wrote {NOTEBOOK} ({os.path.getsize(NOTEBOOK):,} bytes).",
        file=sys.stderr)
