"""A mixed-precision KV cache for transformers models: important tokens at high precision, the rest low.

transformers' ``QuantizedCache`` gives every token one bit width. :class:`MixedPrecisionLayer`
is a cache layer (a ``DynamicLayer`` subclass, so ``generate()`` and the attention code use it
unchanged) that stores, per batch row:

- the compressed prefix: tokens flagged important at ``high_bits`` (default 4) and the others at
  ``low_bits`` (default 2), keys per channel and values per token (KIVI's layouts, see
  :mod:`hasten.kernels.kv_quant`);
- a recent full-precision window (the residual): new tokens land there; once it holds
  ``residual + recompress_every`` tokens, everything but the last ``residual`` tokens is
  compressed (every ``recompress_every`` generated tokens, ZipVL's 100 by default). A prompt
  nobody flagged is compressed at the first decoding step.

Which prompt tokens are important is told by :meth:`MixedPrecisionLayer.compress` (ZipVL does it
right after the layer's prefill attention). Decoded tokens are compressed without a verdict (at
``high_bits``) unless a method sets ``layer.defer_decoded``: the layer then only announces the
tokens due (:attr:`MixedPrecisionLayer.due`) and the method compresses them with its own verdict
after the step's attention (ZipVL splits each block of generated tokens by the current query's
attention). A cache nobody flags is compressed at ``high_bits``. 16 bits means "not quantised": with
``high_bits = low_bits = 16`` the cache holds exactly what a ``DynamicCache`` would.

Attention reads the dequantised tensors (as transformers' quantised caches do), unless a
method's attention hook sets ``layer.fused``: decoding steps then attend the quantised segments
directly (:meth:`MixedPrecisionLayer.decode_attention`: the fused Triton kernel on CUDA, which
dequantises in registers, or its torch reference) and merge the partial results exactly. The
memory saved is the stored bytes, reported exactly by :meth:`MixedPrecisionLayer.nbytes`
(codes, scales, zero points and the residual).

Use it through :func:`mixed_precision_cache` (a fresh cache to pass to ``generate()``: as ``cache=``
from transformers 5.24, ``past_key_values=`` before; :func:`hasten.transformers_conventions.cache_keyword`
says which) or :func:`install_mixed_precision` (swap the layers of the cache ``generate()`` created, from a
pruning method's hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .._validation import check_int
from ..kernels.kv_quant import BITS, LAYOUTS, QuantizedKV

__all__ = ["MixedPrecisionConfig", "MixedPrecisionLayer", "install_mixed_precision", "mixed_precision_cache"]

_FULL = 16  # "bits" meaning: stored unquantised


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Settings of the mixed-precision cache (ZipVL's defaults).

    Parameters
    ----------
    high_bits : {2, 4, 8, 16}, default 4
        Important tokens (ZipVL: 4-bit).
    low_bits : {2, 4, 8, 16}, default 2
        The rest (ZipVL: 2-bit).
    residual : int, default 32
        Most recent tokens kept in full precision after each compression (:class:`ZipVL` uses 0:
        the paper compresses each block of ``recompress_every`` generated tokens whole).
    recompress_every : int, default 100
        Generated tokens between compressions of the residual window (ZipVL: 100).
    group : int, default 32
        Quantisation group: tokens per key-channel group, channels per value-token group (capped
        at the head dimension, which it must then divide).
    key_layout, value_layout : str, default "channel", "token"
        KIVI: keys per channel, values per token; "separable" is ZipCache's layout.
    """

    high_bits: int = 4
    low_bits: int = 2
    residual: int = 32
    recompress_every: int = 100
    group: int = 32
    key_layout: str = "channel"
    value_layout: str = "token"

    def __post_init__(self) -> None:
        for name in ("high_bits", "low_bits"):
            if getattr(self, name) not in (*BITS, _FULL):
                raise ValueError(f"`{name}` must be one of {(*BITS, _FULL)}, got {getattr(self, name)!r}")
        for name in ("residual", "recompress_every", "group"):
            value = getattr(self, name)
            check_int(value, name, 0 if name == "residual" else 1)
        for name in ("key_layout", "value_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise ValueError(f"`{name}` must be one of {LAYOUTS}, got {getattr(self, name)!r}")


def _group(config: MixedPrecisionConfig, layout: str, tensor: torch.Tensor) -> int:
    """The group along channels ("token" layout) cannot exceed the head dimension."""
    if layout != "token":
        return config.group
    dim = tensor.shape[-1]
    group = min(config.group, dim)
    if dim % group:
        raise ValueError(f"`group` {config.group} must divide the head dimension {dim} for per-token values")
    return group


def _key_valid(mask, row: int, length: int, device) -> torch.Tensor | None:
    """The last query's visible keys of one batch row, from a boolean or additive 4-D mask."""
    if mask is None:
        return None
    last = mask[min(row, mask.shape[0] - 1), 0, -1, :length]
    return last.to(device) if last.dtype == torch.bool else (last == 0).to(device)


class _Segment:
    """Some tokens of one batch row at one precision: (heads, n, dim) keys and values."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, config: MixedPrecisionConfig):
        self.length = keys.shape[-2]
        if bits == _FULL:
            self.keys, self.values = keys, values
        else:
            self.keys = QuantizedKV.quantize(keys, bits, config.key_layout, _group(config, config.key_layout, keys))
            self.values = QuantizedKV.quantize(
                values, bits, config.value_layout, _group(config, config.value_layout, values)
            )

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.keys, QuantizedKV):
            return self.keys.dequantize(), self.values.dequantize()
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return sum(
            t.nbytes if isinstance(t, QuantizedKV) else t.numel() * t.element_size() for t in (self.keys, self.values)
        )


class MixedPrecisionLayer(DynamicLayer):
    """One layer's cache: per-row compressed prefix (high / low bits) + a full-precision residual.

    ``keys`` / ``values`` hold the residual window ``(batch, heads, r, dim)``, like a
    ``DynamicLayer``; the compressed prefix lives in per-row segments.
    """

    is_croppable = False

    def __init__(self, config: MixedPrecisionConfig | None = None):
        super().__init__()
        self.config = config or MixedPrecisionConfig()
        self.cumulative_length = 0
        self._rows: list[list[tuple[torch.Tensor, _Segment]]] = []  # per row: (slot order, segment)
        self._prefix = 0  # tokens in the compressed prefix (the same count in every row)
        self._updates = 0
        self.fused = False  # set by a method whose attention hook calls decode_attention
        self.defer_decoded = False  # set by a method that compresses decoded tokens itself (see `due`)
        self.due = 0  # with defer_decoded: the oldest residual tokens due for compression at this step
        self.last_lse = None  # (batch, heads) log-sum-exp of the last decode_attention call, over every key

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._rows = [[] for _ in range(key_states.shape[0])]
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.numel() else key_states
        self.values = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
        self._updates += 1
        if self._updates == 1:
            return self.keys, self.values  # the prefill: a method may flag its tokens (compress) before the next step
        due = self.config.residual + (self.config.recompress_every if self._prefix else 0)
        if self.keys.shape[-2] >= max(due, 1):  # no verdict on the prompt: compressed at the first step
            if self.defer_decoded and self._prefix:
                self.due = self.keys.shape[-2] - self.config.residual  # the method compresses after attention
            else:
                self.compress(None, self.keys.shape[-2] - self.config.residual)
        if self.reads_fused(key_states.shape[-2]):
            return self.keys, self.values  # the residual window: decode_attention adds the compressed prefix
        return self._read()

    def reads_fused(self, queries: int = 1) -> bool:
        """Whether a decoding step reads the compressed prefix through :meth:`decode_attention`."""
        quantized = min(self.config.high_bits, self.config.low_bits) < _FULL
        return self.fused and queries == 1 and self._prefix > 0 and quantized

    def decode_attention(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scaling: float, backend: str = "auto"
    ) -> torch.Tensor:
        """One decoding step's attention over the compressed prefix and the residual window.

        The quantised segments are attended without dequantising the cache (the fused Triton
        kernel on CUDA, ``backend="auto"``; the torch reference elsewhere or with ``"torch"``),
        and the partial results merge exactly by their log-sum-exps. ``query`` ``(batch, heads,
        1, dim)``, ``keys`` / ``values`` the residual window update() returned, ``mask`` the
        layer's attention mask (None, boolean or additive) over prefix + residual. Returns
        ``(batch, 1, heads, dim)`` like transformers' attention functions.
        """
        from ..kernels.kv_quant import merge_partials, partial_attention

        fused = None
        if backend == "triton" or (backend == "auto" and query.is_cuda):
            from ..kernels.triton_kv_quant import triton_partial_attention as fused
        outputs, lses = [], []
        for row, segments in enumerate(self._rows):
            valid = _key_valid(mask, row, self._prefix + keys.shape[-2], query.device)
            q = query[row, :, -1]
            parts = []
            for slots, segment in segments:
                seg_valid = None if valid is None else valid[slots]
                quantized = isinstance(segment.keys, QuantizedKV)
                if (
                    fused is not None
                    and quantized
                    and segment.keys.layout == "channel"
                    and segment.values.layout == "token"
                ):
                    parts.append(fused(q, segment.keys, segment.values, scaling, seg_valid))
                else:
                    parts.append(partial_attention(q, segment.keys, segment.values, scaling, seg_valid))
            parts.append(
                partial_attention(q, keys[row], values[row], scaling, None if valid is None else valid[self._prefix :])
            )
            outputs.append(merge_partials(parts))
            lses.append(torch.logsumexp(torch.stack([lse for _, lse in parts]), 0))
        self.last_lse = torch.stack(lses)  # (batch, heads): the softmax normaliser over every key
        return torch.stack(outputs)[:, None].to(query.dtype)

    def compress(self, important: torch.Tensor | None, count: int | None = None) -> None:
        """Move the oldest ``count`` residual tokens (all of them by default) into the compressed prefix.

        ``important``: ``(batch, count)`` bool, True -> ``high_bits``; None: all ``high_bits``.
        """
        count = self.keys.shape[-2] if count is None else count
        self.due = 0
        if count <= 0:
            return
        batch = self.keys.shape[0]
        if important is None:
            important = torch.ones(batch, count, dtype=torch.bool, device=self.keys.device)
        if tuple(important.shape) != (batch, count):
            raise ValueError(f"`important` must be (batch, {count}) = ({batch}, {count}), got {tuple(important.shape)}")
        keys, values = self.keys[..., :count, :], self.values[..., :count, :]
        for row in range(batch):
            for flag, bits in ((True, self.config.high_bits), (False, self.config.low_bits)):
                slots = (important[row] == flag).nonzero()[:, 0]
                if len(slots):
                    segment = _Segment(keys[row][:, slots], values[row][:, slots], bits, self.config)
                    self._rows[row].append((slots + self._prefix, segment))
        self._prefix += count
        self.keys, self.values = self.keys[..., count:, :], self.values[..., count:, :]

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token, dequantised, in the original order."""
        if not self._prefix:
            return self.keys, self.values
        rows_k, rows_v = [], []
        heads, dim = self.keys.shape[1], self.keys.shape[-1]
        dtype = self.keys.dtype  # the residual's: cache layers have no `dtype` attribute from transformers 5.24
        for row in self._rows:
            keys = torch.empty(heads, self._prefix, dim, dtype=dtype, device=self.keys.device)
            values = torch.empty_like(keys)
            for slots, segment in row:
                k, v = segment.read()
                keys[:, slots], values[:, slots] = k.to(dtype), v.to(dtype)
            rows_k.append(keys)
            rows_v.append(values)
        return (torch.cat([torch.stack(rows_k), self.keys], -2), torch.cat([torch.stack(rows_v), self.values], -2))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a mixed-precision cache cannot be cropped (assisted/speculative decoding needs a DynamicCache)"
        )

    def reset(self) -> None:
        super().reset()
        self.cumulative_length, self._rows, self._prefix, self._updates = 0, [], 0, 0
        self.due, self.last_lse = 0, None

    @property
    def nbytes(self) -> int:
        """Bytes stored: compressed segments (codes + parameters) and the full-precision residual."""
        residual = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if isinstance(t, torch.Tensor))
        return residual + sum(segment.nbytes for row in self._rows for _, segment in row)


