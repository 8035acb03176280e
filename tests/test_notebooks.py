"""The notebooks in colabs/ run top to bottom (with their FAST settings) without an error.

Each notebook is executed in a fresh python3 kernel with colabs/ as the working directory, as a
user would run it. About two minutes for all three on a 2-core CPU, mostly XLA compilation.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "speculative_anatomy.ipynb", "train_your_drafter.ipynb")
CELL_TIMEOUT_S = 300


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLABS / name, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_clean(name):
  """Valid nbformat 4, no stored outputs, and the FAST settings on (what the test below runs)."""
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), \
      f"{name} is saved with outputs: clear them before committing"
  assert any("FAST = True" in c.source for c in code), f"{name} must ship with FAST = True"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  # the kernel runs as a user's would, with XLA's optimizations (conftest turns them off for
  # the suite; the notebooks train, where they pay: train_your_drafter 79 -> 66 s)
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  nb = _read(name)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(COLABS)}})
  client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
