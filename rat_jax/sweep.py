"""Several targets in one workdir (the paper's whole table): every target's `Pipeline` jobs in one
schedule, sharing what does not depend on the target.

A sweep config (configs/paper.py) is a base config whose `target` / `aux` are replaced by
`datasets` (name -> dataset entry) and `sweep.targets` (the targets, in column order); target T
is the config of `target_config(config, T)`: T as the target, every other entry of `datasets` as
an auxiliary task. The sweep's root holds

  config.json                   the sweep config and command line
  foundation/                   converted once
  lp/<A>_notest/, aux/<A>_notest/   each auxiliary dataset's linear probe and pool, trained once
                                and loaded by every target that uses A (stages.WorkdirStore with
                                `shared_root`; fingerprints and leakage guards unchanged)
  targets/<T>/                  target T's own workdir: config.json, lp/<T>_test<k>/, target/,
                                models/, plots/, its per-env results.md / results.json
  results.md, results.json      the combined table (report.combined_table), rewritten after
                                each target; pending targets are "—" and listed in the notes
  trained_runs.jsonl            one line per target finished by an invocation: the runs it
                                trained (none when everything was loaded)

Every target's jobs go into one schedule (rat_jax.schedule). A rerun loads every finished run and
resumes a killed one (the stores' fingerprints); on several hosts every process runs the same
jobs in the same order and process 0 writes the files, as in a single run.

The runs a config implies and their jobs are rat_jax.runs' (no JAX); `plan` prints them per
stage and dataset with an estimated time and the schedule, and refuses members that cannot fit
the devices' memory (`python -m rat_jax.main ... --plan`). This module imports no JAX at module
level.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time
from typing import Sequence

from rat_jax import report
from rat_jax.runs import (FORWARD_COST, TARGETS_DIR, PlannedRun, dataset_info, is_sweep,
                          plan_jobs, planned_runs, target_config, target_names)

log = logging.getLogger("rat_jax")

TRAINED_LOG = "trained_runs.jsonl"
STAGES = ("linear probes", "auxiliary pools", "target runs")
# Pixels of the timed member step on CPU (4 images at 224 px: a ResNet-50 224-px step is slow)
CPU_TIMING_PIXELS = 4 * 224 * 224
# Host memory of a training process besides its data and member state: Python, the JAX and XLA
# runtimes and the compiled programs (peak RSS of configs/demo.py's run before its first step).
PROCESS_BYTES = int(1.5 * 2**30)
# What to change when host memory does not fit, by its largest part (host_memory)
HOST_FIXES = {
    "process": "a machine with more memory.",
    "loader": "fewer members per run (--config.n_hparams, --config.run_fusing=False) or a smaller "
              "--config.batch_size; on an accelerator --config.augment_on=device ships uint8 "
              "crops (about 4x fewer bytes per image).",
    "checkpoint_copies": "fewer members per run (--config.n_hparams, --config.run_fusing=False).",
    "devices": "fewer emulated CPU devices (--config.engine.cpu_devices=1: one member's "
               "activations at a time), a smaller --config.batch_size / --config.image_size, or "
               "fewer members.",
}


# ---------------------------------------------------------------------------------------------
# Sweep configs
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------
class Sweep:
    """Every target of a sweep config, one `Pipeline` each, sharing the root's foundation,
    auxiliary probes and pools. `run()` returns {target: rows}; `trained_runs` lists the
    (run name, members) this process trained."""

    def __init__(self, config, workdir: str | os.PathLike):
        from rat_jax import pipeline
        self.c = config
        self.root = pathlib.Path(workdir).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.targets = target_names(config)
        if not self.targets:
            raise ValueError("config.sweep.targets is empty: name the datasets to run as targets")
        self.trained_runs: list[tuple[str, int]] = []
        pipeline.record_config(config, self.root)

    def target_dir(self, name: str) -> pathlib.Path:
        return self.root / TARGETS_DIR / name

    def run(self) -> dict:
        """Every target's jobs in one schedule (rat_jax.schedule): the shared auxiliary runs once,
        each target's table and the combined table as soon as its selections are done."""
        import jax
        from rat_jax import distributed, schedule
        from rat_jax.pipeline import Pipeline
        results: dict = {t: None for t in self.targets}
        jobs, fns, pipes = [], {}, {}
        for name in self.targets:
            pipe = pipes[name] = Pipeline(target_config(self.c, name), self.target_dir(name),
                                          shared_root=self.root)
            own_jobs, own_fns = pipe.jobs(self.root)
            for job in own_jobs:
                if job.name in fns:                   # a shared auxiliary run: once
                    continue
                jobs.append(job)
                fns[job.name] = own_fns[job.name]
                if job.kind == "table":
                    fns[job.name] = lambda devices, name=name, fn=own_fns[job.name]: \
                        self._finish(name, fn(devices), pipes, results)
        parallel = schedule.resolve_mode(self.c.engine.get("schedule", "auto"),
                                         jax.default_backend(), jax.process_count())
        for pipe in pipes.values():
            pipe.parallel = parallel
        schedule.run_jobs(jobs, fns, jax.devices(), parallel)
        if distributed.is_main_process():
            md = report.write_combined(self.root, results, self.notes(results))
            print(f"\n# The whole table: {len(self.targets)} targets ({self.root})\n", flush=True)
            print(md, flush=True)
        return results

    def _finish(self, name: str, rows: list, pipes: dict, results: dict) -> list:
        """Target `name` is done: log what it trained, rewrite the combined table."""
        from rat_jax import distributed
        results[name] = rows
        store = pipes[name].store
        trained = [(r if store.is_shared(r) else f"{TARGETS_DIR}/{name}/{r}", m)
                   for r, m in store.trained_runs]
        self.trained_runs += trained
        if distributed.is_main_process():
            with open(self.root / TRAINED_LOG, "a") as f:  # what each invocation trained
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "argv": sys.argv, "target": name,
                                    "trained": trained}) + "\n")
            report.write_combined(self.root, results, self.notes(results))
            log.info("sweep: %s done (%d/%d)", name, sum(r is not None for r in results.values()),
                     len(self.targets))
        return rows

    def notes(self, results: dict) -> str:
        c = self.c
        pending = [t for t, rows in results.items() if rows is None]
        members = sum(m for _, m in self.trained_runs)
        text = (f"Sweep of {len(self.targets)} targets ({', '.join(self.targets)}); each uses "
                f"the other datasets of config.datasets ({', '.join(sorted(c.datasets))}) as "
                f"auxiliary tasks x {c.n_aux_hparams} runs, trained once at the sweep's root "
                f"and shared. Arch {c.arch}, {c.image_size}px, batch {c.batch_size}/domain, "
                f"{c.n_hparams} members per (test env, trial), trials {list(c.trials)}. "
                f"Per-env tables: {TARGETS_DIR}/<target>/results.md. Member runs trained by this "
                f"invocation: {members} in {len(self.trained_runs)} runs.")
        if pending:
            text += f" Pending (— in the table): {', '.join(pending)}."
        return text


