import json

from rat_jax import report


def test_table_mean_standard_error_over_trials_and_files(tmp_path):
    rows = [report.make_row("Ratatouille", "Uniform", "digits", e, t, acc, 6)
            for e, t, acc in [(0, 0, 0.5), (0, 1, 0.7), (1, 0, 0.9), (1, 1, 0.9)]]
    rows.append(report.make_row("ERM (vanilla fine-tuning)", "ID val", "digits", 0, 0, 0.4, 1))
    md = report.write(tmp_path, rows)
    lines = md.splitlines()
    assert lines[0].startswith("| Algorithm | Selection | digits env 0 | digits env 1 | Avg")
    erm = next(l for l in lines if l.startswith("| ERM"))
    rat = next(l for l in lines if l.startswith("| Ratatouille |"))
    # ± is DomainBed's standard error: population std / √n (here 10 / √2), said under the table
    assert "| 60.0 ± 7.1 | 90.0 ± 0.0 | 75.0 |" in rat
    assert report.PLUS_MINUS in lines and "standard error" in report.PLUS_MINUS
    assert "| 40.0 | — | — |" in erm   # missing env -> no average
    assert lines.index(erm) < lines.index(rat)  # MR README order
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plus_minus"] == report.PLUS_MINUS
    assert len(saved["rows"]) == 5 and set(report.ROW_KEYS) <= set(saved["rows"][0])
    assert report.read_rows(tmp_path / "results.json") == saved["rows"]
    assert (tmp_path / "results.md").read_text() == md
