"""Multi-process (multi-host) set-up in one place: `initialize(config)` before any JAX device use.

How the processes are found, in order:
  1. explicit: a coordinator "host:port", the process count and this process's id, from
     `config.distributed.{coordinator,num_processes,process_id}` or $RAT_JAX_COORDINATOR,
     $RAT_JAX_NUM_PROCESSES, $RAT_JAX_PROCESS_ID (launch/local.sh, any other launcher);
  2. SLURM (`srun`, SLURM_NTASKS > 1): jax's own detection (coordinator = first node of the step),
     plus the GPUs each process drives: one process per GPU (the usual `--ntasks-per-node=<gpus>`),
     one process per node (all the node's GPUs), or k GPUs per process, read from
     CUDA_VISIBLE_DEVICES / SLURM_* (jax alone would give every process GPU 0 only);
  3. Open MPI (`mpirun`, OMPI_COMM_WORLD_SIZE > 1): jax's own detection;
  4. Cloud TPU pod slice (libtpu installed, a TPU attached, and several hosts: in
     TPU_WORKER_HOSTNAMES, Multislice's MEGASCALE_* or the VM's metadata worker list):
     `jax.distributed.initialize()` with no coordinator, which reads the workers itself. A
     single-host TPU (Colab, Kaggle, a v4-8 or v5e-8 VM) is one process: no initialization;
  5. otherwise a single process: nothing to do.
`mode="off"` ($RAT_JAX_DISTRIBUTED=off) skips all of it.

Timeouts are bounded: connecting gives up after `initialization_timeout` seconds, and a process
whose peer died (killed, OOM, node lost) is stopped by JAX's coordination service once the peer
missed heartbeats for `heartbeat_timeout` seconds ("Terminating process because the JAX distributed
service detected fatal errors ... another task died"), instead of waiting forever in a collective.

After initialization `jax.devices()` lists the devices of every process, so the member engine's mesh
('model', 'data') spans all hosts. Helpers: `is_main_process()`, `log0()`/`print0()` (process 0
only), `barrier()`, `process_indices()` (which members / rows of a global batch this process must
load), `global_batch()` (a global array from each process's own part), `local_part()` (that part of
a host array every process holds), `to_host()` (a global array as numpy on every process) and
`AnyProcess` (flags OR-ed over the processes, so that all take the same decision).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("rat_jax")

ENV_PREFIX = "RAT_JAX_"
DEFAULTS = dict(mode="auto", coordinator="", num_processes=0, process_id=-1, local_device_ids="",
                initialization_timeout=300, heartbeat_timeout=60, shutdown_timeout=300)
_ENV_NAMES = dict(mode="DISTRIBUTED", coordinator="COORDINATOR", num_processes="NUM_PROCESSES",
                  process_id="PROCESS_ID", local_device_ids="LOCAL_DEVICE_IDS",
                  initialization_timeout="INIT_TIMEOUT", heartbeat_timeout="HEARTBEAT_TIMEOUT",
                  shutdown_timeout="SHUTDOWN_TIMEOUT")

_info: dict | None = None  # what initialize() did (for logs and tests)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def settings(config: Any = None, env: Mapping[str, str] | None = None) -> dict:
    """Distributed settings: a config field set to something other than its default wins, then
    $RAT_JAX_* (so launch scripts' variables apply to any config), then DEFAULTS.

    `config` may be the experiment config (its `distributed` field is used), that field itself, or
    a plain dict.
    """
    env = os.environ if env is None else env
    section = config
    if config is not None and _get(config, "distributed") is not None:
        section = _get(config, "distributed")
    out = {}
    for key, default in DEFAULTS.items():
        value = _get(section, key) if section is not None else None
        if value is None or value == "" or value == default:
            raw = env.get(ENV_PREFIX + _ENV_NAMES[key], "")
            value = type(default)(raw) if raw != "" else default
        out[key] = value
    out["mode"] = str(out["mode"]).lower()
    if out["mode"] not in ("auto", "off"):
        raise ValueError(f"distributed mode {out['mode']!r}: use 'auto' or 'off'")
    return out


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return obj.get(key)  # ml_collections.ConfigDict
    except AttributeError:
        return getattr(obj, key, None)


def _parse_ids(value: Any) -> list[int] | None:
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# ----------------------------------------------------------------------------------------------
# Cluster detection
# ----------------------------------------------------------------------------------------------
def _slurm_present(env: Mapping[str, str]) -> bool:
    return all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                                  "SLURM_PROCID", "SLURM_LOCALID"))


def _expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """How many processes of this job step run on this node."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = _expand_tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", 0))
        if node < len(counts):
            return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    return None


