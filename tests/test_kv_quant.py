"""KV quantisation kernels: round-trip bounds, packed sizes, layouts, errors."""

from __future__ import annotations

import pytest
import torch

from hasten.kernels.kv_quant import BITS, LAYOUTS, QuantizedKV, dequantize_rows, packed_bytes, quantize_rows


def _keys(seed: int = 0, shape=(2, 3, 45, 32)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    x[..., 5] *= 20  # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_within_half_a_step(bits, layout):
    x = _keys()
    q = QuantizedKV.quantize(x, bits=bits, layout=layout, group=16)
    error = (q.dequantize() - x).abs()
    assert q.dequantize().shape == x.shape and q.dequantize().dtype == x.dtype
    assert bool((error <= q.error_bound() * (1 + 1e-5) + 1e-6).all())
    steps = q.error_bound() * 2
    span = 2 * float(x.abs().amax()) if layout == "separable" else float(x.amax() - x.amin())  # [-1, 1] per channel
    assert float(steps.max()) <= span / (2**bits - 1) * 1.01


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_size_is_the_formula(bits, layout):
    x = _keys(1, (1, 2, 64, 32))
    q = QuantizedKV.quantize(x, bits=bits, layout=layout, group=16)
    assert q.nbytes == packed_bytes(64, 32, bits, 16, layout, lead=2)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 2 * 64 * 32 * bits // 8


def test_more_bits_less_error_and_constant_rows_are_exact():
    x = _keys(2)
    errors = [float((QuantizedKV.quantize(x, b, "token", 16).dequantize() - x).abs().mean()) for b in BITS]
    assert errors[0] > errors[1] > errors[2]
    constant = torch.full((1, 1, 8, 16), 0.375)
    assert torch.equal(QuantizedKV.quantize(constant, 2, "channel", 8).dequantize(), constant)


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    """KIVI's finding: with a channel of outliers, per-channel grouping has the smaller error."""
    x = _keys(3)
    channel = float((QuantizedKV.quantize(x, 2, "channel", 32).dequantize() - x).abs().mean())
    token = float((QuantizedKV.quantize(x, 2, "token", 32).dequantize() - x).abs().mean())
    assert channel < token


def test_rows_pack_low_bits_first():
    packed, scale, zero = quantize_rows(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group=4)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6]]
    assert torch.equal(dequantize_rows(packed, scale, zero, 2, 4), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="bits"):
        QuantizedKV.quantize(x, bits=3, layout="token")
    with pytest.raises(ValueError, match="layout"):
        QuantizedKV.quantize(x, bits=4, layout="block")
    with pytest.raises(ValueError, match="group"):
        QuantizedKV.quantize(x, bits=4, layout="token", group=5)
    with pytest.raises(ValueError, match="group"):
        quantize_rows(x, bits=2, group=2)
