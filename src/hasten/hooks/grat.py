"""GRAT grouped sparse attention on a diffusion transformer: its config, hook and processor.

Shape of the mechanism (after diffusers' FirstBlockCache): a :class:`GratConfig`; one transformer
hook (:class:`GratHook`, registered in diffusers' ``HookRegistry``) that reads each forward call's
token grid and denoising step and prepares the token layouts once per shape; and one
:class:`GratAttnProcessor` per attention module, wrapping the module's own processor and running
it unchanged -- its projections (LoRA layers included), QK norms and rotary embeddings -- except
for the one ``F.scaled_dot_product_attention`` call inside it (directly, or through diffusers'
``dispatch_attention_fn`` native backend). That call is redirected, through a
:class:`~torch.overrides.TorchFunctionMode` active only while the wrapped processor runs, to
:func:`hasten.kernels.grouped_attention` (gather into groups, block-sparse kernel, scatter back),
with the layout the hook prepared in the shared :class:`GratState`.

``hasten.apply(pipe, GratConfig(...))`` (or its spellings :func:`apply_grat`,
``pipe.enable_grat()``) installs both through :func:`prepare_grat` / :func:`install_grat`;
removal (:func:`uninstall_grat`) restores the exact original processor objects and forward. No
weight is touched. Dense vs GRAT side by side: :func:`hasten.measure.compare_grat`.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from ..adapters import ModelAdapter, adapter_for
from ..kernels import (
    BACKENDS,
    GROUPED_BACKENDS,
    PATTERNS,
    GroupLayout,
    group_layout,
    grouped_attention,
    resolve_backend,
)
from .clock import DenoisingClock

_HOOK_NAME = "hasten_grat"


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
        Denoising step index of the current call (:class:`~hasten.hooks.clock.DenoisingClock`).
    grid : (t, h, w) or None
        Latent token grid of the current call.
    """

    layouts: dict[int, GroupLayout] = field(default_factory=dict)
    sparse: bool = True
    step: int = -1
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
        Kernel backend ("auto", "flex", "triton", "reference", "bands", "windows").
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


@dataclass(frozen=True)
class GratConfig:
    """GRAT settings. Defaults follow the GRAT paper and its official code.

    Parameters
    ----------
    pattern : {"cross", "block"}
        ``"cross"`` is GRAT-X (criss-cross: key groups sharing a row band, a column band or, for
        video, a time slab with the query group; the paper's main setting and the official
        HunyuanVideo config), ``"block"`` is GRAT-B (key groups within ``window`` groups).
    group_size : int or tuple, optional
        Group size in latent tokens, ``(h, w)`` for images or ``(t, h, w)`` for video; an int
        means that size on every axis of the model's grid. Default per model family: 16x16 for
        Flux/SD3 (the public Flux port), 4x8x8 for HunyuanVideo (official), and the same
        256-token 4x8x8 groups for Wan and CogVideoX (the paper leaves these open).
    window : int or tuple
        GRAT-B reach in groups on each side of the query group, per axis (1 = a 3x3 / 3x3x3
        neighbourhood). Ignored by "cross".
    dense_steps : int
        The first ``dense_steps`` denoising steps use dense attention (peers such as STA keep
        early steps dense; GRAT's default is 0).
    dense_blocks : tuple[int, ...]
        Block indices that keep dense attention (blocks numbered over the model's block lists
        in order, e.g. Flux: 0-18 double-stream, 19-56 single-stream).
    backend : {"auto", "flex", "triton", "reference", "bands", "windows"}
        Attention kernel: "auto" picks the Triton kernel on CUDA; elsewhere band attention for
        GRAT-X on images (exact; fastest on CPU) and the gathered-SDPA reference otherwise;
        "flex" is compiled FlexAttention (:mod:`hasten.kernels`).

    Examples
    --------
    >>> from hasten import GratConfig
    >>> GratConfig(pattern="block", group_size=(16, 16), window=1).pattern
    'block'
    """

    pattern: Literal["cross", "block"] = "cross"
    group_size: int | tuple[int, ...] | None = None
    window: int | tuple[int, ...] = 1
    dense_steps: int = 0
    dense_blocks: tuple[int, ...] = field(default_factory=tuple)
    backend: str = "auto"

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"`pattern` must be one of {PATTERNS}, got {self.pattern!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if GROUPED_BACKENDS.get(self.backend, self.pattern) != self.pattern:
            raise ValueError(
                f"`backend` {self.backend!r} computes pattern {GROUPED_BACKENDS[self.backend]!r} only; got "
                f"pattern {self.pattern!r} (use backend 'auto')"
            )
        for name in ("group_size", "window"):
            value = getattr(self, name)
            if value is None:
                continue
            values = (value,) if isinstance(value, int) else tuple(value)
            if not values or not all(isinstance(v, int) and v > 0 for v in values) or len(values) > 3:
                raise ValueError(f"`{name}` must be a positive int or a tuple of 2-3 positive ints, got {value!r}")
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"`dense_steps` must be an int >= 0, got {self.dense_steps!r}")
        object.__setattr__(self, "dense_blocks", tuple(int(b) for b in self.dense_blocks))
        if any(b < 0 for b in self.dense_blocks):
            raise ValueError(f"`dense_blocks` must be non-negative block indices, got {self.dense_blocks!r}")

    def resolved(self, adapter: ModelAdapter) -> "GratConfig":
        """This config with the model family's defaults filled in and sizes as (t, h, w) triples."""
        return replace(
            self,
            group_size=_triple("group_size", self.group_size or adapter.default_group, adapter),
            window=_triple("window", self.window, adapter),
        )


