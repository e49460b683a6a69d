"""GRAT-X as band attention: one band per grid axis, merged by log-sum-exp.

A query group of the criss-cross pattern attends the key groups that share a group coordinate
with it: its row band and its column band on an image; on a video also its time slab (the frames
of its time group). Each of those key sets is a whole *band* of the grid along one axis, so
instead of gathering a key list per query tile (the reference backend, which copies every key
once per query tile that reads it), this backend runs attention band by band, axis by axis:

* **first axis** (a video's time slabs, an image's row bands: contiguous in the model's
  row-major order): the tokens of a band attend the keys of that band plus the text keys;
* **each later axis** (one permuted copy of q/k/v with that axis outermost): the tokens of a
  band attend the keys of that band *except those sharing a group coordinate with them on an
  earlier axis* (a fixed additive mask), so that no key is counted twice;
* the partial softmaxes are merged exactly with their log-sum-exps;
* text queries attend every key (one dense call).

An axis cut into a single group shares its band with every token, so later axes add no key and
are skipped (a video whose frames fit in one time group is dense, as the rule says). Each part is
one fused SDPA call over all equal-sized bands (plus one for a partial edge band), so the work is
the pattern's own (bar the masked keys of the later axes) and no key is copied more than once.
:func:`supports` says which layouts (the cross pattern with text-only key padding). On CPU the
per-row log-sum-exp comes from PyTorch's fused flash kernel; elsewhere it is computed from the
scores (exact, not fast).
"""

from __future__ import annotations

import functools

import torch

from .grouping import GroupLayout
from .partial import additive, assemble, attention_lse, image_keys_unmasked, image_slice, merge, text_slice


def supports(layout: GroupLayout, key_padding: torch.Tensor | None = None) -> bool:
    """Whether :func:`band_cross_attention` computes ``layout``: GRAT-X (an image or a video), with
    any masked keys among the text keys only."""
    if layout.pattern != "cross":
        return False
    return image_keys_unmasked(layout, key_padding)


def _axes(layout: GroupLayout) -> tuple[int, ...]:
    """The grid axes (0 time, 1 rows, 2 columns) whose shared group makes a key visible, in model order:
    rows and columns on an image (one frame: the time coordinate is shared by all), all three on a video."""
    return (1, 2) if layout.grid[0] == 1 else (0, 1, 2)


@functools.lru_cache(maxsize=32)
def _exclusion_bias(
    size: int,
    lengths: tuple[int, ...],
    runs: tuple[int | None, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive bias of a band of ``size`` positions along its axis by ``lengths`` along the other
    axes (tokens in that order): -inf where query and key share a run of ``runs[i]`` positions along
    other axis ``i`` (a group coordinate of an earlier axis; None: not compared). Built once per shape:
    an image column band at Flux 2048² is 2048 x 2048."""
    coords = torch.meshgrid(*(torch.arange(n, device=device) for n in (size, *lengths)), indexing="ij")
    shared = torch.zeros((), dtype=torch.bool, device=device)
    for coord, run in zip(coords[1:], runs):
        if run is not None:
            index = (coord // run).flatten()
            shared = shared | (index[:, None] == index[None, :])
    return additive(~shared, dtype)


def _band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: int,
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    exclude: tuple[tuple[int, ...], tuple[int | None, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside bands of ``band`` positions of a (B, H, L, M, D) grid (the last band may be shorter).

    ``extra`` = (keys, values, valid) of shape (B, H, T, D), (B, H, T, D), (B or 1, T) or None: keys
    every band also attends (text). ``exclude`` = (lengths, runs): the M positions are a grid of
    ``lengths``, and a query does not attend band keys in the same run of ``runs[i]`` positions as
    itself along any axis ``i`` with a run (its group on an earlier axis; see :func:`_exclusion_bias`).
    The first axis passes ``extra``, later axes ``exclude``; never both.
    Returns the output (B, H, L, M, D) and the log-sum-exp (B, H, L, M).
    """
    if extra is not None and exclude is not None:
        raise ValueError("`extra` and `exclude` are not combined (one bias per call)")
    batch, heads, length, width, dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1])
    full = length // band
    for start, size, count in ((0, band, full), (full * band, length - full * band, 1)):
        if not size or not count:
            continue
        stop = start + size * count

        def bands(x: torch.Tensor) -> torch.Tensor:
            return x[:, :, start:stop].reshape(batch, heads * count, size * width, dim)

        keys, values, bias = bands(k), bands(v), None
        if exclude is not None:
            bias = _exclusion_bias(size, *exclude, q.dtype, q.device)
        if extra is not None:
            text_k, text_v, text_valid = extra
            num_text = text_k.shape[2]

            def repeat(x: torch.Tensor) -> torch.Tensor:
                return (
                    x[:, :, None]
                    .expand(batch, heads, count, num_text, dim)
                    .reshape(batch, heads * count, num_text, dim)
                )

            keys, values = torch.cat([repeat(text_k), keys], 2), torch.cat([repeat(text_v), values], 2)
            if text_valid is not None:
                image_valid = torch.ones(text_valid.shape[0], size * width, dtype=torch.bool, device=q.device)
                bias = additive(torch.cat([text_valid, image_valid], 1)[:, None, None, :], q.dtype)
        o, row_lse = attention_lse(bands(q), keys, values, bias, scale)
        out[:, :, start:stop] = o.reshape(batch, heads, count * size, width, dim)
        lse[:, :, start:stop] = row_lse.reshape(batch, heads, count * size, width)
    return out, lse


