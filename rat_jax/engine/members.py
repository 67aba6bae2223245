"""The member engine: stacked members laid on devices, trained and evaluated by compiled steps.

Members are stored *stacked*: one pytree whose leaves carry a leading member axis [M, ...]
(rat_jax.trees). Steps run as `jit(shard_map(local_fn))` over the mesh ('model', 'data') of
rat_jax.engine.mesh; on each device the local members run with a local strategy
(rat_jax.engine.strategies: "loop" on CPU, "map" on accelerators, "vmap").

Training goes through `live = engine.start(members, hparams)`: `live.step(batch)` updates every
member once (on a loader batch, or on one that `engine.feed(batches)` placed on the devices while
the previous step ran: feed.DeviceFeed), `live.stacked()` gives the stacked members for
evaluation, selection and checkpoints, `live.params_for_eval()` their params for
`evaluate_batch`. With the "loop" strategy and several members per device, the live members are
held in parts (local member i of every device group per part), each stepped in place with
donated buffers, so no step slices members out of the stacked tree and writes them back; the
stacked tree is assembled only when asked for.

Evaluation and selection: `engine.logits(params, images)` gives every member's logits [M, N, C]
(host numpy on every process) from one compiled `jit(shard_map)`: members split over 'model',
images over 'data' in steps of at most `batch_size` images per device; `images` is an array every
process holds or a row source (rat_jax.evaluation.EvalSplit) of which each process loads only the
rows its devices hold. `plan_eval_mesh` lays 'data' over the processes first, so that each process
decodes only its share of an evaluation split.

Data-parallel gradients: with `check_vma=True`, the gradient of a parameter that is replicated over
'data' is already summed over 'data' by autodiff (the transpose of the implicit broadcast is a psum).
The local loss is therefore the shard's summed CE divided by the *global* batch size, and there is no
extra pmean/psum of the gradients (tests/test_members.py checks the gradient norm).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import rat_jax.distributed as distributed
import rat_jax.runtime as runtime
import rat_jax.trees as trees
from rat_jax.engine import programs
from rat_jax.engine import step as step_lib
from rat_jax.engine.feed import DeviceFeed, PlacedBatch
from rat_jax.engine.mesh import DATA_AXIS, MEMBER_AXIS, default_data_parallel, plan_mesh
from rat_jax.engine.placement import PartLayout, Parts, Placement
from rat_jax.engine.placement import put as placement_put
from rat_jax.engine.programs import TrainProgram
from rat_jax.engine.strategies import check_strategy, default_strategy


# ----------------------------------------------------------------------------------------------
# Per-member settings and state
# ----------------------------------------------------------------------------------------------
def member_keys(seeds: Sequence[int]) -> np.ndarray:
    """Raw uint32 [M, 2] PRNG keys, one independent dropout stream per member (flax#4195)."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])


def make_hparams(num_members: int, *, lr: Any = 5e-5, weight_decay: Any = 0.0, dropout: Any = 0.0,
                 lp_steps: Any = -1, seed: Any = 0) -> dict:
    """Per-member settings as [M] arrays (scalars are broadcast); seeds give each member its RNG.

    `lp_steps`: L >= 0 for an aux-init member (classifier-only updates 0..L, then Adam reset and
    whole net), -1 for a member trained whole from update 0 (docs/protocol.md §1.4).
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


def init_state_shapes(params: Any) -> dict:
    """The ShapeDtypeStructs of init_state(params) (stacked params [M, ...], host or abstract),
    without making the state."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype)), params)
    m = trees.num_members(params)
    return {
        "members": jax.eval_shape(jax.vmap(step_lib.init_member), params),
        "best_params": params,
        "best_score": jax.ShapeDtypeStruct((m,), np.dtype(np.float32)),
        "best_step": jax.ShapeDtypeStruct((m,), np.dtype(np.int32)),
    }


def init_state(params: Any) -> dict:
    """Stacked training state from stacked params (leading member axis on every leaf)."""
    m = trees.num_members(params)
    members = jax.vmap(step_lib.init_member)(jax.tree.map(jnp.asarray, params))
    members = jax.tree.map(np.asarray, members)
    return {
        "members": members,
        "best_params": jax.tree.map(np.array, params),
        "best_score": np.full((m,), -np.inf, np.float32),
        "best_step": np.full((m,), -1, np.int32),
    }


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a MemberEngine lays out and compiles its members. `batch_size`: images per member per
    step (lets the engine split each member's batch over spare devices; `data_parallel` None = by
    backend, see mesh.default_data_parallel); `devices`, `model_axis`: see mesh.plan_mesh.
    `strategy`: the local strategy (None = by backend, strategies.default_strategy).
    `classifier_only=True` is the linear-probe stage (featurizer never stepped); `remat`: a
    step_lib.remat_policy. `cpu_ynn` ("auto", "on", "off"): XLA:CPU's YNNPACK dot fusions for
    the train step, decided per compiled step by runtime.cpu_compiler_options.
    `device_prefetch`: training batches placed on the devices ahead of the step that reads
    them (`feed`; 0: each placed when its step starts)."""
    batch_size: int | None = None
    devices: Sequence[jax.Device] | None = None
    strategy: str | None = None
    classifier_only: bool = False
    remat: bool | str = False
    model_axis: int | None = None
    data_parallel: bool | None = None
    cpu_ynn: str = "auto"
    device_prefetch: int = 1

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


class LiveMembers:
    """The members one engine is training (`MemberEngine.start`).

    `step(batch)` updates every member once on its own batch (a loader batch, or one already
    placed by `MemberEngine.place_train` / `feed`) and returns the metrics [M] (the members'
    buffers are donated to the step). `stacked()` is the stacked member state [M] on the
    mesh and `params_for_eval()` the params in the form `MemberEngine.evaluate_batch` reads; both
    are valid until the next `step` (with one part they are its very buffers, which the next step
    donates).
    """

    def __init__(self, engine: "MemberEngine", members: Any, hparams: Any):
        self.engine = engine
        self._parts = engine.parts.split(members)
        self._hparams = engine.parts.split(hparams)

    def step(self, batch: dict | PlacedBatch) -> dict:
        self._parts, metrics = self.engine._train_parts(self._parts, self._hparams, batch)
        return metrics

    def stacked(self, keys: Sequence[str] | None = None) -> Any:
        """The members' stacked state {'params', 'opt_state', 'step', 'nonfinite'} [M, ...];
        `keys`: only those entries (an evaluation reads the params and flags, not Adam's
        moments: with several parts, each entry joined is a copy)."""
        parts = self._parts
        if keys is not None:
            parts = Parts({k: p[k] for k in keys} for p in parts)
        return self.engine.parts.join(parts)

    def params_for_eval(self) -> Any:
        """The members' params, for `evaluate_batch` / loop.evaluate (no copy)."""
        return Parts(p["params"] for p in self._parts)


class MemberEngine:
    """Compiled stacked steps for one model, one member count and one mesh.

    `start(members, hparams)` begins training (LiveMembers); `train_step(state, hparams, batch)`
    is one update of a stacked state (a start, one step and a stacked() in one call);
    `evaluate_batch(params, images, labels, mask)` returns per-member correct counts on images
    shared by all members; `update_best(state, score, step)` keeps each member's params on strict
    score improvement; `logits(params, images)` every member's logits.

    Its parts: `placement` (mesh and shardings, placement.Placement), `parts` (the training form
    of the local strategy, placement.PartLayout), `train_program` (the compiled train step and
    its memory analysis, programs.TrainProgram), the evaluation programs, and `feed(batches)`
    (training batches placed ahead of their step by `place_train`, feed.DeviceFeed). `config`:
    EngineConfig; `mesh` replaces the one planned from it.
    """

    def __init__(self, model, batch_stats: Any, num_members: int,
                 config: EngineConfig | None = None, *, mesh: Mesh | None = None):
        c = self.config = config or EngineConfig()
        self.model = model
        self.num_members = num_members
        mesh = mesh or plan_mesh(num_members, c.batch_size, c.devices, c.model_axis,
                                 c.data_parallel)
        self.strategy = check_strategy(c.strategy or default_strategy(jax.default_backend()))
        self.cpu_ynn = runtime.check_cpu_ynn(c.cpu_ynn)
        self.classifier_only, self.remat = c.classifier_only, c.remat
        if c.remat:
            step_lib.remat_policy(c.remat)  # fail early on an unknown policy
        self.placement = Placement(mesh, num_members)
        self.parts = PartLayout(self.placement, self.strategy)
        self.batch_stats = self.placement.replicate(batch_stats)
        self.train_program = TrainProgram(model, self.placement, self.strategy,
                                          classifier_only=c.classifier_only, remat=c.remat,
                                          cpu_ynn=self.cpu_ynn)
        self._best = jax.jit(programs.update_best, donate_argnums=(0,))

    # -- the placement's fields, read by the loop, the sweep's plan and the tests -------------
    mesh = property(lambda self: self.placement.mesh)
    model_size = property(lambda self: self.placement.model_size)
    data_size = property(lambda self: self.placement.data_size)
    batch_spec = property(lambda self: self.placement.batch_spec)
    eval_spec = property(lambda self: self.placement.eval_spec)
    member_sharding = property(lambda self: self.placement.member_sharding)
    batch_sharding = property(lambda self: self.placement.batch_sharding)
    eval_sharding = property(lambda self: self.placement.eval_sharding)
    replicated = property(lambda self: self.placement.replicated)
    local_members = property(lambda self: self.parts.local_members,
                             doc="Members per device group (the 'loop' strategy's loop length).")
    compiler_options = property(lambda self: self.train_program.compiler_options,
                                doc="The XLA options of the last compiled train step.")

    def place(self, stacked: Any) -> Any:
        """Put a stacked tree (leading member axis) on the mesh, split over 'model'."""
        return self.placement.place(stacked)

    def place_batch(self, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
        """(images, labels, augment parameters) of a loader batch on the mesh."""
        return self.placement.place_batch(batch)

    def _split(self, stacked: Any) -> Parts:
        return self.parts.split(stacked)

    def _join(self, parts: Parts) -> Any:
        return self.parts.join(parts)

    def place_train(self, batch: dict | PlacedBatch) -> PlacedBatch:
        """A loader batch on the mesh in the form the train step reads: the whole batch, or
        with several parts each part's members sliced on the host (no device copy of the
        batch) and placed; with several processes each places only its devices' blocks. A
        PlacedBatch is returned as it is."""
        if isinstance(batch, PlacedBatch):
            return batch
        if not self.parts.split_form:
            parts = (self.placement.place_batch(batch),)
        else:
            images, labels = self.placement.check_batch(batch)
            aug_all = batch.get("augment") or {}

            def part(i):
                index = self.parts.local_index(i)
                put = lambda x: placement_put(x[index], self.placement.batch_sharding)
                return put(images), put(labels), jax.tree.map(put, aug_all)
            parts = tuple(part(i) for i in range(self.local_members))
        return PlacedBatch(parts, batch.get("image_size"), tuple(np.shape(batch["labels"])))

    def feed(self, batches: Iterable, *, limit: int | None = None, stateful: Any = None,
             depth: int | None = None) -> DeviceFeed:
        """`batches` placed by `place_train`, `depth` (default: the config's device_prefetch)
        batches ahead of the step that reads them (feed.DeviceFeed), at most `limit`;
        `stateful`: whose get_state() is the position of `batches`."""
        depth = self.config.device_prefetch if depth is None else depth
        return DeviceFeed(batches, self.place_train, depth, limit, stateful)

    def _train_parts(self, parts: Parts, hparams: Parts,
                     batch: dict | PlacedBatch) -> tuple[Parts, dict]:
        """One update of every member in the training form; each part is donated. Returns
        (parts, metrics [M] in member order)."""
        batch = self.place_train(batch)
        if len(batch.parts) != len(parts):
            raise ValueError(f"a batch placed in {len(batch.parts)} part(s) for an engine "
                             f"training {len(parts)}: place it with this engine's place_train")
        new, outs = [], []
        for members, hp, (x, y, aug) in zip(parts, hparams, batch.parts):
            members, metrics = self.train_program(members, hp, x, y, aug, self.batch_stats,
                                                  batch.image_size)
            new.append(members)
            outs.append(metrics)
        if not self.parts.split_form:
            return Parts(new), outs[0]
        return Parts(new), self.parts.gather_local(outs)

    def compile_train(self, members: Any, hparams: Any, batch: dict | PlacedBatch) -> None:
        """Compile the train step for stacked `members` (host, placed or ShapeDtypeStructs:
        their shapes are what is read) with the [M] `hparams` on `batch`'s shapes, without
        running it; the first `LiveMembers.step` on such members then reuses it."""
        batch = self.place_train(batch)
        members = self.parts.abstract_part(members)
        hparams = self.parts.split(hparams)[0]
        x, y, aug = batch.parts[0]
        self.train_program.compile(members, hparams, x, y, aug, self.batch_stats,
                                   batch.image_size)

    # -- public steps ------------------------------------------------------------------------
    def start(self, members: Any, hparams: Any) -> LiveMembers:
        """Begin training the stacked member state `members` (init_state(...)["members"], host or
        placed; left as it was) with the [M] `hparams` (make_hparams)."""
        return LiveMembers(self, members, hparams)

    def train_step(self, state: dict, hparams: dict, batch: dict) -> tuple[dict, dict]:
        """Update every member of a stacked state once on its own batch; returns (state,
        metrics [M]). A loop over many steps is faster with `start` (no split and join per step
        with the 'loop' strategy)."""
        live = self.start(state["members"], hparams)
        metrics = live.step(batch)
        return {**state, "members": live.stacked()}, metrics

    def prepare_eval(self, params: Any) -> Any:
        """Stacked params [M] (or live.params_for_eval()) in the form `evaluate_batch` reads;
        prepare once when evaluating many batches."""
        return self.parts.split(params)

    def evaluate_batch(self, params: Any, images: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None, augment: dict | None = None,
                       image_size: int | None = None) -> jax.Array:
        """Correct counts [M] of all members on one batch: images shared by every member
        ([B, H, W, C], labels [B]) or each member's own ([M, B, H, W, C], labels [M, B], e.g.
        its own augmentation draw; with `augment`, crop-window canvases and their parameters
        as MemberLoader's device mode ships them, augmented to `image_size` on device). `mask`
        (labels' shape): the rows that count. `params`: stacked [M], live.params_for_eval() or
        prepare_eval(params)."""
        labels = np.asarray(labels)
        mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
        per_member = labels.ndim == 2
        size = int(image_size) if augment else None
        fn = programs.forward_program(self.model, self.mesh, self.strategy,
                                      per_member=per_member, counts=True, size=size)
        parts = self.parts.split(params)
        if not per_member:
            shared = self.placement.place_eval(images, labels, mask)
            outs = [fn(p, *shared, {}, self.batch_stats) for p in parts]
        else:
            batch = {"images": images, "labels": labels, "mask": mask,
                     "augment": augment or {}}
            outs = [fn(p, *self._member_rows(batch, i, len(parts)), self.batch_stats)
                    for i, p in enumerate(parts)]
        return outs[0] if len(outs) == 1 else self.parts.gather_local(outs)

    def _member_rows(self, batch: dict, part: int, num_parts: int) -> tuple:
        """(images, labels, mask, augment) of a per-member batch [M, B, ...] on the mesh, the
        rows padded (mask off) to split over 'data'; with several parts, part `part`'s
        members, sliced on the host."""
        self.placement.check_members(batch["images"])
        b = batch["labels"].shape[1]
        pad = (-b) % self.data_size

        def put(x):
            x = np.asarray(x)
            if num_parts > 1:
                x = x[self.parts.local_index(part)]
            if pad:
                x = np.concatenate([x, np.zeros((x.shape[0], pad) + x.shape[2:], x.dtype)], 1)
            return placement_put(x, self.placement.batch_sharding)
        return (put(batch["images"]), put(batch["labels"]), put(batch["mask"]),
                jax.tree.map(put, batch["augment"]))

    def logits(self, params: Any, images: Any, batch_size: int = 256) -> np.ndarray:
        """Logits [K, N, C] (float32 numpy, on every process) of every member of `params` on
        `images`, each image sent once and run through all members.

        `params`: stacked [K] (host or placed; K a multiple of the 'model' axis, not necessarily
        `num_members`), live.params_for_eval() or prepare_eval(params). `images`: uint8 (or
        normalized float32) [N, H, W, 3] that every process holds, or a row source with
        `len()`, `image_shape`, `dtype` and `load(rows) -> [len(rows), H, W, 3]` (e.g.
        rat_jax.evaluation.EvalSplit): each process then loads only the rows its devices hold.
        Images go in steps of `batch_size` rows per device ('data' shard); the last step is
        padded with zeros, so one shape is compiled per split size class."""
        source = images if hasattr(images, "load") else _ArrayRows(images)
        parts = self.parts.eval_parts(params)
        n = len(source)
        k = sum(int(jax.tree.leaves(p)[0].shape[0]) for p in parts)
        if n == 0:
            return np.zeros((k, 0, _num_classes(parts[0])), np.float32)
        d = self.data_size
        b = max(1, min(int(batch_size), -(-n // d)))        # rows per device and step
        g = b * d                                             # rows per step
        shape = (g,) + tuple(source.image_shape)
        held = distributed.process_indices(self.mesh, self.eval_spec, shape)[0]
        logits_fn = programs.forward_program(self.model, self.mesh, self.strategy)
        pending, outs = None, []
        for start in range(0, n, g):
            x = self._eval_rows(source, start + held, n, shape)
            arrays = [logits_fn(p, x, None, None, {}, self.batch_stats) for p in parts]
            if pending is not None:                           # at most two steps in flight
                outs.append(programs.gather_logits(pending[1], k, min(g, n - pending[0])))
            pending = (start, arrays)
        outs.append(programs.gather_logits(pending[1], k, min(g, n - pending[0])))
        return np.concatenate(outs, axis=1)

    def _eval_rows(self, source, rows: np.ndarray, n: int, shape: tuple) -> jax.Array:
        """This process's `rows` of a row source (zeros past `n`) as the step's global array."""
        local = np.zeros((len(rows),) + shape[1:], source.dtype)
        valid = rows < n
        if valid.any():
            local[valid] = source.load(rows[valid])
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(self.eval_sharding, local, shape)
        return jax.device_put(local, self.eval_sharding)

    def update_best(self, state: dict, score: jax.Array, step: int) -> dict:
        """Replace best params/score/step of members whose score strictly improved."""
        best = self._best({"best_params": state["best_params"], "best_score": state["best_score"],
                           "best_step": state["best_step"]},
                          state["members"]["params"], jnp.asarray(score, jnp.float32),
                          jnp.int32(step))
        return {**state, **best}

    def train_memory(self, state: dict, hparams: dict, batch: dict) -> dict:
        """XLA's memory analysis of the compiled train step (bytes per device), without running it."""
        local = self.local_members if self.parts.split_form else 1
        return self.train_program.memory(state["members"], hparams, batch, self.batch_stats,
                                         local)


class _ArrayRows:
    """Rows of an image array that every process holds (the row-source interface of
    MemberEngine.logits)."""

    def __init__(self, images):
        self.images = np.asarray(images)
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
        self.image_shape, self.dtype = self.images.shape[1:], self.images.dtype

    def __len__(self):
        return len(self.images)

    def load(self, rows):
        rows = np.asarray(rows)
        if len(rows) and np.all(np.diff(rows) == 1):
            return self.images[rows[0]:rows[-1] + 1]
        return self.images[rows]


def _num_classes(params) -> int:
    try:
        return int(np.shape(params["classifier"]["bias"])[-1])
    except (KeyError, TypeError, IndexError):
        return 0


def plan_eval_mesh(num_members: int, devices: Sequence[jax.Device] | None = None,
                   data_parallel: bool | None = None) -> Mesh:
    """The mesh ('model', 'data') for evaluating `num_members` stacked members (any count).

    'data' is laid over the processes first, so that each process holds (and loads) only its
    share of an evaluation split's images, and every process holds all members; within a process
    the members split over its devices as training's plan_mesh splits them ('model' = the
    largest divisor of the member count that fits the process's devices; with `data_parallel`,
    default mesh.default_data_parallel, gcd(members, local devices) and the devices left over
    add to 'data'). One process: plan_mesh's layout."""
    devices = list(jax.devices() if devices is None else devices)
    if data_parallel is None:
        data_parallel = default_data_parallel(devices)
    procs = sorted({d.process_index for d in devices})
    by_proc = [[d for d in devices if d.process_index == p] for p in procs]
    local = min(len(ds) for ds in by_proc)
    if data_parallel:
        model = int(np.gcd(num_members, local))
    else:
        model = max(k for k in range(1, min(local, num_members) + 1) if num_members % k == 0)
    per = local // model if data_parallel else 1
    # grid[m, p * per + j] = process p's device m * per + j
    blocks = [np.asarray(ds[: model * per], dtype=object).reshape(model, per) for ds in by_proc]
    return Mesh(np.concatenate(blocks, axis=1), (MEMBER_AXIS, DATA_AXIS))
