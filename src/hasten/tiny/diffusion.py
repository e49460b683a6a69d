"""Tiny, seeded, random-weight diffusers pipelines, built offline for tests, demos and the CLI.

Six model families are covered (:data:`KINDS`). Each pipeline uses the real diffusers and
transformers component classes with tiny configs (2 attention heads of dim 16, 2 blocks of
each kind, tiny VAEs and text encoders) and tokenizers trained here, in pure Python, on a small
built-in English corpus, so nothing is downloaded. A pipeline is built once, saved with
``save_pretrained`` under ``$HASTEN_HOME/tiny/<kind>-v1`` (``HASTEN_HOME`` defaults to
``~/.cache/hasten``) and then loaded back with ``DiffusionPipeline.from_pretrained``, so the real
loading code runs. Weights come from fixed per-component seeds, so every machine builds the
same model.

=================  ==============================  ====================  ============================
kind               pipeline                        default_size          latent token grid (t, h, w)
=================  ==============================  ====================  ============================
``flux``           FluxPipeline                    36 x 52               (1, 9, 13)
``sd3``            StableDiffusion3Pipeline        36 x 52               (1, 9, 13)
``hunyuan-video``  HunyuanVideoPipeline            80 x 112, 9 frames    (3, 5, 7)
``wan``            WanPipeline                     80 x 112, 9 frames    (3, 5, 7)
``cogvideox``      CogVideoXPipeline               80 x 112, 9 frames    (3, 5, 7)
``sd15``           StableDiffusionPipeline         40 x 56               UNet latent 5 x 7
=================  ==============================  ====================  ============================

Size rules (enforced by the pipelines): flux ``height``/``width`` multiples of 4 (VAE factor 2 x
packing 2); sd3 multiples of 4 (VAE 2 x patch 2); hunyuan-video and wan multiples of 16 (VAE 8 x
patch 2; the pipelines reject anything else), ``num_frames = 4 k + 1``; cogvideox multiples of 16
(VAE 8 x patch 2), ``num_frames = 4 k + 1``; sd15 multiples of 8 (VAE factor 8).

Text lengths: every pipeline's default ``max_sequence_length`` works (flux 512, sd3 256,
hunyuan-video 256 after the default prompt template, whose ``crop_start`` of 95 this tokenizer
matches exactly, wan 512, cogvideox 226); a smaller ``max_sequence_length`` (e.g. 32) is
accepted by all five and is faster. CLIP encoders use 77 tokens as in the real models.

Always pass sizes: without them HunyuanVideoPipeline (720 x 1280, 129 frames) and WanPipeline
(480 x 832, 81 frames) fall back to their full-size signature defaults, which exhaust CPU memory
even with tiny weights; flux falls back to 256 x 256, sd3 to 32 x 32, sd15 to 64 x 64 and
cogvideox to its config, i.e. :func:`default_size`.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Callable

import torch

from ._store import saved_folder, seeded
from .tokenizers import clip_tokenizer, llama_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["KINDS", "MODEL_IDS", "SD15_NOISE_SCHEDULE", "default_size", "is_tiny", "path", "pipeline"]

SD15_NOISE_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""stable-diffusion-v1-5's noise schedule (its scheduler config), shared by the tiny and the trained SD 1.5."""

KINDS: tuple[str, ...] = ("flux", "sd3", "hunyuan-video", "wan", "cogvideox", "sd15")
"""The tiny model families, as accepted by :func:`path` and :func:`pipeline`."""

MODEL_IDS: dict[str, str] = {f"tiny-{kind}": kind for kind in KINDS}
"""CLI model names (``"tiny-flux"``, ...) mapped to their kind."""

_VERSION = "v1"  # bump when a build changes, so stale folders are never reused

_DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "flux": {"height": 36, "width": 52},
    "sd3": {"height": 36, "width": 52},
    "hunyuan-video": {"height": 80, "width": 112, "num_frames": 9},
    "wan": {"height": 80, "width": 112, "num_frames": 9},
    "cogvideox": {"height": 80, "width": 112, "num_frames": 9},
    "sd15": {"height": 40, "width": 56},
}

