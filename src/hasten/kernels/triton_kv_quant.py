"""Triton kernels for the quantised KV cache: row packing / unpacking and fused decode attention.

- :func:`triton_pack_rows` / :func:`triton_unpack_rows`: the code computation and bit packing
  of :func:`hasten.kernels.kv_quant.quantize_rows` (given its scales and zero points, which are
  a cheap torch reduction) and the inverse; the same bytes as the torch reference.
- :func:`triton_partial_attention`: one decoding query per head against KIVI-layout quantised
  keys (per channel) and values (per token), dequantised on the fly in registers, with an online
  softmax: the Triton twin of :func:`hasten.kernels.kv_quant.partial_attention`, returning the
  output and log-sum-exp so blocks merge exactly. The cache is never materialised at full
  precision.

CUDA, or the CPU under ``TRITON_INTERPRET=1`` (how the tests run them).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .kv_quant import QuantizedKV

try:  # triton is a Linux-only dependency; keep this module importable without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the platform
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["triton_pack_rows", "triton_partial_attention", "triton_unpack_rows", "triton_kv_available"]


def triton_kv_available() -> bool:
    """True when triton imports and can run: CUDA is available or TRITON_INTERPRET=1."""
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    return triton is not None and (torch.cuda.is_available() or interpret)


if triton is not None:

    def _pack_rows(
        X,
        SCALE,
        ZERO,
        OUT,
        columns,
        stride_x,
        stride_s,
        stride_o,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        byte = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        per: tl.constexpr = 8 // BITS
        live = byte < columns // per
        packed = tl.zeros([BLOCK], dtype=tl.int32)
        for i in tl.static_range(per):
            column = byte * per + i
            x = tl.load(X + row * stride_x + column, mask=live, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + row * stride_s + column // GROUP, mask=live, other=1.0).to(tl.float32)
            zero = tl.load(ZERO + row * stride_s + column // GROUP, mask=live, other=0.0).to(tl.float32)
            code = tl.floor(tl.math.div_rn(x - zero, scale) + 0.5)
            code = tl.minimum(tl.maximum(code, 0.0), (1 << BITS) - 1).to(tl.int32)
            packed = packed | (code << (i * BITS))
        tl.store(OUT + row * stride_o + byte, packed.to(tl.uint8), mask=live)

    def _unpack_rows(
        P,
        SCALE,
        ZERO,
        OUT,
        columns,
        stride_p,
        stride_s,
        stride_o,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        column = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        per: tl.constexpr = 8 // BITS
        live = column < columns
        byte = tl.load(P + row * stride_p + column // per, mask=live, other=0).to(tl.int32)
        code = (byte >> ((column % per) * BITS)) & ((1 << BITS) - 1)
        scale = tl.load(SCALE + row * stride_s + column // GROUP, mask=live, other=1.0).to(tl.float32)
        zero = tl.load(ZERO + row * stride_s + column // GROUP, mask=live, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + column, code.to(tl.float32) * scale + zero, mask=live)

    def _decode_attention(
        Q,
        KP,
        KS,
        KZ,
        VP,
        VS,
        VZ,
        VALID,
        OUT,
        LSE,
        tokens,
        scaling,
        sq_h,
        skp_h,
        skp_d,
        sks_h,
        sks_d,
        svp_h,
        svp_t,
        svs_h,
        svs_t,
        so_h,
        DIM: tl.constexpr,
        GROUPS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BITS_K: tl.constexpr,
        BITS_V: tl.constexpr,
        GROUP_K: tl.constexpr,
        GROUP_V: tl.constexpr,
    ):
        head = tl.program_id(0)
        kv = head // GROUPS
        d = tl.arange(0, DIM)
        q = tl.load(Q + head * sq_h + d).to(tl.float32)
        per_k: tl.constexpr = 8 // BITS_K
        per_v: tl.constexpr = 8 // BITS_V
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([DIM], tl.float32)
        for start in range(0, tokens, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            live = t < tokens
            valid = (tl.load(VALID + t, mask=live, other=0) != 0) & live
            # keys, per channel: (DIM, BLOCK_N) codes along the token axis
            k_byte = tl.load(KP + kv * skp_h + d[:, None] * skp_d + (t // per_k)[None, :], mask=live[None, :], other=0)
            k_code = (k_byte.to(tl.int32) >> ((t % per_k) * BITS_K)[None, :]) & ((1 << BITS_K) - 1)
            k_scale = tl.load(
                KS + kv * sks_h + d[:, None] * sks_d + (t // GROUP_K)[None, :], mask=live[None, :], other=0.0
            ).to(tl.float32)
            k_zero = tl.load(
                KZ + kv * sks_h + d[:, None] * sks_d + (t // GROUP_K)[None, :], mask=live[None, :], other=0.0
            ).to(tl.float32)
            k = k_code.to(tl.float32) * k_scale + k_zero
            s = tl.sum(q[:, None] * k, axis=0) * scaling
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - safe)
            alpha = tl.exp(m - safe)
            # values, per token: (BLOCK_N, DIM) codes along the channel axis
            v_byte = tl.load(VP + kv * svp_h + t[:, None] * svp_t + (d // per_v)[None, :], mask=live[:, None], other=0)
            v_code = (v_byte.to(tl.int32) >> ((d % per_v) * BITS_V)[None, :]) & ((1 << BITS_V) - 1)
            v_scale = tl.load(
                VS + kv * svs_h + t[:, None] * svs_t + (d // GROUP_V)[None, :], mask=live[:, None], other=0.0
            ).to(tl.float32)
            v_zero = tl.load(
                VZ + kv * svs_h + t[:, None] * svs_t + (d // GROUP_V)[None, :], mask=live[:, None], other=0.0
            ).to(tl.float32)
            v = v_code.to(tl.float32) * v_scale + v_zero
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        has_keys = total > 0
        out = tl.where(has_keys, acc / tl.where(has_keys, total, 1.0), 0.0)
        tl.store(OUT + head * so_h + d, out)
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
        tl.store(LSE + head + tl.arange(0, 1), lse)


_KERNELS: dict[tuple[str, bool], Any] = {}


def _kernel(name: str):
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    key = (name, interpret)
    if key not in _KERNELS:  # jitted lazily: honours TRITON_INTERPRET as set at call time
        _KERNELS[key] = triton.jit({"pack": _pack_rows, "unpack": _unpack_rows, "decode": _decode_attention}[name])
    return _KERNELS[key]


def _require() -> None:
    if not triton_kv_available():
        raise RuntimeError("Triton KV kernels need CUDA or TRITON_INTERPRET=1 (and triton installed)")


def triton_pack_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Codes of ``x`` ``(..., C)`` under ``scale`` / ``zero`` ``(..., C // group)``, packed into uint8."""
    _require()
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    scales, zeros = scale.reshape(rows.shape[0], -1).contiguous(), zero.reshape(rows.shape[0], -1).contiguous()
    out = torch.empty(rows.shape[0], rows.shape[1] * bits // 8, dtype=torch.uint8, device=x.device)
    block = 64
    grid = (rows.shape[0], triton.cdiv(out.shape[1], block))
    _kernel("pack")[grid](
        rows,
        scales,
        zeros,
        out,
        rows.shape[1],
        rows.stride(0),
        scales.stride(0),
        out.stride(0),
        BITS=bits,
        GROUP=group,
        BLOCK=block,
    )
    return out.reshape(*x.shape[:-1], -1)


def triton_unpack_rows(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`triton_pack_rows` (same values as ``dequantize_rows``)."""
    _require()
    rows = packed.reshape(-1, packed.shape[-1]).contiguous()
    scales, zeros = scale.reshape(rows.shape[0], -1).contiguous(), zero.reshape(rows.shape[0], -1).contiguous()
    columns = rows.shape[1] * 8 // bits
    out = torch.empty(rows.shape[0], columns, dtype=torch.float32, device=packed.device)
    block = 64
    _kernel("unpack")[(rows.shape[0], triton.cdiv(columns, block))](
        rows,
        scales,
        zeros,
        out,
        columns,
        rows.stride(0),
        scales.stride(0),
        out.stride(0),
        BITS=bits,
        GROUP=group,
        BLOCK=block,
    )
    return out.reshape(*packed.shape[:-1], columns).to(dtype)


def triton_partial_attention(
    query: torch.Tensor, keys: QuantizedKV, values: QuantizedKV, scaling: float, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`~hasten.kernels.kv_quant.partial_attention` for "channel" keys and "token" values.

    ``query`` ``(heads, dim)`` (dim a power of two), ``keys`` / ``values`` quantised
    ``(kv_heads, n, dim)``. Returns float32 ``(heads, dim)`` outputs and ``(heads,)`` log-sum-exps.
    """
    _require()
    if keys.layout != "channel" or values.layout != "token":
        raise ValueError("the fused kernel reads KIVI layouts: keys 'channel', values 'token'")
    heads, dim = query.shape
    kv_heads, tokens = keys.packed.shape[0], keys.tokens
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"the fused kernel needs a power-of-two head dimension >= 16, got {dim}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group onto {kv_heads} KV heads")
    valid = (
        torch.ones(tokens, dtype=torch.int8, device=query.device)
        if key_valid is None
        else key_valid.to(torch.int8).contiguous()
    )
    q = query.float().contiguous()
    kp, ks, kz = keys.packed.contiguous(), keys.scale.contiguous(), keys.zero.contiguous()
    vp, vs, vz = values.packed.contiguous(), values.scale.contiguous(), values.zero.contiguous()
    out = torch.empty(heads, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(heads, dtype=torch.float32, device=query.device)
    _kernel("decode")[(heads,)](
        q,
        kp,
        ks,
        kz,
        vp,
        vs,
        vz,
        valid,
        out,
        lse,
        tokens,
        float(scaling),
        q.stride(0),
        kp.stride(0),
        kp.stride(1),
        ks.stride(0),
        ks.stride(1),
        vp.stride(0),
        vp.stride(1),
        vs.stride(0),
        vs.stride(1),
        out.stride(0),
        DIM=dim,
        GROUPS=heads // kv_heads,
        BLOCK_N=32,
        BITS_K=keys.bits,
        BITS_V=values.bits,
        GROUP_K=keys.group,
        GROUP_V=values.group,
    )
    return out, lse