def run_sweep(config, workdir: str | os.PathLike) -> dict:
    """Every target of a sweep config in `workdir` (resumable); {target: rows}."""
    return Sweep(config, workdir).run()


# ---------------------------------------------------------------------------------------------
# The plan: sizes, an estimated time, and the memory check (needs JAX)
# ---------------------------------------------------------------------------------------------
def plan_table(runs: Sequence[PlannedRun], rate: float | None) -> tuple[str, dict]:
    """Markdown: per stage and dataset, member runs (groups), member-steps, training and
    evaluation images and, with `rate` (training images/s of the whole machine), the estimated
    time; then the totals. Also returns the numbers as a dict."""
    keyed: dict = {}
    for r in runs:
        keyed.setdefault((r.stage, r.dataset), []).append(r)
    order = sorted(keyed, key=lambda k: (STAGES.index(k[0]),
                                         [r.dataset for r in runs].index(k[1])))
    head = ["stage", "dataset", "groups", "member runs", "member-steps", "train images",
            "eval images", "estimated time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = {"stages": []}

    def row(stage, dataset, rs):
        n = {"stage": stage, "dataset": dataset, "groups": len(rs),
             "member_runs": sum(r.members for r in rs),
             "member_steps": sum(r.member_steps for r in rs),
             "train_images": sum(r.train_images for r in rs),
             "eval_images": int(round(sum(r.all_eval_images for r in rs))),
             "seconds": sum(r.cost() for r in rs) / rate if rate else None}
        lines.append("| " + " | ".join([stage, dataset, f"{n['groups']:,}",
                                        f"{n['member_runs']:,}", f"{n['member_steps']:,}",
                                        f"{n['train_images']:,}", f"{n['eval_images']:,}",
                                        report.duration(n["seconds"])]) + " |")
        return n
    for key in order:
        out["stages"].append(row(*key, keyed[key]))
    for stage in STAGES:
        rs = [r for r in runs if r.stage == stage]
        if rs:
            out.setdefault("stage_totals", []).append(row(f"**{stage}**", "all", rs))
    out["total"] = row("**total**", "all", list(runs))
    return "\n".join(lines), out


def _abstract_model(settings, num_classes: int):
    import jax
    import numpy as np
    model = settings.model(num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, settings.image_size, settings.image_size, 3),
                                                 np.float32))
    return model, shapes


