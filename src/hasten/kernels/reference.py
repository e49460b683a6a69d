"""Reference block-sparse attention in plain torch: exact, any device, no compilation.

Each query tile gathers the keys/values of the tiles it attends and runs a masked softmax.
Query tiles are processed in chunks of equal-length tile lists, so memory stays bounded
and rows that attend few tiles do not pay for the rows that attend many.
"""

from __future__ import annotations

import torch

# Upper bound on the gathered key/value elements per chunk (per tensor), ~256 MiB in fp32.
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def reference_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention, computed exactly by gathering each query tile's key tiles.

    Same contract as :func:`hasten.kernels.block_sparse_attention` (which validates inputs).
    Query rows with no valid key return zeros.
    """
    batch, heads, seq, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    num_tiles = seq // tile
    out = torch.zeros_like(q)
    q_tiles = q.view(batch, heads, num_tiles, tile, dim)
    key_valid = key_valid.expand(batch, seq)
    counts = kv_counts.tolist()
    # Tiles with the same count share one gather width; iterate over runs of equal counts.
    order = sorted(range(num_tiles), key=lambda i: counts[i])
    start = 0
    while start < num_tiles:
        width = counts[order[start]]
        end = start
        while end < num_tiles and counts[order[end]] == width:
            end += 1
        if width == 0:
            start = end
            continue
        per_tile = batch * heads * width * tile * dim
        step = max(1, _CHUNK_ELEMENTS // per_tile)
        for chunk_start in range(start, end, step):
            rows = torch.tensor(order[chunk_start : min(end, chunk_start + step)], device=q.device)
            key_tiles = kv_indices[rows, :width].long()  # (n, width)
            token_index = (key_tiles[:, :, None] * tile + torch.arange(tile, device=q.device)).flatten(1)
            keys = k[:, :, token_index]  # (B, H, n, width*tile, D)
            values = v[:, :, token_index]
            scores = torch.einsum("bhntd,bhnkd->bhntk", q_tiles[:, :, rows].float(), keys.float()) * scale
            valid = key_valid[:, token_index]  # (B, n, width*tile)
            scores = scores.masked_fill(~valid[:, None, :, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            result = torch.einsum("bhntk,bhnkd->bhntd", probs, values.float()).to(q.dtype)
            out.view(batch, heads, num_tiles, tile, dim)[:, :, rows] = result
        start = end
    return out
