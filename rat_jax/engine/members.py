"""The member engine: stacked members laid on devices, trained and evaluated by compiled steps.

Members are stored *stacked*: one pytree whose leaves carry a leading member axis [M, ...]
(rat_jax.trees). Steps run as `jit(shard_map(local_fn))` over the mesh ('model', 'data') of
rat_jax.engine.mesh; on each device the local members run with a local strategy
(rat_jax.engine.strategies: "loop" on CPU, "map" on accelerators, "vmap").

Training goes through `live = engine.start(members, hparams)`: `live.step(batch)` updates every
member once, `live.stacked()` gives the stacked members for evaluation, selection and checkpoints,
`live.params_for_eval()` their params for `evaluate_batch`. With the "loop" strategy and several
members per device, the live members are held in parts (local member i of every device group per
part), each stepped in place with donated buffers, so no step slices members out of the stacked
tree and writes them back; the stacked tree is assembled only when asked for.

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

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import rat_jax.distributed as distributed
import rat_jax.runtime as runtime
import rat_jax.trees as trees
from rat_jax.data import augment
from rat_jax.engine import step as step_lib
from rat_jax.engine.mesh import DATA_AXIS, MEMBER_AXIS, default_data_parallel, plan_mesh
from rat_jax.engine.strategies import check_strategy, default_strategy, run_local


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
class _Parts(tuple):
    """Members in the engine's training form: a tuple of trees [model, ...], tree i holding local
    member i of every device group; one tree, the stacked [M] one, unless the engine runs the
    'loop' strategy with several members per device group."""


class LiveMembers:
    """The members one engine is training (`MemberEngine.start`).

    `step(batch)` updates every member once on its own batch and returns the metrics [M] (the
    members' buffers are donated to the step). `stacked()` is the stacked member state [M] on the
    mesh and `params_for_eval()` the params in the form `MemberEngine.evaluate_batch` reads; both
    are valid until the next `step` (with one part they are its very buffers, which the next step
    donates).
    """

    def __init__(self, engine: "MemberEngine", members: Any, hparams: Any):
        self.engine = engine
        self._parts = engine._split(members)
        self._hparams = engine._split(hparams)

    def step(self, batch: dict) -> dict:
        self._parts, metrics = self.engine._train_parts(self._parts, self._hparams, batch)
        return metrics

    def stacked(self) -> Any:
        """The members' stacked state {'params', 'opt_state', 'step', 'nonfinite'} [M, ...]."""
        return self.engine._join(self._parts)

    def params_for_eval(self) -> Any:
        """The members' params, for `evaluate_batch` / loop.evaluate (no copy)."""
        return _Parts(p["params"] for p in self._parts)


class MemberEngine:
    """Compiled stacked steps for one model, one member count and one mesh.

    `start(members, hparams)` begins training (LiveMembers); `train_step(state, hparams, batch)`
    is one update of a stacked state (a start, one step and a stacked() in one call);
    `evaluate_batch(params, images, labels, mask)` returns per-member correct counts on images
    shared by all members; `update_best(state, score, step)` keeps each member's params on strict
    score improvement.

    `cpu_ynn` ("auto", "on", "off"): XLA:CPU's YNNPACK dot fusions for the train step, decided per
    compiled step by runtime.cpu_compiler_options.
    """

    def __init__(self, model, batch_stats: Any, num_members: int, *, batch_size: int | None = None,
                 mesh: Mesh | None = None, devices: Sequence[jax.Device] | None = None,
                 strategy: str | None = None, classifier_only: bool = False,
                 remat: bool | str = False, model_axis: int | None = None,
                 data_parallel: bool | None = None, cpu_ynn: str = "auto"):
        self.model = model
        self.num_members = num_members
        self.mesh = mesh or plan_mesh(num_members, batch_size, devices, model_axis, data_parallel)
        self.strategy = check_strategy(strategy or default_strategy(jax.default_backend()))
        self.cpu_ynn = runtime.check_cpu_ynn(cpu_ynn)
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
        self._train_jits: dict = {}  # output size of the device-side augmentation -> jit
        self._compiled_train: dict = {}
        self.compiler_options: dict | None = None  # the XLA options of the last compiled train step
        self._eval = self._build_eval()
        self._logits_jit = self._build_logits()
        if self.strategy == "loop":
            self._take_jit, self._join_jit = self._build_take_join()
        self._best = jax.jit(_update_best, donate_argnums=(0,))

    # -- placement ---------------------------------------------------------------------------
    def place(self, stacked: Any) -> Any:
        """Put a stacked tree (leading member axis) on the mesh, split over 'model'."""
        return jax.tree.map(lambda x: _put(x, self.member_sharding), stacked)

    def place_batch(self, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
        """(images, labels, augment parameters) of a loader batch on the mesh."""
        images, labels = self._check_batch(batch)
        aug = jax.tree.map(lambda x: _put(x, self.batch_sharding), batch.get("augment") or {})
        return _put(images, self.batch_sharding), _put(labels, self.batch_sharding), aug

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
    def _train_jit(self, size: int | None):
        """The jitted train step for device-side augmentation to `size` (None: ready images);
        one jit per size, `size` closed over."""
        if size not in self._train_jits:
            self._train_jits[size] = self._build_train(size)
        return self._train_jits[size]

    def _build_train(self, size: int | None):
        model, strategy, data_size = self.model, self.strategy, self.data_size
        classifier_only, remat = self.classifier_only, self.remat

        def train(members, hparams, images, labels, aug, batch_stats):
            mapped = jax.shard_map(
                local, mesh=self.mesh,
                in_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS), self.batch_spec, self.batch_spec,
                          self.batch_spec, P()),
                out_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS)))
            return mapped(members, hparams, images, labels, aug, batch_stats)

        def local(members, hparams, images, labels, aug, batch_stats):
            def one(member, hp, x, y, a):
                # uint8 images are normalized, crop windows augmented, here on device
                x = augment.model_input(x, a, size)
                kwargs = {}
                if data_size > 1:  # shard of a member's batch: own dropout masks, global mean CE
                    shard = jax.lax.axis_index(DATA_AXIS)
                    kwargs = dict(global_batch=y.shape[0] * data_size,
                                  key=jax.random.fold_in(
                                      step_lib.dropout_key(hp, member["step"]), shard),
                                  reduce_loss=lambda l: jax.lax.psum(l, DATA_AXIS))
                return step_lib.train_step(model, batch_stats, member, hp, x, y,
                                           classifier_only=classifier_only, remat=remat, **kwargs)
            return run_local(strategy, one, members, hparams, images, labels, aug)

        return jax.jit(train, donate_argnums=(0,))

    def _build_eval(self):
        model, strategy, data_size = self.model, self.strategy, self.data_size

        def local(params, images, labels, mask, batch_stats):
            images = augment.model_input(images)  # uint8: normalized on device
            one = lambda p: step_lib.eval_step(model, batch_stats, p, images, labels, mask)
            correct = run_local(strategy, one, params)
            return jax.lax.psum(correct, DATA_AXIS) if data_size > 1 else correct

        mapped = jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(P(MEMBER_AXIS), self.eval_spec, self.eval_spec, self.eval_spec, P()),
            out_specs=P(MEMBER_AXIS))
        return jax.jit(mapped)

    def _build_logits(self):
        """The compiled logits program, shared by every engine of the same (model, mesh,
        strategy): selection builds engines per stack layout and per test env, and none of them
        traces or compiles it again."""
        try:
            return _logits_program(self.model, self.mesh, self.strategy)
        except TypeError:  # an unhashable module: one program per engine
            return _logits_program.__wrapped__(self.model, self.mesh, self.strategy)

    def _train(self, members, hparams, images, labels, aug, batch_stats, size=None):
        """The compiled train step for these shapes: lowered once, its XLA:CPU options chosen by
        runtime.cpu_compiler_options, compiled once per shape and reused. `aug`: the device
        mode's per-image parameters ({} for ready images), `size`: its output size."""
        size = int(size) if aug else None
        key = (jax.tree.structure((members, aug)), size,
               tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves((members, images))))
        compiled = self._compiled_train.get(key)
        if compiled is None:
            lowered = self._train_jit(size).lower(members, hparams, images, labels, aug,
                                                  batch_stats)
            n = jax.tree.leaves(members)[0].shape[0]
            options = runtime.cpu_compiler_options(lowered, n, self.mesh.devices.flat[0].platform,
                                                   self.cpu_ynn)
            compiled, self.compiler_options = runtime.compile_with_options(lowered, options)
            self._compiled_train[key] = compiled
        return compiled(members, hparams, images, labels, aug, batch_stats)

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

    # -- the training form (parts) -----------------------------------------------------------
    @property
    def local_members(self) -> int:
        """Members per device group (the length of the 'loop' strategy's loop)."""
        return self.num_members // self.model_size

    @property
    def _split_form(self) -> bool:
        """Whether training keeps the members in several parts (the 'loop' strategy with more than
        one member per device group)."""
        return self.strategy == "loop" and self.local_members > 1

    def _split(self, stacked: Any) -> _Parts:
        """A stacked tree [M, ...] (host or placed; e.g. the members or the hparams) -> _Parts.
        The stacked tree is left as it was (not donated)."""
        if isinstance(stacked, _Parts):
            return stacked
        stacked = self.place(stacked)
        if not self._split_form:
            return _Parts((stacked,))
        return _Parts(self._take_jit(stacked, np.int32(i)) for i in range(self.local_members))

    def _join(self, parts: _Parts) -> Any:
        """_Parts -> the stacked tree [M, ...] on the mesh (a copy when there are several parts;
        with one part, that part itself)."""
        if len(parts) == 1:
            return parts[0]
        return self._join_jit(tuple(parts))

    def _local_index(self, i: int) -> np.ndarray:
        """Members in part i: local member i of every device group (group d holds d*L .. d*L+L-1)."""
        return np.arange(self.model_size) * self.local_members + i

    def _gather_local(self, outs: list) -> Any:
        """Per-call outputs [model] of the 'loop' strategy (call i = local member i of every
        device group) -> [M] in member order (device group d holds members d*L .. d*L+L-1)."""
        return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(-1), *outs)

    def _train_parts(self, parts: _Parts, hparams: _Parts, batch: dict) -> tuple[_Parts, dict]:
        """One update of every member in the training form; each part is donated. Returns
        (parts, metrics [M] in member order)."""
        size = batch.get("image_size")
        if not self._split_form:
            images, labels, aug = self.place_batch(batch)
            members, metrics = self._train(parts[0], hparams[0], images, labels, aug,
                                           self.batch_stats, size)
            return _Parts((members,)), metrics
        images, labels = self._check_batch(batch)
        aug_all = batch.get("augment") or {}
        new, outs = [], []
        for i, (members, hp) in enumerate(zip(parts, hparams)):
            index = self._local_index(i)  # sliced on the host: no device copy of the whole batch
            put = lambda x: _put(x[index], self.batch_sharding)
            x, y, aug = put(images), put(labels), jax.tree.map(put, aug_all)
            members, metrics = self._train(members, hp, x, y, aug, self.batch_stats, size)
            new.append(members)
            outs.append(metrics)
        return _Parts(new), self._gather_local(outs)

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
        return self._split(params)

    def evaluate_batch(self, params: Any, images: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None) -> jax.Array:
        """Correct counts [M] of all members on one batch of shared images ([B, H, W, C]).
        `params`: stacked [M], live.params_for_eval() or prepare_eval(params)."""
        n = images.shape[0]
        mask = np.ones((n,), bool) if mask is None else np.asarray(mask, bool)
        pad = (-n) % self.data_size
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
            mask = np.concatenate([mask, np.zeros((pad,), bool)])
        put = lambda x: _put(x, self.eval_sharding)
        shared = (put(images), put(labels), put(mask), self.batch_stats)
        parts = self._split(params)
        if len(parts) > 1:
            return self._gather_local([self._eval(p, *shared) for p in parts])
        return self._eval(parts[0], *shared)

    def _eval_parts(self, params: Any) -> _Parts:
        """Stacked params [K] (any K that the 'model' axis divides; host or placed) or _Parts ->
        the parts `logits` runs: with the 'loop' strategy, local member i of every device group
        per part (the training parts machinery), else the whole placed stack."""
        if isinstance(params, _Parts):
            return params
        k = trees.num_members(params)
        if k % self.model_size:
            raise ValueError(f"{k} members do not split over the 'model' axis of "
                             f"{self.model_size} devices (plan_eval_mesh({k}) gives a mesh "
                             "that fits)")
        placed = self.place(params)
        local = k // self.model_size
        if self.strategy != "loop" or local == 1:
            return _Parts((placed,))
        take = _take_program(self.mesh)
        return _Parts(take(placed, np.int32(i)) for i in range(local))

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
        parts = self._eval_parts(params)
        n = len(source)
        k = sum(int(jax.tree.leaves(p)[0].shape[0]) for p in parts)
        if n == 0:
            return np.zeros((k, 0, _num_classes(parts[0])), np.float32)
        d = self.data_size
        b = max(1, min(int(batch_size), -(-n // d)))        # rows per device and step
        g = b * d                                             # rows per step
        shape = (g,) + tuple(source.image_shape)
        held = distributed.process_indices(self.mesh, self.eval_spec, shape)[0]
        pending, outs = None, []

        def fetch(start, arrays):
            host = [distributed.to_host(a) for a in arrays]   # [model, g, C] per part
            full = host[0] if len(host) == 1 else np.stack(host, axis=1).reshape(
                (k,) + host[0].shape[1:])
            outs.append(full[:, : min(g, n - start)])

        for start in range(0, n, g):
            rows = start + held
            local = np.zeros((len(held),) + shape[1:], source.dtype)
            valid = rows < n
            if valid.any():
                local[valid] = source.load(rows[valid])
            if jax.process_count() > 1:
                x = jax.make_array_from_process_local_data(self.eval_sharding, local, shape)
            else:
                x = jax.device_put(local, self.eval_sharding)
            arrays = [self._logits_jit(p, x, self.batch_stats) for p in parts]
            if pending is not None:                           # at most two steps in flight
                fetch(*pending)
            pending = (start, arrays)
        fetch(*pending)
        return np.concatenate(outs, axis=1)

    def update_best(self, state: dict, score: jax.Array, step: int) -> dict:
        """Replace best params/score/step of members whose score strictly improved."""
        best = self._best({"best_params": state["best_params"], "best_score": state["best_score"],
                           "best_step": state["best_step"]},
                          state["members"]["params"], jnp.asarray(score, jnp.float32),
                          jnp.int32(step))
        return {**state, **best}

    def train_memory(self, state: dict, hparams: dict, batch: dict) -> dict:
        """XLA's memory analysis of the compiled train step (bytes per device), without running it."""
        spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                              sharding=self.batch_sharding)
        images, labels = spec(batch["images"]), spec(batch["labels"])
        aug = jax.tree.map(spec, batch.get("augment") or {})
        size = int(batch["image_size"]) if aug else None
        members = state["members"]
        resident = 0
        if self._split_form:  # one member per device group per call
            def one(x):
                shape = (self.model_size,) + tuple(np.shape(x))[1:]
                return jax.ShapeDtypeStruct(shape, x.dtype, sharding=self.member_sharding)
            full = sum(int(np.prod(np.shape(x))) * x.dtype.itemsize
                       for x in jax.tree.leaves(members)) // self.model_size
            members, hparams = jax.tree.map(one, members), jax.tree.map(one, hparams)
            images, labels, aug = one(images), one(labels), jax.tree.map(one, aug)
            resident = full - full // self.local_members  # the other local members' state
        compiled = self._train_jit(size).lower(members, hparams, images, labels, aug,
                                               self.batch_stats).compile()
        mem = compiled.memory_analysis()
        out = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes") if hasattr(mem, k)}
        out["argument_size_in_bytes"] += resident
        return out


def _put(x, sharding):
    """Place a host array that every process holds whole (or a ready global jax.Array). With several
    processes each one copies only its devices' blocks (device_put would also all-gather the whole
    array to check that the processes agree)."""
    if jax.process_count() > 1 and not isinstance(x, jax.Array):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.device_put(x, sharding)


def _update_best(best: dict, params: Any, score: jax.Array, step: jax.Array) -> dict:
    # strict: ties keep the earlier checkpoint (docs/protocol.md §3.5)
    improved = score > best["best_score"]

    def pick(new, old):
        return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return {"best_params": jax.tree.map(pick, params, best["best_params"]),
            "best_score": jnp.where(improved, score, best["best_score"]),
            "best_step": jnp.where(improved, step, best["best_step"])}


@functools.lru_cache(maxsize=64)
def _logits_program(model, mesh: Mesh, strategy: str):
    """jit(shard_map): stacked params [K] ('model') x images [B] ('data', when the mesh has a
    'data' axis > 1) -> logits [K, B, C] float32, each device running its local members with
    `strategy` on its images."""
    data_size = mesh.shape[DATA_AXIS]
    image_spec = P(DATA_AXIS) if data_size > 1 else P()

    def local(params, images, batch_stats):
        # uint8 images normalized on device as rat_jax.evaluation does it (the reference
        # one-device path): the same logits to the bit (augment.model_input's correctly
        # rounded normalization differs from it by an ulp on some pixels)
        if images.dtype == jnp.uint8:
            images = _eval_normalize(images)
        one = lambda p: model.apply({"params": p, "batch_stats": batch_stats}, images,
                                    train=False).astype(jnp.float32)
        return run_local(strategy, one, params)

    out = P(MEMBER_AXIS, DATA_AXIS) if data_size > 1 else P(MEMBER_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(MEMBER_AXIS), image_spec, P()),
                                 out_specs=out))


@functools.lru_cache(maxsize=64)
def _take_program(mesh: Mesh):
    """Local member i of every device group of a stacked tree ([model] leading axis): the
    'loop' strategy's parts for evaluation (as MemberEngine._build_take_join's take)."""
    spec = P(MEMBER_AXIS)

    def take(tree, i):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=True), tree)
    return jax.jit(jax.shard_map(take, mesh=mesh, in_specs=(spec, P()), out_specs=spec))


def _eval_normalize(images_uint8):
    return step_lib.normalize_on_device(images_uint8)


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