def measure_rate(settings, num_classes: int, images_per_step: int) -> dict:
    """Training images/s of the member step of `settings` (arch, image size, dtype, strategy,
    remat) for ONE member on ONE device, timed over a few steps after a compiled warm-up. On CPU
    the timed step holds at most CPU_TIMING_PIXELS pixels (4 images at 224 px), and the rate per
    image is extrapolated to the full batch."""
    import jax
    import numpy as np
    from rat_jax import trees
    from rat_jax.engine import MemberEngine, init_state, make_hparams
    model, shapes = _abstract_model(settings, num_classes)
    zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
    params, batch_stats = zeros(shapes["params"]), zeros(shapes["batch_stats"])
    device = jax.devices()[0]
    s = settings.image_size
    b = images_per_step
    if device.platform == "cpu" and b * s * s > CPU_TIMING_PIXELS:
        b = max(1, CPU_TIMING_PIXELS // (s * s))
    engine = MemberEngine(model, batch_stats, 1,
                          settings.engine_config(b).replace(devices=[device]))
    live = engine.start(init_state(trees.stack([params]))["members"],
                        make_hparams(1, lr=1e-5, seed=0))
    rng = np.random.default_rng(0)
    batch = {"images": rng.standard_normal((1, b, s, s, 3), np.float32),
             "labels": rng.integers(0, num_classes, (1, b)).astype(np.int32)}
    t0 = time.perf_counter()
    jax.block_until_ready(live.step(batch))   # compiles
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(2 if device.platform == "cpu" else 5):
        t0 = time.perf_counter()
        jax.block_until_ready(live.step(batch))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"device": str(device.device_kind), "platform": device.platform,
            "timed_images": b, "step_s": step, "compile_s": compile_s,
            "images_per_s": b / step, "member_steps_per_s": b / step / images_per_step}


def memory_check(settings, runs: Sequence[PlannedRun]) -> dict:
    """XLA's memory analysis of the compiled train step of the worst case of `runs` (the most
    members per device, with the largest per-member batch and class count of any run), laid
    on the devices as training lays it, plus the batches the device feed places ahead of the
    step (device_prefetch), against the device's memory (jax's bytes_limit; on CPU the
    machine's RAM, shared by the emulated devices). Returns the numbers and `fits`."""
    import jax
    import numpy as np
    from rat_jax.engine import MemberEngine, make_hparams
    from rat_jax.engine import step as step_lib
    from rat_jax.engine.mesh import DATA_AXIS, MEMBER_AXIS, plan_mesh
    dp = settings.data_parallel_flag
    devices = jax.devices()
    trained = [r for r in runs if not r.classifier_only] or list(runs)
    batch = max(r.images_per_step for r in trained)
    classes = max(r.num_classes for r in trained)

    def local(m):
        mesh = plan_mesh(m, batch, devices, None, dp)
        return m // mesh.shape[MEMBER_AXIS], mesh
    worst = max(trained, key=lambda r: (local(r.members)[0], r.members))
    m = worst.members
    per_device, mesh = local(m)
    model, shapes = _abstract_model(settings, classes)
    batch_stats = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["batch_stats"])
    engine = MemberEngine(model, batch_stats, m,
                          settings.engine_config(batch).replace(devices=devices))
    stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((m,) + s.shape, s.dtype),
                           shapes["params"])
    members = jax.eval_shape(jax.vmap(step_lib.init_member), stacked)
    members = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                          sharding=engine.member_sharding),
                           members)
    s = settings.image_size
    fake = lambda shape, dtype: np.broadcast_to(np.zeros((), dtype), shape)  # no memory
    mem = engine.train_memory({"members": members}, make_hparams(m),
                              {"images": fake((m, batch, s, s, 3), np.float32),
                               "labels": fake((m, batch), np.int32)})
    param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(shapes["params"]))
    ahead = (settings.device_prefetch * per_device * (batch // mesh.shape[DATA_AXIS])
             * (s * s * 3 * 4 + 4))              # batches the device feed placed ahead
    need = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
            + mem["temp_size_in_bytes"] - mem.get("alias_size_in_bytes", 0)
            + per_device * param_bytes           # + the best-so-far params the loop keeps
            + ahead)
    used = int(np.prod(list(mesh.shape.values())))
    platform = devices[0].platform
    limit, source = None, ""
    if platform == "cpu":
        try:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            source = f"the machine's RAM, shared by the {used} emulated CPU device(s) in use"
        except (ValueError, OSError, AttributeError):
            pass
        total = need * used
    else:
        try:
            limit = int((devices[0].memory_stats() or {}).get("bytes_limit")) or None
            source = f"{devices[0].device_kind} memory (jax bytes_limit)"
        except Exception:  # a backend that reports no memory
            limit = None
        total = need
    return {"run": worst.name, "members": m, "members_per_device": per_device,
            "devices_used": used, "images_per_step": batch, "bytes_per_device": int(need),
            "bytes_needed": int(total), "limit_bytes": limit, "limit_source": source,
            "fits": limit is None or total <= limit}


