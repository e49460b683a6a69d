"""ConsistEdit's attention control for MM-DiT / video DiT transformers, as forward hooks on Q/K/V projections.

The source and target branches share a forward pass (batch rows ``source_rows`` /
``target_rows``). In the chosen attention layers (SD3: every joint block; Flux: the
single-stream blocks only, as the paper prescribes; CogVideoX: every block; Wan: every block's
self-attention), on IMAGE (video) tokens only (text Q/K/V are never touched), the target
branch's projections are overwritten by the source's:

- ``V_t <- m V_s + (1 - m) V_t`` at every step;
- ``Q_t, K_t <- m' {Q,K}_s + (1 - m') {Q,K}_t`` with ``m' = 1`` (all image tokens) while
  ``step < int(alpha * steps)`` and ``m' = m`` afterwards;

``m`` is the preserve mask (1 = keep the source). The model's own attention processor then
runs unchanged (SDPA), so both branches use numerically identical attention. Hooking the
projections (not a processor class) finds the layers on current diffusers whatever the
processor is called (the official code lost Flux when diffusers renamed its attention class).

Masked K/V replay (:mod:`hasten.pipelines.masked_kv`) uses the same layers and image tokens
(:func:`image_projection_sites`) with :class:`~hasten.hooks.feature_replay.FeatureReplay`
alone.

Two more modes share the hooks:

- ``"record"`` / replay: the source branch's image Q/K/V per (noise level, layer) are recorded
  during inversion and put back into the source rows while editing (``replay``), through the
  one record/replay mechanism (:class:`~hasten.hooks.feature_replay.FeatureReplay`
  over a bounded :class:`~hasten.hooks.feature_cache.FeatureCache`);
- ``"mask"``: the attention of the source's image queries to the edit words' text tokens is
  accumulated (averaged over heads, summed over the words' tokens, averaged over layers and
  steps); :meth:`ConsistEditControl.edit_mask` min-max normalises it and thresholds it. The map
  is the attention the model computes: Q/K after the layer's norms and rotary embedding (Flux on
  every token, CogVideoX / HunyuanVideo on image tokens), softmaxed over every key (SD3, Flux)
  or the text keys only (CogVideoX, as the reference; Wan's cross-attention)
  (:data:`hasten.adapters.EDIT_LAYOUTS`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._validation import check_number, check_positive_int
from ..adapters import edit_layout
from .clock import DenoisingClock
from .feature_replay import FeatureReplay, ProjectionSite

__all__ = ["ConsistEditConfig", "ConsistEditControl", "edit_layers", "image_projection_sites"]


def edit_layers(transformer: Any) -> tuple[list[Any], bool, list[Any]]:
    """The attention modules ConsistEdit controls, whether their sequence is ``[text, image]``, and
    the cross-attention modules the edit-word mask reads (Wan); see :data:`hasten.adapters.EDIT_LAYOUTS`."""
    layout = edit_layout(transformer)
    layers, cross = layout.modules(transformer)
    return layers, layout.text_first, cross


def image_projection_sites(
    transformer: Any, image_tokens: int, kinds: tuple[str, ...] = ("k", "v")
) -> list[ProjectionSite]:
    """The image-token features of the ``to_q`` / ``to_k`` / ``to_v`` projections (``kinds``) of the layers
    ConsistEdit controls, as :class:`~hasten.hooks.feature_replay.ProjectionSite` s (for
    masked K/V replay: the same layers, text tokens never touched)."""
    layout = edit_layout(transformer)
    layers, _ = layout.modules(transformer)

    def image(output: torch.Tensor) -> torch.Tensor:
        return output[:, output.shape[1] - image_tokens :]

    select = image if layout.text_first else (lambda output: output)
    return [
        ProjectionSite(index, kind, getattr(attn, f"to_{kind}"), select)
        for index, attn in enumerate(layers)
        for kind in kinds
    ]


def _heads(x: torch.Tensor, norm: Any, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, tokens, heads, dim), with the layer's q/k norm applied
    where it applies (per head: SD3, Flux, CogVideoX; over all heads: Wan)."""
    if norm is None:
        return x.unflatten(-1, (heads, -1))
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    size = shape[-1] if isinstance(shape, (tuple, list, torch.Size)) else shape
    if size == x.shape[-1]:
        return norm(x).unflatten(-1, (heads, -1))
    return norm(x.unflatten(-1, (heads, -1)))