def mixed_precision_cache(config: MixedPrecisionConfig | None = None, num_layers: int | None = None) -> Cache:
    """A cache of :class:`MixedPrecisionLayer` to pass to ``generate()`` (under
    :func:`~hasten.transformers_conventions.cache_keyword`: ``cache`` from transformers 5.24).

    Examples
    --------
    >>> import hasten.tiny
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> ids = processor.tokenizer(["USER: hi ASSISTANT:"], return_tensors="pt")
    >>> cache = mixed_precision_cache(MixedPrecisionConfig(residual=0))
    >>> from hasten.transformers_conventions import cache_keyword
    >>> _ = model.generate(**ids, **{cache_keyword(model): cache}, max_new_tokens=2)
    >>> cache.get_seq_length() > 0
    True
    """
    config = config or MixedPrecisionConfig()
    if num_layers is None:
        return _MixedPrecisionCache(config)
    return Cache(layers=[MixedPrecisionLayer(config) for _ in range(num_layers)])


class _MixedPrecisionCache(Cache):
    """Grows one :class:`MixedPrecisionLayer` per model layer as they are first updated."""

    def __init__(self, config: MixedPrecisionConfig):
        super().__init__(layers=[])
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        while len(self.layers) <= layer_idx:
            self.layers.append(MixedPrecisionLayer(self.config))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def install_mixed_precision(cache: Cache, num_layers: int, config: MixedPrecisionConfig) -> list[MixedPrecisionLayer]:
    """Give an EMPTY cache (the one ``generate()`` made) mixed-precision layers; returns them."""
    if cache.get_seq_length() != 0:
        raise ValueError("install_mixed_precision needs an empty cache (before the prefill)")
    layers = [MixedPrecisionLayer(config) for _ in range(num_layers)]
    cache.layers[:] = layers
    return layers
