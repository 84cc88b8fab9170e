"""docs/quickstart.ipynb runs top to bottom (on the built-in synthetic faces) as a reader runs it."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                        for o in cell.get("outputs", []))
    assert "facesiam serve --onnx" in outputs  # fit's summary
    assert "same person" in outputs or "different people" in outputs  # compare
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # ROC, PR, the worst pairs
    assert (tmp_path / "quickstart-run" / "report" / "report.html").is_file()
