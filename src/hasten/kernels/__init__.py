"""Pure compute, no model knowledge: block-sparse attention over tile lists.

Three backends share one contract (:func:`block_sparse_attention`):

``"reference"``
    plain torch, exact, any device: gathers each query tile's key tiles and runs PyTorch's
    fused SDPA on them (measured: 1.9x over dense SDPA at Flux 2048² GRAT-X where compiled flex
    reaches 1.2x; benchmarks/results/).
``"flex"``
    compiled PyTorch FlexAttention with a BlockMask built from the tile lists.
``"triton"``
    a block-sparse flash-attention forward kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

Two more work on a grouped layout only (:func:`grouped_attention`), where they know the groups:

``"bands"``
    GRAT-X as band attention, one band per grid axis (rows and columns; on a video also time
    slabs), merged by log-sum-exp (:mod:`hasten.kernels.bands`): no key is copied per query tile,
    so small groups cost what their pattern computes. The fastest path on CPU (4x over dense SDPA
    at 64 x 64 tokens with 4 x 4 groups, where the reference gather is 2x slower than dense;
    1.5-1.8x at a HunyuanVideo shape, where the reference is 1x; benchmarks/results/).
``"windows"``
    GRAT-B as window attention (:mod:`hasten.kernels.windows`): query tiles of whole groups, each
    with the box of key groups its window reaches, cut from the grid as strided windows and run as
    one fused SDPA call (no per-group key lists).

``"auto"`` means Triton on CUDA; elsewhere (CPU, MPS) bands for GRAT-X and windows for GRAT-B on an
image with small groups (:func:`hasten.kernels.windows.preferred`) where the layout allows them (only
text keys masked), else the reference.

The call goes through the custom op ``hasten::block_sparse_attention`` (and the fused grouped
call through ``hasten::grouped_block_sparse_attention``) so that
``torch.compile`` of a model treats it as one opaque node (no graph breaks, no recompiles).
"""

from __future__ import annotations

import os

import torch

from . import bands, windows
from .flex import flex_block_sparse_attention
from .grouping import PATTERNS, TILE_SIZES, GroupLayout, default_tile, group_layout
from .reference import reference_block_sparse_attention

BACKENDS: tuple[str, ...] = ("auto", "flex", "triton", "reference", "bands", "windows")
GROUPED_BACKENDS: dict[str, str] = {"bands": "cross", "windows": "block"}
"""The backends that need a grouped layout (:func:`grouped_attention`), and the one pattern each computes."""
_GROUPED = {"bands": (bands, "GRAT-X"), "windows": (windows, "GRAT-B")}

__all__ = [
    "BACKENDS",
    "GROUPED_BACKENDS",
    "PATTERNS",
    "TILE_SIZES",
    "GroupLayout",
    "block_sparse_attention",
    "default_tile",
    "grouped_attention",
    "grouped_backend",
    "group_layout",
    "resolve_backend",
]


def _triton_usable(device: torch.device) -> bool:
    """Triton imports and can run on ``device`` (CUDA, or any device under TRITON_INTERPRET=1)."""
    if not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    from .triton_block_sparse import triton_available  # imports triton: only when a GPU (or the interpreter) can use it

    return triton_available()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means on ``device`` for a tile-list call ("auto" -> triton on
    CUDA, else reference); :func:`grouped_attention` may pick ``"bands"`` or ``"windows"`` for "auto" off
    CUDA."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "reference"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1); got device {device}"
        )
    return backend


def _validate_qkv(q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (batch, heads, seq, dim) shape; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )


