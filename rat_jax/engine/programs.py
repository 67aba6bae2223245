"""The compiled programs of the member engine: the train step (per device-augmentation size,
compiled once per shape with the XLA:CPU options of runtime.cpu_compiler_options, and its memory
analysis) and the one evaluation program (members over 'model', images over 'data')."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import rat_jax.distributed as distributed
import rat_jax.runtime as runtime
from rat_jax.data import augment
from rat_jax.engine import step as step_lib
from rat_jax.engine.mesh import DATA_AXIS, MEMBER_AXIS
from rat_jax.engine.placement import Placement
from rat_jax.engine.strategies import run_local


class TrainProgram:
    """The jitted train step of one model on one placement: `model`'s members run with the
    local `strategy`; `classifier_only` (the linear probe) and `remat` shape the step, `cpu_ynn`
    its XLA:CPU compilation. `compiler_options`: the options of the last compiled step."""

    def __init__(self, model, placement: Placement, strategy: str, *, classifier_only: bool,
                 remat: bool | str, cpu_ynn: str):
        self.model, self.placement, self.strategy = model, placement, strategy
        self.classifier_only, self.remat, self.cpu_ynn = classifier_only, remat, cpu_ynn
        self._jits: dict = {}  # output size of the device-side augmentation -> jit
        self._compiled: dict = {}
        self.compiler_options: dict | None = None

    def jit(self, size: int | None):
        """The jitted train step for device-side augmentation to `size` (None: ready images);
        one jit per size, `size` closed over."""
        if size not in self._jits:
            self._jits[size] = self._build(size)
        return self._jits[size]

    def _build(self, size: int | None):
        model, strategy = self.model, self.strategy
        data_size, spec = self.placement.data_size, self.placement.batch_spec
        classifier_only, remat = self.classifier_only, self.remat

        def train(members, hparams, images, labels, aug, batch_stats):
            mapped = jax.shard_map(
                local, mesh=self.placement.mesh,
                in_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS), spec, spec, spec, P()),
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
                options = step_lib.StepOptions(classifier_only=classifier_only, remat=remat,
                                               **kwargs)
                return step_lib.train_step(model, batch_stats, member, hp, x, y, options)
            return run_local(strategy, one, members, hparams, images, labels, aug)

        return jax.jit(train, donate_argnums=(0,))

    def __call__(self, members, hparams, images, labels, aug, batch_stats, size=None):
        """One update with the compiled train step for these shapes (`compile`). `aug`: the
        device mode's per-image parameters ({} for ready images), `size`: its output size."""
        compiled = self.compile(members, hparams, images, labels, aug, batch_stats, size)
        return compiled(members, hparams, images, labels, aug, batch_stats)

    def compile(self, members, hparams, images, labels, aug, batch_stats, size=None):
        """The compiled train step for these shapes: lowered once, its XLA:CPU options chosen by
        runtime.cpu_compiler_options, compiled once per shape and reused. `members` may be
        ShapeDtypeStructs with the placed members' shardings: the loop compiles before the
        members' state is placed, so the compiler's memory and the state's do not add up."""
        size = int(size) if aug else None
        key = (jax.tree.structure((members, aug)), size,
               tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves((members, images))))
        compiled = self._compiled.get(key)
        if compiled is None:
            lowered = self.jit(size).lower(members, hparams, images, labels, aug, batch_stats)
            n = jax.tree.leaves(members)[0].shape[0]
            platform = self.placement.mesh.devices.flat[0].platform
            options = runtime.cpu_compiler_options(lowered, n, platform, self.cpu_ynn)
            compiled, self.compiler_options = runtime.compile_with_options(lowered, options)
            self._compiled[key] = compiled
        return compiled

    def memory(self, members, hparams, batch: dict, batch_stats, local_members: int) -> dict:
        """XLA's memory analysis of the compiled train step (bytes per device), without running
        it; `local_members` > 1 with the 'loop' strategy's parts (one member per device group
        per call: the other local members' state is resident beside it)."""
        pl = self.placement
        spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                              sharding=pl.batch_sharding)
        images, labels = spec(batch["images"]), spec(batch["labels"])
        aug = jax.tree.map(spec, batch.get("augment") or {})
        size = int(batch["image_size"]) if aug else None
        resident = 0
        if local_members > 1:
            def one(x):
                shape = (pl.model_size,) + tuple(np.shape(x))[1:]
                return jax.ShapeDtypeStruct(shape, x.dtype, sharding=pl.member_sharding)
            full = sum(int(np.prod(np.shape(x))) * x.dtype.itemsize
                       for x in jax.tree.leaves(members)) // pl.model_size
            members, hparams = jax.tree.map(one, members), jax.tree.map(one, hparams)
            images, labels, aug = one(images), one(labels), jax.tree.map(one, aug)
            resident = full - full // local_members
        compiled = self.jit(size).lower(members, hparams, images, labels, aug,
                                        batch_stats).compile()
        mem = compiled.memory_analysis()
        out = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes") if hasattr(mem, k)}
        out["argument_size_in_bytes"] += resident
        return out


