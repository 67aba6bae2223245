"""notebooks/quickstart.ipynb executes top to bottom (nbclient, a real Jupyter kernel).

The default run sets RAT_JAX_QUICK=1: the same cells with a tiny random network and a few steps;
the `slow` variant runs the notebook as a Colab user would (EfficientNet-Lite0, real weights).
"""
import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _execute(tmp_path, quick: bool, timeout: int):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"RAT_JAX_QUICK": "1" if quick else "0", "RAT_JAX_NOTEBOOK_DIR": str(tmp_path / "work")}
    # The kernel inherits os.environ; set the notebook's knobs for its lifetime only.
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # kernel "python3" is ipykernel's built-in spec: `sys.executable -m ipykernel_launcher`
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise AssertionError(f"cell failed: {out.get('ename')}: {out.get('evalue')}")
            text.append(out.get("text", "") or json.dumps(out.get("data", {}).get("text/plain", "")))
            text.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(text)


def _check(nb, tmp_path):
    out = _outputs(nb)
    # the table was displayed with every row, and the plots were shown as PNGs
    for row in ("ERM (best member)", "Ratatouille | Uniform", "Ratatouille | Greedy",
                "Ensemble of Ratatouille members"):
        assert row in out, f"missing table row {row!r}"
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 4, f"expected the 4 diagnostic figures, got {len(pngs)}"
    assert "round trip max |logit diff|:" in out
    diff = float(out.split("round trip max |logit diff|:")[1].split()[0])
    assert diff <= 1e-5
    work = tmp_path / "work"
    assert sorted(p.name for p in (work / "plots").glob("*.png")) == sorted(
        f"members_{n}.png" for n in ("diversity", "idval_vs_ood", "interpolation",
                                     "soup_vs_members"))
    assert (work / "soup.safetensors").exists() and (work / "soup_flax").is_dir()


def test_quickstart_notebook_quick(tmp_path):
    nb = _execute(tmp_path, quick=True, timeout=600)
    _check(nb, tmp_path)


@pytest.mark.slow
def test_quickstart_notebook_full(tmp_path):
    nb = _execute(tmp_path, quick=False, timeout=1800)
    _check(nb, tmp_path)


def _install_cell() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    return "".join(nb["cells"][1]["source"])


@pytest.mark.parametrize("kind, extra", [("cpu", ""), ("gpu", "[cuda12]"), ("tpu", "[tpu]")])
def test_install_cell_installs_from_the_users_source_with_the_runtimes_extra(
        monkeypatch, tmp_path, kind, extra):
    """The first cell as on a fresh Colab runtime (rat_jax not importable): pip installs the
    folder the user set, with the runtime's extra and never the test extras."""
    import importlib.util
    import subprocess
    calls = []
    code = _install_cell().replace("import rat_jax\n", "rat_jax = None\n").replace(
        'print("runtime:", RUNTIME, "| rat_jax from", os.path.dirname(rat_jax.__file__))', "")
    code = code.replace('RAT_JAX_SOURCE = ""', f'RAT_JAX_SOURCE = {str(tmp_path)!r}')
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    namespace = {}
    exec(compile(code.replace("RUNTIME = runtime_kind()", f"RUNTIME = {kind!r}"), "cell1",
                 "exec"), namespace)
    assert calls == [[__import__("sys").executable, "-m", "pip", "install", "-q",
                      str(tmp_path) + extra]]


def test_install_cell_says_what_to_set_when_there_is_no_source(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("RAT_JAX_SOURCE", raising=False)
    with pytest.raises(FileNotFoundError, match="set RAT_JAX_SOURCE"):
        exec(compile(_install_cell(), "cell1", "exec"), {})
