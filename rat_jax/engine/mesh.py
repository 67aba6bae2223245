"""Mesh planning: which devices hold which members, and which split a member's batch.

The member engine runs on a 2-D mesh ('model', 'data'): the member axis of the stacked tree is split
over 'model', each member's batch over 'data' (data parallelism inside a member when devices
outnumber members). How the members on one device are run is the local strategy's business
(rat_jax.engine.strategies).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MEMBER_AXIS, DATA_AXIS = "model", "data"


def default_data_parallel(devices: Sequence[jax.Device]) -> bool:
    """Whether spare devices split a member's batch by default.

    Accelerators (and multi-process runs): yes. One CPU process: no; emulated CPU devices share the
    same cores, so splitting a member's batch over them is slower than running it whole on one
    device (bench/cpu_vs_torch.py, docs/benchmarks.md). Members still spread one per device.
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
