"""Building blocks of TRELLIS's sparse-structure models, written for hasten.

Module and parameter names follow TRELLIS's released checkpoints (``blocks.0.self_attn.to_qkv``,
``blocks.0.cross_attn.to_kv``, ``t_embedder.mlp.0``, ...) so their ``ckpts/*.safetensors`` load
unchanged. Attention runs through PyTorch's SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AbsolutePositionEmbedder",
    "FeedForwardNet",
    "LayerNorm32",
    "ModulatedTransformerCrossBlock",
    "MultiHeadAttention",
    "MultiHeadRMSNorm",
    "TimestepEmbedder",
    "patchify",
    "pixel_shuffle_3d",
    "unpatchify",
]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, whatever the dtype of the input and of its own parameters (a model
    cast to bf16 / fp16, as TRELLIS's ``use_fp16`` checkpoints run, keeps float32 statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis of a (B, C, ...) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.dim()
        x = x.permute(0, *range(2, dims), 1)
        x = super().forward(x)
        return x.permute(0, dims - 1, *range(1, dims - 1)).contiguous()


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS normalisation with a learned ``gamma`` (heads, dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention (fused ``to_qkv``) or cross-attention (``to_q`` + ``to_kv``), SDPA underneath."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: str = "self",
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"`channels` {channels} must be a multiple of `num_heads` {num_heads}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self._type, self.qk_rms_norm = type, qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, channels * 2, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        if self._type == "self":
            q, k, v = self.to_qkv(x).reshape(batch, length, 3, self.num_heads, -1).unbind(dim=2)
        else:
            q = self.to_q(x).reshape(batch, length, self.num_heads, -1)
            k, v = self.to_kv(context).reshape(batch, context.shape[1], 2, self.num_heads, -1).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(h.transpose(1, 2).reshape(batch, length, -1))


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to the condition tokens, and an MLP."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(
            channels, num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm
        )
        self.cross_attn = MultiHeadAttention(
            channels,
            num_heads,
            ctx_channels=ctx_channels,
            type="cross",
            qkv_bias=qkv_bias,
            qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        modulation = mod if self.share_mod else self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        x = x + self.self_attn(h) * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), context)
        h = self.norm3(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        return x + self.mlp(h) * gate_mlp.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features through an MLP (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class AbsolutePositionEmbedder(nn.Module):
    """Sin/cos features of each coordinate, concatenated (zero-padded to ``channels``)."""

    def __init__(self, channels: int, in_channels: int = 3):
        super().__init__()
        self.channels, self.in_channels = channels, in_channels
        self.freq_dim = channels // in_channels // 2
        self.freqs = 1.0 / (10000 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = torch.outer(x.reshape(-1).float(), self.freqs.to(x.device))
        embed = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(n, -1)
        if embed.shape[1] < self.channels:
            embed = torch.cat([embed, torch.zeros(n, self.channels - embed.shape[1], device=embed.device)], dim=-1)
        return embed


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C * p^D, *spatial / p), TRELLIS's channel order."""
    dims = x.dim() - 2
    x = x.reshape(*x.shape[:2], *sum([[x.shape[d] // patch_size, patch_size] for d in range(2, dims + 2)], []))
    x = x.permute(0, 1, *([2 * i + 3 for i in range(dims)] + [2 * i + 2 for i in range(dims)]))
    return x.reshape(x.shape[0], x.shape[1] * patch_size**dims, *x.shape[-dims:])


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    dims = x.dim() - 2
    x = x.reshape(x.shape[0], x.shape[1] // patch_size**dims, *([patch_size] * dims), *x.shape[-dims:])
    x = x.permute(0, 1, *sum([[2 + dims + i, 2 + i] for i in range(dims)], []))
    return x.reshape(x.shape[0], x.shape[1], *[x.shape[2 + 2 * i] * patch_size for i in range(dims)])


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    batch, channels, h, w, d = x.shape
    x = x.reshape(batch, channels // scale**3, scale, scale, scale, h, w, d)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(batch, channels // scale**3, h * scale, w * scale, d * scale)