def _validate(q, k, v, kv_indices, kv_counts, key_valid, tile):
    _validate_qkv(q, k, v)
    if tile not in TILE_SIZES:
        raise ValueError(f"`tile` must be one of {TILE_SIZES}, got {tile}")
    batch, _, seq, _ = q.shape
    if seq % tile:
        raise ValueError(f"sequence length {seq} is not a multiple of `tile` {tile}")
    num_tiles = seq // tile
    if kv_indices.dim() != 2 or kv_indices.shape[0] != num_tiles or kv_counts.shape != (num_tiles,):
        raise ValueError(
            f"`kv_indices` must be (num_tiles={num_tiles}, max_kv) and `kv_counts` (num_tiles,); got "
            f"{tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}"
        )
    if key_valid.dtype != torch.bool or key_valid.shape[-1] != seq or key_valid.shape[0] not in (1, batch):
        raise ValueError(
            f"`key_valid` must be a bool ({batch} or 1, {seq}) tensor, got {key_valid.dtype} {tuple(key_valid.shape)}"
        )


@torch.library.custom_op("hasten::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    static_valid: torch.Tensor | None,
    tile: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":  # the kernel reads one mask row per batch row: broadcast (1, S) as a view
        key_valid = key_valid.expand(q.shape[0], -1)
        from .triton_block_sparse import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, scale)
    if backend == "flex":
        return flex_block_sparse_attention(
            q, k, v, kv_indices, kv_counts, key_valid, tile, scale, static_valid=static_valid
        )
    return reference_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, scale)


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, key_valid, static_valid, tile, scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("hasten::grouped_block_sparse_attention", mutates_args=())
def _grouped_triton_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel reading q/k/v in model order through ``rows`` and writing its output back
    through it: gather, block-sparse attention and scatter in one launch."""
    key_valid = key_valid.expand(q.shape[0], -1)
    from .triton_block_sparse import triton_block_sparse_attention

    return triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, key_valid, tile, scale, rows=rows)


@_grouped_triton_op.register_fake
def _(q, k, v, rows, kv_indices, kv_counts, key_valid, tile, scale):
    return torch.empty_like(q)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float | None = None,
    backend: str = "auto",
    static_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in which each query tile attends only the key tiles listed for it.

    Parameters
    ----------
    q, k, v : Tensor (batch, heads, seq, dim)
        ``seq`` is a multiple of ``tile``.
    kv_indices : IntTensor (num_tiles, max_kv)
        Key tiles each query tile attends (ascending); entries past ``kv_counts`` are ignored.
    kv_counts : IntTensor (num_tiles,)
    key_valid : BoolTensor (batch or 1, seq)
        Keys that may be attended. Query rows with no valid key return zeros.
    tile : int
        Tokens per tile, one of 16, 32, 64, 128.
    scale : float, optional
        Softmax scale, default ``dim ** -0.5``.
    backend : {"auto", "flex", "triton", "reference"}
    static_valid : BoolTensor (seq,), optional
        Keys valid on every call (lets the flex backend skip its mask on those tiles).

    Examples
    --------
    >>> import torch
    >>> from hasten.kernels import block_sparse_attention, group_layout
    >>> layout = group_layout((1, 4, 4), (1, 2, 2), num_text=0, pattern="block", window=(0, 0, 0))
    >>> q = k = v = torch.randn(1, 2, layout.kernel_len, 16)
    >>> out = block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts,
    ...                              layout.key_valid[None], layout.tile, backend="reference")
    >>> out.shape
    torch.Size([1, 2, 64, 16])
    """
    _validate(q, k, v, kv_indices, kv_counts, key_valid, tile)
    if backend in _GROUPED:
        raise ValueError(f"backend={backend!r} needs the groups: call grouped_attention with a GroupLayout")
    backend = resolve_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _block_sparse_attention_op(q, k, v, kv_indices, kv_counts, key_valid, static_valid, tile, scale, backend)


