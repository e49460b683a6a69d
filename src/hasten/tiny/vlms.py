"""Tiny vision-language models (LLaVA, LLaVA-Next, Qwen2-VL, Qwen2.5-VL) with processors, offline.

The real transformers model and processor classes with tiny configs and seeded random weights;
the tokenizer is :func:`hasten.tiny.tokenizers.llama_tokenizer` (left padding, for batched
generation) plus each family's image tokens and a small chat template. Image processors are the
PIL backends (torchvision does not import on every machine). Each model is saved with
``save_pretrained`` under ``$HASTEN_HOME/tiny/<kind>-v1`` and loaded back with
``from_pretrained``, so the real loading code runs.

===============  ======================================  =================================
kind             model                                   visual tokens per image
===============  ======================================  =================================
``llava``        LlavaForConditionalGeneration           8 x 8 = 64 (32 px, patch 4; CLS
                                                         dropped, LLaVA-1.5's "default")
``llava-next``   LlavaNextForConditionalGeneration       anyres: base 8 x 8 + sub-images
                                                         (grid pinpoints up to 64 x 64 px)
``qwen2-vl``     Qwen2VLForConditionalGeneration         (H/8) x (W/8) after the 2 x 2 merge
                                                         (patch 4), 64 for 64 x 64 px
``qwen2.5-vl``   Qwen2_5_VLForConditionalGeneration      as qwen2-vl, windowed vision blocks
===============  ======================================  =================================

Examples
--------
>>> model, processor = vlm("llava")
>>> type(model).__name__, type(processor).__name__
('LlavaForConditionalGeneration', 'LlavaProcessor')
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from ._store import saved_folder, seeded
from .tokenizers import llama_tokenizer

__all__ = ["VLM_KINDS", "Qwen2VLImageOnlyProcessor", "chat_prompt", "path", "vlm"]  # noqa: F822 (a lazy name: module __getattr__)

VLM_KINDS: tuple[str, ...] = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
"""The tiny VLM families accepted by :func:`vlm`."""

_VERSION = "v1"
_SEED = 11

# Chat templates in each family's shape (LLaVA-1.5 "USER: <image>\n... ASSISTANT:", Qwen's
# <|im_start|> turns with <|vision_start|><|image_pad|><|vision_end|>), small enough to read.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _image_only_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without its video processor (which needs torchvision).

        Images and text behave exactly as in ``Qwen2VLProcessor`` (same image-pad expansion from
        ``image_grid_thw``, same outputs); videos are not supported. Used for the tiny Qwen2-VL /
        Qwen2.5-VL models on machines where torchvision does not import.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = tokenizer.image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


def __getattr__(name: str) -> Any:
    if name == "Qwen2VLImageOnlyProcessor":  # built on first use: it subclasses a transformers class
        return _image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _text(tokenizer) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,
    projection_dim=32,
)


def _qwen_tokenizer():
    """The Qwen2-VL / Qwen2.5-VL tokenizer and the special-token ids their configs need."""
    tokenizer = llama_tokenizer(
        padding_side="left", extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )
    tokenizer.add_tokens(_QWEN_TOKENS, special_tokens=True)
    tokenizer.chat_template = _QWEN_TEMPLATE
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    return tokenizer, ids


def _llava_tokenizer():
    tokenizer = llama_tokenizer(extra_special_tokens={"image_token": "<image>"}, padding_side="left")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = _LLAVA_TEMPLATE
    return tokenizer


def _save_llava(folder: pathlib.Path, next_: bool) -> None:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=dict(model_type="clip_vision_model", **_CLIP_VISION),
        text_config=_text(tokenizer),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    size = _CLIP_VISION["image_size"]
    if next_:
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor,
            tokenizer,
            patch_size=4,
            num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
            chat_template=_LLAVA_TEMPLATE,
        )
        cls = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**common)
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = LlavaProcessor(
            image_processor,
            tokenizer,
            patch_size=4,
            num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
            chat_template=_LLAVA_TEMPLATE,
        )
        cls = LlavaForConditionalGeneration
    with seeded(_SEED):
        model = cls(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_qwen(folder: pathlib.Path, v25: bool) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_tokenizer()
    text = dict(
        _text(tokenizer), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    )
    if v25:
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        )
        config, cls = (
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids),
            Qwen2_5_VLForConditionalGeneration,
        )
    else:
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            mlp_ratio=2,
        )
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4, temporal_patch_size=2, merge_size=2
    )
    with seeded(_SEED):
        model = cls(config).eval()
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


_SAVERS = {
    "llava": lambda folder: _save_llava(folder, next_=False),
    "llava-next": lambda folder: _save_llava(folder, next_=True),
    "qwen2-vl": lambda folder: _save_qwen(folder, v25=False),
    "qwen2.5-vl": lambda folder: _save_qwen(folder, v25=True),
}


def path(kind: str) -> pathlib.Path:
    """The saved folder of the tiny ``kind`` VLM (built and saved atomically on first use)."""
    if kind not in VLM_KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(VLM_KINDS)}; got {kind!r}")
    return saved_folder(f"{kind}-{_VERSION}", "config.json", _SAVERS[kind])


def vlm(kind: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The tiny ``kind`` VLM and its processor, loaded with ``from_pretrained``.

    Parameters
    ----------
    kind : {"llava", "llava-next", "qwen2-vl", "qwen2.5-vl"}
    dtype : torch.dtype, default torch.float32
    attn_implementation : str, default "sdpa"
        Passed to ``from_pretrained`` (``"eager"`` for methods that need attention weights).

    Returns
    -------
    (model, processor)
        Call ``processor(images=..., text=chat_prompt(processor, question), return_tensors="pt")``
        and ``model.generate(**inputs)`` as with the released checkpoints. The Qwen kinds come
        with :class:`Qwen2VLImageOnlyProcessor` (``Qwen2VLProcessor`` minus videos, which need
        torchvision); a released Qwen checkpoint loads its own ``Qwen2VLProcessor``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    folder = path(kind)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    if kind.startswith("qwen"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor = _image_only_processor_class()(
            Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer, chat_template=tokenizer.chat_template
        )
    else:
        processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor


def chat_prompt(processor: Any, question: str, images: int = 1) -> str:
    """One user turn with ``images`` image placeholders and ``question``, ready for the assistant.

    Examples
    --------
    >>> _, processor = vlm("qwen2-vl")
    >>> chat_prompt(processor, "What is this?")
    '<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