def band_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """GRAT-X attention of ``layout`` in model order, by bands (see the module docstring).

    Same contract as :func:`hasten.kernels.grouped_attention`; the result equals the reference
    backend's to float rounding. Raises ``ValueError`` where :func:`supports` is False.

    Examples
    --------
    >>> import torch
    >>> from hasten.kernels import group_layout, grouped_attention
    >>> from hasten.kernels.bands import band_cross_attention
    >>> layout = group_layout((3, 6, 10), (1, 4, 4), num_text=3, pattern="cross")  # a 3-frame video
    >>> q, k, v = torch.randn(3, 1, 2, layout.seq_len, 16)
    >>> bands = band_cross_attention(q, k, v, layout)
    >>> torch.allclose(bands, grouped_attention(q, k, v, layout, backend="reference"), atol=1e-5)
    True
    """
    if not supports(layout, key_padding):
        raise ValueError(
            "band attention computes GRAT-X (pattern='cross') with only text keys masked; "
            f"got pattern={layout.pattern!r} and image keys masked by `key_padding`"
            if layout.pattern == "cross"
            else f"band attention computes GRAT-X (pattern='cross'); got pattern={layout.pattern!r}"
        )
    if query.shape[-2] != layout.seq_len:
        raise ValueError(f"query has {query.shape[-2]} tokens but the layout is for {layout.seq_len}")
    dim = query.shape[-1]
    scale = dim**-0.5 if scale is None else float(scale)
    grid, group = layout.grid, layout.group
    image, text = image_slice(layout), text_slice(layout)
    q, k, v = (x[:, :, image].unflatten(2, grid) for x in (query, key, value))  # (B, H, t, h, w, D)
    text_valid = None if key_padding is None else key_padding[:, text]
    if text_valid is not None and text_valid.all():
        text_valid = None
    extra = (key[:, :, text], value[:, :, text], text_valid) if layout.num_text else None

    axes = _axes(layout)
    out = lse = None
    for index, axis in enumerate(axes):
        earlier = axes[:index]
        if any(grid[e] <= group[e] for e in earlier):  # an earlier band holds every key already
            break
        others = tuple(d for d in range(3) if d != axis)
        order = (axis, *others)

        def to_bands(x: torch.Tensor, order: tuple[int, ...] = order) -> torch.Tensor:
            return x.permute(0, 1, *(2 + d for d in order), 5).flatten(3, 4)

        exclude = None
        if earlier:
            exclude = (tuple(grid[d] for d in others), tuple(group[d] if d in earlier else None for d in others))
        part, part_lse = _band_attention(
            to_bands(q),
            to_bands(k),
            to_bands(v),
            group[axis],
            scale,
            extra=extra if not earlier else None,
            exclude=exclude,
        )
        back = (0, 1, *(2 + order.index(d) for d in range(3)))
        part = part.unflatten(3, tuple(grid[d] for d in others)).permute(*back, 5)
        part_lse = part_lse.unflatten(3, tuple(grid[d] for d in others)).permute(*back)
        if out is None:
            out, lse = part, part_lse
            continue
        out, lse = merge(out, lse, part, part_lse, with_lse=index + 1 < len(axes))  # another axis follows?
    return assemble(out.flatten(2, 4), query, key, value, layout, key_padding, scale)
