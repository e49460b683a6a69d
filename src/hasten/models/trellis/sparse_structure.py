"""TRELLIS's sparse-structure stage: the flow transformer on a dense 16^3 x 8 latent, and the 3-D conv VAE.

Written for hasten from the architecture of microsoft/TRELLIS (MIT); the constructor arguments
are the ``args`` of TRELLIS's JSON configs and the parameter names those of its checkpoints, so
:func:`hasten.models.trellis.from_pretrained` loads ``ckpts/ss_flow_img_dit_L_16l8_fp16`` and
``ckpts/ss_dec_conv3d_16l8_fp16`` unchanged.

The flow model predicts the rectified-flow velocity ``v = noise - x0`` (``x_t = (1 - t) x0 + t
noise``) from ``t * 1000`` and the condition tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import (
    AbsolutePositionEmbedder,
    ChannelLayerNorm32,
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
    patchify,
    pixel_shuffle_3d,
    unpatchify,
)

__all__ = ["SparseStructureDecoder", "SparseStructureEncoder", "SparseStructureFlowModel"]


class SparseStructureFlowModel(nn.Module):
    """The sparse-structure flow DiT (TRELLIS ``SparseStructureFlowModel``, "ape" positions)."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"only pe_mode='ape' (TRELLIS's sparse-structure flow) is implemented; got {pe_mode!r}")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.patch_size, self.share_mod = patch_size, share_mod
        self.num_heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels, bias=True))
        side = resolution // patch_size
        coords = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels, 3)(coords))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList(
            [
                ModulatedTransformerCrossBlock(
                    model_channels, cond_channels, self.num_heads, mlp_ratio, share_mod, qk_rms_norm, qk_rms_norm_cross
                )
                for _ in range(num_blocks)
            ]
        )
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)

    @property
    def tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 3

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        expected = [x.shape[0], self.in_channels, *[self.resolution] * 3]
        if list(x.shape) != expected:
            raise ValueError(f"`x` must be {expected}, got {list(x.shape)}")
        h = patchify(x, self.patch_size)
        h = h.view(*h.shape[:2], -1).permute(0, 2, 1)
        h = self.input_layer(h) + self.pos_emb[None].to(h.dtype)
        modulation = self.t_embedder(t)
        if self.share_mod:
            modulation = self.adaLN_modulation(modulation)
        for block in self.blocks:
            h = block(h, modulation, cond.to(h.dtype))
        h = self.out_layer(F.layer_norm(h, h.shape[-1:]))
        side = self.resolution // self.patch_size
        h = h.permute(0, 2, 1).reshape(h.shape[0], -1, side, side, side)
        return unpatchify(h, self.patch_size)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm32(channels)
        self.norm2 = ChannelLayerNorm32(out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureEncoder(nn.Module):
    """64^3 occupancy -> the 16^3 x C latent (the posterior mean; TRELLIS ``SparseStructureEncoder``)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        if norm_type != "layer":
            raise ValueError(f"only norm_type='layer' is implemented; got {norm_type!r}")
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList([])
        for index, channel in enumerate(channels):
            self.blocks.extend([ResBlock3d(channel, channel) for _ in range(num_res_blocks)])
            if index < len(channels) - 1:
                self.blocks.append(DownsampleBlock3d(channel, channels[index + 1]))
        self.middle_block = nn.Sequential(
            *[ResBlock3d(channels[-1], channels[-1]) for _ in range(num_res_blocks_middle)]
        )
        self.out_layer = nn.Sequential(
            ChannelLayerNorm32(channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], latent_channels * 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        mean, _ = self.out_layer(self.middle_block(h)).chunk(2, dim=1)
        return mean


class SparseStructureDecoder(nn.Module):
    """The 16^3 x C latent -> 64^3 occupancy logits (TRELLIS ``SparseStructureDecoder``)."""

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        if norm_type != "layer":
            raise ValueError(f"only norm_type='layer' is implemented; got {norm_type!r}")
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], channels[0]) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList([])
        for index, channel in enumerate(channels):
            self.blocks.extend([ResBlock3d(channel, channel) for _ in range(num_res_blocks)])
            if index < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(channel, channels[index + 1]))
        self.out_layer = nn.Sequential(
            ChannelLayerNorm32(channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(x))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)
