"""Protocol defaults (issue 17, item 7): trials of the configs, what the table's ± is, and the
auxiliary-run order that docs/protocol.md §1.3 states."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from rat_jax import report
from rat_jax.data import SPECS
from rat_jax.data.protocol import aux_init_assignment

REPO = pathlib.Path(__file__).resolve().parents[1]
DOMAINBED = ("pacs", "vlcs", "officehome", "terraincognita", "domainnet")


def config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg), module


@pytest.mark.parametrize("name", DOMAINBED)
def test_domainbed_configs_run_three_trials_cpu_one_smoke_two(name):
    assert tuple(config(name)[0].trials) == (0, 1, 2)     # sweep.py's --n_trials 3: † rows
    assert tuple(config(name, "cpu")[0].trials) == (0,)   # CPU-sized
    assert tuple(config(name, "smoke")[0].trials) == (0, 1)


def test_base_and_demo_trials_unchanged():
    demo, module = config("demo")
    assert tuple(module.common.base().trials) == (0,)
    assert tuple(demo.trials) == (0, 1) and tuple(config("demo", "smoke")[0].trials) == (0, 1)


def test_plus_minus_is_domainbed_standard_error():
    accs = [0.61, 0.58, 0.66]
    # DomainBed's collect_results.format_mean: 100 * np.std(list(data) / np.sqrt(len(data)))
    domainbed = 100 * np.std(np.asarray(accs) / np.sqrt(len(accs)))
    pct = [100 * a for a in accs]
    assert report.standard_error(pct) == pytest.approx(domainbed, rel=1e-12)
    assert report.standard_error(pct) == pytest.approx(np.std(pct, ddof=0) / np.sqrt(3))
    rows = [report.make_row("Ratatouille", "Uniform", "PACS", 0, t, a, 20)
            for t, a in enumerate(accs)]
    rows.append(report.make_row("Ratatouille†", "Uniform†", "PACS", 0, -1, 0.7, 60))
    md = report.table(rows)
    assert f"| {np.mean(pct):.1f} ± {domainbed:.1f} |" in md
    assert "| 70.0 | 70.0 |" in md                       # a single value: no ±
    assert md.splitlines()[-1] == report.PLUS_MINUS


def test_results_json_says_what_plus_minus_is_and_other_files_are_refused(tmp_path):
    rows = [report.make_row("Fusing", "ID val", "digits", 0, t, 0.5, 1) for t in (0, 1)]
    md = report.write(tmp_path / "new", rows, notes="notes")
    saved = json.loads((tmp_path / "new" / "results.json").read_text())
    assert saved == {"plus_minus": report.PLUS_MINUS, "rows": rows}
    assert report.PLUS_MINUS in md.splitlines() and md.rstrip().endswith("notes")
    assert report.read_rows(tmp_path / "new" / "results.json") == rows
    (tmp_path / "list.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"list\.json is not a rat_jax results\.json.*rerun"):
        report.read_rows(tmp_path / "list.json")


def test_aux_run_order_is_names_sorted_then_hparams_index():
    """docs/protocol.md §1.3: datasets in sorted-name order (no name-prefix exclusion), run index
    h % n_runs = the auxiliary run trained with hparams seed h % n_runs (aux_pool's order)."""
    names = sorted(set(SPECS) - {"PACS"})
    assert names == ["DomainNet", "OfficeHome", "TerraIncognita", "VLCS"]
    for h in range(20):
        i = h % (len(names) + 1)
        expected = "imagenet" if i == 0 else (names[i - 1], h % 4)
        assert aux_init_assignment(h, list(reversed(names)), 4) == expected
    # the target's name is not filtered out when no target is given: the identity guard is
    # what refuses a target dataset in the pool (stages.leakage_guard)
    assert aux_init_assignment(1, ["PACS", "VLCS"], 4) == ("PACS", 1)
    assert aux_init_assignment(1, ["PACS", "VLCS"], 4, target="PACS") == ("VLCS", 1)
