"""TRELLIS's sparse-structure models in hasten's own code, loading TRELLIS's released checkpoints.

    from hasten.models import trellis
    flow = trellis.from_pretrained("TRELLIS-image-large/ckpts/ss_flow_img_dit_L_16l8_fp16")   # .json + .safetensors
    decoder = trellis.from_pretrained("TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16")

A checkpoint is TRELLIS's pair ``{path}.json`` (``{"name": class name, "args": {...}}``) and
``{path}.safetensors``. The second stage (structured latents, appearance) is not implemented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .sparse_structure import SparseStructureDecoder, SparseStructureEncoder, SparseStructureFlowModel

__all__ = [
    "MODELS",
    "SparseStructureDecoder",
    "SparseStructureEncoder",
    "SparseStructureFlowModel",
    "from_pretrained",
    "save_pretrained",
]

MODELS = {cls.__name__: cls for cls in (SparseStructureFlowModel, SparseStructureEncoder, SparseStructureDecoder)}


def save_pretrained(model: nn.Module, path: str | os.PathLike, args: dict) -> Path:
    """Write ``model`` as TRELLIS does: ``{path}.json`` with its class and ``args``, ``{path}.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.json").write_text(json.dumps({"name": type(model).__name__, "args": args}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{path}.safetensors")
    return path


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a TRELLIS sparse-structure checkpoint (``{path}.json`` + ``{path}.safetensors``)."""
    from safetensors.torch import load_file

    config_file, weights_file = Path(f"{path}.json"), Path(f"{path}.safetensors")
    if not config_file.exists() or not weights_file.exists():
        raise FileNotFoundError(
            f"a TRELLIS checkpoint is {config_file.name} + {weights_file.name}; not found at {path}"
        )
    config = json.loads(config_file.read_text())
    name = config.get("name")
    if name not in MODELS:
        raise ValueError(f"{config_file}: model {name!r} is not implemented; hasten has {', '.join(MODELS)}")
    model = MODELS[name](**config.get("args", {}))
    state = load_file(str(weights_file))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file.name} does not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{weights_file.name}: shape mismatch for {wrong[:5]}")
    model.load_state_dict(state)
    return model.to(dtype).eval()
