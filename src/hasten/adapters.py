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

import numpy as np
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
        f"GRAT does not support {type(module).__name__}; supported transformer classes: {', '.join(sorted(ADAPTERS))}"
    )


# --- pipeline facts: what a diffusers pipeline's own ``__call__`` would do ----------------------------
# Editing pipelines sample outside the pipeline's ``__call__`` (inversion, two branches in one batch), so
# they take the pipeline's own defaults and schedules from here, read from the installed diffusers code
# where possible, instead of re-deriving them.


def _flux_schedule(pipe: Any, steps: int, tokens: int) -> dict[str, Any]:
    # FluxPipeline.__call__: sigmas linspace(1, 1/n, n) (none with flow sigmas), mu from the packed token count
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return {"sigmas": sigmas, "mu": mu} if sigmas is not None else {"num_inference_steps": steps, "mu": mu}


def _sd3_schedule(pipe: Any, steps: int, tokens: int) -> dict[str, Any]:
    # StableDiffusion3Pipeline.__call__: the scheduler's own timesteps; mu only with dynamic shifting (SD3.5)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return {"num_inference_steps": steps}
    return {
        "num_inference_steps": steps,
        "mu": calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        ),
    }  # SD3's default max_shift is 1.16


def _hunyuan_schedule(pipe: Any, steps: int, tokens: int) -> dict[str, Any]:
    # HunyuanVideoPipeline.__call__: sigmas linspace(1, 0, n + 1)[:-1], shifted by the scheduler
    return {"sigmas": np.linspace(1.0, 0.0, steps + 1)[:-1]}


def _plain_schedule(pipe: Any, steps: int, tokens: int) -> dict[str, Any]:
    # WanPipeline.__call__: scheduler.set_timesteps(n) (UniPC's flow_shift or FlowMatchEuler's shift)
    return {"num_inference_steps": steps}


SCHEDULES: dict[str, Callable[[Any, int, int], dict[str, Any]]] = {
    "FluxPipeline": _flux_schedule,
    "StableDiffusion3Pipeline": _sd3_schedule,
    "HunyuanVideoPipeline": _hunyuan_schedule,
    "WanPipeline": _plain_schedule,
}
"""Per pipeline class: the ``set_timesteps`` arguments its ``__call__`` uses for ``steps`` steps at
``tokens`` image tokens."""


def pipeline_sigmas(pipe: Any, steps: int, tokens: int) -> torch.Tensor:
    """The ``steps + 1`` noise levels (ending at 0) the pipeline's own scheduler samples with.

    A fresh scheduler of the pipeline's class and config is given the arguments the pipeline's
    ``__call__`` would give it (:data:`SCHEDULES`), so shifts (SD3's ``shift``, Flux's dynamic ``mu``,
    Wan's ``flow_shift``) and the last non-zero level are the pipeline's, not a re-derivation.

    Examples
    --------
    >>> import hasten.tiny
    >>> sigmas = pipeline_sigmas(hasten.tiny.pipeline("sd3"), 28, 117)
    >>> len(sigmas), float(sigmas[0]), float(sigmas[-1])
    (29, 1.0, 0.0)
    """
    name = type(pipe).__name__
    if name not in SCHEDULES:
        raise ValueError(f"no sampling schedule is known for {name}; known: {', '.join(sorted(SCHEDULES))}")
    kwargs = SCHEDULES[name](pipe, steps, tokens)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(device="cpu", **kwargs)
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).flatten()
    if len(sigmas) != steps + 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(
            f"{type(scheduler).__name__} gave {len(sigmas)} noise levels ending at {float(sigmas[-1])} "
            f"for {steps} steps; editing needs {steps + 1} ending at 0"
        )
    return sigmas