class ConsistEditControl:
    """State and hooks of one ConsistEdit run (see the module docstring)."""

    def __init__(self, transformer: Any, image_tokens: int):
        self.layout = edit_layout(transformer)
        self.layers, self.cross_layers = self.layout.modules(transformer)
        self.text_first = self.layout.text_first
        self._rotary: dict[int, Any] = {}  # layer -> the rotary embedding its processor applies (mask pass)
        self.mask_enabled = True  # False on calls whose rows are not the conditional ones (Wan's uncond call)
        self.image_tokens = image_tokens
        self.mode = "off"
        self.step, self.steps, self.alpha = 0, 1, 1.0
        self.sigma: float = 1.0
        self.preserve: torch.Tensor | None = None  # (image tokens,) 1 = keep the source
        self.source_rows: list[int] = [0]
        self.target_rows: list[int] = [1]
        self.features: FeatureReplay | None = None  # record / replay of the source's features (real mode)
        self.replay = False
        self.record_preserved: torch.Tensor | None = None  # region-only recording: preserved token indices
        self.record_levels: dict[float, int] = {}
        self.record_kinds = {"q", "k", "v"}
        self.word_positions: list[int] = []
        self.mask_rows: list[int] = [0]
        self._mask_sum: torch.Tensor | None = None
        self._mask_count = 0
        self._pending: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[Any] = []

    # --- install ------------------------------------------------------------------------------------
    def install(self) -> "ConsistEditControl":
        for index, attn in enumerate(self.layers):
            if self.layout.rope != "none":
                self._handles.append(
                    attn.register_forward_pre_hook(
                        functools.partial(self._rotary_embedding, layer=index), with_kwargs=True
                    )
                )
            for kind, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
                self._handles.append(
                    getattr(attn, name).register_forward_hook(
                        functools.partial(self._projection, layer=index, kind=kind, attn=attn)
                    )
                )
            if not self.text_first and getattr(attn, "add_k_proj", None) is not None:
                self._handles.append(
                    attn.add_k_proj.register_forward_hook(functools.partial(self._text_keys, layer=index, attn=attn))
                )
        for index, attn in enumerate(self.cross_layers):  # Wan: word attention from cross-attention
            self._handles.append(attn.to_q.register_forward_hook(functools.partial(self._cross, layer=index, kind="q")))
            self._handles.append(
                attn.to_k.register_forward_hook(functools.partial(self._cross, layer=index, kind="k", attn=attn))
            )
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._rotary, self._pending = {}, {}

    # --- hooks --------------------------------------------------------------------------------------
    def _rotary_embedding(self, module, args, kwargs, layer: int):
        if self.mode == "mask":
            self._rotary[layer] = kwargs.get("image_rotary_emb")
        return None

    def _record_rows(self, kind: str) -> torch.Tensor | None:
        """Region-only recording: the image tokens the edit will read from the source at this noise level.

        V is read in the preserved region only; Q and K on every token while ``step < alpha * steps``.
        ``record_levels`` maps each noise level to its denoising step; None records everything.
        """
        if self.record_preserved is None:
            return None
        step = self.record_levels.get(round(self.sigma, 6))
        if kind in ("q", "k") and step is not None and step < int(self.alpha * self.steps):
            return None
        return self.record_preserved

    def _image(self, output: torch.Tensor) -> slice:
        return slice(output.shape[1] - self.image_tokens, None) if self.text_first else slice(None)

    def _projection(self, module, args, output, layer: int, kind: str, attn: Any):
        if self.mode == "off":
            return None
        image = self._image(output)
        if self.mode == "record":
            if kind in self.record_kinds:
                self.features.sigma, self.features.batch_rows = self.sigma, self.source_rows
                self.features.record(layer, kind, output[:, image].detach(), rows=self._record_rows(kind))
            return None
        if self.mode == "mask":
            if self.cross_layers or not self.mask_enabled:
                return None
            self._pending[(layer, kind)] = output
            if self.text_first and kind == "k":  # Flux single / CogVideoX blocks: text and image keys are here
                self._accumulate(attn, self._pending.pop((layer, "q")), output, None, layer=layer)
            return None
        out = output.clone() if output.requires_grad else output  # a fresh projection: edited in place
        features = out[:, image]  # a view: writes land in ``out``
        if self.replay and self.features is not None:  # the source rows get the inverted source's features back
            self.features.sigma, self.features.batch_rows = self.sigma, self.source_rows
            self.features.replay(layer, kind, features)
        if self.preserve is not None:
            everything = kind in ("q", "k") and self.step < int(self.alpha * self.steps)
            keep = torch.ones_like(self.preserve) if everything else self.preserve
            keep = keep.to(out.device, out.dtype)[:, None]
            for source, target in zip(self.source_rows, self.target_rows):
                features[target] = keep * features[source] + (1 - keep) * features[target]
        return out

    def _cross(self, module, args, output, layer: int, kind: str, attn: Any = None):
        if self.mode != "mask" or not self.mask_enabled:
            return None
        if kind == "q":
            self._pending[("cross", layer)] = output
        else:
            self._accumulate(attn, self._pending.pop(("cross", layer)), output, None, keys_are_text=True)
        return None

    def _text_keys(self, module, args, output, layer: int, attn: Any):
        if self.mode == "mask":  # SD3 joint blocks: image keys came from to_k, text keys are these
            query = self._pending.pop((layer, "q"))
            self._accumulate(attn, query, self._pending.pop((layer, "k")), output, layer=layer)
        return None

    # --- the mask ---------------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``x`` (batch, tokens, heads, dim) from ``to_q`` / ``to_k`` with the rotary embedding its processor
        applies (:attr:`EditLayout.rope`): to every token, or to the image tokens only."""
        embedding = self._rotary.get(layer)
        if self.layout.rope == "none" or embedding is None:
            return x
        from diffusers.models.embeddings import apply_rotary_emb

        if self.layout.rope == "all" or not self.text_first:  # every token, or image-only projections
            return apply_rotary_emb(x, embedding, sequence_dim=1)
        text = x.shape[1] - self.image_tokens
        return torch.cat([x[:, :text], apply_rotary_emb(x[:, text:], embedding, sequence_dim=1)], dim=1)

    @torch.no_grad()
    def _accumulate(
        self,
        attn: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        text_keys: torch.Tensor | None,
        keys_are_text: bool = False,
        layer: int | None = None,
    ) -> None:
        """Add one layer's image-query attention to the edit words (source rows, heads averaged), with the
        rotary embedding and over the keys the model's (and the reference's) attention uses."""
        heads = attn.heads
        rows = self.mask_rows
        # the layer's norms run in the model's dtype (their weights'), the map in float32
        q = _heads(query[rows], getattr(attn, "norm_q", None), heads).float()
        k = _heads(keys[rows], getattr(attn, "norm_k", None), heads).float()
        if not keys_are_text:
            q, k = self._rope(q, layer), self._rope(k, layer)
        if text_keys is not None:  # SD3 / HunyuanVideo: keys = [image, text]
            k = torch.cat([k, _heads(text_keys[rows], getattr(attn, "norm_added_k", None), heads).float()], dim=1)
            columns = [self.image_tokens + p for p in self.word_positions]
        else:  # Flux / CogVideoX: keys = [text, image]; Wan's cross-attention: keys = text
            columns = list(self.word_positions)
        if self.text_first and not keys_are_text:
            q = q[:, self._image(query)]
            if self.layout.word_keys == "text":  # CogVideoX: normalised over the text keys only
                k = k[:, : k.shape[1] - self.image_tokens]
        total = None
        for chunk in q.split(1024, dim=1):  # bounded memory on large images
            logits = torch.einsum("bqhd,bkhd->bhqk", chunk, k) * q.shape[-1] ** -0.5
            share = torch.softmax(logits, -1)[..., columns].sum(-1).mean(1).mean(0)  # (queries,)
            total = share if total is None else torch.cat([total, share])
        self._mask_sum = total if self._mask_sum is None else self._mask_sum + total
        self._mask_count += 1

    def edit_mask(self, threshold: float = 0.1, frames: int = 1) -> torch.Tensor:
        """(image tokens,) bool: the edit region (word attention min-max normalised per frame, > threshold)."""
        if self._mask_sum is None:
            raise ValueError("no attention to the edit words was recorded (run a mask pass first)")
        mean = (self._mask_sum / self._mask_count).view(frames, -1)
        low, high = mean.amin(1, keepdim=True), mean.amax(1, keepdim=True)
        normalised = (mean - low) / (high - low).clamp_min(1e-12)
        return (normalised > threshold).flatten()


# --- on its own, through the front door (hasten.methods.METHODS) ----------------------------------------
@dataclass(frozen=True)
class ConsistEditConfig:
    """ConsistEdit's attention control on plain pipeline calls: ``hasten.apply(pipe, ConsistEditConfig(mask))``.

    Synthetic editing with a given edit region: while applied, every call of the pipeline (or of
    its transformer) whose batch pairs a source and a target row -- ``prompt=[source, target]``
    from the SAME noise (``latents=`` one noise repeated twice) -- edits the target inside
    ``mask`` and keeps the source outside it: the target's image V (and Q, K while
    ``step < int(alpha * num_inference_steps)``) are the source's in the preserved region, Q and K
    everywhere in those steps (the rule in the module docstring). Rows alternate source, target
    (``[source, target]``, or with guidance in the batch ``[neg source, neg target, source,
    target]``). The edit-word mask pass and real-image (inverted) editing need a loop of their
    own: :class:`~hasten.pipelines.ConsistEditPipeline`.

    Parameters
    ----------
    mask : array, tensor or PIL image
        The edit region, white / True = edit, any resolution covering the image (area-pooled to
        the call's token grid; videos: ``(frames, h, w)`` or one mask for every frame).
    alpha : float, default 1.0
        Fraction of the steps in which the target's Q and K are the source's on every image token
        (the paper's synthetic setting copies them throughout: 1.0).
    num_inference_steps : int, optional
        The calls' step count; needed when ``alpha < 1`` (steps are counted from the timesteps
        the transformer receives).

    Examples
    --------
    >>> import numpy as np, hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> mask = np.zeros((36, 52), bool); mask[:, 26:] = True        # edit the right half
    >>> with hasten.apply(pipe, ConsistEditConfig(mask)) as handle:
    ...     type(handle.module).__name__
    'FluxTransformer2DModel'
    """

    mask: Any
    alpha: float = 1.0
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        check_number(self.alpha, "alpha", 0, 1)
        steps = self.num_inference_steps
        if steps is not None:
            check_positive_int(steps, "num_inference_steps")
        if self.alpha < 1.0 and steps is None:
            raise ValueError("`num_inference_steps` is needed with `alpha` < 1 (alpha is a fraction of the steps)")
        if self.mask is None:
            raise ValueError(
                "`mask` (the edit region) is required; without one, use ConsistEditPipeline, which "
                "finds it from the edit words' attention"
            )


def grid_mask(mask: Any, grid: tuple[int, ...], height: int, width: int) -> torch.Tensor:
    """A user mask (PIL / array / tensor; white or True = edit; image- or token-grid-sized, videos
    optionally with frames first) -> edit flags over the tokens, in their order."""
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
    array = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float32))
    if array.dim() == 3 and array.shape[-1] in (3, 4) and len(grid) == 2:
        array = array[..., :3].mean(-1)
    if array.numel() and array.max() > 1:
        array = array / 255.0
    if array.dim() == 2:
        array = array[None]
    frames, rows, cols = (1, *grid) if len(grid) == 2 else grid
    if (
        array.dim() != 3
        or tuple(array.shape[1:]) not in ((height, width), (rows, cols))
        or (len(grid) == 2 and array.shape[0] != 1)
    ):
        raise ValueError(
            f"`mask` is {tuple(array.shape)}; expected the image size ({height}, {width}) or the token "
            f"grid ({rows}, {cols})" + (", optionally with frames first" if len(grid) == 3 else "")
        )
    pooled = torch.nn.functional.adaptive_avg_pool3d(array[None, None], (frames, rows, cols))[0, 0]
    return (pooled > 0.5).flatten()


class _EditHook:
    """Transformer forward pre-hook: sets the control's rows, step, image tokens and preserve mask per call."""

    def __init__(self, control: ConsistEditControl, config: ConsistEditConfig, adapter: Any):
        self.control, self.config, self.adapter = control, config, adapter
        self.clock = DenoisingClock()
        self.preserve: dict[tuple[int, ...], torch.Tensor] = {}  # token grid -> preserve flags

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid, _, timestep = self.adapter.observe(module, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = hidden.shape[0]
        if rows % 2:
            raise ValueError(
                f"ConsistEdit needs source and target rows in the batch (prompt=[source, target] from "
                f"one noise); the transformer got {rows} rows"
            )
        control = self.control
        control.step = self.clock.tick(timestep)
        if grid not in self.preserve:
            mask = self.config.mask
            tokens = grid[1:] if grid[0] == 1 else grid  # (rows, cols) for images
            shape = (
                (mask.height, mask.width)
                if hasattr(mask, "height") and hasattr(mask, "convert")
                else tuple(np.shape(mask))
            )
            if len(shape) == 3 and shape[-1] in (3, 4) and len(tokens) == 2:  # an RGB(A) array
                shape = shape[:2]
            self.preserve[grid] = ~grid_mask(mask, tokens, *shape[-2:])
        control.image_tokens = math.prod(grid)
        control.preserve = self.preserve[grid].to(hidden.device, hidden.dtype)
        control.source_rows, control.target_rows = list(range(0, rows, 2)), list(range(1, rows, 2))


def consistedit_transformer(pipe_or_transformer: Any) -> torch.nn.Module:
    """The transformer the control hooks: a pipeline's ``transformer``, or the transformer itself."""
    transformer = (
        pipe_or_transformer
        if isinstance(pipe_or_transformer, torch.nn.Module)
        else getattr(pipe_or_transformer, "transformer", None)
    )
    if transformer is None:
        raise ValueError(
            f"ConsistEdit needs a diffusion transformer (SD3, Flux, CogVideoX, Wan, HunyuanVideo); "
            f"{type(pipe_or_transformer).__name__} has no `transformer`"
        )
    return getattr(transformer, "_orig_mod", transformer)


def prepare_consistedit(transformer: torch.nn.Module, config: ConsistEditConfig) -> ConsistEditConfig:
    from ..adapters import adapter_for

    edit_layout(transformer), adapter_for(transformer)  # clear errors for an unsupported family
    return config


def attach_consistedit(transformer: torch.nn.Module, config: ConsistEditConfig) -> None:
    from ..adapters import adapter_for

    control = ConsistEditControl(transformer, image_tokens=0)
    control.mode, control.alpha = "edit", config.alpha
    # without a step count alpha is 1: Q and K are copied at every step
    control.steps = config.num_inference_steps or 2**31
    clock = transformer.register_forward_pre_hook(
        _EditHook(control, config, adapter_for(transformer)), with_kwargs=True
    )
    control.install()
    control._handles.append(clock)
    transformer._hasten_consistedit = control


def detach_consistedit(transformer: torch.nn.Module, config: ConsistEditConfig) -> None:
    vars(transformer).pop("_hasten_consistedit").remove()