def forward_program(model, mesh: Mesh, strategy: str, *, per_member: bool = False,
                    counts: bool = False, size: int | None = None):
    """The engine's one evaluation program (training-time ID-val, selection, the API, the
    figures): jit(shard_map) of stacked params [K] ('model') on images that are either shared
    by every member ([B, ...], over 'data') or the members' own (`per_member`: [K, B, ...], over
    'model' and 'data'). The images are what the train step reads (augment.model_input: uint8
    normalized on device, crop-window canvases with their `aug` parameters augmented to `size`),
    so training and evaluation score the same inputs the same way. Returns logits [K, B, C]
    float32, or with `counts` each member's correct count [K] among the rows whose mask is set.
    Cached per (model, mesh, strategy, layout): engines of the same mesh share it."""
    try:
        return _forward_program(model, mesh, strategy, per_member, counts, size)
    except TypeError:  # an unhashable module: one program per call
        return _forward_program.__wrapped__(model, mesh, strategy, per_member, counts, size)


@functools.lru_cache(maxsize=64)
def _forward_program(model, mesh: Mesh, strategy: str, per_member: bool, counts: bool,
                     size: int | None):
    data_size = mesh.shape[DATA_AXIS]
    data = (DATA_AXIS,) if data_size > 1 else ()
    image_spec = P(MEMBER_AXIS, *data) if per_member else P(*data)

    def forward(p, x, batch_stats):
        return model.apply({"params": p, "batch_stats": batch_stats}, x,
                           train=False).astype(jnp.float32)

    def score(logits, labels, mask):
        return ((jnp.argmax(logits, axis=-1) == labels) & mask).sum().astype(jnp.int32)

    def local(params, images, labels, mask, aug, batch_stats):
        if per_member:
            def one(p, x, y, m, a):
                logits = forward(p, augment.model_input(x, a, size), batch_stats)
                return score(logits, y, m) if counts else logits
            out = run_local(strategy, one, params, images, labels, mask, aug)
        else:
            x = augment.model_input(images, aug, size)   # once for every member
            out = run_local(strategy, lambda p: (score(forward(p, x, batch_stats), labels, mask)
                                                 if counts else forward(p, x, batch_stats)),
                            params)
        return jax.lax.psum(out, DATA_AXIS) if counts and data_size > 1 else out

    out_spec = P(MEMBER_AXIS) if counts else P(MEMBER_AXIS, *data)
    return jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(MEMBER_AXIS), image_spec, image_spec, image_spec,
                                    image_spec, P()),
        out_specs=out_spec))


def update_best(best: dict, params: Any, score: jax.Array, step: jax.Array) -> dict:
    """Best params/score/step, replaced for members whose score strictly improved (ties keep
    the earlier checkpoint, docs/protocol.md §3.5)."""
    improved = score > best["best_score"]

    def pick(new, old):
        return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return {"best_params": jax.tree.map(pick, params, best["best_params"]),
            "best_score": jnp.where(improved, score, best["best_score"]),
            "best_step": jnp.where(improved, step, best["best_step"])}


def gather_logits(arrays: list, k: int, rows: int) -> np.ndarray:
    """Per-part logits [model, g, C] on the mesh -> host [k, rows, C] in member order."""
    host = [distributed.to_host(a) for a in arrays]
    full = host[0] if len(host) == 1 else np.stack(host, axis=1).reshape(
        (k,) + host[0].shape[1:])
    return full[:, :rows]
