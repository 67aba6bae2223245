"""The compiled programs of the member engine: the train step (per device-augmentation size,
compiled once per shape with the XLA:CPU options of runtime.cpu_compiler_options, and its memory
analysis), the evaluation counts and the logits program (members over 'model', images over
'data')."""
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
        """The compiled train step for these shapes: lowered once, its XLA:CPU options chosen by
        runtime.cpu_compiler_options, compiled once per shape and reused. `aug`: the device
        mode's per-image parameters ({} for ready images), `size`: its output size."""
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
        return compiled(members, hparams, images, labels, aug, batch_stats)

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


def eval_program(model, placement: Placement, strategy: str):
    """jit(shard_map): params [M] ('model') x shared images, labels, mask ('data') -> correct
    counts [M]."""
    data_size, spec = placement.data_size, placement.eval_spec

    def local(params, images, labels, mask, batch_stats):
        images = augment.model_input(images)  # uint8: normalized on device
        one = lambda p: step_lib.eval_step(model, batch_stats, p, images, labels, mask)
        correct = run_local(strategy, one, params)
        return jax.lax.psum(correct, DATA_AXIS) if data_size > 1 else correct

    mapped = jax.shard_map(local, mesh=placement.mesh,
                           in_specs=(P(MEMBER_AXIS), spec, spec, spec, P()),
                           out_specs=P(MEMBER_AXIS))
    return jax.jit(mapped)


def logits_program(model, mesh: Mesh, strategy: str):
    """The compiled logits program, shared by every engine of the same (model, mesh,
    strategy): selection builds engines per stack layout and per test env, and none of them
    traces or compiles it again."""
    try:
        return _logits_program(model, mesh, strategy)
    except TypeError:  # an unhashable module: one program per engine
        return _logits_program.__wrapped__(model, mesh, strategy)


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
            images = step_lib.normalize_on_device(images)
        one = lambda p: model.apply({"params": p, "batch_stats": batch_stats}, images,
                                    train=False).astype(jnp.float32)
        return run_local(strategy, one, params)

    out = P(MEMBER_AXIS, DATA_AXIS) if data_size > 1 else P(MEMBER_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(MEMBER_AXIS), image_spec, P()),
                                 out_specs=out))


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
