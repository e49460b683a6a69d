"""Block-sparse Triton attention kernel, checked with the Triton interpreter on the CPU.

TRITON_INTERPRET is set before triton is imported, then restored after the imports and set
again around each test by a fixture: the kernel module jits lazily and reads the variable at
call time, so neither the order of test-module imports nor other modules are affected.
bf16 runs in the interpreter through an fp32 upcast of the dot operands (numpy has no
bfloat16 and the interpreter's tl.dot multiplies the raw uint16 storage); compiled GPU
kernels use bf16 tensor cores, which the interpreter cannot exercise.
"""

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hasten.kernels import triton_block_sparse as tbs  # noqa: E402
from hasten.kernels.triton_block_sparse import (  # noqa: E402
    triton_available,
    triton_block_sparse_attention,
)

# Put the variable back as it was once this module is imported, so that test modules
# collected after this one are not switched to the interpreter; the fixture below sets it
# for each test here (the kernel module reads it at call time).
if _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile, scale=None):
    """float64 SDPA with the tile lists expanded to an (S, S) mask; rows without keys -> 0."""
    B, H, S, D = q.shape
    T = S // tile
    tile_mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for n in range(int(kv_counts[t])):
            tile_mask[t, int(kv_indices[t, n])] = True
    mask = tile_mask.repeat_interleave(tile, 0).repeat_interleave(tile, 1)  # (S, S)
    mask = mask[None, None] & key_valid[:, None, None, :]  # (B, 1, S, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale
    )
    has_key = mask.any(-1, keepdim=True)  # (B, 1, S, 1)
    return torch.where(has_key, out, torch.zeros_like(out))


