"""Load a pipeline by name: an embedded tiny model ("tiny-flux", ...), a hub id or a local folder."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from .. import tiny

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_pipeline(model: str, dtype: str | torch.dtype | None = None, device: str | None = None) -> DiffusionPipeline:
    """A ready diffusers pipeline for ``model``.

    Parameters
    ----------
    model : str
        ``"tiny-flux"``, ``"tiny-sd3"``, ... (offline random-weight models, see :mod:`hasten.tiny`),
        or any diffusers model id / local folder, loaded with ``DiffusionPipeline.from_pretrained``.
    dtype : str or torch.dtype, optional
        Default float32 for tiny models and on CPU, bfloat16 on CUDA.
    device : str, optional
        Default "cuda" when available, else "cpu".

    Examples
    --------
    >>> from hasten.pipelines.loading import load_pipeline
    >>> type(load_pipeline("tiny-flux")).__name__
    'FluxPipeline'
    """
    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if tiny.is_tiny(model):
        pipe = tiny.pipeline(tiny.MODEL_IDS[model], torch_dtype=dtype or torch.float32)
    else:
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe.to(device)
