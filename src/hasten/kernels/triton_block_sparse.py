"""Block-sparse flash-attention forward kernel in Triton (inference only).

What it computes
----------------
For every batch ``b``, head ``h`` and query token ``i`` (in query tile ``t = i // tile``)::

    keys(i) = { j : j // tile in kv_indices[t, :kv_counts[t]]  and  key_valid[b, j] }
    out[b, h, i] = sum_{j in keys(i)} softmax_j(scale * q[b,h,i] . k[b,h,j]) * v[b,h,j]

i.e. exact softmax attention restricted to the listed key tiles and the valid keys.  A
query row with no valid key (``kv_counts[t] == 0``, or every key of its listed tiles has
``key_valid == False``) gets an all-zero output row, never NaN.  The softmax is computed
online (flash attention): running row max and row sum, accumulation in fp32, base-2
exponentials with ``log2(e)`` folded into the score scale, a single cast to the input
dtype at the end.  No backward pass: the output carries no autograd graph.

Layout contract
---------------
* ``q, k, v``: ``(B, H, S, D)``, identical shapes, one dtype out of fp32/fp16/bf16, any
  strides (a transposed view of a ``(B, S, H, D)`` tensor is read in place: all four strides
  of every tensor are passed to the kernel, nothing is copied).  ``D`` is a power of two in
  ``[16, 256]``.
* ``tile``: tokens per tile, one of 16/32/64/128, ``S % tile == 0``; ``T = S // tile``.
* ``kv_indices``: ``(T, M)`` int32 (int64 is converted): row ``t`` lists the key tiles that
  query tile ``t`` attends, ascending by convention (the result does not depend on the order;
  a tile listed twice would be counted twice, so lists must not repeat a tile).  Entries at
  positions ``>= kv_counts[t]`` are ignored.  Entries must lie in ``[0, T)``; they are
  checked on the host only for CPU tensors (checking CUDA tensors would force a device
  sync), so out-of-range entries on CUDA read out of bounds.
* ``kv_counts``: ``(T,)`` int32 (int64 is converted), ``0 <= kv_counts[t] <= M``; the kernel
  clamps to ``[0, M]``.
* ``key_valid``: ``(B, S)`` bool, any strides: ``False`` keys are never attended.
* ``tile_counter``: optional one-element int32/int64 tensor; every ``(b, h, query tile)``
  adds its ``kv_counts[t]`` with one atomic, so after the call it has grown by
  ``B * H * kv_counts.sum()`` (the number of (query tile, key tile) products computed).
* Output: ``(B, H, S, D)`` in q's dtype, allocated with ``torch.empty_like(q)`` (so it keeps
  q's memory layout, e.g. a ``(B, S, H, D)``-backed view stays one).

Fused gather and scatter (``rows``)
-----------------------------------
GRAT's kernel order (each group contiguous and tile-padded) is a permutation of the model's
token order plus padding slots.  With ``rows`` (``(L,)`` int32/int64, ``L`` a multiple of
``tile``), q, k and v stay in the caller's order ``(B, H, S, D)`` and slot ``s`` of the kernel
order is row ``rows[s]`` of them, or a padding slot when ``rows[s] == -1``; the non-negative
entries must name each of the ``S`` rows exactly once (checked on the host for CPU tensors
only).  ``kv_indices``, ``kv_counts`` and ``key_valid`` (then ``(B, L)``, False on padding
slots) describe slots and tiles of ``L // tile``.  Every program loads its query rows and each
key/value block through ``rows`` (one small int32 load per block, then row-wise gathered
loads; padding slots read row 0, and their keys must be masked in ``key_valid``) and stores
each output row at its own model position; padding slots store nothing.  The output is
``(B, H, S, D)`` in the caller's order, ``torch.empty_like(q)``.  The result equals gathering
copies with ``index_select``, running the kernel in slot order and scattering back, without
the three copies in and one copy out.  Row offsets are computed in int64.

Launch configuration
--------------------
Grid ``(T * (tile // BLOCK_M), B * H)``: consecutive programs share one ``(b, h)``, so that
head's K/V stay hot in L2 while its query tiles run.  Each program owns ``BLOCK_M`` query
rows of one query tile (``BLOCK_M == tile`` unless the tile is split, see below) and loops
over ``kv_counts[t] * (tile // BLOCK_N)`` key blocks of ``BLOCK_N`` rows: for each listed key
tile, its ``tile // BLOCK_N`` sub-blocks.  Both products use ``tl.dot`` with fp32
accumulation; ``P`` is cast to v's dtype for the second one (fp16/bf16 tensor cores).
fp32 inputs use ``input_precision="ieee"`` (true fp32, matching the reference semantics,
not TF32).  The key mask is loaded and applied only for key tiles that hold an invalid key
(one int8 flag per (batch, key tile), computed on the host side of the launch).

    inputs               BLOCK_M        BLOCK_N        warps                 stages
    fp16/bf16, D <= 128  min(tile,128)  min(tile,128)  8 if BLOCK_M==128 else 4   3
    fp16/bf16, D == 256  min(tile,64)   min(tile,64)   8                          2
    fp32,      D <= 128  min(tile,64)   min(tile,32)   8 if BLOCK_M==64 else 4    2
    fp32,      D == 256  min(tile,32)   min(tile,16)   8                          2

* fp16/bf16, D <= 128: measured on an H100 (``benchmarks/grat_triton_configs.py``, bf16,
  head dim 128, 24 heads, tile 128, 2026-11-22) over BLOCK_M {64, 128} x BLOCK_N {32, 128} x
  warps {4, 8} x stages {2, 3}: 128 x 128 blocks, two warpgroups, 3 stages were the fastest at
  Flux 4096² and HunyuanVideo 544x960x61, GRAT-X and GRAT-B, by 7-15% over the next config
  and 11-29% over compiled FlexAttention.  (Before the mask was skipped on full tiles, 64 x 32
  with one warpgroup was fastest: the masked 128 x 128 program ran out of registers.)
* D == 256 halves BLOCK_M so that the 64 x 256 fp32 accumulator (plus scores) fits.
* K/V addresses come from ``kv_indices`` (a gather), and the software pipeliner
  double-buffers the K/V copies (cp.async).
* fp32 uses exact (``ieee``) FMA dots and is meant for testing, not speed.

Under the interpreter (``TRITON_INTERPRET=1``) bf16 dot operands are upcast to fp32, because
the interpreter's ``tl.dot`` multiplies numpy's uint16 storage of bf16 values; compiled
kernels keep bf16 operands.  Launch settings (warps, stages) are ignored by the interpreter.

Splitting a tile into sub-blocks changes nothing in the result (same keys, same online
softmax); the tile counter is incremented once per (b, h, query tile) regardless.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

try:  # triton is a Linux-only dependency; keep this module importable without it
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as _exc:  # pragma: no cover - depends on the platform
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = _exc

__all__ = ["triton_available", "triton_block_sparse_attention", "SUPPORTED_TILES"]

SUPPORTED_TILES = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def _interpret_enabled() -> bool:
    """Whether Triton runs kernels in its (CPU, numpy) interpreter."""
    if triton is not None:
        knobs = getattr(triton, "knobs", None)
        runtime = getattr(knobs, "runtime", None)
        if runtime is not None and hasattr(runtime, "interpret"):
            try:
                return bool(runtime.interpret)
            except Exception:  # pragma: no cover - defensive
                pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when triton imports and kernels can run: CUDA is available or TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return bool(torch.cuda.is_available() or _interpret_enabled())


if triton is not None:

    def _block_sparse_attn_fwd(
        Q,
        K,
        V,
        O,  # noqa: E741 (the kernel's output pointer)
        KV_IDX,
        KV_CNT,
        KEY_VALID,
        TILE_FULL,
        COUNTER,
        ROWS,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_os,
        stride_od,
        stride_idx_t,
        stride_idx_m,
        stride_valid_b,
        stride_valid_s,
        stride_full_b,
        stride_full_t,
        H,
        M,
        qk_scale,
        TILE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HAS_COUNTER: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        GATHER: tl.constexpr,
    ):
        SUB_M: tl.constexpr = TILE // BLOCK_M
        SUB_N: tl.constexpr = TILE // BLOCK_N

        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        q_tile = pid_m // SUB_M
        m_sub = pid_m % SUB_M
        off_b = pid_bh // H
        off_h = pid_bh % H

        # Scalar int64 base offsets (large B*H*S*D); per-block vector offsets stay int32.
        start_m = q_tile.to(tl.int64) * TILE + m_sub * BLOCK_M
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
        o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        valid_base = KEY_VALID + off_b.to(tl.int64) * stride_valid_b
        full_base = TILE_FULL + off_b.to(tl.int64) * stride_full_b
        idx_row = KV_IDX + q_tile.to(tl.int64) * stride_idx_t

        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        if GATHER:
            # Slot -> row of the caller's (model-order) tensors; padding slots hold -1: they read
            # row 0 (their keys are masked by KEY_VALID, their outputs are never stored).
            q_rows = tl.load(ROWS + start_m + offs_m)
            q_live = q_rows >= 0
            q_off = tl.maximum(q_rows, 0).to(tl.int64) * stride_qs
            q_ptrs = q_base + q_off[:, None] + offs_d[None, :] * stride_qd
        else:
            q_ptrs = q_base + start_m * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs)
        if UPCAST_DOT:
            q = q.to(tl.float32)

        count = tl.load(KV_CNT + q_tile)
        count = tl.minimum(tl.maximum(count, 0), M)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for step in range(0, count * SUB_N):
            kv_tile = tl.load(idx_row + (step // SUB_N) * stride_idx_m)
            start_n = kv_tile.to(tl.int64) * TILE + (step % SUB_N) * BLOCK_N

            if GATHER:
                kv_rows = tl.maximum(tl.load(ROWS + start_n + offs_n), 0).to(tl.int64)
                k_ptrs = k_base + kv_rows[:, None] * stride_ks + offs_d[None, :] * stride_kd
                v_ptrs = v_base + kv_rows[:, None] * stride_vs + offs_d[None, :] * stride_vd
            else:
                k_ptrs = k_base + start_n * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
                v_ptrs = v_base + start_n * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            # Most key tiles are fully valid: only partial ones (group padding, padded text)
            # pay for loading and applying the key mask.
            if tl.load(full_base + kv_tile * stride_full_t) == 0:
                key_ok = tl.load(valid_base + start_n * stride_valid_s + offs_n * stride_valid_s) != 0
                s = tl.where(key_ok[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no valid key yet keep m == -inf; subtract 0 instead so
            # that exp2 gives exact zeros and never evaluates (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if GATHER:  # scatter: each real slot writes its own row of the caller's order
            o_off = tl.maximum(q_rows, 0).to(tl.int64) * stride_os
            o_ptrs = o_base + o_off[:, None] + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_live[:, None])
        else:
            o_ptrs = o_base + start_m * stride_os + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty))

        if HAS_COUNTER:
            tl.atomic_add(COUNTER, count.to(COUNTER.dtype.element_ty), mask=m_sub == 0)


# One jitted kernel per interpreter mode: ``triton.jit`` decides between the compiler and
# the interpreter when it is applied, so jitting lazily honours TRITON_INTERPRET as set at
# call time (e.g. by a test module imported after this one).
_KERNELS: dict[bool, Any] = {}


def _get_kernel(interpret: bool):
    kernel = _KERNELS.get(interpret)
    if kernel is None:
        kernel = triton.jit(_block_sparse_attn_fwd)
        _KERNELS[interpret] = kernel
    return kernel


def _launch_config(tile: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); see the table in the module docstring."""
    if dtype == torch.float32:  # ieee fp32 dots run on FMA units: keep blocks small
        if head_dim <= 128:
            block_m = min(tile, 64)
            return block_m, min(tile, 32), 8 if block_m == 64 else 4, 2
        return min(tile, 32), min(tile, 16), 8, 2
    if head_dim <= 128:
        block = min(tile, 128)
        return block, block, 8 if block == 128 else 4, 3
    return min(tile, 64), min(tile, 64), 8, 2


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _validate(q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter, interpret, rows=None):
    for name, t in (
        ("q", q),
        ("k", k),
        ("v", v),
        ("kv_indices", kv_indices),
        ("kv_counts", kv_counts),
        ("key_valid", key_valid),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rows is not None and not isinstance(rows, torch.Tensor):
        raise ValueError(f"rows must be a torch.Tensor or None, got {type(rows).__name__}")
    if tile_counter is not None and not isinstance(tile_counter, torch.Tensor):
        raise ValueError(f"tile_counter must be a torch.Tensor or None, got {type(tile_counter).__name__}")

    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, S, D), got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v shape {tuple(v.shape)} does not match q shape {tuple(q.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported (expected float32, float16 or bfloat16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")

    B, H, S, D = q.shape
    if not (16 <= D <= 256 and _is_pow2(D)):
        raise ValueError(f"head dim D={D} (last dim of q) must be a power of two in [16, 256]")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile not in SUPPORTED_TILES:
        raise ValueError(f"tile={tile!r} must be one of {SUPPORTED_TILES}")
    if rows is None:
        L = S
        if S % tile != 0:
            raise ValueError(f"sequence length S={S} of q must be divisible by tile={tile}")
    else:
        if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be a 1-D int32/int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
        L = rows.shape[0]
        if L % tile != 0:
            raise ValueError(f"rows has {L} slots, not a multiple of tile={tile}")
    T = L // tile

    if kv_indices.dim() != 2 or kv_indices.shape[0] != T:
        raise ValueError(f"kv_indices must have shape (T, M) with T = S // tile = {T}, got {tuple(kv_indices.shape)}")
    if kv_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_indices must be int32 (or int64), got {kv_indices.dtype}")
    if kv_counts.dim() != 1 or kv_counts.shape[0] != T:
        raise ValueError(f"kv_counts must have shape (T,) = ({T},), got {tuple(kv_counts.shape)}")
    if kv_counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_counts must be int32 (or int64), got {kv_counts.dtype}")
    if key_valid.dim() != 2 or tuple(key_valid.shape) != (B, L):
        what = "(B, S)" if rows is None else "(B, len(rows))"
        raise ValueError(f"key_valid must have shape {what} = ({B}, {L}), got {tuple(key_valid.shape)}")
    if key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid must be a bool tensor, got {key_valid.dtype}")
    if tile_counter is not None:
        if tile_counter.numel() != 1:
            raise ValueError(f"tile_counter must have exactly one element, got shape {tuple(tile_counter.shape)}")
        if tile_counter.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tile_counter must be int32 or int64, got {tile_counter.dtype}")
        if not tile_counter.is_contiguous():
            raise ValueError("tile_counter must be contiguous")

    device = q.device
    named = [("k", k), ("v", v), ("kv_indices", kv_indices), ("kv_counts", kv_counts), ("key_valid", key_valid)]
    if tile_counter is not None:
        named.append(("tile_counter", tile_counter))
    if rows is not None:
        named.append(("rows", rows))
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must be on one device")
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"tensors are on {device}: the Triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run the Triton interpreter on the CPU)"
        )

    # Host-side range checks only where they are free of a device sync.
    if device.type == "cpu":
        if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > kv_indices.shape[1]):
            raise ValueError(f"kv_counts entries must lie in [0, M={kv_indices.shape[1]}]")
        if kv_indices.numel() and T:
            used = torch.arange(kv_indices.shape[1]).unsqueeze(0) < kv_counts.to(torch.int64).unsqueeze(1)
            listed = kv_indices[used]
            if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= T):
                raise ValueError(f"kv_indices entries (within kv_counts) must lie in [0, T={T})")
        if rows is not None:
            real = rows[rows >= 0]
            if (
                int((rows < -1).sum())
                or real.numel() != S
                or not torch.equal(real.sort().values, torch.arange(S, dtype=real.dtype))
            ):
                raise ValueError(f"rows must name each of q's S={S} rows exactly once, -1 on padding slots")


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float | None = None,
    tile_counter: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention forward; see the module docstring for the full contract.

    Args:
        q, k, v: ``(B, H, S, D)``, one dtype (fp32/fp16/bf16), any strides.
        kv_indices: ``(T, M)`` int32, ``T = S // tile``: key tiles listed per query tile.
        kv_counts: ``(T,)`` int32: how many entries of each ``kv_indices`` row are used.
        key_valid: ``(B, S)`` bool: keys that may be attended.
        tile: tokens per tile, one of 16/32/64/128.
        scale: score scale, default ``1 / sqrt(D)``.
        tile_counter: optional one-element int32/int64 tensor, incremented by
            ``B * H * kv_counts.sum()``.
        rows: optional ``(L,)`` int32/int64 gather index (see "Fused gather and scatter" in the
            module docstring): q/k/v/out are then in the caller's order, the tiles, ``kv_indices``
            and ``key_valid`` (``(B, L)``) in slot order, ``T = L // tile``.

    Returns:
        ``(B, H, S, D)`` tensor in q's dtype; rows without any valid key are zero.
    """
    if triton is None:
        raise RuntimeError(f"triton is not available: {_TRITON_IMPORT_ERROR!r}")
    interpret = _interpret_enabled()
    _validate(q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter, interpret, rows)

    B, H, S, D = q.shape
    T = (S if rows is None else rows.shape[0]) // tile
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)

    out = torch.empty_like(q)
    if out.numel() == 0:
        return out

    kv_indices = kv_indices.to(torch.int32)
    kv_counts = kv_counts.to(torch.int32).contiguous()
    M = kv_indices.shape[1]
    if M == 0:  # nothing listed anywhere: kernel still runs (writes zeros), give it a valid pointer
        kv_indices = torch.zeros((T, 1), dtype=torch.int32, device=q.device)

    block_m, block_n, num_warps, num_stages = _launch_config(tile, D, q.dtype)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit
    # The interpreter's tl.dot runs numpy matmul on the raw storage, and numpy has no
    # bfloat16 (it is stored as uint16): upcast bf16 operands to fp32 there.  Compiled
    # kernels use bf16 tensor cores.
    upcast = bool(interpret and q.dtype == torch.bfloat16)
    has_counter = tile_counter is not None
    counter = tile_counter if has_counter else kv_counts  # dummy pointer, never touched
    gather = rows is not None
    rows = rows.to(torch.int32).contiguous() if gather else kv_counts  # dummy pointer when not gathering

    # One flag per (batch, key tile): 1 when every key of the tile is valid (no mask needed).
    tile_full = key_valid.reshape(key_valid.shape[0], T, tile).all(dim=-1).to(torch.int8)

    kernel = _get_kernel(interpret)
    grid = (T * (tile // block_m), B * H)
    args = (
        q,
        k,
        v,
        out,
        kv_indices,
        kv_counts,
        key_valid,
        tile_full,
        counter,
        rows,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *kv_indices.stride(),
        *key_valid.stride(),
        *tile_full.stride(),
        H,
        M,
        scale * _LOG2E,
    )
    meta = dict(
        TILE=tile,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=D,
        HAS_COUNTER=has_counter,
        DOT_PRECISION=dot_precision,
        UPCAST_DOT=upcast,
        GATHER=gather,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
    return out
