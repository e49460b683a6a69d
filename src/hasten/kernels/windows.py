"""GRAT-B as window attention: query tiles of whole groups, each with the one window of keys it reads.

A query group of the block pattern attends the key groups within ``window`` groups of it along every
axis (``|dq - dk| <= window``), clipped at the grid's edges. The reference backend gathers a key list
per query group (nine 16-token groups for 4 x 4-token groups and a window of 1: tiny attention calls
and every key copied nine times). This backend cuts the grid into *tiles*: one group along time and
rows and ``columns`` groups along the row, so that a tile is a contiguous run of whole groups; the keys
of a tile are the box of groups its queries may read (``2 r + 1`` groups along time and rows,
``columns + 2 r`` along the row), cut from the grid with strided windows (no index lists), and all
tiles run as one fused SDPA call:

* along the row, a fixed additive mask keeps each query group to its own ``2 r + 1`` key groups
  (the same mask for every tile);
* keys outside the grid (the box of an edge tile, or the padding of a partial edge group) are
  masked through one extra head channel: queries carry 1 there and keys 0, or a large negative
  number where the key does not exist, so their score drops out of the softmax exactly without a
  per-tile mask;
* text keys are one more SDPA call of the image queries, merged by the log-sum-exp; text queries
  attend every key (one dense call).

Each query scores ``columns + 2 r`` key groups along the row where the rule needs ``2 r + 1`` (2x at
4 columns and a window of 1): extra work traded for calls big enough to run fast (:func:`tile_columns`;
one group per tile would compute the rule's keys only, in calls of 16 queries). :func:`supports` says
which layouts (the block pattern with text-only key padding).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .grouping import GroupLayout
from .partial import additive, assemble, attention_lse, image_keys_unmasked, image_slice, merge, text_slice

# Score offset of a key outside the grid (through the extra channel): exp() of it is 0 in every float
# format, and it is within half precision's range.
_ABSENT = -30000.0
# Query tokens per tile the tiling aims at: fewer and the SDPA calls are too small to run fast on a CPU.
_TILE_TOKENS = 64


def supports(layout: GroupLayout, key_padding: torch.Tensor | None = None) -> bool:
    """Whether :func:`window_block_attention` computes ``layout``: GRAT-B (an image or a video), with any
    masked keys among the text keys only."""
    return layout.pattern == "block" and image_keys_unmasked(layout, key_padding)


def preferred(layout: GroupLayout) -> bool:
    """Whether "auto" runs this backend for ``layout`` (off CUDA): on an image whose tiles hold several
    groups (groups under ~43 tokens), where it was measured faster than the gathered reference, whose
    per-group SDPA calls are then too small to run fast (micro-flux, 4 x 4-token groups: 2.38x over
    dense end to end at 192 x 192 against 1.36x). Elsewhere the reference stays the default:

    * large groups (Flux's 16 x 16): one tile is one group, the calls are big either way, and a box at
      the edge of a small group grid holds 9 groups where the reference attends the 4-6 inside it
      (Flux 1024²: 0.91x against the reference's 1.29x);
    * videos: the box spans 3 time groups too, so on the small grids measured (the Wan micro-world,
      5-9 latent frames of 8 x 8-12 x 12 tokens) the boxes copy the keys many times over and cover more
      than the grid itself (0.38-0.69x against 0.94-1.17x)."""
    return layout.grid[0] == 1 and tile_columns(layout) > 1


def tile_columns(layout: GroupLayout) -> int:
    """Groups per query tile along the row: enough for about 64 query tokens, at most the row's groups.

    Examples
    --------
    >>> from hasten.kernels import group_layout
    >>> tile_columns(group_layout((1, 48, 48), (1, 4, 4), pattern="block"))  # 16-token groups
    4
    """
    group = layout.group
    return max(1, min(layout.group_grid[2], round(_TILE_TOKENS / math.prod(group))))


def _reach(layout: GroupLayout) -> tuple[int, int, int]:
    """The window per axis, capped at the grid: a reach of ``groups - 1`` already covers every group."""
    return tuple(min(r, n - 1) for r, n in zip(layout.window, layout.group_grid))


@functools.lru_cache(maxsize=32)
def _row_bias(
    group: tuple[int, int, int], columns: int, reach: tuple[int, int, int], window: int, dtype, device
) -> torch.Tensor:
    """(q_len, k_len) additive mask of every tile: the query tokens of the tile's ``columns`` groups
    (time, rows, row order) against its box of keys; along the row, query group ``j`` reads the box's
    groups within ``window`` of it; along time and rows every key of the box is in reach."""
    gt, gh, gw = group
    query_group = torch.arange(columns * gw, device=device) // gw
    key_group = torch.arange((columns + 2 * reach[2]) * gw, device=device) // gw - reach[2]
    within = (key_group[None, :] - query_group[:, None]).abs() <= window  # (row queries, row keys)
    box_t, box_h = (2 * reach[0] + 1) * gt, (2 * reach[1] + 1) * gh
    shape = (gt, gh, columns * gw, box_t, box_h, within.shape[1])
    within = within[None, None, :, None, None, :].expand(shape)
    return additive(within.reshape(gt * gh * columns * gw, -1), dtype)


def _pad_grid(x: torch.Tensor, before: tuple[int, int, int], after: tuple[int, int, int], value: float = 0.0):
    """Pad the (t, h, w) axes of a (B, H, t, h, w, C) tensor."""
    pads = []
    for low, high in zip(reversed(before), reversed(after)):
        pads += [low, high]
    return F.pad(x, (0, 0, *pads), value=value)


def window_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """GRAT-B attention of ``layout`` in model order, by windows (see the module docstring).

    Same contract as :func:`hasten.kernels.grouped_attention`; the result equals the reference
    backend's to float rounding. Raises ``ValueError`` where :func:`supports` is False.

    Examples
    --------
    >>> import torch
    >>> from hasten.kernels import group_layout, grouped_attention
    >>> from hasten.kernels.windows import window_block_attention
    >>> layout = group_layout((3, 6, 10), (1, 4, 4), num_text=3, pattern="block", window=(1, 1, 1))
    >>> q, k, v = torch.randn(3, 1, 2, layout.seq_len, 16)
    >>> out = window_block_attention(q, k, v, layout)
    >>> torch.allclose(out, grouped_attention(q, k, v, layout, backend="reference"), atol=1e-5)
    True
    """
    if not supports(layout, key_padding):
        raise ValueError(
            "window attention computes GRAT-B (pattern='block') with only text keys masked; "
            f"got pattern={layout.pattern!r}"
            + ("" if layout.pattern != "block" else " and image keys masked by `key_padding`")
        )
    if query.shape[-2] != layout.seq_len:
        raise ValueError(f"query has {query.shape[-2]} tokens but the layout is for {layout.seq_len}")
    batch, heads, _, dim = query.shape
    scale = dim**-0.5 if scale is None else float(scale)
    grid, group, groups = layout.grid, layout.group, layout.group_grid
    reach, columns = _reach(layout), tile_columns(layout)
    tiles_per_row = -(-groups[2] // columns)
    padded = (groups[0] * group[0], groups[1] * group[1], tiles_per_row * columns * group[2])
    image, text = image_slice(layout), text_slice(layout)

    def grid_of(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, image].unflatten(2, grid)  # (B, H, t, h, w, D)

    # Queries: the grid padded to whole tiles, one extra channel of ones.
    ones = query.new_ones(())
    q = _pad_grid(grid_of(query), (0, 0, 0), tuple(p - n for p, n in zip(padded, grid)))
    q = torch.cat([q, ones.expand(*q.shape[:-1], 1)], -1)
    # Keys and values: padded by the reach on every side too; the extra channel holds 0 on the grid's
    # keys and _ABSENT on the padding (values: 0).
    before = tuple(r * g for r, g in zip(reach, group))
    after = tuple(p - n + b for p, n, b in zip(padded, grid, before))
    present = query.new_zeros(1, 1, *grid, 1)
    k = torch.cat([grid_of(key), present.expand(batch, heads, *grid, 1)], -1)
    k = _pad_grid(k, before, after)
    k[..., -1:] = _pad_grid(present, before, after, value=_ABSENT)
    v = _pad_grid(torch.cat([grid_of(value), present.expand(batch, heads, *grid, 1)], -1), before, after)

    # Tiles: one group along time and rows, `columns` groups along the row (queries), and the box of
    # keys each reads, taken as strided windows of the padded grid.
    gt, gh, gw = group
    q_tiles = (
        q.unflatten(2, (groups[0], gt))
        .unflatten(4, (groups[1], gh))
        .unflatten(6, (tiles_per_row, columns * gw))
        .permute(0, 1, 2, 4, 6, 3, 5, 7, 8)  # (B, H, Gt, Gh, tiles, gt, gh, columns * gw, D + 1)
        .reshape(batch * heads, -1, gt * gh * columns * gw, dim + 1)
    )
    box = ((2 * reach[0] + 1) * gt, (2 * reach[1] + 1) * gh, (columns + 2 * reach[2]) * gw)
    steps = (gt, gh, columns * gw)

    def boxes(x: torch.Tensor) -> torch.Tensor:
        for axis, (size, step) in enumerate(zip(box, steps)):
            x = x.unfold(2 + axis, size, step)  # window appended as a last dimension
        # (B, H, Gt, Gh, tiles, D + 1, bt, bh, bw) -> (B * H, tiles, box tokens, D + 1)
        return x.permute(0, 1, 2, 3, 4, 6, 7, 8, 5).reshape(batch * heads, q_tiles.shape[1], -1, dim + 1)

    bias = _row_bias(group, columns, reach, layout.window[2], query.dtype, query.device)
    out, lse = attention_lse(q_tiles, boxes(k), boxes(v), bias, scale)

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # (B * H, tiles, q_len[, C]) -> (B, H, tokens[, C])
        x = x.reshape(batch, heads, groups[0], groups[1], tiles_per_row, gt, gh, columns * gw, *x.shape[3:])
        x = x.permute(0, 1, 2, 5, 3, 6, 4, 7, *range(8, x.dim())).reshape(batch, heads, *padded, *x.shape[8:])
        return x[:, :, : grid[0], : grid[1], : grid[2]].flatten(2, 4)

    out, lse = to_grid(out[..., :dim]), to_grid(lse)
    if layout.num_text:  # the image queries' text keys, merged by the log-sum-exp
        text_valid = None if key_padding is None else key_padding[:, text]
        text_bias = None if text_valid is None or text_valid.all() else additive(text_valid[:, None, None], query.dtype)
        part, part_lse = attention_lse(query[:, :, image], key[:, :, text], value[:, :, text], text_bias, scale)
        out, _ = merge(out, lse, part, part_lse, with_lse=False)
    return assemble(out, query, key, value, layout, key_padding, scale)