# Fixed seeds, one per component, so each component's weights do not depend on build order.
_SEEDS = {"transformer": 0, "unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "text_encoder_3": 4}

_HEADS, _HEAD_DIM = 2, 16  # every transformer: 2 heads of dim 16 (inner dim 32)

# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def is_tiny(model: str) -> bool:
    """Whether ``model`` names an embedded tiny model (a key of :data:`MODEL_IDS`).

    Examples
    --------
    >>> is_tiny("tiny-flux"), is_tiny("black-forest-labs/FLUX.1-dev")
    (True, False)
    """
    return model in MODEL_IDS


def default_size(kind: str) -> dict[str, int]:
    """Small call sizes the ``kind`` pipeline accepts: ``height``, ``width`` (and ``num_frames``).

    The latent token grid is odd in at least one spatial axis (flux/sd3 9 x 13 tokens, the
    video kinds 3 frames x 5 x 7 tokens, sd15 a 5 x 7 latent), so code that tiles the token grid
    meets ragged edges.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.

    Returns
    -------
    dict
        A new dict, e.g. ``{"height": 36, "width": 52}``, to pass as pipeline call keywords.

    Examples
    --------
    >>> default_size("flux")
    {'height': 36, 'width': 52}
    >>> default_size("wan")
    {'height': 80, 'width': 112, 'num_frames': 9}
    """
    return dict(_DEFAULT_SIZES[_check_kind(kind)])


def path(kind: str) -> pathlib.Path:
    """The saved pipeline folder for ``kind``, building and saving it first if it is missing.

    The folder is ``home() / "tiny" / f"{kind}-v1"``, built and saved atomically by
    :func:`hasten.tiny._store.saved_folder` (concurrent processes or an interrupted build never
    leave a half-written folder behind).

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.

    Returns
    -------
    pathlib.Path
        A folder that ``DiffusionPipeline.from_pretrained`` loads.

    Examples
    --------
    >>> folder = path("sd15")
    >>> folder.name, (folder / "model_index.json").is_file()
    ('sd15-v1', True)
    """
    kind = _check_kind(kind)
    return saved_folder(f"{kind}-{_VERSION}", "model_index.json", lambda tmp: _build(kind).save_pretrained(tmp))


def pipeline(kind: str, *, torch_dtype: torch.dtype = torch.float32, **overrides: Any) -> DiffusionPipeline:
    """Load the tiny ``kind`` pipeline with ``DiffusionPipeline.from_pretrained(path(kind))``.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    torch_dtype : torch.dtype, default torch.float32
        Weights dtype, passed to ``from_pretrained`` (as ``dtype``: diffusers 0.42 deprecates
        ``torch_dtype``).
    **overrides
        More ``from_pretrained`` keywords, e.g. a replacement ``scheduler=...``.

    Returns
    -------
    diffusers.DiffusionPipeline
        A FluxPipeline, StableDiffusion3Pipeline, HunyuanVideoPipeline, WanPipeline,
        CogVideoXPipeline or StableDiffusionPipeline, on the CPU.

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`KINDS`.

    Examples
    --------
    >>> import torch
    >>> pipe = pipeline("flux")
    >>> pipe.set_progress_bar_config(disable=True)
    >>> out = pipe("a red fox in the snow", num_inference_steps=2, output_type="np",
    ...            generator=torch.Generator().manual_seed(0), **default_size("flux"))
    >>> out.images.shape
    (1, 36, 52, 3)
    """
    from diffusers import DiffusionPipeline

    folder = path(kind)
    return DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, **overrides)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def _make(name: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with seeded(_SEEDS[name]):
        return factory().eval()


def _clip_config(tokenizer, *, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer, *, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, UMT5Config

    config_class = UMT5Config if umt5 else T5Config
    return config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _image_vae(levels: int, *, latent_channels: int = 4, **config: Any):
    """A diffusers AutoencoderKL with ``levels`` blocks (spatial factor 2 ** (levels - 1)), 8 channels each."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **config,
    )


def _flux() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    components = {
        # Flux packs 2x2 latent patches: 4 latent channels -> 16 transformer channels.
        "transformer": _make(
            "transformer",
            lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=_HEAD_DIM,
                num_attention_heads=_HEADS,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            ),
        ),
        # Real FLUX.1 VAE: no quant convs, shift and scale factors.
        "vae": _make(
            "vae",
            lambda: _image_vae(
                2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611
            ),
        ),
        "text_encoder": _make("text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))),
        "text_encoder_2": _make("text_encoder_2", lambda: T5EncoderModel(_t5_config(tokenizer_2))),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        # FLUX.1-dev's scheduler config (resolution-dependent shift).
        "scheduler": FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    }
    return {"cls": FluxPipeline, **components, "image_encoder": None, "feature_extractor": None}


def _sd3() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    # The two CLIP encoders' hidden states (2 x 32) are zero-padded to the T5 width (64) and joined.
    components = {
        "transformer": _make(
            "transformer",
            lambda: SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=_HEAD_DIM,
                num_attention_heads=_HEADS,
                joint_attention_dim=64,
                caption_projection_dim=_HEADS * _HEAD_DIM,
                pooled_projection_dim=64,
                pos_embed_max_size=96,
            ),
        ),
        "vae": _make(
            "vae",
            lambda: _image_vae(
                2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305
            ),
        ),
        "text_encoder": _make("text_encoder", lambda: CLIPTextModelWithProjection(_clip_config(clip))),
        "text_encoder_2": _make("text_encoder_2", lambda: CLIPTextModelWithProjection(_clip_config(clip))),
        "text_encoder_3": _make("text_encoder_3", lambda: T5EncoderModel(_t5_config(t5, d_model=64))),
        "tokenizer": clip,
        "tokenizer_2": clip_tokenizer(),
        "tokenizer_3": t5,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    return {"cls": StableDiffusion3Pipeline, **components, "image_encoder": None, "feature_extractor": None}


def _hunyuan_video() -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    llama, clip = llama_tokenizer(), clip_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(llama),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
    )
    components = {
        "transformer": _make(
            "transformer",
            lambda: HunyuanVideoTransformer3DModel(
                in_channels=4,
                out_channels=4,
                num_attention_heads=_HEADS,
                attention_head_dim=_HEAD_DIM,
                num_layers=2,
                num_single_layers=2,
                num_refiner_layers=1,
                patch_size=2,
                patch_size_t=1,
                guidance_embeds=True,
                text_embed_dim=32,
                pooled_projection_dim=32,
                rope_axes_dim=(4, 6, 6),
            ),
        ),
        # 4 blocks: spatial factor 8, temporal factor 4 (the only layouts this VAE supports).
        "vae": _make(
            "vae",
            lambda: AutoencoderKLHunyuanVideo(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                block_out_channels=(8,) * 4,
                layers_per_block=1,
                norm_num_groups=4,
                spatial_compression_ratio=8,
                temporal_compression_ratio=4,
            ),
        ),
        # The pipeline reads hidden_states[-3]: 3 layers so that one of them is used.
        "text_encoder": _make("text_encoder", lambda: LlamaModel(llama_config)),
        "text_encoder_2": _make("text_encoder_2", lambda: CLIPTextModel(_clip_config(clip))),
        "tokenizer": llama,
        "tokenizer_2": clip,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
    }
    return {"cls": HunyuanVideoPipeline, **components}


def _wan() -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    t5 = t5_tokenizer()
    components = {
        "transformer": _make(
            "transformer",
            lambda: WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=_HEADS,
                attention_head_dim=_HEAD_DIM,
                in_channels=16,
                out_channels=16,
                text_dim=32,
                freq_dim=32,
                ffn_dim=64,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
            ),
        ),
        # Wan 2.1 layout (spatial 8, temporal 4), 4 channels per level; 16 latent channels so that the
        # default latents_mean / latents_std apply.
        "vae": _make(
            "vae",
            lambda: AutoencoderKLWan(
                base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            ),
        ),
        "text_encoder": _make("text_encoder", lambda: UMT5EncoderModel(_t5_config(t5, umt5=True))),
        "tokenizer": t5,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    return {"cls": WanPipeline, **components, "transformer_2": None}


def _cogvideox() -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    t5 = t5_tokenizer()
    components = {
        # CogVideoX-5b layout: rotary positions (any text length works, not only max_text_seq_length).
        "transformer": _make(
            "transformer",
            lambda: CogVideoXTransformer3DModel(
                num_attention_heads=_HEADS,
                attention_head_dim=_HEAD_DIM,
                in_channels=4,
                out_channels=4,
                time_embed_dim=32,
                text_embed_dim=32,
                num_layers=2,
                sample_width=14,
                sample_height=10,
                sample_frames=9,
                patch_size=2,
                temporal_compression_ratio=4,
                max_text_seq_length=226,
                use_rotary_positional_embeddings=True,
            ),
        ),
        # 4 blocks: spatial factor 8, temporal factor 4.
        "vae": _make(
            "vae",
            lambda: AutoencoderKLCogVideoX(
                in_channels=3,
                out_channels=3,
                down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4,
                block_out_channels=(8,) * 4,
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
                sample_height=80,
                sample_width=112,
                scaling_factor=0.7,
            ),
        ),
        "text_encoder": _make("text_encoder", lambda: T5EncoderModel(_t5_config(t5))),
        "tokenizer": t5,
        # THUDM/CogVideoX-5b's scheduler config.
        "scheduler": CogVideoXDDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            num_train_timesteps=1000,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=1.0,
            steps_offset=0,
            timestep_spacing="trailing",
        ),
    }
    return {"cls": CogVideoXPipeline, **components}


def _sd15() -> dict[str, Any]:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    clip = clip_tokenizer()
    components = {
        "unet": _make(
            "unet",
            lambda: UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=_HEADS,
                norm_num_groups=8,
            ),
        ),
        # 4 blocks: spatial factor 8 as in SD 1.5.
        "vae": _make("vae", lambda: _image_vae(4, scaling_factor=0.18215)),
        "text_encoder": _make("text_encoder", lambda: CLIPTextModel(_clip_config(clip))),
        "tokenizer": clip,
        # runwayml/stable-diffusion-v1-5's scheduler config.
        "scheduler": PNDMScheduler(**SD15_NOISE_SCHEDULE, skip_prk_steps=True),
    }
    return {
        "cls": StableDiffusionPipeline,
        **components,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "flux": _flux,
    "sd3": _sd3,
    "hunyuan-video": _hunyuan_video,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "sd15": _sd15,
}


def _build(kind: str) -> DiffusionPipeline:
    """Build the ``kind`` pipeline in memory (fixed seeds, float32, CPU)."""
    components = _BUILDERS[kind]()
    cls = components.pop("cls")
    return cls(**components)
