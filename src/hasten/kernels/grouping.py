"""Token grouping for block-sparse attention: the one place where groups, tiles and masks are made.

A sequence handed to attention holds ``num_text`` text tokens (before or after the image
tokens) and the tokens of a latent grid ``(t, h, w)`` in row-major order. GRAT cuts the grid
into contiguous groups of ``group = (gt, gh, gw)`` tokens; groups at the far edges may be
partial. :class:`GroupLayout` describes the *kernel order* of that sequence::

    [ text tokens | pad ][ group 0 | pad ][ group 1 | pad ] ... [ group G-1 | pad ]

Every segment is padded to a whole number of ``tile`` tokens (each group by its own size), so
that a group owns whole kernel tiles and the attention mask is block-sparse at tile granularity.
Padded slots are never attended as keys and their query rows are dropped when scattering back.

The layout carries everything a kernel needs (``kv_indices`` / ``kv_counts`` per query
tile, the static key-validity mask) and everything a caller needs to go to kernel order and
back (``gather_index`` / ``scatter_index``). It is built once per shape and cached
(:func:`group_layout`), on the CPU; :meth:`GroupLayout.to` caches device copies.

Patterns (which key groups a query group attends):

``"cross"`` (GRAT-X, criss-cross)
    key groups that share at least one group coordinate with the query group: the same
    row band, the same column band, or (video) the same time slab. An image (a grid of one
    frame) is 2-D. A video whose frames all fit in one time group shares that slab everywhere,
    so GRAT-X is dense there (as the paper's rule says); use a smaller time group.
``"block"`` (GRAT-B)
    key groups within ``window`` groups of the query group along every axis
    (``|dq - dk| <= window`` per axis; a per-axis tuple is accepted).

Image queries attend every text key; text queries attend every key. Only the text keys
a caller marks invalid (padding) are masked, at call time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Pattern = Literal["cross", "block"]
PATTERNS: tuple[str, ...] = ("cross", "block")
TILE_SIZES: tuple[int, ...] = (16, 32, 64, 128)


def _positive_triple(name: str, value: int | tuple[int, ...], ndim_hint: int = 3) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value,) * ndim_hint
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        value = (1, *value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"`{name}` must be positive integers ((h, w) or (t, h, w)), got {value!r}")
    return value  # type: ignore[return-value]


def default_tile(group_tokens: int) -> int:
    """Kernel tile for a group of ``group_tokens`` tokens: the smallest power of two >= the group,
    clamped to [16, 128]. Groups of a power-of-two size (e.g. 16x16 = 256) waste no padding."""
    return min(TILE_SIZES[-1], max(TILE_SIZES[0], 1 << max(0, group_tokens - 1).bit_length()))


def tile_lists(tile_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) of a (rows, tiles) bool mask: each row's set tiles, ascending, then zeros."""
    counts = tile_mask.sum(-1, dtype=torch.int32)
    # A stable sort of ~mask lists each row's set tiles first, in ascending order.
    indices = torch.sort((~tile_mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    indices[torch.arange(indices.shape[-1], device=indices.device) >= counts[..., None]] = 0
    return counts, indices


def tile_mask_of(kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> torch.Tensor:
    """The (num_tiles, num_tiles) bool mask that the tile lists ``kv_indices``/``kv_counts`` describe."""
    num_tiles, width = kv_counts.shape[0], kv_indices.shape[1]
    listed = torch.arange(width, device=kv_counts.device)[None, :] < kv_counts[:, None].long()
    rows = torch.arange(num_tiles, device=kv_counts.device)[:, None].expand(-1, width)
    mask = torch.zeros(num_tiles, num_tiles, dtype=torch.bool, device=kv_counts.device)
    mask[rows[listed], kv_indices.to(kv_counts.device).long()[listed]] = True
    return mask


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """Kernel-order layout of one (grid, text, group, pattern) shape. Build with :func:`group_layout`.

    Attributes
    ----------
    grid, group : tuple[int, int, int]
        Latent token grid and group size, both (t, h, w); the group is clamped to the grid.
    num_text : int
        Text tokens in the sequence; ``text_first`` says whether they precede the image tokens.
    tile : int
        Tokens per kernel tile.
    seq_len : int
        Tokens in the model's sequence (``num_text + t*h*w``).
    kernel_len : int
        Tokens in kernel order, padding included (a multiple of ``tile``).
    gather_index : LongTensor (kernel_len,)
        Model position of each kernel slot (padding points at position 0; it is masked).
    gather_rows : LongTensor (kernel_len,)
        ``gather_index`` with ``-1`` on padding slots: the rows the fused Triton kernel loads and
        stores through (padding slots load nothing and store nothing).
    scatter_index : LongTensor (seq_len,)
        Kernel slot of each model position.
    key_valid : BoolTensor (kernel_len,)
        False on padding slots.
    image_key_valid : BoolTensor (kernel_len,)
        ``key_valid`` restricted to image slots (keys valid whatever a call's text mask says).
    text_slots : int
        Kernel slots ``[0, text_slots)`` belong to text (valid ones are ``[0, num_text)``).
    kv_indices : IntTensor (num_tiles, max_kv)
        Key tiles each query tile attends, ascending; entries past ``kv_counts`` are 0.
    kv_counts : IntTensor (num_tiles,)
    """

    grid: tuple[int, int, int]
    group: tuple[int, int, int]
    num_text: int
    text_first: bool
    pattern: str
    window: tuple[int, int, int]
    tile: int
    seq_len: int
    kernel_len: int
    text_slots: int
    group_grid: tuple[int, int, int]
    gather_index: torch.Tensor
    gather_rows: torch.Tensor
    scatter_index: torch.Tensor
    key_valid: torch.Tensor
    image_key_valid: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tiles(self) -> int:
        return self.kernel_len // self.tile

    @property
    def density(self) -> float:
        """Fraction of (query tile, key tile) pairs computed; attention can be at most 1/density faster."""
        return float(self.kv_counts.sum()) / float(self.num_tiles) ** 2

    @property
    def relative_work(self) -> float:
        """Attention work relative to dense attention over the unpadded sequence: computed tile pairs
        x tile² / seq_len². Unlike ``density`` it counts padding slots as cost."""
        return float(self.kv_counts.sum()) * self.tile**2 / float(self.seq_len) ** 2

    @property
    def bound(self) -> float:
        """The most this layout can speed attention up over dense attention: 1 / relative_work."""
        return 1.0 / self.relative_work

    def to(self, device: torch.device | str) -> "GroupLayout":
        """The same layout with its index tensors on ``device`` (cached per device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._device_cache:
            moved = {
                name: getattr(self, name).to(device)
                for name in (
                    "gather_index",
                    "gather_rows",
                    "scatter_index",
                    "key_valid",
                    "image_key_valid",
                    "kv_indices",
                    "kv_counts",
                )
            }
            fields = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "_device_cache"}
            fields.update(moved)
            self._device_cache[key] = GroupLayout(**fields)
        return self._device_cache[key]

    def dense_mask(self) -> torch.Tensor:
        """(kernel_len, kernel_len) bool mask in kernel order (static key validity applied). For tests
        and documentation: kernels never build it."""
        mask = (
            tile_mask_of(self.kv_indices, self.kv_counts)
            .repeat_interleave(self.tile, 0)
            .repeat_interleave(self.tile, 1)
        )
        return mask & self.key_valid[None, :]


def _group_mask(
    group_grid: tuple[int, int, int], pattern: str, window: tuple[int, int, int], image: bool
) -> torch.Tensor:
    """(G, G) bool: which key group (column) each query group (row) attends, groups row-major.
    ``image``: the grid has one frame, so GRAT-X ignores the (shared) time coordinate."""
    axes = [torch.arange(n) for n in group_grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    if pattern == "cross":
        coords = coords[:, 1:] if image else coords
        return (coords[:, None, :] == coords[None, :, :]).any(-1)
    reach = torch.tensor(window)
    return ((coords[:, None, :] - coords[None, :, :]).abs() <= reach).all(-1)


@functools.lru_cache(maxsize=64)
def group_layout(
    grid: tuple[int, int, int],
    group: tuple[int, int, int],
    num_text: int = 0,
    text_first: bool = True,
    pattern: str = "cross",
    window: tuple[int, int, int] = (1, 1, 1),
    tile: int | None = None,
) -> GroupLayout:
    """Build (once per shape, then cached) the :class:`GroupLayout` of a sequence.

    Parameters
    ----------
    grid : (t, h, w)
        Latent token grid; images use ``t = 1``. Any size: edge groups may be partial, and a grid
        smaller than one group is one partial group.
    group : (gt, gh, gw)
        Group size in tokens per axis.
    num_text : int
        Text tokens in the sequence.
    text_first : bool
        True when the text tokens precede the image tokens in the model's sequence.
    pattern : {"cross", "block"}
        GRAT-X or GRAT-B (see the module docstring).
    window : (rt, rh, rw)
        GRAT-B reach in groups per axis (ignored by "cross").
    tile : int, optional
        Kernel tile (16, 32, 64 or 128); default :func:`default_tile` of the group's token count.

    Examples
    --------
    >>> layout = group_layout((1, 5, 7), (1, 2, 2), num_text=3, pattern="block", window=(0, 1, 1))
    >>> layout.group_grid, layout.tile, round(layout.density, 3)
    ((1, 3, 4), 16, 0.562)
    """
    grid = _positive_triple("grid", grid)
    group = _positive_triple("group_size", group)
    window_t = tuple(int(r) for r in window)
    if len(window_t) != 3 or any(r < 0 for r in window_t):
        raise ValueError(f"`window` must be non-negative integers (t, h, w), got {window!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern!r}")
    if num_text < 0:
        raise ValueError(f"`num_text` must be >= 0, got {num_text}")
    # A group larger than the grid along an axis is clamped to the grid (one partial group there).
    group = tuple(min(g, n) for g, n in zip(group, grid))
    group_tokens = math.prod(group)
    tile = default_tile(group_tokens) if tile is None else int(tile)
    if tile not in TILE_SIZES:
        raise ValueError(f"`tile` must be one of {TILE_SIZES}, got {tile}")

    t, h, w = grid
    gt, gh, gw = group
    group_grid = (math.ceil(t / gt), math.ceil(h / gh), math.ceil(w / gw))
    # Each group gets as many whole tiles as its own token count needs: a partial edge group
    # (e.g. 2 of 8 rows) takes fewer tiles than a full one, so edge padding stays small.
    extents = [torch.clamp(n - torch.arange(count) * size, max=size) for n, count, size in zip(grid, group_grid, group)]
    group_tokens_each = (extents[0][:, None, None] * extents[1][None, :, None] * extents[2][None, None, :]).flatten()
    tiles_per_group = (group_tokens_each + tile - 1) // tile
    text_slots = math.ceil(num_text / tile) * tile
    group_start = text_slots + (torch.cumsum(tiles_per_group, 0) - tiles_per_group) * tile
    kernel_len = text_slots + int(tiles_per_group.sum()) * tile
    num_image = t * h * w
    image_offset = num_text if text_first else 0
    text_offset = 0 if text_first else num_image

    # Kernel slot of every image token: its group's slot start + its rank inside the group.
    it, ih, iw = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    group_id = ((it // gt) * group_grid[1] + ih // gh) * group_grid[2] + iw // gw
    # Rank inside the (possibly partial) group, row-major over the group's own extent.
    ext_h = torch.clamp(h - (ih // gh) * gh, max=gh)
    ext_w = torch.clamp(w - (iw // gw) * gw, max=gw)
    rank = ((it % gt) * ext_h + ih % gh) * ext_w + iw % gw
    image_slot = (group_start[group_id] + rank).flatten()

    scatter_index = torch.empty(num_text + num_image, dtype=torch.long)
    scatter_index[text_offset : text_offset + num_text] = torch.arange(num_text)
    scatter_index[image_offset : image_offset + num_image] = image_slot
    gather_index = torch.zeros(kernel_len, dtype=torch.long)
    gather_index[scatter_index] = torch.arange(num_text + num_image)
    key_valid = torch.zeros(kernel_len, dtype=torch.bool)
    key_valid[scatter_index] = True
    image_key_valid = key_valid.clone()
    image_key_valid[:text_slots] = False

    # Tile mask: text query tiles see everything; image query tiles see all text tiles and the
    # tiles of the key groups their group attends.
    num_text_tiles = text_slots // tile
    num_tiles = kernel_len // tile
    tile_mask = torch.ones(num_tiles, num_tiles, dtype=torch.bool)
    group_tiles = _group_mask(group_grid, pattern, window_t, image=t == 1)
    group_tiles = group_tiles.repeat_interleave(tiles_per_group, 0).repeat_interleave(tiles_per_group, 1)
    tile_mask[num_text_tiles:, num_text_tiles:] = group_tiles
    kv_counts, kv_indices = tile_lists(tile_mask)
    kv_indices = kv_indices[:, : int(kv_counts.max())].contiguous()

    return GroupLayout(
        grid=grid,
        group=group,
        num_text=num_text,
        text_first=text_first,
        pattern=pattern,
        window=window_t,  # type: ignore[arg-type]
        tile=tile,
        seq_len=num_text + num_image,
        kernel_len=kernel_len,
        text_slots=text_slots,
        group_grid=group_grid,
        gather_index=gather_index,
        gather_rows=torch.where(key_valid, gather_index, -1),
        scatter_index=scatter_index,
        key_valid=key_valid,
        image_key_valid=image_key_valid,
        kv_indices=kv_indices,
        kv_counts=kv_counts,
    )