def host_memory(settings, runs: Sequence[PlannedRun], infos: dict, device: dict) -> dict:
    """Host memory (bytes) of the worst run of `runs` besides what the devices hold: the process
    itself (PROCESS_BYTES), the loader's batches in flight (MemberLoader's prefetch, the device
    feed's batches placed ahead, the one being consumed and the one on the devices), the host copies
    a checkpoint save makes (params, Adam moments and best params of every member), and the
    decoded-image cache of the largest dataset as page cache (mapped and reread every evaluation;
    reclaimable, so reported but not counted against the RAM). On CPU the devices are host memory:
    `device["bytes_needed"]` (the compiled member step, memory_check) is added. `infos`: {dataset
    name: DatasetInfo}."""
    import jax
    import numpy as np
    from rat_jax.data.loader import DEFAULT_PREFETCH
    from rat_jax.data.stream import device_canvas
    trained = [r for r in runs if not r.classifier_only] or list(runs)
    worst = max(trained, key=lambda r: (r.members * r.images_per_step, r.members))
    s = settings.image_size
    mode = str(settings.augment_on).lower()
    on_cpu = device.get("platform", "cpu") == "cpu"
    if mode == "auto":
        mode = "host" if on_cpu else "device"
    image = s * s * 3 * 4 if mode == "host" else device_canvas(s) ** 2 * 3
    in_flight = DEFAULT_PREFETCH + settings.device_prefetch + 2
    loader = in_flight * worst.members * worst.images_per_step * image
    _, shapes = _abstract_model(settings, max(r.num_classes for r in runs))
    param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(shapes["params"]))
    checkpoint = 4 * worst.members * param_bytes
    known = {n: i.decoded_bytes for n, i in infos.items() if i.decoded_bytes is not None}
    page_cache = max(known.values()) if known and len(known) == len(infos) else None
    parts = {"process": PROCESS_BYTES, "loader": loader, "checkpoint_copies": checkpoint,
             "devices": device["bytes_needed"] if on_cpu else 0}
    total = int(sum(parts.values()))
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        limit = None
    return {"run": worst.name, "augment_on": mode, "parts": {k: int(v) for k, v in parts.items()},
            "page_cache_bytes": page_cache, "bytes_needed": total, "limit_bytes": limit,
            "fits": limit is None or total <= limit}


def check_host_memory(host: dict) -> None:
    """SystemExit naming the run, its parts and what to change when host_memory's `host` does
    not fit the machine's RAM (the change for its largest part, HOST_FIXES)."""
    if host["fits"]:
        return
    biggest = max(host["parts"], key=host["parts"].get)
    raise SystemExit(f"rat_jax plan: {host['run']} needs {_gib(host['bytes_needed'])} of host "
                     f"memory ({_parts(host)}), the machine has {_gib(host['limit_bytes'])}. "
                     "Change: " + HOST_FIXES[biggest])


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def _parts(host: dict) -> str:
    """host_memory's parts, "name 1.23 GiB, ..."."""
    return ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in host["parts"].items())


