"""The whole table from one command: `python -m rat_jax.main --config=configs/paper.py:smoke`
(three embedded targets, each with the two others as auxiliary tasks), its --plan, rat_jax.status,
a rerun and a kill -9 mid-sweep."""
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from rat_jax import report, sweep
from rat_jax import runs as run_model

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/configs/paper.py:smoke"
TARGETS = ["digits", "textures", "glyphs"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "rat_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
            *extra]


def _run(workdir, *extra):
    res = subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True, env=ENV,
                         timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _status(workdir):
    """rat_jax.status --json in a process that must not import JAX."""
    code = ("import sys, runpy; sys.argv = ['status'] + sys.argv[1:]; "
            "from rat_jax import status; rc = status.main(sys.argv[1:]); "
            "assert 'jax' not in sys.modules, 'rat_jax.status imported jax'")
    res = subprocess.run([sys.executable, "-c", code, "--workdir", str(workdir), "--config",
                          CONFIG, "--json"], capture_output=True, text=True, env=ENV,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _tables(stdout):
    return [l for l in stdout.splitlines() if l.startswith("|")]


def _trained(workdir):
    """Every (run, members) trained by any invocation, from trained_runs.jsonl."""
    lines = (workdir / "trained_runs.jsonl").read_text().splitlines()
    return [tuple(r) for line in lines for r in json.loads(line)["trained"]]


PARALLEL = ("--config.engine.cpu_devices=4", "--config.engine.schedule=parallel")
ONE_DEVICE = ("--config.engine.cpu_devices=1",)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One uninterrupted smoke sweep, its runs scheduled side by side over 4 emulated CPU
    devices: (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("sweep")
    return workdir, _run(workdir, *PARALLEL)


def test_sweep_table_and_each_shared_run_trained_once(swept):
    workdir, out = swept
    data = json.loads((workdir / "results.json").read_text())
    assert data["datasets"] == TARGETS and data["pending"] == []
    expected = {(m, s) for m, s, _ in report.ROW_ORDER}
    for t in TARGETS:  # every target's own table, per env, in its folder
        rows = report.read_rows(workdir / "targets" / t / "results.json")
        assert {(r["method"], r["selection"]) for r in rows} == expected
        assert all(math.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1 for r in rows)
        assert (workdir / "targets" / t / "results.md").read_text().startswith("| Algorithm")
    cells = {(c["method"], c["selection"], c["dataset"]): c for c in data["cells"]}
    assert set(cells) == {(m, s, t) for m, s in expected for t in TARGETS}
    assert all(math.isfinite(c["mean"]) for c in cells.values())
    # the combined table: one column per target + Avg, every row filled
    md = (workdir / "results.md").read_text()
    head, rows = md.splitlines()[0], [l for l in md.splitlines()[2:] if l.startswith("|")]
    assert head == "| Algorithm | Selection | digits | textures | glyphs | Avg | Test protocol |"
    assert len(rows) == len(expected) and not any("—" in r for r in rows)
    # a dataset's value is its target's Avg
    digits_rows = report.read_rows(workdir / "targets" / "digits" / "results.json")
    erm = [100 * r["accuracy"] for r in digits_rows if r["selection"] == "ID val"
           and r["method"].startswith("ERM")]
    assert math.isclose(cells[("ERM (vanilla fine-tuning)", "ID val", "digits")]["mean"],
                        sum(erm) / len(erm))
    assert "# The whole table: 3 targets" in out
    # each auxiliary pool and auxiliary linear probe trained exactly once, at the sweep's root
    trained = _trained(workdir)
    names = [n for n, _ in trained]
    for t in TARGETS:
        assert names.count(f"aux/{t}_notest") == 1 and names.count(f"lp/{t}_notest") == 1
        assert (workdir / "aux" / f"{t}_notest" / "manifest.json").exists()
        assert not (workdir / "targets" / t / "aux").exists()
        assert not any((workdir / "targets" / t / "lp").glob("*_notest"))
    assert len(names) == len(set(names)) == 15
    assert not list(workdir.rglob("checkpoints"))


def _runs_at_best(records):
    """{hparams seed: (best mean train-env out acc, test-env in acc at its first best record)}."""
    out = {}
    for r in records:
        k = r["args"]["test_envs"][0]
        val = sum(v for key, v in r.items() if key.endswith("_out_acc")
                  and key != f"env{k}_out_acc") / (sum(key.endswith("_out_acc") for key in r) - 1)
        h = r["args"]["hparams_seed"]
        if h not in out or val > out[h][0]:
            out[h] = (val, r[f"env{k}_in_acc"])
    return out


def test_records_folder_reads_with_domainbeds_selection(swept, tmp_path):
    """`python -m rat_jax.records` on the sweep -> DIR/<run>/results.jsonl; DomainBed's reader
    (tests/domainbed_reader.py: load_records, IIDAccuracySelectionMethod, collect_results'
    tables) prints every target's table with ERM, Ratatouille (aux-init and foundation-init
    members) and Fusing rows, and it selects the run rat_jax's ERM and Fusing rows selected (on
    tied ID-val scores, any of the tied runs: DomainBed's pick then depends on os.listdir)."""
    import domainbed_reader as db
    workdir, _ = swept
    out = tmp_path / "records"
    res = subprocess.run([sys.executable, "-m", "rat_jax.records", "--workdir", str(workdir),
                          "--out", str(out)], capture_output=True, text=True, env=ENV,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stdout and "collect_results --input_dir" in res.stdout
    folders = list(out.iterdir())
    assert all((f / "results.jsonl").is_symlink() for f in folders if f.name.endswith("_ERM"))
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != "results.jsonl"]
    text, grouped = db.results_tables(db.load_records(out), db.IIDAccuracySelectionMethod)
    print(text)
    for t in TARGETS:
        assert f"Dataset: {t}, model selection method: training-domain validation" in text
    rows = [l.split(" | ") for l in text.splitlines() if l.startswith(("ERM", "Ratatouille",
                                                                        "Fusing"))]
    assert len(rows) == 3 * 3 and all("+/-" in r[1] for r in rows)  # env 0, the smoke test env
    groups = {(g["trial_seed"], g["dataset"], g["algorithm"], g["test_env"]): g for g in grouped}
    assert len(groups) == 3 * 3 * 2                  # targets x labels x trials (test env 0)
    label = {"ERM (vanilla fine-tuning)": "ERM", "Inter-training": "Ratatouille",
             "Fusing": "Fusing"}
    for t in TARGETS:
        for r in report.read_rows(workdir / "targets" / t / "results.json"):
            if r["selection"] != "ID val":
                continue
            g = groups[(r["trial"], t, label[r["method"]], r["test_env"])]
            runs = _runs_at_best(g["records"])
            best = max(v for v, _ in runs.values())
            tied = {h: acc for h, (v, acc) in runs.items() if v == best}
            assert g["sweep_acc"] in tied.values()
            if label[r["method"]] != "Ratatouille":   # member index = hparams seed
                assert r["member"] in tied, (r, runs)
                # the record's test-env accuracy at that member's best step is our cell
                assert math.isclose(tied[r["member"]], r["accuracy"]), (r, runs)
            else:                                     # foundation-init + aux-init members
                assert len(runs) == 3


def test_plan_counts_match_what_the_sweep_trained(swept, tmp_path):
    workdir, _ = swept
    out = _run(tmp_path, "--plan")
    assert not (tmp_path / "targets").exists() and not list(tmp_path.iterdir())  # nothing trained
    assert "ESTIMATE" in out and "member-steps/s" in out and "Memory (XLA memory analysis" in out
    assert "Host memory of the worst run (target/digits_test0_trial" in out
    planned = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in sweep.STAGES:
            planned[(cells[0], cells[1])] = int(cells[3].replace(",", ""))
    trained = {}
    stage = lambda n: ("auxiliary pools" if "aux/" in n else "linear probes" if "lp/" in n
                       else "target runs")
    for name, members in _trained(workdir):
        dataset = next(t for t in TARGETS if t in name.rsplit("/", 1)[-1])
        key = (stage(name), dataset)
        trained[key] = trained.get(key, 0) + members
    assert planned == trained
    total = re.search(r"\| \*\*total\*\* \| all \| (\d+) \| ([\d,]+) \|", out)
    assert int(total.group(1)) == 15 and int(total.group(2).replace(",", "")) == 60


def test_rerun_trains_nothing_and_prints_the_same_tables(swept):
    workdir, out1 = swept
    before = len((workdir / "trained_runs.jsonl").read_text().splitlines())
    out2 = _run(workdir)
    lines = (workdir / "trained_runs.jsonl").read_text().splitlines()[before:]
    assert len(lines) == 3 and all(json.loads(l)["trained"] == [] for l in lines)
    assert "Member runs trained by this invocation: 0 in 0 runs." in out2
    # the same tables (a parallel schedule prints each target's as it finishes: any order)
    assert sorted(_tables(out2)) == sorted(_tables(out1))
    assert _tables(out2)[-12:] == _tables(out1)[-12:]      # the combined table, printed last
    st = _status(workdir)
    assert {r["state"] for r in st["runs"]} == {"done"} and st["member_steps_left"] == 0
    assert set(st["tables"].values()) == {"done"} and st["rate"]["member_steps_per_s"] > 0


def test_killed_one_device_sweep_resumes_to_the_parallel_sweeps_results(swept, tmp_path):
    """The sweep run one job at a time on one device, killed (-9) once its first target is done
    and rerun, ends with the numbers of the uninterrupted 4-device parallel sweep: every target's
    rows and the combined cells bit for bit, and nothing that had finished is trained again."""
    ref_dir, ref_out = swept
    st = _status(tmp_path)  # before anything ran: every run pending
    assert {r["state"] for r in st["runs"]} == {"pending"} and len(st["runs"]) == 15
    assert st["member_steps_left"] == 234 and set(st["tables"].values()) == {"pending"}
    proc = subprocess.Popen(_cmd(tmp_path, *ONE_DEVICE), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    first = tmp_path / "targets" / "digits" / "results.json"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first target did not finish"
    st = _status(tmp_path)
    states = {r["name"] if "notest" in r["name"] else r["path"]: r["state"] for r in st["runs"]}
    assert st["tables"]["digits"] == "done" and st["tables"]["glyphs"] == "pending"
    for name in ("lp/glyphs_notest", "aux/glyphs_notest", "lp/textures_notest",
                 "aux/textures_notest"):
        assert states[name] == "done"
    digits = [r for r in st["runs"] if "/targets/digits/" in r["path"]]
    assert digits and all(r["state"] == "done" for r in digits)
    glyph_runs = [r for r in st["runs"] if "/targets/glyphs/" in r["path"]]
    assert all(r["state"] in ("pending", "partial") for r in glyph_runs)
    assert 0 < st["member_steps_left"] < 234 and st["seconds_left"] is not None
    partial = json.loads((tmp_path / "results.json").read_text())
    assert "glyphs" in partial["pending"] and "digits" not in partial["pending"]

    out = _run(tmp_path, *ONE_DEVICE)  # the same command resumes; finished work is loaded
    assert _tables(out)[-12:] == _tables(ref_out)[-12:]  # the combined table
    for t in TARGETS:
        got = report.read_rows(tmp_path / "targets" / t / "results.json")
        assert got == report.read_rows(ref_dir / "targets" / t / "results.json"), t
    cells = lambda d: json.loads((d / "results.json").read_text())["cells"]
    assert cells(tmp_path) == cells(ref_dir)
    names = [n for n, _ in _trained(tmp_path)]
    assert len(names) == len(set(names)) == 15  # nothing finished was trained twice
    st = _status(tmp_path)
    assert {r["state"] for r in st["runs"]} == {"done"}
    assert set(st["tables"].values()) == {"done"}


def test_status_text_lists_stages_and_the_partial_table(tmp_path):
    from rat_jax import status
    text = status.format_status(status.status(tmp_path, CONFIG))
    assert "| auxiliary pools | glyphs | aux/glyphs_notest | pending |" in text
    assert "| digits | textures | glyphs | Avg |" in text and "—" in text


def test_full_paper_config_runs_are_counted_from_specs_without_data(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("paper", REPO / "configs" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert tuple(c.sweep.targets) == ("PACS", "VLCS", "OfficeHome", "TerraIncognita",
                                      "DomainNet")
    t = run_model.target_config(c, "PACS")
    assert t.target.name == "PACS" and sorted(t.aux) == ["DomainNet", "OfficeHome",
                                                          "TerraIncognita", "VLCS"]
    assert t.trials == (0, 1, 2) and t.n_hparams == 20 and t.arch == "resnet50"
    runs = run_model.planned_runs(c, tmp_path)
    shared = [r for r in runs if r.stage == "auxiliary pools"]
    assert len(shared) == 5 and {r.members for r in shared} == {4}
    targets = [r for r in runs if r.stage == "target runs"]
    # 20 no-aux + 16 aux-init + 20 fusing members per (test env, trial); 22 test envs x 3 trials
    assert {r.members for r in targets} == {56} and len(targets) == 3 * (4 * 4 + 6)
    assert len([r for r in runs if r.stage == "linear probes"]) == 5 + 22


def test_host_memory_counts_the_worst_run_and_refuses_what_the_ram_cannot_hold(monkeypatch):
    from rat_jax.stages import TrainSettings
    info = run_model.DatasetInfo("d", (100, 100, 100), 5, True, decoded_bytes=3e6)
    run = lambda name, members, per_step, lp=False: run_model.PlannedRun(
        "target runs", "d", name, pathlib.Path(name), members, 10, 5, per_step, 40.0, lp, 5)
    runs = [run("lp/a", 1, 64, lp=True), run("target/small", 8, 16), run("target/big", 4, 64)]
    settings = TrainSettings(arch="resnet_tiny", image_size=16, augment_on="host")
    device = {"platform": "cpu", "bytes_needed": 10 * 2**20}
    host = sweep.host_memory(settings, runs, {"d": info}, device)
    # the worst run holds the most images in flight (4 x 64 > 8 x 16); float32 host batches
    assert host["run"] == "target/big" and host["augment_on"] == "host"
    # in flight: the loader's prefetch (2), the device feed's (1), the step's and the one before
    assert host["parts"]["loader"] == 5 * 4 * 64 * 16 * 16 * 3 * 4
    assert host["parts"]["devices"] == device["bytes_needed"]  # CPU devices are host memory
    assert host["page_cache_bytes"] == 3e6 and host["fits"]
    assert host["bytes_needed"] == sum(host["parts"].values())
    # on an accelerator the devices' memory is not the host's, and crops ship as uint8
    gpu = sweep.host_memory(settings.replace(augment_on="auto"), runs, {"d": info},
                            {"platform": "gpu", "bytes_needed": 10 * 2**20})
    assert gpu["parts"]["devices"] == 0 and gpu["augment_on"] == "device"
    assert gpu["parts"]["loader"] < host["parts"]["loader"]
    # a machine too small: refused, naming the run and the change for its largest part
    monkeypatch.setattr(sweep.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 1000)
    small = sweep.host_memory(settings, runs, {"d": info}, device)
    assert not small["fits"]
    with pytest.raises(SystemExit, match=r"target/big needs .* of host memory .*Change: a machine"):
        sweep.check_host_memory(small)
    sweep.check_host_memory(host)  # fits: no error
