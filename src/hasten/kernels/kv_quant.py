"""KV-cache quantisation: asymmetric int2 / int4 / int8 codes packed into bytes, with scales.

Pure tensors, no model knowledge. One primitive does all the work: :func:`quantize_rows`
quantises each row of a ``(..., C)`` tensor in groups of ``group`` consecutive elements
(asymmetric: a scale and a zero point per group) and packs ``8 // bits`` codes per byte.
:class:`QuantizedKV` applies it to a ``(..., tokens, dim)`` key or value tensor in one of three
layouts:

``"channel"``
    per-channel (KIVI's choice for keys): each channel gets its own scale over groups of
    ``group`` tokens, because key outliers live in fixed channels.
``"token"``
    per-token (KIVI's choice for values): each token gets its own scales over groups of
    ``group`` channels.
``"separable"``
    ZipCache's channel-separable token-wise layout: channels are first divided by their
    absolute maximum over the tokens, then each token is quantised with one scale: ``dim +
    2 * tokens`` parameters instead of one pair per group.

Error bound: every element round-trips within half a quantisation step of its group,
``|x - dequantize(quantize(x))| <= scale / 2`` (times the channel factor for "separable"),
because scales and zero points are stored in float16 rounded outward (the zero point down,
the scale up), so every group's range stays covered.

Codes are computed as ``floor((x - zero) / scale + 0.5)``, the rounding the Triton kernels
(:mod:`.triton_kv_quant`) use too, so both backends give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_positive_int

__all__ = [
    "BITS",
    "LAYOUTS",
    "QuantizedKV",
    "dequantize_rows",
    "merge_partials",
    "packed_bytes",
    "partial_attention",
    "quantize_rows",
]

BITS = (2, 4, 8)
LAYOUTS = ("channel", "token", "separable")
_PARAM_DTYPE = torch.float16  # scales and zero points


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"`bits` must be one of {BITS}, got {bits!r}")


def _round_outward(value: torch.Tensor, down: bool) -> torch.Tensor:
    """float16 copy of ``value`` rounded toward -inf (``down``) or +inf, so ranges stay covered."""
    stored = value.to(_PARAM_DTYPE)
    wrong = stored.float() > value if down else stored.float() < value
    target = torch.full_like(stored, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(stored, target), stored)


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise the last axis of ``x`` in groups of ``group`` elements and pack the codes.

    Parameters
    ----------
    x : Tensor (..., C)
        ``C`` must be a multiple of ``group``, and ``group`` a multiple of ``8 // bits``.
    bits : {2, 4, 8}
    group : int

    Returns
    -------
    (packed, scale, zero)
        ``packed``: uint8 ``(..., C * bits // 8)``; ``scale`` and ``zero``: float16
        ``(..., C // group)``. ``x ~= code * scale + zero``.

    Examples
    --------
    >>> x = torch.linspace(-1, 1, 8).view(1, 8)
    >>> packed, scale, zero = quantize_rows(x, bits=2, group=8)
    >>> packed.shape, float((dequantize_rows(packed, scale, zero, 2, 8) - x).abs().max()) <= float(scale) / 2
    (torch.Size([1, 2]), True)
    """
    _check_bits(bits)
    per_byte = 8 // bits
    columns = x.shape[-1]
    if group <= 0 or columns % group or group % per_byte:
        raise ValueError(
            f"`group` ({group}) must divide the row length ({columns}) and be a multiple of "
            f"{per_byte} (codes per byte at {bits} bits)"
        )
    levels = 2**bits - 1
    grouped = x.float().reshape(*x.shape[:-1], columns // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    zero = _round_outward(low, down=True)
    scale = _round_outward(((high - zero.float()) / levels).clamp_min(1e-8), down=False)
    codes = torch.floor((grouped - zero.float()[..., None]) / scale.float()[..., None] + 0.5).clamp_(0, levels)
    codes = codes.to(torch.uint8).reshape(*x.shape[:-1], columns // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.uint8) * bits
    packed = (codes << shifts).sum(-1, dtype=torch.uint8) if per_byte > 1 else codes[..., 0]
    return packed, scale, zero


def dequantize_rows(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: ``(..., C)`` values in ``dtype``."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(*packed.shape[:-1], -1, group).float()
    values = codes * scale.float()[..., None] + zero.float()[..., None]
    return values.reshape(*packed.shape[:-1], -1).to(dtype)


def packed_bytes(tokens: int, dim: int, bits: int, group: int, layout: str, lead: int = 1) -> int:
    """Bytes of a :class:`QuantizedKV` of ``lead x tokens x dim`` values (codes + parameters).

    ``tokens`` is counted after padding to a multiple of ``group`` for the "channel" layout.
    """
    param = torch.finfo(_PARAM_DTYPE).bits // 8
    codes = tokens * dim * bits // 8
    if layout == "channel":
        params = 2 * dim * (tokens // group)
    elif layout == "token":
        params = 2 * tokens * (dim // group)
    elif layout == "separable":
        params = 2 * tokens + dim
    else:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    return lead * (codes + params * param)


@dataclass
class QuantizedKV:
    """A quantised ``(..., tokens, dim)`` key or value tensor.

    Build with :meth:`quantize`, read back with :meth:`dequantize`; :attr:`nbytes` is the true
    size (codes, scales, zero points, channel factors).

    Examples
    --------
    >>> keys = torch.randn(1, 2, 40, 16)
    >>> q = QuantizedKV.quantize(keys, bits=4, layout="channel", group=32)
    >>> q.dequantize().shape, q.nbytes < keys.numel() * 2
    (torch.Size([1, 2, 40, 16]), True)
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    layout: str
    group: int
    tokens: int
    dtype: torch.dtype
    channel_factor: torch.Tensor | None = None

    @classmethod
    def quantize(cls, x: torch.Tensor, bits: int, layout: str, group: int = 32) -> "QuantizedKV":
        """Quantise ``x`` (``(..., tokens, dim)``) with ``bits`` in ``layout``.

        ``group`` is the token group of "channel" (the last group is padded by repeating the last
        token; the padding is dropped on the way back) and the channel group of "token" (it
        must divide ``dim``); "separable" uses one group per token.
        """
        _check_bits(bits)
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
        check_positive_int(group, "group")
        tokens, dim = x.shape[-2], x.shape[-1]
        factor = None
        if layout == "channel":
            pad = (-tokens) % group
            rows = x.transpose(-1, -2)
            if pad:
                rows = torch.cat([rows, rows[..., -1:].expand(*rows.shape[:-1], pad)], -1)
            packed, scale, zero = quantize_rows(rows, bits, group)
        elif layout == "token":
            packed, scale, zero = quantize_rows(x, bits, group)
        else:
            factor = _round_outward(x.float().abs().amax(-2, keepdim=True).clamp_min(1e-6), down=False)
            packed, scale, zero = quantize_rows(x.float() / factor.float(), bits, dim)
        return cls(packed, scale, zero, bits, layout, group, tokens, x.dtype, factor)

    def dequantize(self) -> torch.Tensor:
        """The ``(..., tokens, dim)`` values in the original dtype."""
        if self.layout == "channel":
            rows = dequantize_rows(self.packed, self.scale, self.zero, self.bits, self.group)
            return rows[..., : self.tokens].transpose(-1, -2).to(self.dtype)
        if self.layout == "token":
            return dequantize_rows(self.packed, self.scale, self.zero, self.bits, self.group, self.dtype)
        dim = self.packed.shape[-1] * 8 // self.bits
        values = dequantize_rows(self.packed, self.scale, self.zero, self.bits, dim)
        return (values * self.channel_factor.float()).to(self.dtype)

    def error_bound(self) -> torch.Tensor:
        """Half a quantisation step per element, broadcastable to ``dequantize()``'s shape."""
        half = self.scale.float() / 2
        if self.layout == "channel":  # (..., dim, token groups) -> (..., tokens, dim)
            return half.repeat_interleave(self.group, -1)[..., : self.tokens].transpose(-1, -2)
        if self.layout == "token":
            return half.repeat_interleave(self.group, -1)
        return half * self.channel_factor.float()

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scale, self.zero] + (
            [self.channel_factor] if self.channel_factor is not None else []
        )
        return sum(t.numel() * t.element_size() for t in tensors)


def partial_attention(
    query: torch.Tensor,
    keys: torch.Tensor | QuantizedKV,
    values: torch.Tensor | QuantizedKV,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head against a block of keys: the softmax-weighted values and the log-sum-exp.

    ``query`` ``(heads, dim)``; ``keys`` / ``values`` ``(kv_heads, n, dim)`` tensors or
    :class:`QuantizedKV` of that shape (dequantised here: the torch reference of the fused
    Triton kernel); ``key_valid`` ``(n,)`` bool. Returns ``(heads, dim)`` float32 outputs and
    ``(heads,)`` log-sum-exps, which :func:`merge_partials` combines across blocks exactly.
    """
    k = keys.dequantize() if isinstance(keys, QuantizedKV) else keys
    v = values.dequantize() if isinstance(values, QuantizedKV) else values
    heads, kv_heads = query.shape[0], k.shape[0]
    k = k.float().repeat_interleave(heads // kv_heads, 0)
    v = v.float().repeat_interleave(heads // kv_heads, 0)
    logits = (k @ query.float()[:, :, None])[..., 0] * scaling  # (heads, n)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    weights = torch.exp(logits - lse[:, None]).nan_to_num(0.0)
    return (weights[:, None, :] @ v)[:, 0], lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine :func:`partial_attention` results over disjoint key blocks into the full attention."""
    outputs = torch.stack([out for out, _ in parts])  # (blocks, heads, dim)
    lses = torch.stack([lse for _, lse in parts])  # (blocks, heads)
    weights = torch.softmax(lses, 0).nan_to_num(0.0)  # blocks with no valid key weigh 0
    return (weights[..., None] * outputs).sum(0)
