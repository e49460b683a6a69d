"""Partial softmax attention, shared by the group-aware CPU backends (:mod:`.bands`, :mod:`.windows`).

Both split a grouped layout's attention into parts over disjoint key sets, run each as fused SDPA
with its per-row log-sum-exp, merge the parts exactly (:func:`merge`), and let the text queries
attend every key in one dense call (:func:`assemble`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .grouping import GroupLayout


def image_slice(layout: GroupLayout) -> slice:
    """The image (or video) tokens of ``layout`` in model order."""
    start = layout.num_text if layout.text_first else 0
    return slice(start, start + math.prod(layout.grid))


def text_slice(layout: GroupLayout) -> slice:
    """The text tokens of ``layout`` in model order."""
    start = 0 if layout.text_first else math.prod(layout.grid)
    return slice(start, start + layout.num_text)


def image_keys_unmasked(layout: GroupLayout, key_padding: torch.Tensor | None) -> bool:
    """True when ``key_padding`` masks text keys only (what the group-aware backends compute)."""
    return key_padding is None or bool(key_padding[:, image_slice(layout)].all())


def additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive bias: 0 where valid, -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its per-row log-sum-exp (``bias``: additive, broadcastable to the scores).
    On CPU both come from PyTorch's fused flash kernel; elsewhere from the scores (exact, not fast)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor, with_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The softmax attention over two disjoint key sets from each set's output and log-sum-exp
    (``(..., D)`` and ``(...)``); the merged log-sum-exp too when ``with_lse`` (another part follows)."""
    top = torch.maximum(lse, part_lse)
    w_out, w_part = torch.exp(lse - top), torch.exp(part_lse - top)
    total = w_out + w_part
    merged = (out * w_out[..., None] + part * w_part[..., None]) / total[..., None]
    return merged, (top + torch.log(total)) if with_lse else None


def assemble(
    image_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    key_padding: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The layout's output in model order: ``image_out`` (B, H, image tokens, D) for the image queries,
    and the text queries attending every (unmasked) key, one dense SDPA call."""
    result = query.new_empty(query.shape)
    result[:, :, image_slice(layout)] = image_out
    if layout.num_text:
        text = text_slice(layout)
        mask = None if key_padding is None else key_padding[:, None, None, :]
        result[:, :, text] = F.scaled_dot_product_attention(query[:, :, text], key, value, attn_mask=mask, scale=scale)
    return result
