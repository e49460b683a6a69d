"""Masked K/V replay editing (VoxHammer / KV-Edit) on tiny SD3, Flux, Wan and HunyuanVideo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hasten.tiny
from hasten.hooks.feature_cache import FeatureCacheConfig
from hasten.pipelines.masked_kv import MaskedKVEditPipeline
from hasten.tiny.motion import panned, photo

STEPS = 5


def _case(kind):
    editor = MaskedKVEditPipeline.from_pipe(hasten.tiny.pipeline(kind), **hasten.tiny.default_size(kind))
    model = editor.model
    mask = np.zeros((model.height, model.width))
    mask[model.height // 4 : 3 * model.height // 4, model.width // 4 : 3 * model.width // 4] = 1
    source = panned(frames=9, size=(80, 112))[0] if kind in ("wan", "hunyuan-video") else photo("chelsea")
    return editor, mask, source


@pytest.mark.parametrize("kind", ["sd3", "flux", "wan", "hunyuan-video"])
def test_preserved_region_is_the_source_and_no_edit_is_the_source(kind):
    editor, mask, source = _case(kind)
    model = editor.model
    x0 = model.encode_image(source)
    out = editor.edit(source, mask, "a photo of a dog", num_inference_steps=STEPS, progress=False)
    keep = editor.model.latent_keep((~out.edit_region.flatten().to(model.device)).to(model.dtype)).bool().expand_as(x0)
    assert torch.equal(out.latents[keep], x0[keep])
    assert not torch.equal(out.latents[~keep], x0[~keep]), "the edit region was regenerated"
    nothing = editor.edit(source, np.zeros_like(mask), "a photo of a dog", num_inference_steps=STEPS, progress=False)
    assert torch.equal(nothing.latents, x0) and nothing.cache_bytes == 0
    torch.testing.assert_close(nothing.image, model.decode(x0)[0])


def test_storage_modes_bytes_and_tolerance():
    editor, mask, source = _case("flux")
    outs = {
        name: editor.edit(source, mask, "a photo of a dog", num_inference_steps=STEPS, progress=False, cache=config)
        for name, config in (
            ("fp32", FeatureCacheConfig(dtype="float32")),
            ("bf16", FeatureCacheConfig()),
            ("int8", FeatureCacheConfig(quantize=True)),
        )
    }
    assert outs["bf16"].cache_bytes * 2 == outs["fp32"].cache_bytes  # the same entries at half the width
    assert outs["int8"].cache_bytes < outs["fp32"].cache_bytes / 3
    transformer = editor.model.pipe.transformer
    layers = len(transformer.single_transformer_blocks)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    preserved = int((~outs["fp32"].edit_region).sum())
    evaluations = 2 * STEPS  # midpoint: two velocity evaluations per step
    assert outs["fp32"].cache_bytes <= evaluations * layers * 2 * preserved * inner * 4  # K, V of preserved tokens
    naive = evaluations * layers * 3 * editor.model.tokens * inner * 4  # fp32 Q/K/V of every token
    assert naive / outs["int8"].cache_bytes >= 4
    for name in ("bf16", "int8"):  # preserved region copied; the edit within a small tolerance of fp32's
        assert float((outs[name].image - outs["fp32"].image).abs().max()) < 0.05


def test_edit_everything_and_errors():
    editor, mask, source = _case("sd3")
    out = editor.edit(source, np.ones_like(mask), "a photo of a dog", num_inference_steps=STEPS, progress=False)
    assert bool(out.edit_region.all()) and out.image.shape == (3, 36, 52)
    with pytest.raises(ValueError, match="mask"):
        editor.edit(source, np.zeros((5, 5)), "x", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="flow-matching"):
        MaskedKVEditPipeline.from_pipe(hasten.tiny.pipeline("cogvideox"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        editor.edit(source, mask, "x", num_inference_steps=0, progress=False)
