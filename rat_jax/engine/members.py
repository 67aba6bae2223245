"""The one module that lays members on devices.

Members are stored *stacked*: one pytree whose leaves carry a leading member axis [M, ...]. Steps run
as `jit(shard_map(local_fn))` over a mesh ('model', 'data'): the member axis is split over 'model',
each member's batch over 'data' (data parallelism inside a member when devices outnumber members).
On each device the local members run with a strategy:
  "vmap"    all local members at once (convolutions become grouped convolutions),
  "map"     `lax.map`, one member at a time (plain convolutions, least memory),
  "unroll"  a Python loop over the local members inside the compiled step (plain convolutions,
            no while loop; compile time grows with the local member count),
  "chunk:k" `lax.map` over chunks of k vmapped members,
  "loop"    the one-member-per-device step called once per local member, so the compiled step is
            the single-member one and only one member's activations are live. Training keeps the
            members in *parts* (MemberEngine.split): L trees [model, ...], tree i holding local
            member i of every device group, each stepped in place (donated buffers); the stacked
            tree is assembled (MemberEngine.join) only for evaluation, selection and checkpoints.
See ARCHITECTURE.md "Parallel members" and bench/members.py for the measurements behind the default.

Data-parallel gradients: with `check_vma=True`, the gradient of a parameter that is replicated over
'data' is already summed over 'data' by autodiff (the transpose of the implicit broadcast is a psum).
The local loss is therefore the shard's summed CE divided by the *global* batch size, and there is no
extra pmean/psum of the gradients (tests/test_members.py checks the gradient norm).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rat_jax.engine import step as step_lib

MEMBER_AXIS, DATA_AXIS = "model", "data"
STRATEGIES = ("vmap", "map", "unroll", "chunk:k", "loop")


# ----------------------------------------------------------------------------------------------
# Stacked pytrees and per-member settings
# ----------------------------------------------------------------------------------------------
def stack_trees(trees: Sequence[Any]) -> Any:
    """[tree_0, ..., tree_{M-1}] -> one tree with a leading member axis (host numpy arrays)."""
    if not trees:
        raise ValueError("stack_trees needs at least one tree")
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if jax.tree.structure(t) != structure:
            raise ValueError(f"member {i} has a different parameter tree than member 0; every member "
                             "must be the same architecture with the same number of classes")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack_tree(tree: Any, index: int) -> Any:
    """Member `index` of a stacked tree."""
    return jax.tree.map(lambda x: x[index], tree)


def num_members_of(tree: Any) -> int:
    return int(jax.tree.leaves(tree)[0].shape[0])


def member_keys(seeds: Sequence[int]) -> np.ndarray:
    """Raw uint32 [M, 2] PRNG keys, one independent dropout stream per member (flax#4195)."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])


def make_hparams(num_members: int, *, lr: Any = 5e-5, weight_decay: Any = 0.0, dropout: Any = 0.0,
                 lp_steps: Any = -1, seed: Any = 0) -> dict:
    """Per-member settings as [M] arrays (scalars are broadcast); seeds give each member its RNG.

    `lp_steps`: L >= 0 for an aux-init member (classifier-only updates 0..L, then Adam reset and
    whole net), -1 for a member trained whole from update 0 (PROTOCOL §1.4).
    """
    def arr(name, x, dtype):
        x = np.asarray(x, dtype)
        if x.ndim > 1 or (x.ndim == 1 and x.shape[0] != num_members):
            raise ValueError(f"{name} has shape {x.shape}; give one value per member "
                             f"({num_members}) or a scalar for all")
        return np.broadcast_to(x, (num_members,)).copy()
    seeds = arr("seed", seed, np.int64)
    if np.ndim(seed) == 0:  # one seed for all: members still get distinct keys (seed, seed+1, ...)
        seeds = seeds + np.arange(num_members)
    return {"lr": arr("lr", lr, np.float32),
            "weight_decay": arr("weight_decay", weight_decay, np.float32),
            "dropout": arr("dropout", dropout, np.float32),
            "lp_steps": arr("lp_steps", lp_steps, np.int32), "key": member_keys(seeds)}


def init_state(params: Any) -> dict:
    """Stacked training state from stacked params (leading member axis on every leaf)."""
    m = num_members_of(params)
    members = jax.vmap(step_lib.init_member)(jax.tree.map(jnp.asarray, params))
    members = jax.tree.map(np.asarray, members)
    return {
        "members": members,
        "best_params": jax.tree.map(np.array, params),
        "best_score": np.full((m,), -np.inf, np.float32),
        "best_step": np.full((m,), -1, np.int32),
    }


# ----------------------------------------------------------------------------------------------
# Mesh and local strategy
# ----------------------------------------------------------------------------------------------
def default_strategy(backend: str | None = None) -> str:
    """Local strategy for members sharing a device, by backend (bench/members.py).

    CPU: "loop" -- the single-member step once per local member: the speed of calling a jitted
    one-member step M times and the memory of one member's activations. XLA:CPU runs
    convolutions inside a while loop (lax.map) over 10x slower, vmap turns them into slow grouped
    convolutions, and unrolled members run concurrently on the same cores with all their
    activations. Across emulated devices members do run concurrently (one per device at a time):
    one device per core (runtime.DEFAULT_CPU_DEVICES). Training holds the members in parts
    (MemberEngine.split), so no step slices members out of the stacked tree or writes them back.
    With rat_jax's malloc settings (runtime.MALLOC_TUNABLES) that default ran x1.09-1.18 of the
    one-by-one loop for resnet_tiny @ 64 px at M = 1..8, and x1.01-1.07 for EfficientNet-Lite0
    @ 64 px at M = 2..8 (at M = 1 it is the loop's own one-member program: x0.997-1.01;
    bench/members.py, README). More devices than cores made 8 ResNet-50 @ 64 px members 0.63x
    torch, and 8 ResNet-18 @ 224 px members ran out of the 24 GB (bench/cpu_vs_torch.py, before
    the malloc settings).
    GPU/TPU: "map" (plain convolutions, least memory); not measured here.
    """
    backend = backend or jax.default_backend()
    return "loop" if backend == "cpu" else "map"


def default_data_parallel(devices: Sequence[jax.Device]) -> bool:
    """Whether spare devices split a member's batch by default.

    Accelerators (and multi-process runs): yes. One CPU process: no. Emulated CPU devices share the
    same cores, and splitting one member's batch over them made its step 1.8x (ResNet-18 @ 64 px)
    to 3.8x (EfficientNet-Lite0 @ 64 px) slower than running it whole on one device
    (bench/cpu_vs_torch.py, README); members still spread one per device.
    """
    return devices[0].platform != "cpu" or jax.process_count() > 1


def plan_mesh(num_members: int, batch_size: int | None = None,
              devices: Sequence[jax.Device] | None = None, model_axis: int | None = None,
              data_parallel: bool | None = None) -> Mesh:
    """Mesh ('model', 'data') over (a prefix of) `devices`.

    With `data_parallel` (default: default_data_parallel): 'model' = gcd(members, devices), and the
    devices left per member group go to 'data' if they divide the per-member `batch_size`, else
    fewer are used. Without it: 'model' = the largest member count's divisor that is at most the
    device count, 'data' = 1 (e.g. 3 members on 8 CPU devices: one per device on 3 of them).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data_parallel is None:
        data_parallel = default_data_parallel(devices)
    if model_axis is not None:
        model = model_axis
    elif data_parallel:
        model = math.gcd(num_members, n)
    else:  # no batch split: as many devices as the members divide evenly, the rest stay idle
        model = max(k for k in range(1, min(n, num_members) + 1) if num_members % k == 0)
    if num_members % model or (n % model if data_parallel else model > n):
        raise ValueError(f"model_axis={model} must divide the {num_members} members and "
                         + (f"the {n} devices" if data_parallel else f"be at most {n} devices"))
    data = n // model
    if batch_size is not None and data_parallel:
        while data > 1 and batch_size % data:
            data -= 1
    else:
        data = 1
    grid = np.asarray(devices[: model * data], dtype=object).reshape(model, data)
    return Mesh(grid, (MEMBER_AXIS, DATA_AXIS))  # Auto axes (jax.make_mesh would make Explicit ones)


def _parse_strategy(strategy: str) -> tuple[str, int | None]:
    if strategy in ("vmap", "map", "unroll", "loop"):
        return strategy, None
    if strategy.startswith("chunk:"):
        k = int(strategy.split(":", 1)[1])
        if k < 1:
            raise ValueError(f"chunk size must be >= 1, got {strategy!r}")
        return "chunk", k
    raise ValueError(f"unknown member strategy {strategy!r}; use one of {STRATEGIES}")


def run_local(strategy: str, fn, *xs):
    """Apply `fn` to each local member (leading axis of every leaf of `xs`) with `strategy`.

    A single local member is called directly, without vmap or a loop: that is the fast path of the
    one-member-per-device layout (XLA:CPU runs convolutions inside a while loop several times slower,
    so "map" is for memory, not speed, on CPU).
    """
    kind, k = _parse_strategy(strategy)
    m = jax.tree.leaves(xs)[0].shape[0]
    index = lambda i: jax.tree.map(lambda x: x[i], xs)
    if m == 1:
        return jax.tree.map(lambda y: y[None], fn(*index(0)))
    if kind == "vmap":
        return jax.vmap(fn)(*xs)
    if kind in ("unroll", "loop"):  # the engine hands "loop" one local member at a time
        outs = [fn(*index(i)) for i in range(m)]
        return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
    body = lambda args: fn(*args)
    if kind == "map":
        return jax.lax.map(body, xs)
    return jax.lax.map(body, xs, batch_size=k)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class Parts(tuple):
    """Members in the engine's training form (MemberEngine.split): a tuple of trees [model, ...],
    tree i holding local member i of every device group; one tree, the stacked [M] one, unless the
    engine runs the 'loop' strategy with several members per device group."""


class MemberEngine:
    """Compiled stacked steps for one model, one member count and one mesh.

    `train_step(state, hparams, batch)` updates every member once; `evaluate_batch(params, images,
    labels, mask)` returns per-member correct counts on images shared by all members;
    `update_best(state, score, step)` keeps each member's params on strict score improvement.
    A training loop keeps the members split (`parts = split(members)`, `train_parts(parts,
    hparam_parts, batch)`, `join(parts)` when it needs the stacked tree): with the 'loop' strategy
    that avoids slicing every member out of the stacked tree and writing it back at every step
    (~17 ms per 40 MB EfficientNet-Lite0 member, 2-3% of its step).
    """

    def __init__(self, model, batch_stats: Any, num_members: int, *, batch_size: int | None = None,
                 mesh: Mesh | None = None, devices: Sequence[jax.Device] | None = None,
                 strategy: str | None = None, classifier_only: bool = False,
                 remat: bool | str = False, model_axis: int | None = None,
                 data_parallel: bool | None = None):
        self.model = model
        self.num_members = num_members
        self.mesh = mesh or plan_mesh(num_members, batch_size, devices, model_axis, data_parallel)
        self.strategy = strategy or default_strategy(jax.default_backend())
        _parse_strategy(self.strategy)
        self.classifier_only = classifier_only
        self.remat = remat
        if remat:
            step_lib.remat_policy(remat)  # fail early on an unknown policy
        self.model_size = self.mesh.shape[MEMBER_AXIS]
        self.data_size = self.mesh.shape[DATA_AXIS]
        if num_members % self.model_size:
            raise ValueError(f"{num_members} members do not split over a 'model' axis of "
                             f"{self.model_size}")
        self.member_sharding = NamedSharding(self.mesh, P(MEMBER_AXIS))
        # A size-1 'data' axis is left out of the specs: values that vary over it could not be
        # returned as replicated over it (check_vma).
        self.batch_spec = P(MEMBER_AXIS, DATA_AXIS) if self.data_size > 1 else P(MEMBER_AXIS)
        self.eval_spec = P(DATA_AXIS) if self.data_size > 1 else P()
        self.batch_sharding = NamedSharding(self.mesh, self.batch_spec)
        self.eval_sharding = NamedSharding(self.mesh, self.eval_spec)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_stats = jax.tree.map(lambda x: _put(x, self.replicated), batch_stats)
        self._train_jit = self._build_train()
        self._compiled_train: dict = {}
        self.compiler_options: dict | None = None  # the XLA options of the last compiled train step
        self._eval = self._build_eval()
        if self.strategy == "loop":
            self._take, self._join = self._build_take_join()
        self._best = jax.jit(_update_best, donate_argnums=(0,))

    # -- placement ---------------------------------------------------------------------------
    def place(self, stacked: Any) -> Any:
        """Put a stacked tree (leading member axis) on the mesh, split over 'model'."""
        return jax.tree.map(lambda x: _put(x, self.member_sharding), stacked)

    def place_batch(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        images, labels = self._check_batch(batch)
        return _put(images, self.batch_sharding), _put(labels, self.batch_sharding)

    def _check_batch(self, batch: dict) -> tuple[Any, Any]:
        images, labels = batch["images"], batch["labels"]
        if images.shape[0] != self.num_members:
            raise ValueError(f"the member loader gave a batch for {images.shape[0]} members; the "
                             f"engine trains {self.num_members} (images must be [M, N, H, W, C])")
        if images.shape[1] % self.data_size:
            raise ValueError(f"per-member batch {images.shape[1]} does not split over the 'data' "
                             f"axis of {self.data_size} devices; pass batch_size to plan_mesh")
        return images, labels

    # -- compiled functions ------------------------------------------------------------------
    def _build_train(self):
        model, strategy, data_size = self.model, self.strategy, self.data_size
        classifier_only, remat = self.classifier_only, self.remat

        def local(members, hparams, images, labels, batch_stats):
            def one(member, hp, x, y):
                kwargs = {}
                if data_size > 1:  # shard of a member's batch: own dropout masks, global mean CE
                    shard = jax.lax.axis_index(DATA_AXIS)
                    kwargs = dict(global_batch=y.shape[0] * data_size,
                                  key=jax.random.fold_in(
                                      step_lib.dropout_key(hp, member["step"]), shard),
                                  reduce_loss=lambda l: jax.lax.psum(l, DATA_AXIS))
                return step_lib.train_step(model, batch_stats, member, hp, x, y,
                                           classifier_only=classifier_only, remat=remat, **kwargs)
            return run_local(strategy, one, members, hparams, images, labels)

        mapped = jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS), self.batch_spec, self.batch_spec, P()),
            out_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS)))
        return jax.jit(mapped, donate_argnums=(0,))

    def _build_eval(self):
        model, strategy, data_size = self.model, self.strategy, self.data_size

        def local(params, images, labels, mask, batch_stats):
            one = lambda p: step_lib.eval_step(model, batch_stats, p, images, labels, mask)
            correct = run_local(strategy, one, params)
            return jax.lax.psum(correct, DATA_AXIS) if data_size > 1 else correct

        mapped = jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(P(MEMBER_AXIS), self.eval_spec, self.eval_spec, self.eval_spec, P()),
            out_specs=P(MEMBER_AXIS))
        return jax.jit(mapped)

    def _train(self, members, hparams, images, labels, batch_stats):
        """The compiled train step for these shapes: lowered once, the XLA:CPU options chosen from
        its cost (cpu_compiler_options), compiled once per shape and reused."""
        key = (jax.tree.structure(members),
               tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves((members, images))))
        compiled = self._compiled_train.get(key)
        if compiled is None:
            lowered = self._train_jit.lower(members, hparams, images, labels, batch_stats)
            n = jax.tree.leaves(members)[0].shape[0]
            options = cpu_compiler_options(lowered, n, self.mesh.devices.flat[0].platform)
            compiled = self._compiled_train[key] = lowered.compile(compiler_options=options)
            self.compiler_options = options
        return compiled(members, hparams, images, labels, batch_stats)

    def _build_take_join(self):
        """'loop' helpers: local member i of every device group out of a stacked tree ([model]
        leading axis), and L such trees back into one stacked tree."""
        spec = P(MEMBER_AXIS)

        def take(tree, i):
            return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=True),
                                tree)

        def join(parts):  # per device: [1, ...] x L -> its L members in order
            return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
        take_j = jax.jit(jax.shard_map(take, mesh=self.mesh, in_specs=(spec, P()),
                                       out_specs=spec))
        # (no donation: XLA cannot alias L [1, ...] buffers into one [L, ...] buffer)
        join_j = jax.jit(jax.shard_map(join, mesh=self.mesh, in_specs=(spec,), out_specs=spec))
        return take_j, join_j

    @property
    def local_members(self) -> int:
        """Members per device group (the length of the 'loop' strategy's loop)."""
        return self.num_members // self.model_size

    @property
    def split_form(self) -> bool:
        """Whether training keeps the members in several parts (the 'loop' strategy with more than
        one member per device group)."""
        return self.strategy == "loop" and self.local_members > 1

    def _local_index(self, i: int) -> np.ndarray:
        """Members in part i: local member i of every device group (group d holds d*L .. d*L+L-1)."""
        return np.arange(self.model_size) * self.local_members + i

    def split(self, stacked: Any) -> Parts:
        """A stacked tree [M, ...] (host or placed; e.g. the members or the hparams) -> Parts for
        train_parts / evaluate_batch. The stacked tree is left as it was (not donated)."""
        if isinstance(stacked, Parts):
            return stacked
        stacked = self.place(stacked)
        if not self.split_form:
            return Parts((stacked,))
        return Parts(self._take(stacked, np.int32(i)) for i in range(self.local_members))

    def join(self, parts: Parts) -> Any:
        """Parts -> the stacked tree [M, ...] on the mesh (a copy when there are several parts; with
        one part, that part itself)."""
        if len(parts) == 1:
            return parts[0]
        return self._join(tuple(parts))

    def _gather_local(self, outs: list) -> Any:
        """Per-call outputs [model] of the 'loop' strategy (call i = local member i of every
        device group) -> [M] in member order (device group d holds members d*L .. d*L+L-1)."""
        return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(-1), *outs)

    def train_memory(self, state: dict, hparams: dict, batch: dict) -> dict:
        """XLA's memory analysis of the compiled train step (bytes per device), without running it."""
        images = jax.ShapeDtypeStruct(np.shape(batch["images"]), np.float32,
                                      sharding=self.batch_sharding)
        labels = jax.ShapeDtypeStruct(np.shape(batch["labels"]), np.int32,
                                      sharding=self.batch_sharding)
        members = state["members"]
        resident = 0
        if self.strategy == "loop" and self.local_members > 1:  # one member per device group
            def one(x):
                shape = (self.model_size,) + tuple(np.shape(x))[1:]
                return jax.ShapeDtypeStruct(shape, x.dtype, sharding=self.member_sharding)
            full = sum(int(np.prod(np.shape(x))) * x.dtype.itemsize
                       for x in jax.tree.leaves(members)) // self.model_size
            members, hparams = jax.tree.map(one, members), jax.tree.map(one, hparams)
            images, labels = one(images), one(labels)
            resident = full - full // self.local_members  # the other local members' state
        compiled = self._train_jit.lower(members, hparams, images, labels,
                                         self.batch_stats).compile()
        mem = compiled.memory_analysis()
        out = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes") if hasattr(mem, k)}
        out["argument_size_in_bytes"] += resident
        return out

    # -- public steps ------------------------------------------------------------------------
    def train_step(self, state: dict, hparams: dict, batch: dict) -> tuple[dict, dict]:
        """Update every member once on its own batch; returns (state, metrics [M]). The stacked
        members are donated (one part) or copied into parts and back (several parts, 'loop'): a
        loop over many steps is faster with split / train_parts / join."""
        parts, metrics = self.train_parts(self.split(state["members"]), self.split(hparams), batch)
        return {**state, "members": self.join(parts)}, metrics

    def train_parts(self, parts: Parts, hparams: Parts, batch: dict) -> tuple[Parts, dict]:
        """One update of every member, on the members and hparams in split form (self.split);
        each part is donated. Returns (parts, metrics [M] in member order)."""
        if not self.split_form:
            images, labels = self.place_batch(batch)
            members, metrics = self._train(parts[0], hparams[0], images, labels,
                                           self.batch_stats)
            return Parts((members,)), metrics
        images, labels = self._check_batch(batch)
        new, outs = [], []
        for i, (members, hp) in enumerate(zip(parts, hparams)):
            index = self._local_index(i)  # sliced on the host: no device copy of the whole batch
            x, y = _put(images[index], self.batch_sharding), _put(labels[index], self.batch_sharding)
            members, metrics = self._train(members, hp, x, y, self.batch_stats)
            new.append(members)
            outs.append(metrics)
        return Parts(new), self._gather_local(outs)

    def evaluate_batch(self, params: Any, images: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None) -> jax.Array:
        """Correct counts [M] of all members on one batch of shared images ([B, H, W, C]).
        `params`: stacked [M] or Parts (split once for many batches: self.split(params))."""
        n = images.shape[0]
        mask = np.ones((n,), bool) if mask is None else np.asarray(mask, bool)
        pad = (-n) % self.data_size
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
            mask = np.concatenate([mask, np.zeros((pad,), bool)])
        put = lambda x: _put(x, self.eval_sharding)
        shared = (put(images), put(labels), put(mask), self.batch_stats)
        parts = self.split(params)
        if len(parts) > 1:
            return self._gather_local([self._eval(p, *shared) for p in parts])
        return self._eval(parts[0], *shared)

    def update_best(self, state: dict, score: jax.Array, step: int) -> dict:
        """Replace best params/score/step of members whose score strictly improved."""
        best = self._best({"best_params": state["best_params"], "best_score": state["best_score"],
                           "best_step": state["best_step"]},
                          state["members"]["params"], jnp.asarray(score, jnp.float32),
                          jnp.int32(step))
        return {**state, **best}


# XLA:CPU's YNNPACK dot fusions (on by default in jaxlib 0.10) against Eigen's matmul, one member step
# on one device, batch 96 unless noted, with rat_jax's malloc settings (runtime.MALLOC_TUNABLES; XLA's
# cost analysis of the step in parentheses; `RAT_JAX_CPU_YNN=1|0 python bench/engine_step.py ARCH
# SIZE 1 --devices 1`, idle machine): YNNPACK faster for EfficientNet-Lite0 @ 32 px, batch 24
# (1.4 GFLOP: 11.8 vs 4.8 member-steps/s) and Lite0 @ 64 px (19 GFLOP: 1.55 vs 1.35), about even for
# resnet_tiny @ 64 px (3.1 GFLOP: 9.8 vs 10.2); Eigen faster for ResNet-18 @ 64 px (80 GFLOP: 1.18 vs
# 0.85). ResNet-50 @ 64 px (188 GFLOP) ran 0.39 with YNNPACK, 0.35 without. Steps above this many
# FLOPs per member are compiled with the YNNPACK fusions off. (Before the malloc settings, when every
# step page-faulted its temporaries, Eigen had measured 1.2x faster for Lite0 @ 64 px and the limit
# was 1e10.)
CPU_YNN_MAX_FLOPS = 4e10


def cpu_compiler_options(lowered, num_members: int, platform: str) -> dict | None:
    """Per-program XLA options for a member train step on CPU: YNNPACK dot fusions off when a member
    step costs more than CPU_YNN_MAX_FLOPS (XLA's own cost analysis of the lowered step).
    RAT_JAX_CPU_YNN=1 / 0 forces them on / off (0 also sets the process-wide flag,
    runtime.configure_cpu_xla_flags); other backends: None."""
    if platform != "cpu" or os.environ.get("RAT_JAX_CPU_YNN", "") == "1":
        return None
    if os.environ.get("RAT_JAX_CPU_YNN", "") == "0":
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # no cost analysis: XLA's defaults
        return None
    if flops / max(num_members, 1) > CPU_YNN_MAX_FLOPS:
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return None


def _put(x, sharding):
    """Place a host array that every process holds whole (or a ready global jax.Array). With several
    processes each one copies only its devices' blocks (device_put would also all-gather the whole
    array to check that the processes agree)."""
    if jax.process_count() > 1 and not isinstance(x, jax.Array):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.device_put(x, sharding)


def _update_best(best: dict, params: Any, score: jax.Array, step: jax.Array) -> dict:
    improved = score > best["best_score"]  # strict: ties keep the earlier checkpoint (PROTOCOL §3.5)

    def pick(new, old):
        return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return {"best_params": jax.tree.map(pick, params, best["best_params"]),
            "best_score": jnp.where(improved, score, best["best_score"]),
            "best_step": jnp.where(improved, step, best["best_step"])}


def slice_members(tree: Any, count: int, start: int = 0) -> Any:
    """Members start..start+count-1 of a stacked tree (e.g. [M] hparams)."""
    return jax.tree.map(lambda x: x[start:start + count], tree)