def plan(config, workdir: str | os.PathLike, rate: float = 0.0, devices: int = 0) -> dict:
    """Print the plan of `config` (a sweep or a single target) in `workdir` without training:
    per stage and dataset, member runs, member-steps, images, and an estimated time from the
    measured member-step rate on the current devices (`rate` > 0: training images/s per device
    instead of measuring; `devices` > 0: the device count to estimate for). Raises SystemExit
    naming what to change when the worst run's members cannot fit the devices' memory."""
    import jax
    from rat_jax.stages import TrainSettings
    root = pathlib.Path(workdir).absolute()
    infos: dict = {}

    def info(entry, cfg):
        i = dataset_info(entry, cfg)
        infos[i.name] = i
        return i
    runs = planned_runs(config, root, info)
    first = target_config(config, target_names(config)[0]) if is_sweep(config) else config
    settings = TrainSettings.from_config(first)
    typical = _typical_images_per_step(runs)
    speed = _plan_rate(settings, runs, typical, rate, devices)
    md, numbers = plan_table(runs, speed["machine_images_per_s"])
    targets = target_names(config)
    print(f"# Plan: {len(targets)} target(s) ({', '.join(targets)}) in {root}\n")
    print(f"arch {settings.arch}, {settings.image_size}px, batch {first.batch_size}/domain, "
          f"{settings.compute_dtype}; {len(runs)} members runs. A group is one members run "
          "(members trained together); a member run is one network (a DomainBed run).\n")
    print(md + "\n")
    print(_rate_note(speed, typical))
    numbers["rate"] = speed
    numbers["schedule"] = _schedule(config, runs, root, speed, devices)
    print(_schedule_note(numbers["schedule"]))
    if config.get("aux_checkpoints", ()):
        print("config.aux_checkpoints: brought auxiliary checkpoints are not in the plan.")
    mem = memory_check(settings, runs)
    numbers["memory"] = mem
    print(_memory_note(mem), flush=True)
    host = host_memory(settings, runs, infos, dict(mem, platform=jax.devices()[0].platform))
    numbers["host_memory"] = host
    print(_host_memory_note(host), flush=True)
    if not mem["fits"]:
        raise SystemExit(_no_fit_message(mem))
    check_host_memory(host)
    return numbers


def _schedule(config, runs: Sequence[PlannedRun], root: pathlib.Path, speed: dict,
              devices: int) -> dict:
    """The simulated schedule of the plan's jobs (schedule.simulate) on the devices (`devices`,
    or the current ones), in the mode config.engine.schedule gives here, and in parallel: a job
    of cost c on d devices takes c / (d x the machine's rate / the devices) seconds; tables take
    none."""
    import jax
    from rat_jax import schedule
    jobs = plan_jobs(runs, root)
    n_dev = devices or len(jax.devices())
    per_device = speed["machine_images_per_s"] / n_dev   # emulated CPU devices share the cores
    seconds = lambda job, d: 0.0 if job.kind == "table" else job.cost / (per_device * d)
    parallel = schedule.resolve_mode(config.engine.get("schedule", "auto"),
                                     jax.devices()[0].platform, jax.process_count())
    out = {"devices": n_dev, "mode": "parallel" if parallel else "serial", "jobs": len(jobs)}
    for mode in dict.fromkeys((parallel, True)):
        sim = schedule.simulate(jobs, n_dev, seconds, parallel=mode)
        out["parallel" if mode else "serial"] = {"makespan_s": sim["makespan"],
                                                  "busy": sim["busy"]}
    return out


def _schedule_note(sched: dict) -> str:
    def one(key):
        s = sched[key]
        busy = s["busy"]
        return (f"{key}: makespan {report.duration(s['makespan_s'])}, devices busy "
                f"{100 * sum(busy) / len(busy):.1f} % on average (least {100 * min(busy):.1f} %)")
    head = (f"Schedule of the {sched['jobs']} jobs (members runs, selections, tables; "
            f"rat_jax.schedule) on {sched['devices']} device(s), estimated from the rate above "
            "(checkpoint saves not counted): ")
    if sched["mode"] == "parallel":
        return head + one("parallel") + "."
    return (head + one("serial") + " (config.engine.schedule resolves to serial here); "
            "with --config.engine.schedule=parallel, " + one("parallel") + ".")


