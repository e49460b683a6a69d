"""Record attention features (Q/K/V, latents) per key, replay them later, with bounded memory.

Editing methods run a pass that computes features (an inversion, a source reconstruction) and a
later pass that puts some of them back (ConsistEdit's source branch, VoxHammer's preserved
region). :class:`FeatureCache` stores them per key, e.g. ``(sigma, layer, "k")``, and reports
the bytes it holds. Storage is chosen by :class:`FeatureCacheConfig`:

``dtype``
    float32 (exact), bfloat16 or float16 (relative error <= 2**-8 / 2**-11 per element).
``quantize``
    int8 codes per token (asymmetric, one float16 scale and zero per token and group of up to 128
    channels: :mod:`hasten.kernels.kv_quant`); error <= half a step of each group.
``rows``
    region-only storage: :meth:`FeatureCache.put` keeps only the token rows that will be replayed
    (``rows``: their indices on the token axis, -2); :meth:`FeatureCache.get` returns them and
    their indices.
``device``
    where entries live: "cpu" (default: GPU memory stays free for the model) or the model's GPU
    (no host copies: faster, when the cache fits). Entries are converted or quantised on the
    device that produced them and travel in their storage form.
``spill_dir``
    every entry goes to its own safetensors file there (RAM holds only the index); the files are
    deleted by :meth:`FeatureCache.close` (or leaving the ``with`` block).

Examples
--------
>>> import torch
>>> cache = FeatureCache(FeatureCacheConfig(dtype="float32"))
>>> cache.put(("k", 0), torch.ones(1, 4, 8))
>>> torch.equal(cache.get(("k", 0))[0], torch.ones(1, 4, 8)), cache.nbytes
(True, 128)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import torch

from ..kernels.kv_quant import QuantizedKV

__all__ = ["FeatureCache", "FeatureCacheConfig"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FeatureCacheConfig:
    """How a :class:`FeatureCache` stores features (see the module docstring)."""

    dtype: str = "bfloat16"
    quantize: bool = False
    device: str = "cpu"
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


class FeatureCache:
    """Features by key; see the module docstring."""

    def __init__(self, config: FeatureCacheConfig | None = None):
        self.config = config or FeatureCacheConfig()
        self._entries: dict[Hashable, dict[str, Any]] = {}
        self._folder: Path | None = None
        if self.config.spill_dir is not None:
            Path(self.config.spill_dir).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="hasten-features-", dir=self.config.spill_dir))

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, tensor: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Store ``tensor`` (``(..., tokens, channels)``) under ``key``; only ``rows`` of the token axis if given."""
        shape = tuple(tensor.shape)
        if rows is not None:
            rows = rows.to(tensor.device).long()
            tensor = tensor.index_select(-2, rows)
        tensor = tensor.detach()  # converted or quantised where it is (the GPU), then moved: less to copy
        entry: dict[str, Any] = {"shape": shape, "dtype": tensor.dtype, "rows": None if rows is None else rows.cpu()}
        if self.config.quantize:
            group = min(128, tensor.shape[-1])
            while tensor.shape[-1] % group:
                group //= 2
            quantized = QuantizedKV.quantize(tensor, 8, "token", max(group, 1))
            parts = {"packed": quantized.packed, "scale": quantized.scale, "zero": quantized.zero}
            entry["quantized"] = dict(
                bits=8, layout="token", group=quantized.group, tokens=quantized.tokens, dtype=quantized.dtype
            )
        else:
            parts = {"value": tensor.to(_DTYPES[self.config.dtype])}
        parts = {name: part.to(self.config.device) for name, part in parts.items()}
        entry["nbytes"] = sum(t.numel() * t.element_size() for t in parts.values())
        if self._folder is not None:
            from safetensors.torch import save_file

            path = self._folder / f"{len(self._entries)}-{abs(hash(key)) % 10**12}.safetensors"
            save_file({name: t.contiguous() for name, t in parts.items()}, str(path))
            entry["path"] = path
        else:
            entry["parts"] = parts
        old = self._entries.pop(key, None)
        if old is not None and "path" in old:
            old["path"].unlink(missing_ok=True)
        self._entries[key] = entry

    def get(self, key: Hashable, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored tensor (in its original dtype) and the token rows it covers (None: all of them)."""
        entry = self._entries[key]
        if "path" in entry:
            from safetensors.torch import load_file

            parts = load_file(str(entry["path"]))
        else:
            parts = entry["parts"]
        if device is not None:  # moved in storage form, restored where it is used
            parts = {name: part.to(device) for name, part in parts.items()}
        if "quantized" in entry:
            q = entry["quantized"]
            value = QuantizedKV(
                parts["packed"],
                parts["scale"],
                parts["zero"],
                q["bits"],
                q["layout"],
                q["group"],
                q["tokens"],
                q["dtype"],
            ).dequantize()
        else:
            value = parts["value"].to(entry["dtype"])
        rows = entry["rows"]
        if device is not None:
            rows = None if rows is None else rows.to(device)
        return value, rows

    @property
    def nbytes(self) -> int:
        """Bytes of the stored features (in RAM or in the spill files)."""
        return sum(entry["nbytes"] for entry in self._entries.values())

    def clear(self) -> None:
        for entry in self._entries.values():
            if "path" in entry:
                entry["path"].unlink(missing_ok=True)
        self._entries = {}

    def close(self) -> None:
        """Drop every entry and delete the spill folder."""
        self.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __del__(self) -> None:  # a cache dropped without close() still cleans its files
        try:
            if self._folder is not None and os.path.isdir(self._folder):
                shutil.rmtree(self._folder, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
