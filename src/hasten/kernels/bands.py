"""GRAT-X on an image as band attention: row bands and column bands, merged by log-sum-exp.

A query group of the criss-cross pattern attends the key groups of its own row band and of its
own column band (and every text key). Those two key sets are whole bands of the token grid, so
instead of gathering a key list per query tile (the reference backend, which copies every key
once per query tile that reads it), this backend runs attention band by band:

* **row part**: the tokens of row band ``r`` (``gh`` grid rows, contiguous in the model's
  row-major order) attend the keys of that band plus the text keys;
* **column part**: the tokens of column band ``c`` (``gw`` grid columns, one transposed copy of
  q/k/v) attend the keys of that band *except those of their own row band* (a fixed additive
  mask), so that no key is counted twice;
* the two partial softmaxes are merged exactly with their log-sum-exps;
* text queries attend every key (one dense call).

Each part is one fused SDPA call over all equal-sized bands (plus one for a partial edge band),
so the work is the pattern's own and no key is copied more than once. It applies to images
(a one-frame grid) with the cross pattern and text-only key padding; :func:`supports` says
when. On CPU the per-row log-sum-exp comes from PyTorch's fused flash kernel; elsewhere it is
computed from the scores (exact, not fast).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .grouping import GroupLayout


def supports(layout: GroupLayout, key_padding: torch.Tensor | None = None) -> bool:
    """Whether :func:`band_cross_attention` computes ``layout``: GRAT-X on a one-frame grid, with
    any masked keys among the text keys only."""
    if layout.pattern != "cross" or layout.grid[0] != 1:
        return False
    if key_padding is None:
        return True
    return bool(key_padding[:, _image_slice(layout)].all())


def _image_slice(layout: GroupLayout) -> slice:
    start = layout.num_text if layout.text_first else 0
    return slice(start, start + layout.grid[1] * layout.grid[2])


def _text_slice(layout: GroupLayout) -> slice:
    start = 0 if layout.text_first else layout.grid[1] * layout.grid[2]
    return slice(start, start + layout.num_text)


def _attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its per-row log-sum-exp (``bias``: additive, broadcastable to the scores)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


@functools.lru_cache(maxsize=32)
def _exclusion_bias(size: int, width: int, run: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size*width, size*width) additive bias of a column band of ``size`` columns and ``width`` rows:
    -inf where query and key lie in the same run of ``run`` rows (their shared row band). Built once per
    shape: at Flux 2048² one is 2048 x 2048."""
    index = (torch.arange(width, device=device) // run).repeat(size)
    return _additive(index[:, None] != index[None, :], dtype)


def _band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: int,
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    exclude_band: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside bands of ``band`` rows of a (B, H, L, M, D) grid (the last band may be shorter).

    ``extra`` = (keys, values, valid) of shape (B, H, T, D), (B, H, T, D), (B or 1, T) or None: keys
    every band also attends (text). ``exclude_band``: a query does not attend band keys in its own
    run of ``exclude_band`` positions along M (the row band a column band's query belongs to). The
    row part passes ``extra``, the column part ``exclude_band``; never both.
    Returns the output (B, H, L, M, D) and the log-sum-exp (B, H, L, M).
    """
    if extra is not None and exclude_band is not None:
        raise ValueError("`extra` and `exclude_band` are not combined (one bias per call)")
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
        if exclude_band is not None:
            bias = _exclusion_bias(size, width, exclude_band, q.dtype, q.device)
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
                bias = _additive(torch.cat([text_valid, image_valid], 1)[:, None, None, :], q.dtype)
        o, row_lse = _attention_lse(bands(q), keys, values, bias, scale)
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
    """GRAT-X attention of a one-frame ``layout`` in model order, by bands (see the module docstring).

    Same contract as :func:`hasten.kernels.grouped_attention`; the result equals the reference
    backend's to float rounding. Raises ``ValueError`` where :func:`supports` is False.

    Examples
    --------
    >>> import torch
    >>> from hasten.kernels import group_layout, grouped_attention
    >>> from hasten.kernels.bands import band_cross_attention
    >>> layout = group_layout((1, 6, 10), (1, 4, 4), num_text=3, pattern="cross")
    >>> q, k, v = torch.randn(3, 1, 2, layout.seq_len, 16)
    >>> bands = band_cross_attention(q, k, v, layout)
    >>> torch.allclose(bands, grouped_attention(q, k, v, layout, backend="reference"), atol=1e-5)
    True
    """
    if not supports(layout, key_padding):
        raise ValueError(
            "band attention computes GRAT-X (pattern='cross') on a one-frame grid with only text keys masked; "
            f"got pattern={layout.pattern!r}, grid={layout.grid}"
        )
    if query.shape[-2] != layout.seq_len:
        raise ValueError(f"query has {query.shape[-2]} tokens but the layout is for {layout.seq_len}")
    batch, heads, _, dim = query.shape
    scale = dim**-0.5 if scale is None else float(scale)
    _, height, width = layout.grid
    _, group_h, group_w = layout.group
    image, text = _image_slice(layout), _text_slice(layout)

    def grid(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, image].unflatten(2, (height, width))

    q, k, v = grid(query), grid(key), grid(value)
    text_valid = None if key_padding is None else key_padding[:, text]
    if text_valid is not None and text_valid.all():
        text_valid = None
    extra = (key[:, :, text], value[:, :, text], text_valid) if layout.num_text else None

    out, lse = _band_attention(q, k, v, group_h, scale, extra=extra)
    if height > group_h:  # more than one row band: add the column bands' keys outside the query's row band
        column = [x.transpose(2, 3) for x in (q, k, v)]
        out_c, lse_c = _band_attention(*column, group_w, scale, exclude_band=group_h)
        out_c, lse_c = out_c.transpose(2, 3), lse_c.transpose(2, 3)
        top = torch.maximum(lse, lse_c)
        w_row, w_col = torch.exp(lse - top)[..., None], torch.exp(lse_c - top)[..., None]
        out = (out * w_row + out_c * w_col) / (w_row + w_col)

    result = query.new_empty(query.shape)
    result[:, :, image] = out.flatten(2, 3)
    if layout.num_text:
        mask = None if key_padding is None else key_padding[:, None, None, :]
        result[:, :, text] = F.scaled_dot_product_attention(query[:, :, text], key, value, attn_mask=mask, scale=scale)
    return result