def visible_gpu_count(env: Mapping[str, str]) -> int | None:
    """GPUs this process sees: CUDA_VISIBLE_DEVICES, else SLURM's GPU count, else /dev/nvidiaN."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "NoDevFiles"):
        return len([v for v in visible.split(",") if v.strip()])
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        m = re.search(r"(\d+)$", value)  # "4" or "a100:4"
        if m:
            return int(m.group(1))
    devs = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    return len(devs) or None


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The GPU ordinals (as this process sees them) that this SLURM task should drive.

    One GPU visible (srun bound one to the task) -> [0]; one task on the node -> all visible GPUs;
    k = visible / tasks GPUs per task -> the local task's k. None when no GPU is found (CPU/TPU).
    """
    n = visible_gpu_count(env)
    if not n:
        return None
    if n == 1:
        return [0]
    tasks = slurm_tasks_on_node(env) or 1
    local = int(env["SLURM_LOCALID"])
    if n % tasks:
        raise ValueError(f"SLURM runs {tasks} tasks on this node but {n} GPUs are visible; use one "
                         "task per GPU (--ntasks-per-node=<gpus>) or one per node, or set "
                         "RAT_JAX_LOCAL_DEVICE_IDS")
    per = n // tasks
    return list(range(local * per, (local + 1) * per))


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu is installed and a TPU chip is attached (/dev/accel* or /dev/vfio)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*")) or bool(
        [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()])


TPU_METADATA_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
                    "worker-network-endpoints")


