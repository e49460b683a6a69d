"""Tiny TRELLIS-format sparse-structure models (random weights), saved and loaded like the released ones.

``hasten.tiny.trellis.models()`` -> ``{"flow": ..., "encoder": ..., "decoder": ...}``: a 8^3 x 4
latent flow DiT (2 blocks, 32 channels, condition tokens of 16 channels) and a 3-D conv VAE for
32^3 occupancy, written under ``$HASTEN_HOME/tiny/trellis-v1/ckpts`` in TRELLIS's
``{name}.json`` + ``{name}.safetensors`` layout and read back through
:func:`hasten.models.trellis.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._store import saved_folder, seeded

__all__ = ["CONFIGS", "COND_CHANNELS", "models", "random_model"]

COND_CHANNELS = 16
CONFIGS = {
    "ss_flow": (
        "SparseStructureFlowModel",
        dict(
            resolution=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            cond_channels=COND_CHANNELS,
            num_blocks=2,
            num_heads=2,
            mlp_ratio=2,
            patch_size=1,
            pe_mode="ape",
            qk_rms_norm=True,
        ),
    ),
    "ss_enc": (
        "SparseStructureEncoder",
        dict(in_channels=1, latent_channels=4, num_res_blocks=1, channels=[8, 16, 16], num_res_blocks_middle=1),
    ),
    "ss_dec": (
        "SparseStructureDecoder",
        dict(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[16, 16, 8], num_res_blocks_middle=1),
    ),
}
_SEED = 7


def random_model(name: str, args: dict, seed: int) -> torch.nn.Module:
    """A TRELLIS model class ``name`` built from ``args`` with random weights; the gates and outputs
    TRELLIS initialises to zero get small random values too, so every block contributes."""
    from ..models.trellis import MODELS

    with seeded(seed):
        model = MODELS[name](**args)
        for parameter in model.parameters():
            if parameter.dim() > 1 and float(parameter.detach().abs().sum()) == 0:
                torch.nn.init.normal_(parameter, std=0.02)
    return model


def _save(folder: Path) -> None:
    from ..models.trellis import save_pretrained

    for index, (name, (cls, args)) in enumerate(CONFIGS.items()):
        save_pretrained(random_model(cls, args, _SEED + index), folder / "ckpts" / name, args)
    (folder / "ckpts" / "done").write_text("ok")


def models(dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """The tiny flow model, encoder and decoder, loaded from their TRELLIS-format checkpoints."""
    from ..models.trellis import from_pretrained

    folder = saved_folder("trellis-v1", "ckpts/done", _save) / "ckpts"
    return {
        key: from_pretrained(folder / name, dtype)
        for key, name in (("flow", "ss_flow"), ("encoder", "ss_enc"), ("decoder", "ss_dec"))
    }


def conditioner():
    """Tiny random CLIP-text and DINOv2-with-registers encoders whose width is the tiny flow's ``COND_CHANNELS``."""
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from ..pipelines.voxhammer import VoxelConditioner
    from .tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer()
    with seeded(_SEED + 10):
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=COND_CHANNELS,
                intermediate_size=2 * COND_CHANNELS,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        image = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=COND_CHANNELS,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * COND_CHANNELS,
                image_size=28,
                patch_size=14,
                num_register_tokens=4,
            )
        ).eval()
    return VoxelConditioner(text, tokenizer, image, image_size=28)
