"""Model helpers for tests that must not import JAX at module level (scripts started by tests
configure JAX's devices first)."""
import numpy as np


def random_variables(seed, arch="resnet_tiny", num_classes=5):
    """Random variables of the model's shapes drawn with numpy (no JAX init to compile)."""
    from flax.traverse_util import unflatten_dict
    from rat_jax.convert.converter import expected_shapes
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in expected_shapes(arch, num_classes).items():
        scale = np.sqrt(2.0 / np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        v = rng.normal(0.0, scale, shape)
        if path[-1] == "var":
            v = 0.5 + np.abs(v)
        flat[path] = v.astype(np.float32)
    tree = unflatten_dict(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
