"""Block-sparse attention in plain torch: gather each query tile's key tiles, run dense SDPA on them.

Exact and device-agnostic, and on CPU the fastest path (it hands every gathered block to
PyTorch's fused ``scaled_dot_product_attention``). Query tiles that attend the same key tiles
(all tiles of one group, all text tiles) share one gather; rows are batched by (number of key
tiles, number of query tiles) so that each batch is one SDPA call over a leading batch
dimension, chunked to bound memory. A mask is passed only where a gathered key is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._cache import TensorKeyedCache

# Upper bound on the gathered key elements per SDPA call (per tensor): 32 Mi elements.
_CHUNK_ELEMENTS = 32 * 1024 * 1024


@dataclass(frozen=True)
class _Batch:
    query_tiles: torch.Tensor  # (n, q_tiles) tile ids
    key_tiles: torch.Tensor  # (n, k_tiles) tile ids


_PLANS = TensorKeyedCache()


def _plan(kv_indices: torch.Tensor, kv_counts: torch.Tensor, device: torch.device) -> list[_Batch]:
    """Group query tiles by identical key-tile lists, then batch lists of equal shape (cached)."""
    return _PLANS.get_or_build(
        (kv_indices, kv_counts), (str(device),), lambda: _build_plan(kv_indices, kv_counts, device)
    )


def _build_plan(kv_indices: torch.Tensor, kv_counts: torch.Tensor, device: torch.device) -> list[_Batch]:
    counts = kv_counts.tolist()
    rows = kv_indices.tolist()
    sharing: dict[tuple[int, ...], list[int]] = {}
    for tile, (row, count) in enumerate(zip(rows, counts)):
        if count:
            sharing.setdefault(tuple(row[:count]), []).append(tile)
    shapes: dict[tuple[int, int], tuple[list, list]] = {}
    for key_tiles, query_tiles in sharing.items():
        queries, keys = shapes.setdefault((len(key_tiles), len(query_tiles)), ([], []))
        queries.append(query_tiles)
        keys.append(list(key_tiles))
    return [
        _Batch(torch.tensor(queries, device=device), torch.tensor(keys, device=device))
        for queries, keys in shapes.values()
    ]


def _tokens(tiles: torch.Tensor, tile: int) -> torch.Tensor:
    """(n, t) tile ids -> (n, t * tile) token ids."""
    return (tiles[..., None] * tile + torch.arange(tile, device=tiles.device)).flatten(-2)


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
    """Block-sparse attention by gathering each query tile's key tiles (exact; any device).

    Same contract as :func:`hasten.kernels.block_sparse_attention` (which validates inputs).
    Query rows with no valid key return zeros.
    """
    batch, heads, seq, dim = q.shape
    out = torch.zeros_like(q)
    key_valid = key_valid.expand(batch, seq)
    all_valid = bool(key_valid.all())
    for group in _plan(kv_indices, kv_counts, q.device):
        query_tokens = _tokens(group.query_tiles, tile)  # (n, q_len)
        key_tokens = _tokens(group.key_tiles, tile)  # (n, k_len)
        per_row = batch * heads * key_tokens.shape[1] * dim
        step = max(1, _CHUNK_ELEMENTS // per_row)
        for start in range(0, len(query_tokens), step):
            rows_q, rows_k = query_tokens[start : start + step], key_tokens[start : start + step]
            n, q_len, k_len = len(rows_q), rows_q.shape[1], rows_k.shape[1]
            # Gathered (B, H, n, len, D) blocks flattened to 4-D (B, H*n, len, D): the fused CPU/GPU
            # SDPA kernels take 4-D inputs only (5-D falls back to the unfused math path).
            query = q[:, :, rows_q].reshape(batch, heads * n, q_len, dim)
            keys = k[:, :, rows_k].reshape(batch, heads * n, k_len, dim)
            values = v[:, :, rows_k].reshape(batch, heads * n, k_len, dim)
            mask = None
            if not all_valid:
                valid = key_valid[:, rows_k]  # (B, n, k_len)
                mask = valid[:, None, :, None, :].expand(batch, heads, n, 1, k_len).reshape(batch, heads * n, 1, k_len)
            result = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
            if mask is not None:  # rows whose keys are all invalid: zeros, not NaN
                result = torch.where(mask.any(-1, keepdim=True), result, 0.0)
            out[:, :, rows_q] = result.view(batch, heads, n, q_len, dim)
    return out
