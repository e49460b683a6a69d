"""Block-sparse attention through PyTorch FlexAttention (portable: CPU and GPU via torch.compile).

The BlockMask is built directly from the tile lists of a :class:`~hasten.kernels.grouping.GroupLayout`
with ``BlockMask.from_kv_blocks`` (milliseconds), never with ``create_block_mask`` (which
evaluates the mask densely and takes seconds at Flux shapes). Tiles whose keys are all
statically valid image keys are "full" blocks (no mask_mod call); text tiles and tiles with
padding are "partial" and consult the per-call key-validity buffer. BlockMasks are cached per
(tile lists, device, batch); ``flex_attention`` is compiled once and re-specialised only per
new shape.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ._cache import TensorKeyedCache
from .grouping import tile_lists, tile_mask_of

_MASKS = TensorKeyedCache()


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _block_mask(kv_indices, kv_counts, static_valid, tile, batch, device) -> tuple[BlockMask, torch.Tensor]:
    """The BlockMask of these tile lists (cached) and the key-validity buffer its mask_mod reads."""
    return _MASKS.get_or_build(
        (kv_indices, kv_counts, static_valid),
        (tile, batch, str(device)),
        lambda: _build_block_mask(kv_indices, kv_counts, static_valid, tile, batch, device),
    )


def _build_block_mask(kv_indices, kv_counts, static_valid, tile, batch, device) -> tuple[BlockMask, torch.Tensor]:
    num_tiles = kv_counts.shape[0]
    rows = tile_mask_of(kv_indices.to(device), kv_counts.to(device))
    # Full tiles: every key statically valid (the per-call mask may still drop text keys, so
    # a static_valid of None marks no tile as full).
    if static_valid is None:
        tile_all_valid = torch.zeros(num_tiles, dtype=torch.bool, device=device)
    else:
        tile_all_valid = static_valid.to(device).view(num_tiles, tile).all(1)
    full = rows & tile_all_valid[None, :]
    partial = rows & ~tile_all_valid[None, :]
    if not bool(partial.any()):  # all-full BlockMasks do not compile on CPU (torch 2.13)
        full, partial = torch.zeros_like(rows), rows

    valid = torch.ones(batch, num_tiles * tile, dtype=torch.bool, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    (partial_counts, partial_indices), (full_counts, full_indices) = tile_lists(partial), tile_lists(full)
    block_mask = BlockMask.from_kv_blocks(
        partial_counts[None, None],
        partial_indices[None, None],
        full_counts[None, None],
        full_indices[None, None],
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
    )
    return block_mask, valid


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float | None = None,
    static_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention with compiled FlexAttention.

    Same contract as :func:`hasten.kernels.block_sparse_attention`. ``static_valid`` (kernel_len,)
    marks keys that are valid on every call (the layout's padding mask without text); tiles made
    only of such keys skip the mask_mod. Query rows with no valid key return zeros.
    """
    batch = q.shape[0]
    block_mask, valid = _block_mask(kv_indices, kv_counts, static_valid, tile, batch, q.device)
    valid.copy_(key_valid.expand(batch, -1))
    # Rows with no valid key come back as zeros: flex zeroes fully-masked rows.
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