def _typical_images_per_step(runs: Sequence[PlannedRun]) -> int:
    """The images per member step that most trained members use (the rate is measured at it)."""
    trained = [r for r in runs if not r.classifier_only]
    return max({r.images_per_step for r in trained},
               key=lambda b: sum(r.members for r in trained if r.images_per_step == b))


def _plan_rate(settings, runs: Sequence[PlannedRun], typical: int, rate: float,
               devices: int) -> dict:
    """The training rate of the plan's time estimate: `rate` images/s per device when > 0
    ("given"), else measure_rate's one member on one device at `typical` images a step; times
    the devices (`devices`, or the current ones; emulated CPU devices share the same cores:
    x 1) as `machine_images_per_s`."""
    import jax
    platform = jax.devices()[0].platform
    n_dev = devices or len(jax.devices())
    if rate > 0:
        measured = {"images_per_s": rate, "member_steps_per_s": rate / typical,
                    "given": True}
    else:
        measured = measure_rate(settings, max(r.num_classes for r in runs), typical)
    scale = 1 if (platform == "cpu" and not devices and rate <= 0) else n_dev
    return dict(measured, machine_images_per_s=measured["images_per_s"] * scale, devices=scale)


def _rate_note(speed: dict, typical: int) -> str:
    if speed.get("given"):
        how = (f"given: {speed['images_per_s']:,.1f} training images/s per device "
               "(--plan_rate)")
    else:
        how = (f"measured: {speed['images_per_s']:.2f} training images/s = "
               f"{speed['member_steps_per_s']:.4f} member-steps/s of {typical} images, one "
               f"member on one {speed['platform']} device ({speed['device']}), the median "
               f"of timed steps of {speed['timed_images']} images after a "
               f"{speed['compile_s']:.0f}-s compile")
    return (f"Estimated time: an ESTIMATE, not a measurement of the sweep. Rate {how}; "
            f"x {speed['devices']} device(s) -> {speed['machine_images_per_s']:,.1f} images/s "
            f"for the machine. Evaluation and linear-probe images (forward only) are weighted "
            f"{FORWARD_COST:.2f} of a training image; selection, soups, data loading and "
            "compilation are not counted. Image counts of DomainBed datasets come from their "
            "usual totals (docs/protocol.md §3.1) split evenly over envs.")


def _memory_note(mem: dict) -> str:
    limit = _gib(mem["limit_bytes"]) if mem["limit_bytes"] else "not reported"
    return (f"Memory (XLA memory analysis of the compiled member step, not run): the worst case, "
            f"the most members per device ({mem['members']} members as in {mem['run']}, "
            f"{mem['members_per_device']} per device on {mem['devices_used']} device(s)) with "
            f"the largest member batch of any run ({mem['images_per_step']} images) and the "
            f"most classes: {_gib(mem['bytes_per_device'])} per device (arguments + outputs + "
            f"temporaries - aliased + best-so-far params + batches placed ahead), "
            f"{_gib(mem['bytes_needed'])} in all; available {limit} "
            f"({mem['limit_source'] or 'no limit reported'}).")


def _host_memory_note(host: dict) -> str:
    cache = (f"{_gib(host['page_cache_bytes'])} (decoded images of the largest dataset)"
             if host["page_cache_bytes"] is not None
             else "not known (DomainBed datasets are planned from their usual sizes, unread)")
    ram = _gib(host["limit_bytes"]) if host["limit_bytes"] else "not reported"
    return (f"Host memory of the worst run ({host['run']}): {_gib(host['bytes_needed'])} "
            f"({_parts(host)}); RAM {ram}. Page cache, reclaimable and not counted: {cache}.")


def _no_fit_message(mem: dict) -> str:
    limit = _gib(mem["limit_bytes"]) if mem["limit_bytes"] else "not reported"
    return (f"rat_jax plan: {mem['members']} members ({mem['run']}; "
            f"{mem['members_per_device']} per device) do not fit: {_gib(mem['bytes_needed'])} "
            f"needed, {limit} available ({mem['limit_source']}). Change: fewer members per "
            "device (more devices, or fewer members: --config.n_hparams, "
            "--config.run_fusing=False), --config.engine.remat=True, "
            "--config.engine.compute_dtype=bfloat16, or a smaller --config.batch_size / "
            "--config.image_size.")
