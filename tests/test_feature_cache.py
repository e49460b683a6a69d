"""Feature cache: exact byte counts, each storage mode within its documented error, disk spill cleanup."""

from __future__ import annotations

import pytest
import torch

from hasten.hooks.feature_cache import FeatureCache, FeatureCacheConfig


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(seed))


def test_float32_is_exact_and_bytes_are_the_stored_tensors():
    cache = FeatureCache(FeatureCacheConfig(dtype="float32"))
    x = _features()
    cache.put(("v", 0), x)
    cache.put(("v", 1), x[:, :10])
    value, rows = cache.get(("v", 0))
    assert torch.equal(value, x) and rows is None
    assert cache.nbytes == (x.numel() + x[:, :10].numel()) * 4
    cache.put(("v", 1), x[:, :5])  # overwriting an entry replaces its bytes
    assert cache.nbytes == (x.numel() + x[:, :5].numel()) * 4 and len(cache) == 2


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_half_precision_within_its_rounding(dtype, bound):
    cache = FeatureCache(FeatureCacheConfig(dtype=dtype))
    x = _features(1)
    cache.put("k", x)
    value, _ = cache.get("k")
    assert value.dtype == x.dtype
    assert bool(((value - x).abs() <= bound * x.abs() + 1e-6).all())
    assert cache.nbytes == x.numel() * 2


def test_int8_within_half_a_step_and_four_times_smaller_than_fp32():
    cache = FeatureCache(FeatureCacheConfig(quantize=True))
    x = _features(2)
    cache.put("q", x)
    value, _ = cache.get("q")
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255  # one group of 48 channels per token
    assert bool(((value - x).abs() <= step / 2 * 1.01 + 1e-6).all())
    assert cache.nbytes < x.numel() * 4 / 3.5


def test_region_only_keeps_the_rows_to_replay():
    cache = FeatureCache(FeatureCacheConfig(dtype="float32"))
    x = _features(3)
    rows = torch.tensor([3, 10, 40])
    cache.put("k", x, rows=rows)
    value, kept = cache.get("k")
    assert torch.equal(value, x[:, rows]) and torch.equal(kept, rows)
    assert cache.nbytes == x[:, rows].numel() * 4


def test_disk_spill_round_trips_and_cleans_up(tmp_path):
    x = _features(4)
    with FeatureCache(FeatureCacheConfig(dtype="float32", spill_dir=str(tmp_path))) as cache:
        cache.put(("k", 0), x)
        cache.put(("k", 1), x * 2, rows=torch.tensor([0, 1]))
        files = list(tmp_path.rglob("*.safetensors"))
        assert len(files) == 2
        assert torch.equal(cache.get(("k", 0))[0], x)
        assert torch.equal(cache.get(("k", 1))[0], x[:, :2] * 2)
        assert cache.nbytes == x.numel() * 4 + x[:, :2].numel() * 4
    assert not list(tmp_path.rglob("*")), "the spill folder is gone"


def test_bad_config():
    with pytest.raises(ValueError, match="dtype"):
        FeatureCacheConfig(dtype="int4")
