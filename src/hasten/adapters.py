"""Where are the tokens? Per diffusers model class: text order, latent grid, blocks, attention.

One small table (:data:`ADAPTERS`) keyed by transformer class name. Each entry says, for that
model, where its text tokens sit in the joint attention sequence (read from the model's own
attention processor code; see each entry's comment), how to read the latent token grid
``(t, h, w)`` from the transformer's forward call, which block lists it has (in the order that
numbers blocks for ``dense_blocks``) and which attention modules inside a block do
self/joint attention over image tokens. Nothing here knows about kernels.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

Grid = tuple[int, int, int]


def _call_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    return _forward_signature(type(module)).bind_partial(*args, **kwargs).arguments


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _per_axis(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _flux_grid(module, call) -> Grid:
    # Packed latents carry (0, row, col) ids per image token; the grid is read from them.
    img_ids = call.get("img_ids")
    if img_ids is None:
        raise ValueError("FluxTransformer2DModel was called without `img_ids`; GRAT reads the token grid from them")
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    num_image = call["hidden_states"].shape[1]
    if h * w != num_image:
        raise ValueError(
            f"GRAT needs one image grid per Flux call: img_ids span {h}x{w} = {h * w} positions but the "
            f"call has {num_image} image tokens (reference-image variants such as Kontext are not supported)"
        )
    return (1, h, w)


def _sd3_grid(module, call) -> Grid:
    p = module.config.patch_size
    height, width = call["hidden_states"].shape[-2:]
    return (1, height // p, width // p)


def _hunyuan_grid(module, call) -> Grid:
    _, _, frames, height, width = call["hidden_states"].shape
    p, p_t = module.config.patch_size, module.config.patch_size_t
    return (frames // p_t, height // p, width // p)


def _wan_grid(module, call) -> Grid:
    _, _, frames, height, width = call["hidden_states"].shape
    p_t, p_h, p_w = _per_axis(module.config.patch_size, 3)
    return (frames // p_t, height // p_h, width // p_w)


def _cogvideox_grid(module, call) -> Grid:
    _, frames, _, height, width = call["hidden_states"].shape
    p, p_t = module.config.patch_size, module.config.patch_size_t or 1
    return (frames // p_t, height // p, width // p)


def _text_tokens(module, call) -> int:
    states = call.get("encoder_hidden_states")
    return 0 if states is None else int(states.shape[1])


@dataclass(frozen=True)
class ModelAdapter:
    """What GRAT needs to know about one transformer class.

    Attributes
    ----------
    family : str
        Short name ("flux", "sd3", ...), used for per-family defaults.
    text_position : {"first", "last"}
        Where text tokens sit in the joint attention sequence.
    block_lists : tuple[str, ...]
        Attribute names of the block ``ModuleList``s, in the order that numbers blocks.
    attention_names : tuple[str, ...]
        Attribute names, inside a block, of the attention modules GRAT takes over (self/joint
        attention over the image tokens; cross-attention to text stays dense).
    read_grid : callable(module, call_arguments) -> (t, h, w)
        The latent token grid of a forward call.
    default_group : (t, h, w)
        Group size used when the caller gives none.
    video : bool
        Whether the model's grid has a time axis.
    """

    family: str
    text_position: Literal["first", "last"]
    block_lists: tuple[str, ...]
    attention_names: tuple[str, ...]
    read_grid: Callable[[torch.nn.Module, dict], Grid]
    default_group: Grid
    video: bool
    read_text_tokens: Callable[[torch.nn.Module, dict], int] = _text_tokens

    def observe(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Grid, int, Any]:
        """(grid, text tokens, timestep) of one forward call of ``module``."""
        call = _call_arguments(module, args, kwargs)
        return self.read_grid(module, call), self.read_text_tokens(module, call), call.get("timestep")

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
        """(block index, qualified name, attention module) for every attention GRAT takes over."""
        found = []
        index = 0
        for list_name in self.block_lists:
            for position, block in enumerate(getattr(transformer, list_name, None) or ()):
                for attr in self.attention_names:
                    attention = getattr(block, attr, None)
                    if attention is not None and hasattr(attention, "processor"):
                        found.append((index, f"{list_name}.{position}.{attr}", attention))
                index += 1
        return found

    def num_blocks(self, transformer: torch.nn.Module) -> int:
        return sum(len(getattr(transformer, name, None) or ()) for name in self.block_lists)


ADAPTERS: dict[str, ModelAdapter] = {
    # FluxAttnProcessor: torch.cat([encoder_query, query]) -> text FIRST; single-stream blocks get
    # hidden_states = cat([text, image]) from the transformer -> text first as well.
    "FluxTransformer2DModel": ModelAdapter(
        family="flux",
        text_position="first",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        attention_names=("attn",),
        read_grid=_flux_grid,
        default_group=(1, 16, 16),
        video=False,
    ),
    # JointAttnProcessor2_0: torch.cat([query, encoder_query]) -> text LAST. SD3.5's `attn2`
    # (dual attention) is image-only self-attention.
    "SD3Transformer2DModel": ModelAdapter(
        family="sd3",
        text_position="last",
        block_lists=("transformer_blocks",),
        attention_names=("attn", "attn2"),
        read_grid=_sd3_grid,
        default_group=(1, 16, 16),
        video=False,
    ),
    # HunyuanVideoAttnProcessor2_0: cat([query, encoder_query]) (dual) and
    # cat([hidden_states, encoder_hidden_states]) (single) -> text LAST, padded text masked.
    "HunyuanVideoTransformer3DModel": ModelAdapter(
        family="hunyuan-video",
        text_position="last",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        attention_names=("attn",),
        read_grid=_hunyuan_grid,
        default_group=(4, 8, 8),  # the official GRAT HunyuanVideo config
        video=True,
    ),
    # WanAttnProcessor: attn1 is self-attention over video tokens only; attn2 (text) stays dense.
    "WanTransformer3DModel": ModelAdapter(
        family="wan",
        text_position="first",  # no text tokens in attn1
        block_lists=("blocks",),
        attention_names=("attn1",),
        read_grid=_wan_grid,
        default_group=(4, 8, 8),
        video=True,
        read_text_tokens=lambda module, call: 0,
    ),
    # CogVideoXAttnProcessor2_0: torch.cat([encoder_hidden_states, hidden_states]) -> text FIRST.
    "CogVideoXTransformer3DModel": ModelAdapter(
        family="cogvideox",
        text_position="first",
        block_lists=("transformer_blocks",),
        attention_names=("attn1",),
        read_grid=_cogvideox_grid,
        default_group=(4, 8, 8),
        video=True,
    ),
}


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    """The :class:`ModelAdapter` of ``transformer`` (unwrapping ``torch.compile``), or a ValueError
    listing the supported classes."""
    module = getattr(transformer, "_orig_mod", transformer)
    for cls in type(module).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise ValueError(
        f"GRAT does not support {type(module).__name__}; supported transformer classes: "
        f"{', '.join(sorted(ADAPTERS))}"
    )

