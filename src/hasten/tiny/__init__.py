"""Tiny, seeded, random-weight models, built offline for tests, demos and the CLI.

Nothing is downloaded: each family uses the real diffusers / transformers classes with tiny
configs, tokenizers trained here (:mod:`hasten.tiny.tokenizers`), weights from fixed seeds. A
model is built once, saved with ``save_pretrained`` under ``$HASTEN_HOME/tiny/`` (default
``~/.cache/hasten``) and loaded back with ``from_pretrained``, so the real loading code runs.

- :func:`pipeline` — diffusers pipelines (Flux, SD3, HunyuanVideo, Wan, CogVideoX, SD1.5);
  see :mod:`hasten.tiny.diffusion`.
- :func:`vlm` — transformers vision-language models (LLaVA, LLaVA-Next, Qwen2-VL, Qwen2.5-VL)
  with their processors; see :mod:`hasten.tiny.vlms`.
- :func:`ar_image_model` — autoregressive text-to-image models (Janus, Emu3); see
  :mod:`hasten.tiny.ar_image`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._store import home
from .diffusion import KINDS, MODEL_IDS, default_size, is_tiny, path, pipeline

__all__ = ["KINDS", "MODEL_IDS", "ar_image_model", "default_size", "home", "is_tiny", "path", "pipeline", "vlm"]

# Families whose modules import heavier transformers classes load on first use.
_LAZY = {"vlm": ".vlms", "VLM_KINDS": ".vlms", "ar_image_model": ".ar_image", "AR_IMAGE_KINDS": ".ar_image"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