def _triple(name: str, value: int | tuple[int, ...], adapter: ModelAdapter) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value) if adapter.video else (1, value, value)
    value = tuple(value)
    if len(value) == 3:
        if not adapter.video and value[0] != 1:
            raise ValueError(f"`{name}` for the image model {adapter.family} is (h, w); got {value!r}")
        return value  # type: ignore[return-value]
    if len(value) == 2:
        if adapter.video:
            raise ValueError(f"`{name}` for the video model {adapter.family} is (t, h, w); got {value!r}")
        return (1, *value)
    raise ValueError(f"`{name}` must be (h, w) or (t, h, w), got {value!r}")


class GratHook(ModelHook):
    """Transformer pre-forward hook: reads the call's grid and step, prepares layouts once per shape."""

    def __init__(self, adapter: ModelAdapter, config: GratConfig, state: GratState):
        super().__init__()
        self.adapter = adapter
        self.config = config
        self.state = state
        self.clock = DenoisingClock()

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._observe(module, args, kwargs)
        return args, kwargs

    @torch.compiler.disable
    def _observe(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid, num_text, timestep = self.adapter.observe(module, args, kwargs)
        state, config = self.state, self.config
        if timestep is not None:
            state.step = self.clock.tick(timestep)
        state.sparse = state.step >= config.dense_steps
        hidden = args[0] if args else kwargs["hidden_states"]
        key = (grid, num_text, hidden.device)
        if state.shape_key != key:
            layouts = {}
            for text in {num_text, 0}:
                layout = group_layout(
                    grid,
                    config.group_size,
                    num_text=text,
                    text_first=self.adapter.text_position == "first",
                    pattern=config.pattern,
                    window=config.window,
                ).to(hidden.device)
                layouts[layout.seq_len] = layout
            state.layouts, state.grid, state.shape_key = layouts, grid, key

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.clock.reset()
        self.state.step, self.state.sparse = -1, True
        return module


def grat_module(pipe_or_transformer: Any) -> torch.nn.Module:
    """The transformer GRAT changes: a pipeline's ``transformer`` (or the transformer itself), unwrapped
    from ``torch.compile``."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        transformer = pipe_or_transformer
    else:
        transformer = getattr(pipe_or_transformer, "transformer", None)
        if transformer is None:
            raise ValueError(
                f"GRAT needs a diffusion transformer: {type(pipe_or_transformer).__name__} has no `transformer` "
                "(UNet pipelines such as Stable Diffusion 1.5 are not supported)"
            )
    return getattr(transformer, "_orig_mod", transformer)


def prepare_grat(module: torch.nn.Module, config: GratConfig) -> GratConfig:
    """``config`` checked against ``module`` and with its family's defaults filled in (changes nothing)."""
    adapter = adapter_for(module)
    config = config.resolved(adapter)
    device = next(module.parameters()).device
    resolve_backend(config.backend, device)  # fail now, not inside the first attention call
    num_blocks = adapter.num_blocks(module)
    bad = [b for b in config.dense_blocks if b >= num_blocks]
    if bad:
        raise ValueError(f"`dense_blocks` {bad} out of range: {type(module).__name__} has {num_blocks} blocks")
    return config


def install_grat(module: torch.nn.Module, config: GratConfig) -> None:
    """Wrap each (non-dense) attention module's processor and register :class:`GratHook` (a config
    from :func:`prepare_grat`). Use :func:`hasten.apply`; this is the mechanism under it."""
    adapter = adapter_for(module)
    state = GratState()
    for block_index, _, attention in adapter.attention_modules(module):
        if block_index not in config.dense_blocks:
            attention.set_processor(GratAttnProcessor(attention.processor, state, config.backend))
    hook = GratHook(adapter, config, state)
    hook.created_registry = getattr(module, "_diffusers_hook", None) is None
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _HOOK_NAME)


