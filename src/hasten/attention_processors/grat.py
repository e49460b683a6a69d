"""GRAT attention processor: the model's own processor, with its attention call made block-sparse.

:class:`GratAttnProcessor` wraps the processor a diffusers attention module already has and
runs it unchanged -- its projections (LoRA layers included), QK norms and rotary embeddings
-- except for the one ``F.scaled_dot_product_attention`` call inside it (directly, or through
diffusers' ``dispatch_attention_fn`` native backend). That call is redirected, through a
:class:`~torch.overrides.TorchFunctionMode` active only while the wrapped processor runs,
to grouped block-sparse attention:

:func:`hasten.kernels.grouped_attention` (gather into groups, block-sparse kernel, scatter back).

The layout (one per sequence length, built once per shape) is prepared by the transformer
hook in :mod:`hasten.pipelines.grat` and read from the shared :class:`GratState`.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels import GroupLayout, grouped_attention


@dataclass
class GratState:
    """Per-transformer GRAT state, shared by its hook and processors.

    Attributes
    ----------
    layouts : dict[int, GroupLayout]
        Layout per attention sequence length for the current call (joint text+image, image only).
    sparse : bool
        Whether the current forward call uses sparse attention (False during ``dense_steps``).
    step : int
        Denoising step index of the current call (counted from timestep changes).
    grid : (t, h, w) or None
        Latent token grid of the current call.
    """

    layouts: dict[int, GroupLayout] = field(default_factory=dict)
    sparse: bool = True
    step: int = -1
    last_timestep: float | None = None
    grid: tuple[int, int, int] | None = None
    shape_key: tuple | None = None


def _key_padding(attn_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A key-padding mask (batch or 1, seq) bool from an SDPA ``attn_mask`` that varies only over keys
    (bool, or additive with 0 for kept keys and -inf / the dtype's minimum for masked ones)."""
    if attn_mask.shape[-1] != seq_len or any(size != 1 for size in attn_mask.shape[1:-1]):
        raise ValueError(
            "GRAT supports attention masks that only mask keys (shape (batch, 1, 1, seq) or (batch, seq)); "
            f"got attn_mask of shape {tuple(attn_mask.shape)}"
        )
    mask = attn_mask.reshape(attn_mask.shape[0], seq_len)
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class _SparseSDPA(TorchFunctionMode):
    """Redirects ``F.scaled_dot_product_attention`` to the processor's sparse attention."""

    def __init__(self, processor: "GratAttnProcessor"):
        super().__init__()
        self.processor = processor
        self.redirected = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.redirected = True
            return self.processor.attend(*args, **kwargs)
        return func(*args, **kwargs)


class GratAttnProcessor:
    """Wraps an attention module's processor so that its attention is GRAT block-sparse.

    Parameters
    ----------
    original : callable
        The processor the module had (restored by ``disable_grat``).
    state : GratState
        Shared with the transformer hook (layouts of the current call, dense/sparse step).
    backend : str
        Kernel backend ("auto", "flex", "triton", "reference").
    """

    def __init__(self, original: Any, state: GratState, backend: str):
        self.original = original
        self.state = state
        self.backend = backend
        # diffusers' Attention.forward drops every keyword argument that the processor's __call__
        # signature does not name (e.g. CogVideoX's and HunyuanVideo's `image_rotary_emb`), so this
        # instance shows the wrapped processor's signature to `inspect`.
        signature = inspect.signature(original.__call__)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)

        def call(processor, attn, *args, **kwargs):
            return type(processor).__call__(processor, attn, *args, **kwargs)

        call.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
        self.__call__ = types.MethodType(call, self)

    def __call__(self, attn: torch.nn.Module, *args, **kwargs):
        if not self.state.sparse:
            return self.original(attn, *args, **kwargs)
        mode = _SparseSDPA(self)
        with mode:
            out = self.original(attn, *args, **kwargs)
        if not mode.redirected and not torch.compiler.is_compiling():
            backend = getattr(self.original, "_attention_backend", None)
            raise ValueError(
                f"GRAT found no scaled_dot_product_attention call in {type(self.original).__name__} "
                f"(attention backend {backend!r}); GRAT needs diffusers' native attention backend"
            )
        return out

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """Grouped block-sparse replacement for ``F.scaled_dot_product_attention`` (same signature)."""
        seq_len = query.shape[-2]
        if is_causal or dropout_p:
            raise ValueError("GRAT attention is non-causal inference attention (is_causal=False, dropout_p=0)")
        if key.shape[-2] != seq_len or key.shape[:-2] != query.shape[:-2]:
            raise ValueError(
                f"GRAT replaces self/joint attention only; got query {tuple(query.shape)} and key {tuple(key.shape)}"
            )
        layout = self.state.layouts.get(seq_len)
        if layout is None:
            raise ValueError(
                f"GRAT has no token layout for an attention over {seq_len} tokens (known lengths: "
                f"{sorted(self.state.layouts)}); the transformer hook did not see this call's grid"
            )
        padding = None if attn_mask is None else _key_padding(attn_mask, seq_len)
        return grouped_attention(query, key, value, layout, padding, scale=scale, backend=self.backend)