def pipeline_defaults(pipe: Any) -> dict[str, int]:
    """The ``height``, ``width``, ``max_sequence_length`` (and ``num_frames`` for video) that the
    pipeline's ``__call__`` uses when they are not given: its signature's defaults, and where those
    are None, the rule its body applies (``default_sample_size * vae_scale_factor`` for SD3 / Flux,
    the transformer's ``sample_height`` / ``sample_width`` / ``sample_frames`` for CogVideoX).

    Examples
    --------
    >>> import hasten.tiny
    >>> pipeline_defaults(hasten.tiny.pipeline("flux"))["max_sequence_length"]
    512
    """
    parameters = _forward_signature_of_call(type(pipe)).parameters
    values = {
        name: parameters[name].default
        for name in ("height", "width", "num_frames", "max_sequence_length")
        if name in parameters
    }
    config = pipe.transformer.config
    if values.get("height") is None and getattr(pipe, "default_sample_size", None):
        side = pipe.default_sample_size * pipe.vae_scale_factor
        values["height"], values["width"] = side, side
    if values.get("height") is None and hasattr(config, "sample_height"):  # CogVideoX
        values["height"] = config.sample_height * pipe.vae_scale_factor_spatial
        values["width"] = config.sample_width * pipe.vae_scale_factor_spatial
    if "num_frames" in values and values["num_frames"] is None:
        values["num_frames"] = config.sample_frames
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"{type(pipe).__name__} has no default for {', '.join(missing)}; pass them explicitly")
    return {name: int(value) for name, value in values.items()}


@functools.cache
def _forward_signature_of_call(cls: type) -> inspect.Signature:
    return inspect.signature(cls.__call__)


# --- where attention-feature editing (ConsistEdit) reads and writes, per transformer class --------------


@dataclass(frozen=True)
class EditLayout:
    """The attention layers ConsistEdit controls in one transformer class, and how its edit-word map
    reads them (as the model's own attention processor computes them).

    Attributes
    ----------
    block_list, attention : str
        The blocks' ``ModuleList`` and, inside each block, the controlled attention module.
    text_first : bool
        The controlled module's ``to_q/k/v`` see ``[text, image]`` (Flux single-stream blocks,
        CogVideoX); otherwise they see image tokens only and text comes through ``add_*_proj``.
    rope : {"none", "all", "image"}
        Rotary embedding the processor applies to Q/K (from the ``image_rotary_emb`` argument):
        to every token (Flux), to image tokens only (CogVideoX, HunyuanVideo) or none (SD3, Wan).
    word_keys : {"all", "text"}
        The keys the edit-word attention is normalised over: every key (SD3, Flux: the joint
        softmax) or the text keys only (CogVideoX, as the reference; Wan's cross-attention).
    cross_attention : str or None
        Wan: the text cross-attention module the edit-word map reads instead.
    """

    block_list: str
    attention: str
    text_first: bool
    rope: Literal["none", "all", "image"]
    word_keys: Literal["all", "text"]
    cross_attention: str | None = None

    def modules(self, transformer: torch.nn.Module) -> tuple[list[Any], list[Any]]:
        """(controlled attention modules, cross-attention modules for the word map), in block order."""
        blocks = getattr(transformer, self.block_list)
        cross = [getattr(block, self.cross_attention) for block in blocks] if self.cross_attention else []
        return [getattr(block, self.attention) for block in blocks], cross


EDIT_LAYOUTS: dict[str, EditLayout] = {
    # ConsistEdit (official code): SD3 every joint block; Flux only the single-stream blocks (the double
    # blocks run plain attention); CogVideoX every block, word attention softmaxed over the text keys.
    "SD3Transformer2DModel": EditLayout("transformer_blocks", "attn", False, "none", "all"),
    "FluxTransformer2DModel": EditLayout("single_transformer_blocks", "attn", True, "all", "all"),
    "CogVideoXTransformer3DModel": EditLayout("transformer_blocks", "attn1", True, "image", "text"),
    # hasten's extensions (no reference): the dual-stream blocks (image Q/K/V from to_q/k/v alone) and
    # Wan's self-attention, whose word map comes from its text cross-attention.
    "HunyuanVideoTransformer3DModel": EditLayout("transformer_blocks", "attn", False, "image", "all"),
    "WanTransformer3DModel": EditLayout("blocks", "attn1", False, "none", "text", cross_attention="attn2"),
}


def edit_layout(transformer: torch.nn.Module) -> EditLayout:
    """The :class:`EditLayout` of ``transformer``, or a ValueError listing the supported classes."""
    module = getattr(transformer, "_orig_mod", transformer)
    for cls in type(module).__mro__:
        if cls.__name__ in EDIT_LAYOUTS:
            return EDIT_LAYOUTS[cls.__name__]
    raise ValueError(f"ConsistEdit supports {', '.join(sorted(EDIT_LAYOUTS))}; got {type(module).__name__}")
