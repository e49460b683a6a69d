"""Tiny VLMs: the four families load offline, take batched images, and generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hasten import tiny
from hasten.tiny.vlms import chat_prompt


def _image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Visual tokens per 48 x 64 image, from each family's own rule.
EXPECTED_IMAGE_TOKENS = {
    "llava": 8 * 8,  # 32 px square crop, patch 4, CLS dropped ("default" strategy)
    "qwen2-vl": (48 // 8) * (64 // 8),  # patch 4, 2 x 2 merge
    "qwen2.5-vl": (48 // 8) * (64 // 8),
}


@pytest.fixture(scope="module", params=tiny.VLM_KINDS)
def loaded(request):
    model, processor = tiny.vlm(request.param)
    return request.param, model, processor


def test_class_names_and_image_tokens(loaded):
    kind, model, processor = loaded
    expected_class = {
        "llava": "LlavaForConditionalGeneration",
        "llava-next": "LlavaNextForConditionalGeneration",
        "qwen2-vl": "Qwen2VLForConditionalGeneration",
        "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    }[kind]
    assert type(model).__name__ == expected_class
    inputs = processor(images=[_image(0)], text=[chat_prompt(processor, "What is this?")], return_tensors="pt")
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if kind in EXPECTED_IMAGE_TOKENS:
        assert count == EXPECTED_IMAGE_TOKENS[kind]
    else:  # LLaVA-Next anyres: base 8 x 8 plus the selected grid's sub-images, unpadded
        assert count > 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_batch_of_two_generates_like_each_alone(loaded):
    """Left padding and per-sample images: greedy outputs of a batch equal single-sample runs."""
    kind, model, processor = loaded
    questions = ["What is in the picture?", "Describe the colors of this image in detail."]
    images = [_image(1), _image(2, 40, 40)]
    batch = processor(
        images=images, text=[chat_prompt(processor, q) for q in questions], return_tensors="pt", padding=True
    )
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i in range(2):
        alone = processor(images=[images[i]], text=[chat_prompt(processor, questions[i])], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(out[i], single[0]), (kind, i)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        tiny.vlm("blip")
