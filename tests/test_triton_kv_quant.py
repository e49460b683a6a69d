"""Triton KV-quantisation kernels against the torch reference, in the Triton interpreter on the CPU."""

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hasten.kernels.kv_quant import (  # noqa: E402
    QuantizedKV,
    dequantize_rows,
    merge_partials,
    partial_attention,
    quantize_rows,
)
from hasten.kernels.triton_kv_quant import (  # noqa: E402
    triton_pack_rows,
    triton_partial_attention,
    triton_unpack_rows,
)

if _PREVIOUS_INTERPRET is None:  # leave later test modules in compiled mode (the kernels read it at call time)
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_and_unpack_equal_the_reference(bits):
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(bits))
    packed, scale, zero = quantize_rows(x, bits, 32)
    assert torch.equal(triton_pack_rows(x, scale, zero, bits, 32), packed)
    torch.testing.assert_close(
        triton_unpack_rows(packed, scale, zero, bits, 32), dequantize_rows(packed, scale, zero, bits, 32)
    )


@pytest.mark.parametrize("bits_k, bits_v", [(4, 2), (2, 4), (8, 8)])
def test_fused_decode_attention_equals_dequantise_then_attend(bits_k, bits_v):
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 45, 16, generator=generator), torch.randn(2, 45, 16, generator=generator)
    query = torch.randn(4, 16, generator=generator)  # 4 query heads on 2 KV heads
    qk = QuantizedKV.quantize(keys, bits_k, "channel", 8)
    qv = QuantizedKV.quantize(values, bits_v, "token", 8)
    valid = torch.ones(45, dtype=torch.bool)
    valid[[0, 7, 44]] = False
    out, lse = triton_partial_attention(query, qk, qv, 0.25, valid)
    ref_out, ref_lse = partial_attention(query, qk, qv, 0.25, valid)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_blocks_merge_into_the_full_attention():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 30, 16, generator=generator), torch.randn(1, 30, 16, generator=generator)
    query = torch.randn(2, 16, generator=generator)
    whole, _ = partial_attention(query, keys, values, 0.3)
    parts = [partial_attention(query, keys[:, a:b], values[:, a:b], 0.3) for a, b in ((0, 7), (7, 30))]
    torch.testing.assert_close(merge_partials(parts), whole)
    empty = partial_attention(query, keys[:, :3], values[:, :3], 0.3, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(merge_partials([*parts, empty]), whole)  # a block with no valid key weighs 0


def test_cache_layer_decode_attention_triton_equals_torch():
    from hasten.token_pruning.kv_cache import MixedPrecisionConfig, MixedPrecisionLayer

    generator = torch.Generator().manual_seed(2)
    layer = MixedPrecisionLayer(MixedPrecisionConfig(group=8, residual=4))
    layer.fused = True
    layer.update(torch.randn(2, 2, 30, 16, generator=generator), torch.randn(2, 2, 30, 16, generator=generator))
    important = torch.rand(2, 30, generator=generator) > 0.5
    layer.compress(important)
    keys, values = layer.update(
        torch.randn(2, 2, 1, 16, generator=generator), torch.randn(2, 2, 1, 16, generator=generator)
    )
    assert keys.shape[-2] == 1, "fused reads return the residual window only"
    query = torch.randn(2, 4, 1, 16, generator=generator)
    mask = torch.ones(2, 1, 1, 31, dtype=torch.bool)
    mask[1, :, :, :3] = False  # left padding of row 1
    triton_out = layer.decode_attention(query, keys, values, mask, 0.25, backend="triton")
    torch_out = layer.decode_attention(query, keys, values, mask, 0.25, backend="torch")
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-5, atol=1e-5)
    assert triton_out.shape == (2, 1, 4, 16)
