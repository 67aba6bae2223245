"""Kill -9 a members run after its first checkpoint, or stop it with SIGTERM (a preemption), and
rerun the same command: it resumes and ends with the same bits as an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent

SCRIPT = r'''
import sys, time
import jax
import numpy as np
from rat_jax.engine import (EngineConfig, LoopConfig, RunOutput, make_hparams,
                            train_members)
from members_helpers import ListLoader, StandInNet, member_inits, synthetic_batches
from rat_jax.data import FeedOptions, MemberLoader, StreamSpec, load_folder


class SlowLoader(ListLoader):
    def __init__(self, batches, sleep):
        super().__init__(batches)
        self.sleep = sleep

    def __next__(self):
        time.sleep(self.sleep)  # leave time to kill the run between checkpoints
        return super().__next__()


class SlowMemberLoader(MemberLoader):
    def __init__(self, *args, sleep=0.0, **kw):
        super().__init__(*args, **kw)
        self.sleep = sleep

    def __next__(self):
        time.sleep(self.sleep)
        return super().__next__()


def loader(mode, sleep):
    """Synthetic batches, or the member loader on a small image folder with the augmentation
    done on the host (PIL) or in the compiled step ("device")."""
    if mode == "synthetic":
        return SlowLoader(synthetic_batches(2, 8, 12, seed=1), sleep)
    ds = load_folder(sys.argv[4])
    return SlowMemberLoader(ds, [0, 1], [1, 2],
                            spec=StreamSpec(batch_size=4, image_size=16, augment_on=mode),
                            feed=FeedOptions(workers=1, cache_dir=sys.argv[4] + "_cache"),
                            sleep=sleep)


def run(workdir, sleep=0.0, mode="synthetic", save_every=3):
    model = StandInNet(5)
    params, bs = member_inits(model, 2)
    batches = loader(mode, sleep)
    rng = np.random.RandomState(0)
    ev = {"env0_out": [{"images": rng.randn(6, 16, 16, 3).astype(np.float32),
                        "labels": rng.randint(0, 5, 6)}]}
    hp = make_hparams(2, lr=[1e-2, 2e-2], dropout=[0.5, 0.1], lp_steps=[-1, 3], seed=[1, 2])
    res = train_members(model, params, bs, hp, batches,
                        LoopConfig(12, 4, eval_sets=ev, val_names=["env0_out"],
                                   save_every=save_every),
                        RunOutput(workdir=workdir, quiet=True),
                        EngineConfig(batch_size=8, devices=jax.devices()[:2]))
    flat = {f"final/{i}": x for i, x in enumerate(jax.tree.leaves(res.final_params))}
    flat.update({f"best/{i}": x for i, x in enumerate(jax.tree.leaves(res.best_params))})
    flat["best_step"] = res.best_step
    return flat


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    np.savez(sys.argv[1] + ".npz", **run(sys.argv[1], sleep=float(sys.argv[5]), mode=sys.argv[3],
                                         save_every=int(sys.argv[6])))
    print("DONE", flush=True)
'''


def _cmd(tmp_path, name, mode="synthetic", sleep=0.0, save_every=3):
    """The run as a command; `sleep` (seconds per batch) leaves time to kill it between
    checkpoints: only the run that is killed needs it (it changes no bits). `save_every`: its
    step period (0: checkpoints only at the end, on the clock and on SIGTERM)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    images = tmp_path / "images"
    if mode != "synthetic" and not images.exists():  # 2 envs x 2 classes, assorted sizes
        from PIL import Image
        rng = np.random.default_rng(0)
        for e in ("e0", "e1"):
            for c in ("a", "b"):
                (images / e / c).mkdir(parents=True)
                for i in range(6):
                    w, h = (int(v) for v in rng.integers(14, 40, 2))
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                        images / e / c / f"{i}.png")
    return [sys.executable, str(script), str(tmp_path / name), str(tmp_path / "jax_cache"),
            mode, str(images), str(sleep), str(save_every)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _committed_steps(workdir: pathlib.Path):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _run(cmd):
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_as(tmp_path, name, ref_dir):
    """Run `name` in tmp_path ended with the params and records of the run `ref` in ref_dir."""
    got, ref = np.load(tmp_path / f"{name}.npz"), np.load(ref_dir / "ref.npz")
    assert sorted(got.files) == sorted(ref.files)
    for k in got.files:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    strip = lambda p: [l.split('"step_time"')[0] for l in p.read_text().splitlines()]
    for i in range(2):
        rel = pathlib.Path(f"member_{i}") / "results.jsonl"
        assert strip(ref_dir / "ref" / rel) == strip(tmp_path / name / rel)


@pytest.fixture(scope="module")
def synthetic_ref(tmp_path_factory):
    """The uninterrupted run on synthetic batches: the same command in its own process (same
    device count and thread pools as the interrupted ones, so the same reduction orders)."""
    ref_dir = tmp_path_factory.mktemp("synthetic_ref")
    _run(_cmd(ref_dir, "ref"))
    return ref_dir


@pytest.mark.parametrize("mode", ["synthetic", "device"])
def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, mode, request):
    if mode == "synthetic":
        ref_dir = request.getfixturevalue("synthetic_ref")
    else:
        ref_dir = tmp_path
        _run(_cmd(tmp_path, "ref", mode))
        ref = np.load(tmp_path / "ref.npz")
        # the images of the device mode are those of the host (PIL) mode: same training bits
        _run(_cmd(tmp_path, "host", "host"))
        host = np.load(tmp_path / "host.npz")
        for k in host.files:
            np.testing.assert_array_equal(host[k], ref[k], err_msg=k)

    cmd = _cmd(tmp_path, "killed", mode, sleep=0.25)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not _committed_steps(tmp_path / "killed") and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-3000:])
    killed_at = _committed_steps(tmp_path / "killed")
    assert killed_at and killed_at[-1] < 11

    _run(_cmd(tmp_path, "killed", mode))
    _assert_same_as(tmp_path, "killed", ref_dir)


def test_sigterm_then_rerun_matches_uninterrupted_run(tmp_path, synthetic_ref):
    """SIGTERM (a scheduler's preemption) mid-run, no step period: the run saves the step under
    way, exits with code 143 and a line naming its checkpoint; rerunning the same command
    resumes from it and ends with the bits and records of an uninterrupted run."""
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(tmp_path, "stopped", sleep=0.25, save_every=0), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = workdir / "member_0" / "results.jsonl"  # step 0's record: the run is training
    deadline = time.time() + 300
    while not (records.exists() and records.stat().st_size) and proc.poll() is None:
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped = _committed_steps(workdir)
    assert len(stopped) == 1 and stopped[0] < 11, stopped  # the SIGTERM checkpoint, before the end
    assert (f"SIGTERM: stopped after step {stopped[0]} of 12; its checkpoint of step "
            f"{stopped[0]} is in {workdir / 'checkpoints'}; rerun the same command to resume "
            "from there (exit code 143)") in err, err[-3000:]
    assert not (tmp_path / "stopped.npz").exists()

    _run(_cmd(tmp_path, "stopped", save_every=0))
    _assert_same_as(tmp_path, "stopped", synthetic_ref)
