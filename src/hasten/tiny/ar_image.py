"""Tiny autoregressive text-to-image models (Janus, Emu3) with their processors, built offline.

The real transformers classes (``JanusForConditionalGeneration``, ``Emu3ForConditionalGeneration``,
``JanusProcessor``, ``Emu3Processor``) with tiny configs and seeded random weights; the tokenizer
is :func:`hasten.tiny.tokenizers.llama_tokenizer` plus each family's special tokens. Each model
is saved with ``save_pretrained`` under ``$HASTEN_HOME/tiny/<kind>-v1`` and loaded back with
``from_pretrained``, so the real loading code runs.

==========  =========================  ==============  ============================
kind        model                      image tokens    image vocabulary (codebook)
==========  =========================  ==============  ============================
``janus``   JanusForConditionalGen.    8 x 8 = 64      64 (generation head)
``emu3``    Emu3ForConditionalGen.     8 x 8 (+ EOL)   64 visual tokens in the text vocab
==========  =========================  ==============  ============================

Both decode 8 x 8 tokens to 64 x 64 pixel images. :func:`janus_config` and :func:`emu3_config`
take a smaller grid and codebook for statistical tests.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from ._store import saved_folder, seeded
from .tokenizers import llama_tokenizer

__all__ = ["AR_IMAGE_KINDS", "ar_image_model", "emu3_config", "janus_config"]

AR_IMAGE_KINDS: tuple[str, ...] = ("janus", "emu3")
"""The tiny autoregressive image model families accepted by :func:`ar_image_model`."""

_VERSION = "v1"
_SEED = 7

_JANUS_SPECIALS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
_EMU3_SPECIALS = {
    "image_token": "<image>",
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>",
    "eof_token": "<|extra_201|>",
}
_EMU3_EOL = "<|extra_200|>"


def _tokenizer(specials: dict[str, str], extra: list[str] = (), add_bos_token: bool = True):
    tokenizer = llama_tokenizer(extra_special_tokens=dict(specials), padding_side="left", add_bos_token=add_bos_token)
    tokenizer.add_tokens(list(specials.values()) + list(extra), special_tokens=True)
    return tokenizer


def _text_config(vocab_size: int, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **extra,
    )


def janus_config(tokenizer=None, *, grid: int = 8, codebook: int = 64):
    """A tiny ``JanusConfig``: ``grid x grid`` image tokens from a ``codebook``-entry VQ model.

    Examples
    --------
    >>> janus_config(grid=2, codebook=4).vq_config.num_embeddings
    4
    """
    from transformers import JanusConfig

    tokenizer = tokenizer or _tokenizer(_JANUS_SPECIALS)
    text = _text_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        model_type="llama",
    )
    # Each VQ level halves the side: 3 levels (1 -> 2 -> 4 upsampling) turn `grid` tokens into 8x pixels.
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=grid * 8,
        patch_size=8,
        projection_dim=64,
        depth=1,
        num_image_tokens=grid * grid,
        mlp_ratio=2.0,
    )
    vq = dict(
        embed_dim=8,
        num_embeddings=codebook,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1,
        num_patches=grid,
        projection_dim=64,
        image_token_embed_dim=64,
        num_hidden_layers=1,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(_JANUS_SPECIALS["image_token"]),
    )


def emu3_config(tokenizer=None, *, codebook: int = 64):
    """A tiny ``Emu3Config`` whose text vocabulary holds ``codebook`` visual tokens.

    Examples
    --------
    >>> config = emu3_config(codebook=4)
    >>> sum(name.startswith("<|visual token") for name in config.vocabulary_map)
    4
    """
    from transformers import Emu3Config

    tokenizer = tokenizer or _emu3_tokenizer(codebook)
    text = _text_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Emu3Processor assumes a spatial factor of 8: 4 VQ levels (2^3).
    vq = dict(
        codebook_size=codebook,
        embed_dim=8,
        latent_channels=8,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=32,
        num_attention_heads=1,
        temporal_downsample_factor=4,
    )
    return Emu3Config(vq_config=vq, text_config=text, vocabulary_map=dict(tokenizer.get_vocab()))


def _emu3_tokenizer(codebook: int):
    visual = [f"<|visual token {i:06d}|>" for i in range(codebook)]
    return _tokenizer(_EMU3_SPECIALS, [_EMU3_EOL, *visual], add_bos_token=False)  # Emu3Processor adds BOS


def _save_janus(folder: pathlib.Path) -> None:
    from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    tokenizer = _tokenizer(_JANUS_SPECIALS)
    config = janus_config(tokenizer)
    with seeded(_SEED):
        model = JanusForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.generation_kwargs = {
        "boi_token_id": tokenizer.convert_tokens_to_ids(_JANUS_SPECIALS["boi_token"])
    }
    model.generation_config._from_model_config = False  # keep these settings when generate() loads it
    size = config.vision_config.image_size
    processor = JanusProcessor(
        JanusImageProcessorPil(size={"height": size, "width": size}),
        tokenizer,
        num_image_tokens=config.vision_config.num_image_tokens,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_emu3(folder: pathlib.Path) -> None:
    from transformers import Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    tokenizer = _emu3_tokenizer(64)
    config = emu3_config(tokenizer)
    with seeded(_SEED):
        model = Emu3ForConditionalGeneration(config).eval()
    processor = Emu3Processor(Emu3ImageProcessor(min_pixels=64 * 64, max_pixels=64 * 64, spatial_factor=8), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


_SAVERS = {"janus": _save_janus, "emu3": _save_emu3}


def path(kind: str) -> pathlib.Path:
    """The saved folder of the tiny ``kind`` model (built and saved atomically on first use)."""
    if kind not in AR_IMAGE_KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(AR_IMAGE_KINDS)}; got {kind!r}")
    return saved_folder(f"{kind}-{_VERSION}", "config.json", _SAVERS[kind])


def ar_image_model(kind: str, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The tiny ``kind`` model and its processor, loaded with ``from_pretrained``.

    Parameters
    ----------
    kind : {"janus", "emu3"}
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    (model, processor)
        ``JanusForConditionalGeneration`` + ``JanusProcessor`` or ``Emu3ForConditionalGeneration``
        + ``Emu3Processor``, on the CPU, in eval mode.

    Examples
    --------
    >>> model, processor = ar_image_model("janus")
    >>> type(model).__name__, model.config.vision_config.num_image_tokens
    ('JanusForConditionalGeneration', 64)
    """
    from transformers import AutoProcessor, Emu3ForConditionalGeneration, JanusForConditionalGeneration

    folder = path(kind)
    cls = JanusForConditionalGeneration if kind == "janus" else Emu3ForConditionalGeneration
    model = cls.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(folder)
