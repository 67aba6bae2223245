"""MemberLoader process workers: bit-identical to threads in every mode, resumable, errors
naming the file, no shared memory left behind, and the worker_type="auto" rule. Reused host
buffers of the thread path: bit-identical to fresh arrays, never overwritten while referenced."""
import concurrent.futures.process
import gc
import json
import os

import numpy as np
import pytest
from PIL import Image

from rat_jax.data import ImageDecodeError, load_folder
from rat_jax.data import loader as loader_mod
from rat_jax.data import workers as W

from loader_helpers import member_loader


def _make(root, rng, envs, corrupt=()):
    for e, n in envs:
        for c in ("a", "b"):
            os.makedirs(root / e / c)
            for i in range(n):
                path = root / e / c / f"{i}.png"
                if (e, c) in corrupt:
                    path = root / e / c / f"bad{i}.jpg"
                    path.write_bytes(b"this is not a jpeg")
                    continue
                w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return load_folder(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 envs x 2 classes of small random RGB images (as tests/test_data_loader.py's)."""
    return _make(tmp_path_factory.mktemp("w") / "tiny", np.random.default_rng(0),
                 (("e0", 7), ("e1", 9), ("e2", 5)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _loader(ds, cache, worker_type, **kw):
    args = dict(batch_size=4, image_size=16, cache_dir=cache, workers=2, prefetch=2)
    args.update(kw)
    return member_loader(ds, [0, 2], [11, 22], worker_type=worker_type, **args)


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "augment":
            assert sorted(a[k]) == sorted(b[k])
            for j in a[k]:
                assert a[k][j].dtype == b[k][j].dtype and a[k][j].shape == b[k][j].shape
                np.testing.assert_array_equal(a[k][j], b[k][j])
        elif isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])  # float32: exact, NaN-free
        else:
            assert a[k] == b[k]


MODES = {"host_float32": {}, "host_uint8": {"output": "uint8"},
         "device": {"augment_on": "device"}, "device_canvas16": {"augment_on": "device",
                                                                 "canvas": 16},
         "eval": {"augment": False}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_process_batches_equal_thread_batches(tiny, cache, mode):
    kw = MODES[mode]
    with _loader(tiny, cache, "thread", **kw) as t, _loader(tiny, cache, "process", **kw) as p:
        assert p.worker_type == "process"
        for _ in range(4):  # prefetched: several segments in flight, then reused
            _assert_same(next(t), next(p))
        _assert_same(t.batch(9), p.batch(9))
        # load_only with segment reuse: rows of members not loaded are zero / normalize(0)
        # exactly as a thread batch, also in a segment that held data there before
        t2, p2 = (_loader(tiny, cache, wt, prefetch=0, workers=1 + (wt == "process"), **kw)
                  for wt in ("thread", "process"))
        with t2, p2:
            for members in (None, [1], [0], [1]):
                t2.load_only(members)
                p2.load_only(members)
                _assert_same(t2.batch(5), p2.batch(5))
                _assert_same(t2.batch(6), p2.batch(6))


def test_process_resume_and_set_state_mid_prefetch(tiny, cache):
    with _loader(tiny, cache, "process") as loader:
        for _ in range(3):
            next(loader)
        state = json.loads(json.dumps(loader.get_state()))
        expected = {k: np.copy(v) for k, v in next(loader).items()}
        next(loader)
        loader.set_state(state)  # drops prefetched batches still being written
        _assert_same(next(loader), expected)
    with _loader(tiny, cache, "process", workers=3) as fresh:
        fresh.set_state(state)
        _assert_same(next(fresh), expected)
        assert fresh.get_state()["step"] == 4
    with _loader(tiny, cache, "thread") as thread:
        thread.set_state(state)
        _assert_same(next(thread), expected)


def test_worker_errors_reach_the_parent_naming_the_file(tmp_path):
    ds = _make(tmp_path / "bad", np.random.default_rng(1), (("e0", 4), ("e1", 4)),
               corrupt={("e0", "a")})
    # no cache: the worker processes decode the files themselves
    with member_loader(ds, [0], [1], batch_size=16, image_size=16, cache_dir=None, workers=2,
                      worker_type="process", prefetch=1) as loader:
        with pytest.raises(ImageDecodeError, match=r"cannot read image .*bad\d\.jpg"):
            next(loader)
    # with a cache, it is built here before the workers start: the thread workers' error
    errors = []
    for wt in ("thread", "process"):
        with member_loader(ds, [0], [1], batch_size=16, image_size=16, workers=2,
                          cache_dir=str(tmp_path / wt), worker_type=wt) as loader:
            with pytest.raises(ImageDecodeError, match=r"cannot read image .*bad\d\.jpg") as e:
                loader.batch(0)
            errors.append(e.value)
    assert type(errors[0]) is type(errors[1])


def _shm_exists(name):
    return os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm")
def test_no_shared_memory_left_after_close_or_gc(tiny, cache):
    loader = _loader(tiny, cache, "process", output="uint8")
    held = next(loader)
    copy = np.copy(held["images"])
    next(loader)
    names = loader._batches.procs.segments.names()
    assert names and all(_shm_exists(n) for n in names)
    procs = list(loader._batches.procs._executor._processes.values())
    loader.close()
    assert not any(_shm_exists(n) for n in names)
    assert not any(p.is_alive() for p in procs)
    np.testing.assert_array_equal(held["images"], copy)  # still valid after close
    del held
    gc.collect()
    # garbage collection without close()
    loader = _loader(tiny, cache, "process", augment_on="device")
    next(loader)
    names = loader._batches.procs.segments.names()
    assert names and all(_shm_exists(n) for n in names)
    del loader
    gc.collect()
    assert not any(_shm_exists(n) for n in names)


def test_held_batches_are_never_overwritten(tiny, cache):
    """A batch the consumer still holds keeps its segment: later batches use other ones."""
    with _loader(tiny, cache, "process", prefetch=1, output="uint8") as p, \
            _loader(tiny, cache, "thread", prefetch=0, output="uint8") as t:
        held = [next(p) for _ in range(6)]
        assert len(p._batches.procs.segments.names()) >= 6
        for step, b in enumerate(held):
            _assert_same(b, t.batch(step))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reused_thread_buffers_equal_fresh_arrays(tiny, cache, mode):
    """Batches written into reused host blocks are the bits of fresh arrays, for every mode
    (device canvases: the window of a later step is smaller than an earlier one's somewhere,
    and the rest of the canvas must be zero again)."""
    kw = MODES[mode]
    with _loader(tiny, cache, "thread", **kw) as r, \
            _loader(tiny, cache, "thread", reuse_buffers=False, prefetch=0, **kw) as f:
        for _ in range(8):
            _assert_same(next(r), next(f))  # each batch dropped: its block is reused
        assert len(r._batches._blocks.names()) <= r.prefetch + 2
        _assert_same(r.batch(11), f.batch(11))


def test_reused_block_rewrites_rows_of_members_not_loaded(tiny, cache):
    """One block, used in turn with every member and with only member 1 loaded: the rows of
    member 0 are zero (normalize(0) for float32 images) whenever it is not loaded."""
    for kw in ({}, {"augment_on": "device"}, {"output": "uint8"}):
        with _loader(tiny, cache, "thread", **kw) as r, \
                _loader(tiny, cache, "thread", reuse_buffers=False, **kw) as f:
            builder = r._batches
            for step, members in enumerate([None, [1], None, [1], [0, 1], [1]]):
                _assert_same(builder.batch(step, members), f._batches.batch(step, members))
            assert len(builder._blocks.names()) == 1


def test_referenced_batches_are_never_overwritten(tiny, cache):
    """A batch the consumer holds, or that a device array made from it (zero-copy on CPU)
    still reads, keeps its block: later batches use other ones."""
    import jax
    with _loader(tiny, cache, "thread", prefetch=1, output="uint8") as r, \
            _loader(tiny, cache, "thread", reuse_buffers=False, prefetch=0,
                    output="uint8") as f:
        held = [next(r) for _ in range(3)]
        on_device = jax.device_put(next(r)["images"])  # host batch dropped at once
        later = [next(r) for _ in range(4)]
        assert len(r._batches._blocks.names()) >= 4 + 1
        for step, b in enumerate(held):
            _assert_same(b, f.batch(step))
        np.testing.assert_array_equal(np.asarray(on_device), f.batch(3)["images"])
        for step, b in enumerate(later, start=4):
            _assert_same(b, f.batch(step))
        del held, later, on_device, b
        gc.collect()
        before = len(r._batches._blocks.names())
        for _ in range(4):
            next(r)
        assert len(r._batches._blocks.names()) == before  # released blocks are reused


def test_auto_rule(tiny, monkeypatch):
    resolve = loader_mod.resolve_worker_type
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve("auto", 4, tiny, 96, "host") == "process"
    assert resolve("auto", 8, tiny, 96, "host") == "thread"       # < 16 images a worker
    assert resolve("auto", 1, tiny, 96, "host") == "thread"       # one worker
    assert resolve("auto", 8, tiny, 96, "device") == "thread"     # too little work per step
    assert resolve("auto", 4, tiny, 1024, "device") == "process"
    assert resolve("thread", 8, tiny, 4096, "host") == "thread"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve("auto", 2, tiny, 4096, "host") == "thread"     # < AUTO_MIN_CORES
    with pytest.raises(ValueError, match="worker_type='fork'"):
        member_loader(tiny, [0], [1], cache_dir=None, worker_type="fork")


def test_auto_falls_back_to_threads_when_workers_die(tiny, cache, monkeypatch):
    def broken(self):
        self._wait()
        self._segments.release(self._seg)
        raise concurrent.futures.process.BrokenProcessPool("died")
    monkeypatch.setattr(W.PendingBatch, "result", broken)
    monkeypatch.setattr(loader_mod, "resolve_worker_type",
                        lambda wt, *a: "process" if wt == "auto" else wt)
    with _loader(tiny, cache, "auto", prefetch=1) as p, _loader(tiny, cache, "thread") as t:
        with pytest.warns(RuntimeWarning, match="using threads"):
            got = next(p)
        assert p.worker_type == "thread"
        _assert_same(got, next(t))
        _assert_same(next(p), next(t))
    with _loader(tiny, cache, "process", prefetch=0) as p:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            p.batch(0)