def uninstall_grat(module: torch.nn.Module, config: GratConfig | None = None) -> None:
    """Restore the exact original processor objects and forward (and drop the hook registry if GRAT
    created it and no other diffusers hook is left in it)."""
    for attention in module.modules():
        processor = getattr(attention, "processor", None)
        if isinstance(processor, GratAttnProcessor):
            attention.set_processor(processor.original)
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK_NAME) if registry is not None else None
    if hook is None:
        return
    registry.remove_hook(_HOOK_NAME, recurse=False)
    if not registry.hooks:  # the registry leaves the class's forward bound on the instance: drop it
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
            del module.forward
        if hook.created_registry:
            del module._diffusers_hook


def apply_grat(pipe_or_transformer: Any, config: GratConfig | None = None, **kwargs) -> GratConfig:
    """Install GRAT on a pipeline's transformer (or a transformer). Re-applying replaces the old config.

    The same as ``hasten.apply(pipe_or_transformer, config).config`` (:func:`hasten.apply`).

    Parameters
    ----------
    pipe_or_transformer : DiffusionPipeline or transformer module
    config : GratConfig, optional
        Settings; keyword arguments are the :class:`GratConfig` fields (``pattern``,
        ``group_size``, ``window``, ``dense_steps``, ``dense_blocks``, ``backend``).

    Returns
    -------
    GratConfig
        The config in effect, with the model family's defaults filled in.

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> hasten.enable_grat(pipe, pattern="block", group_size=4, window=1).group_size
    (1, 4, 4)
    >>> hasten.disable_grat(pipe)
    """
    from ..methods import apply

    if config is not None and kwargs:
        raise ValueError("pass either `config` or GratConfig keyword arguments, not both")
    return apply(pipe_or_transformer, config or GratConfig(**kwargs)).config


def remove_grat(pipe_or_transformer: Any) -> None:
    """Remove GRAT, restoring the exact original attention processors. No-op if GRAT is not on
    (:func:`hasten.remove` and ``pipe.disable_grat()`` raise instead)."""
    from ..methods import remove

    if grat_state(pipe_or_transformer) is not None:
        remove(pipe_or_transformer, GratConfig)


def grat_state(pipe_or_transformer: Any) -> GratState | None:
    """The live :class:`GratState` of a transformer with GRAT on (layouts, density), else None."""
    registry = getattr(grat_module(pipe_or_transformer), "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK_NAME) if registry is not None else None
    return hook.state if hook is not None else None