def tpu_metadata_workers(timeout: float = 2.0) -> str | None:
    """The TPU VM's worker list from its (link-local) metadata server, or None when there is
    none (not a pod slice, or no metadata server: Colab, Kaggle, a container)."""
    import urllib.request
    req = urllib.request.Request(TPU_METADATA_URL, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - fixed local URL
            return r.read().decode()
    except Exception:  # noqa: BLE001 - any failure means: no slice metadata
        return None


def tpu_hosts(env: Mapping[str, str], metadata=tpu_metadata_workers) -> int:
    """Hosts of this TPU slice: TPU_WORKER_HOSTNAMES (GKE), else the metadata's worker list
    (TPU VMs), else 1. Several slices (Multislice: MEGASCALE_COORDINATOR_ADDRESS) count as many."""
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return 2
    names = env.get("TPU_WORKER_HOSTNAMES", "")
    if names.strip():
        return len([h for h in names.split(",") if h.strip()])
    workers = metadata()
    return max(1, len([w for w in (workers or "").split(",") if w.strip()]))


def plan(config: Any = None, env: Mapping[str, str] | None = None,
         tpu_metadata=tpu_metadata_workers) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` (None: single process), with a
    "method" entry saying how they were found. Reads settings and the environment only, and on
    a TPU VM its slice's worker list (`tpu_metadata`): a single-host TPU (Colab, Kaggle, a v4-8
    or v5e-8 VM) runs as one process without distributed initialization."""
    env = os.environ if env is None else env
    s = settings(config, env)
    if s["mode"] == "off":
        return None
    timeouts = dict(initialization_timeout=int(s["initialization_timeout"]),
                    heartbeat_timeout_seconds=int(s["heartbeat_timeout"]),
                    shutdown_timeout_seconds=int(s["shutdown_timeout"]))
    ids = _parse_ids(s["local_device_ids"])
    if s["coordinator"] or s["num_processes"] > 1:
        n, pid = int(s["num_processes"]), int(s["process_id"])
        if n <= 1:
            if n == 1 or not s["coordinator"]:
                return None
            raise ValueError("a coordinator is set but RAT_JAX_NUM_PROCESSES is not")
        if not s["coordinator"]:
            raise ValueError(f"{n} processes but no coordinator: set RAT_JAX_COORDINATOR=host:port "
                             "(or config.distributed.coordinator)")
        if not 0 <= pid < n:
            raise ValueError(f"RAT_JAX_PROCESS_ID={pid} must be in [0, {n}) for {n} processes")
        return dict(method="explicit", coordinator_address=s["coordinator"], num_processes=n,
                    process_id=pid, local_device_ids=ids, **timeouts)
    if _slurm_present(env) and int(env["SLURM_NTASKS"]) > 1:
        ids = ids if ids is not None else slurm_local_device_ids(env)
        return dict(method="slurm", local_device_ids=ids, **timeouts)
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return dict(method="ompi", local_device_ids=ids, **timeouts)
    if on_cloud_tpu_vm() and tpu_hosts(env, tpu_metadata) > 1:
        return dict(method="tpu", **timeouts)
    return None


def initialize(config: Any = None) -> dict | None:
    """Start `jax.distributed` when this is one process of several (see the module docstring);
    a no-op for a single process and when already initialized. Call before any JAX device use.
    Returns what was done ({"method", "process_id", "num_processes", ...}) or None."""
    global _info
    if jax.distributed.is_initialized():
        return _info
    kwargs = plan(config)
    if kwargs is None:
        return None
    method = kwargs.pop("method")
    try:  # CPU devices of different processes talk through Gloo (jax's default; explicit here)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - a jax without the flag
        pass
    try:  # SIGTERM is rat_jax's (engine.savepoints), as in one process: JAX's preemption
        # service would take it for the whole process at the C level
        jax.config.update("jax_enable_preemption_service", False)
    except Exception:  # pragma: no cover - a jax without the flag
        pass
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    # JAX aborts the process (SIGABRT, "Terminating process because the JAX distributed service
    # detected fatal errors") when a peer never connects or dies later: say first what it means.
    print(f"rat_jax.distributed: {method} start"
          + (f", process {kwargs['process_id']} of {kwargs['num_processes']}, coordinator "
             f"{kwargs['coordinator_address']}" if "process_id" in kwargs else "")
          + f"; every process must connect within {kwargs['initialization_timeout']} s and a peer "
          f"silent for {kwargs['heartbeat_timeout_seconds']} s stops the job (an abort with "
          "DEADLINE_EXCEEDED/RegisterTask = a peer never connected; 'another task died' = a peer "
          "was lost: see its log)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if method != "tpu":
            raise
        # a TPU VM that is no pod slice worker (no slice metadata, e.g. a notebook VM): one process
        print(f"rat_jax.distributed: no TPU pod slice found ({e}); running as one process",
              file=sys.stderr, flush=True)
        return None
    except Exception as e:
        where = kwargs.get("coordinator_address", "auto-detected coordinator")
        raise RuntimeError(
            f"jax.distributed.initialize ({method}, coordinator {where}) failed: {e}. Every "
            f"process must start within {kwargs.get('initialization_timeout')} s "
            "($RAT_JAX_INIT_TIMEOUT) and reach the coordinator's host:port.") from e
    _info = dict(method=method, process_id=jax.process_index(), num_processes=jax.process_count(),
                 local_device_ids=kwargs.get("local_device_ids"),
                 heartbeat_timeout=kwargs["heartbeat_timeout_seconds"])
    log0("jax.distributed: %d processes (%s), %d devices in all, %d here", _info["num_processes"],
         method, jax.device_count(), jax.local_device_count())
    return _info


# ----------------------------------------------------------------------------------------------
# Helpers for code that runs on every process
# ----------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    """True on process 0 (and in a single-process run): write reports, metrics and plots here."""
    return jax.process_index() == 0


def log0(msg: str, *args, level: int = logging.INFO) -> None:
    """`logging.getLogger("rat_jax").log` on process 0 only."""
    if is_main_process():
        logger.log(level, msg, *args)


def print0(*args, **kwargs) -> None:
    """print() on process 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def barrier(name: str) -> None:
    """Wait until every process reached `barrier(name)` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def global_batch(local_array: Any, mesh: Mesh, spec: PartitionSpec,
                 global_shape: Sequence[int] | None = None) -> jax.Array:
    """A global array sharded as `spec` over `mesh`, from this process's rows only.

    `local_array` holds the part of the global array whose shards live on this process's devices
    (e.g. its members' batches, [M_local, N, H, W, C]); `process_indices()` says which part that is.
    Works on pytrees too (same spec for every leaf). In a single process it is plain placement.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), None if global_shape is None else tuple(global_shape)),
        local_array)


def process_indices(mesh: Mesh, spec: PartitionSpec,
                    global_shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per dimension, the sorted global indices of the blocks of a global array of `global_shape`
    (sharded as `spec` over `mesh`) that this process's devices hold: what its loader must read.
    E.g. members 4..7 of 8 on process 1 of 2 for spec P('model'). The blocks of a process need not
    be contiguous (a 'data' axis that alternates between processes)."""
    sharding = NamedSharding(mesh, spec)
    blocks = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
    out = []
    for dim, size in enumerate(global_shape):
        held = np.zeros((size,), bool)
        for idx in blocks:
            held[idx[dim]] = True
        out.append(np.flatnonzero(held))
    return tuple(out)


def local_part(global_value: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
    """This process's part of a host array that every process holds whole (e.g. a deterministic
    batch): the `local_array` for `global_batch`. Works on pytrees (same spec for every leaf)."""
    def cut(x):
        x = np.asarray(x)
        for dim, idx in enumerate(process_indices(mesh, spec, x.shape)):
            if len(idx) == x.shape[dim]:
                continue
            if len(idx) and np.all(np.diff(idx) == 1):
                sl = [slice(None)] * x.ndim
                sl[dim] = slice(int(idx[0]), int(idx[-1]) + 1)
                x = x[tuple(sl)]
            else:
                x = np.take(x, idx, axis=dim)
        return x
    return jax.tree.map(cut, global_value)


def to_host(tree: Any) -> Any:
    """Every leaf as one numpy array on every process (an all-gather for arrays that span
    processes; plain device-to-host copies otherwise)."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


class AnyProcess:
    """Flags that every process must agree on (save now, stop now), OR-ed over the processes
    without stalling the device queue: `submit(tag, flags)` queues a small all-reduce over every
    device of every process and returns at once; `collect()` gives `(tag, flags)` of the oldest
    submit not yet collected (None if there is none), combined over the processes. A loop that
    submits after queueing step s and collects after queueing step s + 1 finds it done, since the
    step s - 1 it waits for was queued before it. Every process must submit and collect at the same
    points (it is a collective). One process: no device work, the flags come back as submitted."""

    def __init__(self, size: int):
        self.size = size
        self._queue: list = []
        self._reduce = None
        if jax.process_count() > 1:
            devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
            mesh = Mesh(np.asarray(devices), ("p",))
            self._rows = NamedSharding(mesh, PartitionSpec("p"))
            self._reduce = jax.jit(lambda x: x.max(axis=0),
                                   out_shardings=NamedSharding(mesh, PartitionSpec()))

    def submit(self, tag: Any, flags: Sequence[bool]) -> None:
        flags = np.asarray(flags, np.int32).reshape(self.size)
        if self._reduce is None:
            self._queue.append((tag, flags))
            return
        local = np.ascontiguousarray(np.broadcast_to(flags, (jax.local_device_count(), self.size)))
        rows = jax.make_array_from_process_local_data(self._rows, local,
                                                      (jax.device_count(), self.size))
        self._queue.append((tag, self._reduce(rows)))

    def collect(self) -> tuple[Any, np.ndarray] | None:
        if not self._queue:
            return None
        tag, flags = self._queue.pop(0)
        if isinstance(flags, jax.Array):
            flags = np.asarray(flags.addressable_data(0))
        return tag, np.asarray(flags, bool)


def info() -> dict | None:
    """What `initialize()` did in this process (None: single process / not initialized by us)."""
    return _info


__all__ = ["initialize", "plan", "settings", "is_main_process", "log0", "print0", "barrier",
           "global_batch", "process_indices", "local_part", "to_host", "info", "AnyProcess"]