def make_layout(T, M=None, seed=0):
    """Random ascending tile lists with varying counts: row 0 lists every tile, row 1 one tile,
    row 2 none (count 0); entries past the count are garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    M = T if M is None else M
    kv_indices = torch.full((T, M), 10_000, dtype=torch.int32)  # out of range on purpose
    kv_counts = torch.zeros(T, dtype=torch.int32)
    for t in range(T):
        if t == 0:
            n = T
        elif t == 1:
            n = 1
        elif t == 2:
            n = 0
        else:
            n = int(torch.randint(1, T + 1, (1,), generator=g))
        n = min(n, M)
        chosen = torch.randperm(T, generator=g)[:n].sort().values
        kv_indices[t, :n] = chosen.to(torch.int32)
        kv_counts[t] = n
    return kv_indices, kv_counts


def make_inputs(B, H, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


def test_triton_available_under_interpreter():
    assert triton_available()


def test_fp32_sparse_padding_and_counter():
    B, H, D, tile, T = 2, 2, 32, 16, 6
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, torch.float32)
    kv_indices, kv_counts = make_layout(T)
    # Row 3 attends only tile 4, whose keys are all invalid -> zeros for query tile 3.
    kv_indices[3, 0] = 4
    kv_counts[3] = 1
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[:, 4 * tile : 5 * tile] = False
    key_valid[0, 5 * tile + 3 : 6 * tile] = False  # padding inside a tile (batch 0 only)
    key_valid[1, 1 * tile + 7] = False
    key_valid[1, 0:5] = False
    counter = torch.zeros(1, dtype=torch.int64)

    out = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter=counter)
    ref = dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 2 * tile : 3 * tile] == 0).all()  # count 0
    assert (out[:, :, 3 * tile : 4 * tile] == 0).all()  # all listed keys invalid
    assert int(counter) == B * H * int(kv_counts.sum())


@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)],
)
def test_half_precision(dtype, atol):
    B, H, D, tile, T = 1, 2, 16, 16, 5
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, dtype, seed=1)
    kv_indices, kv_counts = make_layout(T, seed=1)
    key_valid = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.2
    out = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile)
    ref = dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)


def test_noncontiguous_inputs_and_custom_scale():
    B, H, D, tile, T = 2, 2, 16, 16, 4
    S = T * tile
    g = torch.Generator().manual_seed(2)
    # (B, S, H, D) storage viewed as (B, H, S, D); v additionally strided in D.
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    v = torch.randn(B, S, H, 2 * D, generator=g)[..., ::2].transpose(1, 2)
    assert not q.is_contiguous() and not v.is_contiguous()
    wide = torch.full((T, 2 * T), 7, dtype=torch.int32)
    kv_indices = wide[:, ::2]  # non-contiguous rows
    kv_indices.copy_(torch.tensor([[0, 1, 2, 3], [1, 3, 9, 9], [2, 9, 9, 9], [0, 2, 3, 9]], dtype=torch.int32))
    kv_counts = torch.tensor([4, 2, 1, 3], dtype=torch.int32)
    key_valid = (torch.rand(S, B, generator=g) > 0.25).t()  # non-contiguous (B, S)
    scale = 0.37
    out = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, scale=scale)
    ref = dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile, scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert out.stride() == q.stride()  # keeps q's (B, S, H, D) memory layout
    # A custom scale really changes the result.
    default = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile)
    assert not torch.allclose(out, default, atol=1e-3)
    torch.testing.assert_close(
        default.double(),
        dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile, scale=1 / math.sqrt(D)),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "dtype,tile,D",
    [
        (torch.float32, 128, 16),  # BLOCK_M 64, BLOCK_N 32: 2 query x 4 key sub-blocks
        (torch.float32, 64, 256),  # BLOCK_M 32, BLOCK_N 16: 2 x 4 sub-blocks, widest D
        (torch.float16, 128, 16),  # BLOCK_M 128, BLOCK_N 64: key tile split in 2
        (torch.float16, 32, 64),  # one block per tile
        (torch.bfloat16, 128, 128),  # the H100 production shape: 128 x 64 blocks
    ],
)
def test_tile_sub_blocking(dtype, tile, D):
    B, H, T = 1, 1, 3
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, dtype, seed=3)
    kv_indices = torch.tensor([[0, 1, 2], [2, 0, 0], [0, 2, 0]], dtype=torch.int32)
    kv_counts = torch.tensor([3, 1, 2], dtype=torch.int32)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[0, S - tile // 2 - 3 :] = False  # padding covering a whole sub-block and more
    counter = torch.zeros(1, dtype=torch.int32)
    out = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter=counter)
    ref = dense_reference(q, k, v, kv_indices, kv_counts, key_valid, tile)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    assert int(counter) == B * H * int(kv_counts.sum())  # once per query tile, not per sub-block


def test_counter_accumulates_int32_and_int64_indices():
    B, H, D, tile, T = 1, 2, 16, 16, 4
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, torch.float32, seed=4)
    kv_indices, kv_counts = make_layout(T, seed=4)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    counter = torch.full((1,), 5, dtype=torch.int32)
    a = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter=counter)
    b = triton_block_sparse_attention(
        q, k, v, kv_indices.long(), kv_counts.long(), key_valid, tile, tile_counter=counter
    )
    assert int(counter) == 5 + 2 * B * H * int(kv_counts.sum())
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_empty_lists_give_zeros():
    B, H, D, tile, T = 1, 2, 16, 16, 2
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, torch.float32)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    out = triton_block_sparse_attention(
        q, k, v, torch.zeros(T, 0, dtype=torch.int32), torch.zeros(T, dtype=torch.int32), key_valid, tile
    )
    assert (out == 0).all()


def _good_args():
    B, H, D, tile, T = 1, 2, 16, 16, 2
    S = T * tile
    q, k, v = make_inputs(B, H, S, D, torch.float32)
    return dict(
        q=q,
        k=k,
        v=v,
        kv_indices=torch.tensor([[0, 1], [1, 0]], dtype=torch.int32),
        kv_counts=torch.tensor([2, 1], dtype=torch.int32),
        key_valid=torch.ones(B, S, dtype=torch.bool),
        tile=tile,
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must have shape"),
        (lambda a: a.update(k=a["k"][:, :1]), "k shape"),
        (lambda a: a.update(v=a["v"][..., :8]), "v shape"),
        (lambda a: a.update(q=a["q"].half()), "share one dtype"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "q dtype"),
        (lambda a: a.update(q=a["q"][..., :8], k=a["k"][..., :8], v=a["v"][..., :8]), "head dim"),
        (lambda a: a.update(tile=24), "tile=24"),
        (lambda a: a.update(tile=256), "tile=256"),
        (lambda a: a.update(tile=64), "divisible by tile"),
        (lambda a: a.update(kv_indices=a["kv_indices"][:1]), "kv_indices must have shape"),
        (lambda a: a.update(kv_indices=a["kv_indices"].float()), "kv_indices must be int32"),
        (lambda a: a.update(kv_counts=a["kv_counts"][:1]), "kv_counts must have shape"),
        (lambda a: a.update(kv_counts=a["kv_counts"].float()), "kv_counts must be int32"),
        (lambda a: a.update(kv_counts=torch.tensor([3, 1], dtype=torch.int32)), "kv_counts entries"),
        (lambda a: a.update(kv_indices=torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)), "kv_indices entries"),
        (lambda a: a.update(key_valid=a["key_valid"][:, :16]), "key_valid must have shape"),
        (lambda a: a.update(key_valid=a["key_valid"].int()), "key_valid must be a bool"),
        (lambda a: a.update(tile_counter=torch.zeros(2, dtype=torch.int64)), "tile_counter must have exactly one"),
        (lambda a: a.update(tile_counter=torch.zeros(1)), "tile_counter must be int32 or int64"),
        (lambda a: a.update(key_valid=a["key_valid"].to("meta")), "key_valid is on meta"),
        (lambda a: a.update(v=a["v"].to("meta")), "v is on meta"),
    ],
)
def test_validation_errors(change, match):
    args = _good_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(**args)


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(tbs, "_interpret_enabled", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA.*TRITON_INTERPRET=1"):
        triton_block_sparse_attention(**_good_args())


def test_launch_config_table():
    assert tbs._launch_config(128, 128, torch.float16) == (128, 128, 8, 3)
    assert tbs._launch_config(128, 128, torch.bfloat16) == (128, 128, 8, 3)
    assert tbs._launch_config(64, 64, torch.float16) == (64, 64, 4, 3)
    assert tbs._launch_config(128, 256, torch.bfloat16) == (64, 64, 8, 2)
    for tile in tbs.SUPPORTED_TILES:
        for D in (16, 32, 64, 128, 256):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                bm, bn, _, _ = tbs._launch_config(tile, D, dt)
                assert tile % bm == 0 and tile % bn == 0 and bm >= 16 and bn >= 16


# --------------------------------------------------------------------------- fused gather / scatter


def _shuffled_rows(S, tile, pad, seed=0):
    """A random slot order of S rows plus ``pad`` padding slots (-1) spread over the tiles."""
    g = torch.Generator().manual_seed(seed)
    L = S + pad
    assert L % tile == 0
    slots = torch.full((L,), -1, dtype=torch.int64)
    real_slots = torch.randperm(L, generator=g)[:S].sort().values
    slots[real_slots] = torch.randperm(S, generator=g)
    return slots


@pytest.mark.parametrize(
    "dtype,atol,layout_bsd",
    [
        (torch.float32, 2e-5, False),
        (torch.float32, 2e-5, True),
        (torch.float16, 2e-3, True),
        (torch.bfloat16, 2e-2, False),
    ],
)
def test_rows_gather_and_scatter_in_the_kernel(dtype, atol, layout_bsd):
    """Reading q/k/v through ``rows`` and writing the output through it equals gathering copies,
    running the kernel in slot order and scattering back; padding slots write nothing."""
    B, H, S, D, tile = 2, 2, 53, 16, 16
    rows = _shuffled_rows(S, tile, pad=11)
    T = rows.shape[0] // tile
    kv_indices, kv_counts = make_layout(T, seed=3)
    kv_counts[2] = 1  # every query tile has a key tile, so padding rows would have outputs to leak
    kv_indices[2, 0] = 0
    g = torch.Generator().manual_seed(1)
    if layout_bsd:  # (B, S, H, D) storage read through a transposed view
        q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = make_inputs(B, H, S, D, dtype, seed=1)
    key_valid = (rows >= 0)[None].repeat(B, 1)
    key_valid[1, 5:9] = False  # a caller's key mask on top of the padding

    out = triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, rows=rows)
    assert out.shape == q.shape and out.stride() == q.stride()

    gather = rows.clamp(min=0)
    in_slots = [x.index_select(2, gather) for x in (q, k, v)]
    slot_out = triton_block_sparse_attention(*in_slots, kv_indices, kv_counts, key_valid, tile)
    scatter = torch.empty(S, dtype=torch.int64)
    scatter[rows[rows >= 0]] = (rows >= 0).nonzero()[:, 0]
    torch.testing.assert_close(out, slot_out.index_select(2, scatter), atol=atol, rtol=atol)
    expected = dense_reference(*in_slots, kv_indices, kv_counts, key_valid, tile).index_select(2, scatter)
    torch.testing.assert_close(out.double(), expected, atol=atol * 5, rtol=atol * 5)


def test_rows_tile_counter_and_sub_blocks():
    """The gather path keeps sub-blocking (tile 64 split into 64 x 32 fp32 blocks) and the counter."""
    B, H, S, D, tile = 1, 2, 100, 32, 64
    rows = _shuffled_rows(S, tile, pad=28, seed=2)
    T = rows.shape[0] // tile
    kv_indices = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    kv_counts = torch.tensor([2, 1], dtype=torch.int32)
    q, k, v = make_inputs(B, H, S, D, torch.float32, seed=4)
    key_valid = (rows >= 0)[None]
    counter = torch.zeros(1, dtype=torch.int32)
    out = triton_block_sparse_attention(
        q, k, v, kv_indices, kv_counts, key_valid, tile, tile_counter=counter, rows=rows
    )
    assert counter.item() == B * H * 3 and T == 2
    gather = rows.clamp(min=0)
    expected = dense_reference(*(x.index_select(2, gather) for x in (q, k, v)), kv_indices, kv_counts, key_valid, tile)
    scatter = torch.empty(S, dtype=torch.int64)
    scatter[rows[rows >= 0]] = (rows >= 0).nonzero()[:, 0]
    torch.testing.assert_close(out.double(), expected.index_select(2, scatter), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rows,match",
    [
        (torch.arange(32).float(), "rows must be a 1-D int32/int64"),
        (torch.arange(32)[None], "rows must be a 1-D int32/int64"),
        (torch.arange(40), "not a multiple of tile"),
        (torch.cat([torch.arange(31), torch.tensor([-2])]), "exactly once"),
        (torch.cat([torch.arange(31), torch.tensor([0])]), "exactly once"),
        (torch.cat([torch.arange(30), torch.tensor([-1, 33])]), "exactly once"),
    ],
)
def test_rows_validation(rows, match):
    q, k, v = make_inputs(1, 1, 32, 16, torch.float32)
    kv_indices = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32)
    kv_counts = torch.tensor([2, 2], dtype=torch.int32)
    key_valid = torch.ones(1, rows.shape[-1], dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, 16, rows=rows)