def grouped_backend(
    backend: str, layout: GroupLayout, device: torch.device | str, key_padding: torch.Tensor | None = None
) -> str:
    """The concrete backend :func:`grouped_attention` runs for ``layout`` on ``device``: as
    :func:`resolve_backend`, except that "auto" off CUDA means "bands" (GRAT-X) or "windows" (GRAT-B on an
    image with small groups: :func:`hasten.kernels.windows.preferred`) where the layout allows it (only
    text keys masked by ``key_padding``).

    Examples
    --------
    >>> from hasten.kernels import group_layout, grouped_backend
    >>> grouped_backend("auto", group_layout((1, 8, 8), (1, 4, 4), pattern="cross"), "cpu")
    'bands'
    >>> grouped_backend("auto", group_layout((1, 8, 8), (1, 4, 4), pattern="block"), "cpu")
    'windows'
    >>> grouped_backend("auto", group_layout((1, 64, 64), (1, 16, 16), pattern="block"), "cpu")
    'reference'
    """
    if backend in _GROUPED:
        (module, name), pattern = _GROUPED[backend], GROUPED_BACKENDS[backend]
        if not module.supports(layout, key_padding):
            raise ValueError(
                f"backend={backend!r} computes {name} (pattern={pattern!r}) with only text keys masked; got "
                f"pattern={layout.pattern!r}, grid={layout.grid}: use 'auto' or 'reference'"
            )
        return backend
    concrete = resolve_backend(backend, device)
    if backend == "auto" and concrete == "reference":
        if bands.supports(layout, key_padding):
            return "bands"
        if windows.supports(layout, key_padding) and windows.preferred(layout):
            return "windows"
    return concrete


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped block-sparse attention over a sequence in the model's own token order.

    The attention runs in the layout's kernel order (text, then each group contiguous and
    tile-padded); the result comes back in model order (padding rows dropped). With the
    ``"triton"`` backend (``"auto"`` on CUDA) that is one kernel launch (custom op
    ``hasten::grouped_block_sparse_attention``): the kernel loads query, key and value rows
    through the layout's gather index and stores each output row at its model position, so no
    permuted copy of q/k/v or of the output is made. The ``"bands"`` and ``"windows"`` backends
    (:func:`grouped_backend` says when ``"auto"`` picks them) work in model order too. The other
    backends gather q/k/v with ``index_select``, run :func:`block_sparse_attention` and scatter
    the result back.

    Parameters
    ----------
    query, key, value : Tensor (batch, heads, layout.seq_len, dim)
    layout : GroupLayout
        From :func:`group_layout`, on the tensors' device (``layout.to(device)``).
    key_padding : BoolTensor (batch or 1, layout.seq_len), optional
        False marks keys never to attend (e.g. padded text), in model order.

    Examples
    --------
    >>> import torch
    >>> from hasten.kernels import group_layout, grouped_attention
    >>> layout = group_layout((1, 5, 7), (1, 2, 2), num_text=4, pattern="cross")
    >>> q = k = v = torch.randn(1, 2, layout.seq_len, 16)
    >>> grouped_attention(q, k, v, layout, backend="reference").shape
    torch.Size([1, 2, 39, 16])
    """
    if query.shape[-2] != layout.seq_len:
        raise ValueError(f"query has {query.shape[-2]} tokens but the layout is for {layout.seq_len}")
    index = layout.gather_index
    backend = grouped_backend(backend, layout, query.device, key_padding)
    if backend == "bands":
        return bands.band_cross_attention(query, key, value, layout, key_padding, scale)
    if backend == "windows":
        return windows.window_block_attention(query, key, value, layout, key_padding, scale)
    if backend == "triton":
        _validate_qkv(query, key, value)
        key_valid = layout.key_valid[None]
        if key_padding is not None:
            key_valid = key_valid & key_padding.index_select(1, index)  # a bool mask: (batch, kernel_len)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        return _grouped_triton_op(
            query, key, value, layout.gather_rows, layout.kv_indices, layout.kv_counts, key_valid, layout.tile, scale
        )
    if key_padding is None:
        key_valid, static_valid = layout.key_valid[None], layout.key_valid
    else:
        key_valid = layout.key_valid[None] & key_padding.index_select(1, index)
        static_valid = layout.image_key_valid
    out = block_sparse_attention(
        query.index_select(-2, index),
        key.index_select(-2, index),
        value.index_select(-2, index),
        layout.kv_indices,
        layout.kv_counts,
        key_valid,
        layout.tile,
        scale=scale,
        backend=backend,
        static_valid=static_valid,
    )
    return out.index_select(-2, layout.scatter_index)
