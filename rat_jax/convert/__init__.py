"""Torch checkpoints to Flax: a torch-free, code-execution-free reader, key maps, a CLI.

    from rat_jax.convert import read_torch_file, convert_torch_checkpoint
    state_dict = read_torch_file("model_best.pkl")            # {key: np.ndarray}, canonical keys
    variables = convert_torch_checkpoint("resnet50.pth", "resnet50")   # {'params', 'batch_stats'}

CLI: ``python -m rat_jax.convert --arch resnet50 --torch model_best.pkl --out ckpt/``.
"""
from rat_jax.convert.converter import (
    convert_file_with_info, convert_state_dict, convert_torch_checkpoint, expected_shapes,
    supported_archs, torch_key_to_flax)
from rat_jax.convert.reader import (
    CheckpointFormatError, UnsafePickleError, canonicalize_state_dict, detect_format,
    flatten_state_dict, load_torch_object, read_torch_file)

__all__ = [
    "CheckpointFormatError", "UnsafePickleError", "canonicalize_state_dict", "convert_file_with_info",
    "convert_state_dict", "convert_torch_checkpoint", "detect_format", "expected_shapes",
    "flatten_state_dict", "load_torch_object", "read_torch_file", "supported_archs",
    "torch_key_to_flax",
]
