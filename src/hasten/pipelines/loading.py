"""Load a model by name: an embedded tiny model ("tiny-flux", "tiny-llava", ...), a hub id or a local folder."""

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


def load_transformers_model(model: str, tiny_models: dict, device: str | None = None):
    """A transformers image-text model and its processor, in eval mode on ``device``.

    Parameters
    ----------
    model : str
        A key of ``tiny_models`` (e.g. ``"tiny-llava"``) or a hub id / local folder, loaded with
        ``AutoModelForImageTextToText`` + ``AutoProcessor`` (bfloat16 on CUDA, float32 elsewhere).
    tiny_models : dict
        Tiny model names -> zero-argument loaders returning ``(model, processor)``.
    device : str, optional
        Default "cuda" when available, else "cpu".

    Examples
    --------
    >>> from hasten import tiny
    >>> model, processor = load_transformers_model("tiny-llava", {"tiny-llava": lambda: tiny.vlm("llava")})
    >>> type(model).__name__
    'LlavaForConditionalGeneration'
    """
    device = device or default_device()
    if model in tiny_models:
        loaded, processor = tiny_models[model]()
    elif model.startswith("tiny-"):
        raise ValueError(f"unknown tiny model {model!r}; choose {', '.join(tiny_models)} or a hub id")
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model)
    return loaded.to(device).eval(), processor
