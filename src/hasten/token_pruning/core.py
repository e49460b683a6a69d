"""The shared token-pruning core: method base class, stats, and the before-the-LLM stage.

A method is a dataclass (its paper's knobs, ``budget`` first) whose :meth:`TokenPruner.select`
says which visual tokens of each image to keep; this module does the plumbing, for every
supported model class (:mod:`.adapters`), with SDPA or eager attention, batch size > 1 and
``model.generate``:

1. A forward pre-hook on the VLM records the call's ``input_ids`` (where the image tokens are).
2. A forward pre-hook on its language model sees the merged input embeddings of the prefill. It
   asks the method which visual tokens to keep per image, then gathers the kept tokens. Text
   tokens are always kept. ``inputs_embeds``, ``attention_mask`` and ``position_ids`` are
   gathered together: kept tokens keep their ORIGINAL positions (RoPE, or Qwen's 3-D mRoPE)
   unless the method renumbers. Samples whose kept sequences are shorter are left-padded with
   masked slots, so a batch stays one tensor.
3. At every later decoding step, the same hook drops the pruned columns from the attention
   mask (and, where transformers passes one, points ``cache_position`` into the shorter cache),
   and continues each sample's positions from its last original position.

The KV cache therefore only ever holds kept tokens.

Usage::

    pruner = HiRED(budget=0.2)
    with pruner.apply(model):
        out = model.generate(**inputs, max_new_tokens=64)
    pruner.stats.visual_tokens_kept
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from .._validation import check_number
from ..transformers_conventions import cache_of, output_cache, patch_point_error
from .adapters import VLMAdapter, adapter_for

__all__ = ["ImageTokens", "PromptPlan", "PruningStats", "TokenPruner", "cache_bytes", "gather_plan", "renumbered"]


def gather_plan(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns to gather per row for a (batch, length) keep mask, left-padded to one length.

    Returns ``columns`` (batch, new_length), kept positions ascending, and ``real`` (same shape),
    False on the pad slots that shorter rows get on their left (their column is 0: mask them).
    """
    batch, length = keep.shape
    device = keep.device
    counts = keep.sum(1)
    new_length = int(counts.max())
    order = torch.sort((~keep).long() * (length + 1) + torch.arange(length, device=device), dim=1).indices
    shift = new_length - counts  # pad slots on the left of each row
    slot = torch.arange(new_length, device=device).expand(batch, -1)
    real = slot >= shift[:, None]
    columns = torch.where(real, order[:, :new_length].gather(1, (slot - shift[:, None]).clamp_min(0)), 0)
    return columns, real


def renumbered(mask: torch.Tensor) -> torch.Tensor:
    """Consecutive positions over the unmasked slots of a (batch, length) mask (0 on the left pads)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):  # compressed layers report their true size
            total += layer.nbytes
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class _InstanceAttribute:
    """A removable handle for an attribute set on one instance (it deletes it again)."""

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


@dataclass
class PruningStats:
    """What the last pruned call did.

    Attributes
    ----------
    visual_tokens_in, visual_tokens_kept : list of int
        Per sample: visual tokens before and after pruning.
    prompt_tokens : int
        Prefill length before pruning (padded batch length).
    prefill_tokens : int
        Prefill length the language model ran (padded batch length after pruning).
    kv_cache_bytes : int
        Bytes of keys and values in the cache right after the prefill.
    stage_seconds : dict
        Wall time per stage, e.g. ``{"select": 0.01, "prefill": 0.2}``.
    visual_kept_mask : list of BoolTensor
        Per sample, one flag per visual token (in sequence order): kept or not (e.g. to draw the
        kept tokens over the image).
    layer_tokens : list of int
        Per decoder layer, the (padded batch) sequence length it ran in the prefill: in-LLM
        methods run their early layers on every token.
    layer_important : list of float
        KV-cache methods (ZipVL): per decoder layer, the mean fraction of tokens kept at high
        precision (and attended in a sparse prefill).
    kv_kept_positions : list of LongTensor
        Cache-compressing methods (GUI-KV): per decoder layer, ``(batch, kv_heads, slots)`` prompt
        positions each head's cache keeps after the prefill (ascending; ``-1`` on the pad slots of
        shorter rows).
    """

    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    kv_cache_bytes: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    visual_kept_mask: list[torch.Tensor] = field(default_factory=list)
    layer_tokens: list[int] = field(default_factory=list)
    layer_important: list[float] = field(default_factory=list)
    kv_kept_positions: list[torch.Tensor] = field(default_factory=list)

    def record_kept(self, keep: torch.Tensor, image_mask: torch.Tensor) -> None:
        """Fill the kept counts and masks from (batch, length) keep and image-token masks."""
        self.visual_tokens_kept = (keep & image_mask).sum(1).tolist()
        self.visual_kept_mask = [keep[row][image_mask[row]].cpu() for row in range(keep.shape[0])]


@dataclass
class PromptPlan:
    """How the prefill rewrote the language model's prompt: which of ``generate()``'s prompt
    columns the KV cache holds, so that every later decoding step can be rewritten to match.

    Attributes
    ----------
    columns : LongTensor (batch, kept)
        Original prompt positions held by the cache, ascending per row, left-padded.
    real : BoolTensor (batch, kept)
        False on the pad slots of shorter rows.
    length : int
        Length of ``generate()``'s prompt (before anything was dropped).
    next_position : LongTensor (batch,)
        The position where each row's text continues.
    position_shape : torch.Size
        Leading dimensions of the position ids (Qwen's mRoPE rows), ``()`` for plain 1-D positions.
    image_mask : BoolTensor (batch, length), optional
        Where the image tokens were (before-the-LLM stage only).
    images : list of ImageTokens, optional
        The images as the method saw them (before-the-LLM stage only).
    """

    columns: torch.Tensor
    real: torch.Tensor
    length: int
    next_position: torch.Tensor
    position_shape: torch.Size
    image_mask: torch.Tensor | None = None
    images: list["ImageTokens"] | None = None

    @property
    def dropped(self) -> int:
        """Prompt columns the cache does not hold."""
        return self.length - self.columns.shape[1]


@dataclass
class ImageTokens:
    """One image's visual tokens in the prefill, as a method sees them.

    Attributes
    ----------
    sample : int
        Batch row.
    positions : LongTensor (n,)
        Their sequence positions (ascending).
    embeds : Tensor (n, hidden)
        Their merged input embeddings (the projector's output), or the hidden states entering
        the layer after an in-LLM scoring layer.
    layout : LongTensor (n, 3) or None
        Where each token comes from: ``(vision batch row, patch row, patch column)``, ``-1``
        for tokens that are no patch (LLaVA-Next's row newlines); see
        :class:`~hasten.token_pruning.adapters.VLMAdapter`. ``None`` where unknown.
    index : int
        Image number in the batch, in order of appearance.
    scores : Tensor (n,), optional
        Scores the stage computed for these tokens (e.g. the last prompt token's attention at an
        LLM layer, for in-LLM methods).
    text_attention : Tensor (queries, n), optional
        In-LLM methods that score by text attention: the head-averaged attention of each text
        token of the sample (rows) to these tokens.
    protected : BoolTensor (n,), optional
        In-LLM stages: tokens the method marked never-droppable earlier (they are kept whatever
        the method selects).
    """

    sample: int
    positions: torch.Tensor
    embeds: torch.Tensor
    layout: torch.Tensor | None
    index: int
    scores: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    protected: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` when the tokens are one patch grid in raster order (LLaVA, Qwen), else None."""
        layout = self.layout
        if layout is None or len(layout) == 0 or bool((layout[:, 0] != layout[0, 0]).any()):
            return None
        rows, cols = int(layout[:, 1].max()) + 1, int(layout[:, 2].max()) + 1
        if rows * cols != len(layout) or bool(
            (layout[:, 1] * cols + layout[:, 2] != torch.arange(len(layout), device=layout.device)).any()
        ):
            return None
        return rows, cols


@dataclass
class TokenPruner:
    """Base class of the pruning methods: a budget, hooks, and per-call stats.

    Parameters
    ----------
    budget : float, default 1.0
        Fraction of each image's visual tokens kept, in (0, 1]; 1.0 keeps everything and gives
        exactly the unpruned model.
    renumber : bool, default False
        Give the kept tokens consecutive positions (as if the dropped ones never existed)
        instead of their original ones. Off by default: original positions keep each token's
        place in the image, which grounding and OCR rely on (renumbering is reported to take
        RefCOCO from 56.1 to 15.3); MustDrop's paper renumbers. LLaVA and LLaVA-Next only: a
        Qwen2-VL token's mRoPE position is its (row, column), which has no renumbered form.
    """

    budget: float = 1.0
    renumber: bool = False

    #: Whether ``budget < 1`` drops visual tokens (False: a method that keeps them all, e.g. at
    #: lower precision).
    drops_visual_tokens: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_number(self.budget, "budget", 0, 1, open_low=True)
        if not isinstance(self.renumber, bool):
            raise ValueError(f"`renumber` must be True or False, got {self.renumber!r}")
        self.stats: PruningStats | None = None
        self._model = None
        self._language_model = None
        self._attention = None
        self._handles: list[Any] = []
        self._state: dict[str, Any] = {}

    # --- what a method provides -----------------------------------------------------------------
    def kept_count(self, image: ImageTokens) -> int:
        """How many of the image's tokens to keep: ``max(1, floor(budget * n))``."""
        return self.kept_count_for(len(image.positions))

    def select(self, image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Before the LLM: indices (into ``image.positions``, ascending) to keep, and optional new
        embeddings for them."""
        raise NotImplementedError

    # --- what a method may hook (the base owns attaching, detaching and the stats) ----------------
    def _hook_vision(self, model, adapter: VLMAdapter) -> list[Any]:
        """Hooks a method installs inside the vision tower (e.g. to record CLS attention)."""
        return []

    def _attention_hook(self, language_model) -> Any:
        """An :class:`~hasten.token_pruning.scoring.AttentionHook` to install on the language
        model's attention calls (in-LLM scoring, sparse prefill), or None."""
        return None

    def _extra_hooks(self, model, adapter: VLMAdapter, language_model) -> list[Any]:
        """Every other hook the method needs; by default the before-the-LLM stage's: the vision
        tower (:meth:`_hook_vision`) and the encoder inputs the layouts read."""
        return [*self._hook_vision(model, adapter), *self._record_encoder_inputs(model, adapter)]

    def _after_llm(self, module, args, kwargs, output):
        """The language model's forward hook: by default the prefill's stats."""
        self._measure(module, args, kwargs, output)

    # --- attach / detach ------------------------------------------------------------------------
    def _check_model(self, model) -> VLMAdapter:
        if self._model is not None:
            raise ValueError(f"{type(self).__name__} is already attached to a model; detach() it first")
        adapter = adapter_for(model)
        if self.renumber and adapter.mrope:
            raise ValueError(
                f"`renumber=True` is not defined for {adapter.model_class}: a visual token's mRoPE "
                "position is its (row, column) in the image; use renumber=False"
            )
        self._cache_keyword = adapter.check_hook_points(model)
        return adapter

    def _note_vision(self, module, args, output) -> None:
        self._vision_ran = True

    def attach(self, model) -> "TokenPruner":
        """Install the hooks on ``model`` (a supported transformers VLM); see :meth:`apply`.

        The same as ``hasten.apply(model, self)`` (:func:`hasten.apply`): a pruner already on
        ``model`` is replaced. Returns the pruner.
        """
        from ..methods import apply

        apply(model, self)
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before :meth:`attach` (no-op if not attached)."""
        from ..methods import applied

        if self._model is not None:
            for handle in applied(self._model):
                if handle.config is self:
                    handle.remove()

    def _install(self, model) -> None:
        """The mechanism under :meth:`attach`: every hook goes through here, the call recorder on the
        VLM, the language model's pre- and post-hooks (:meth:`_before_llm`, :meth:`_after_llm`), the
        method's attention hook and its other hooks. A failure part-way removes what was installed."""
        adapter = self._check_model(model)
        language_model = adapter.language_model(model)
        self._adapter, self._model, self._language_model = adapter, model, language_model
        # Whether the vision tower ran since the last prefill: images were given, so the prefill
        # must find image tokens (a moved hook point would otherwise prune nothing, silently).
        self._vision_ran = False
        self._attention = None
        self._handles = []
        try:
            self._handles += [
                adapter.vision_tower(model).register_forward_hook(self._note_vision),
                model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
                language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True),
                language_model.register_forward_hook(self._after_llm, with_kwargs=True),
            ]
            self._handles += self._extra_hooks(model, adapter, language_model)
            attention = self._attention_hook(language_model)
            if attention is not None:
                attention.install(language_model.config)
                self._attention = attention
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        """Remove every hook :meth:`_install` installed."""
        if getattr(self, "_attention", None) is not None:
            self._attention.remove(self._language_model.config)
            self._attention = None
        for handle in self._handles:
            handle.remove()
        self._handles, self._model, self._language_model, self._state = [], None, None, {}

    def _record_encoder_inputs(self, model, adapter: VLMAdapter) -> list[Any]:
        """Record the adapter's ``encoder_inputs`` (e.g. LLaVA-Next's ``image_sizes``) from
        ``get_image_features``: ``generate()`` runs the vision encoder before the first forward and
        passes the VLM only its outputs."""
        if not adapter.encoder_inputs:
            return []
        owner = model.base_model
        original = owner.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recording(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            self._state["encoder"] = {name: bound.get(name) for name in adapter.encoder_inputs}
            return original(*args, **kwargs)

        owner.get_image_features = recording
        return [_InstanceAttribute(owner, "get_image_features")]

    @contextlib.contextmanager
    def apply(self, model) -> Iterator["TokenPruner"]:
        """``with pruner.apply(model): model.generate(...)`` — attached inside, detached after.

        The same as ``with hasten.apply(model, pruner):``, yielding the pruner (for its ``stats``).
        """
        from ..methods import apply

        with apply(model, self):
            yield self

    # --- hooks ------------------------------------------------------------------------------------
    def _record_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoder = {k: v for k, v in self._state.pop("encoder", {}).items() if v is not None}
        self._state["call"] = {"input_ids": input_ids, "kwargs": {**encoder, **kwargs}}

    def _before_llm(self, module, args, kwargs):
        """The language model's forward pre-hook: by default the before-the-LLM stage."""
        embeds = kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if embeds is None:
            raise ValueError("token pruning needs the VLM to call its language model with `inputs_embeds`")
        if cached == 0:
            return args, self._prefill(kwargs, embeds)
        if "prefill" in self._state:
            return args, self._decode(kwargs, embeds, cached)
        return args, kwargs

    def _prompt(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        """The prefill's image mask, 2-D attention mask and position ids, from the recorded call."""
        call = self._state.pop("call", None)
        input_ids = call["input_ids"] if call else None
        if input_ids is None or embeds is None or input_ids.shape != embeds.shape[:2]:
            raise ValueError("token pruning needs `input_ids` (to find the image tokens), not only `inputs_embeds`")
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            raise ValueError("token pruning needs a 2-D attention mask (got precomputed 4-D masks)")
        positions = kwargs.get("position_ids")
        device = input_ids.device
        image_mask = input_ids == self._adapter.image_token_id(self._model)
        vision_ran, self._vision_ran = self._vision_ran, False
        if vision_ran and not bool(image_mask.any()):
            raise patch_point_error(
                self._model,
                f"{type(self).__name__}: the vision tower ran but no image token "
                f"(id {self._adapter.image_token_id(self._model)}) reached the "
                "language model's prefill",
            )
        return dict(
            image_mask=image_mask,
            mask=mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device),
            # what the language model would use without them: 0 .. length-1
            positions=positions if positions is not None else torch.arange(length, device=device).expand(batch, -1),
            call=call["kwargs"] if call else {},
            length=length,
        )

    def _full_prompt_stats(self, prompt: dict) -> PruningStats:
        """Stats of a prefill that runs the whole prompt (nothing dropped before the LLM): every
        layer sees ``length`` tokens and every visual token is kept so far."""
        length, image_mask = prompt["length"], prompt["image_mask"]
        stats = PruningStats(
            visual_tokens_in=image_mask.sum(1).tolist(),
            prompt_tokens=length,
            prefill_tokens=length,
            layer_tokens=[length] * len(self._language_model.layers),
        )
        stats.record_kept(torch.ones_like(image_mask), image_mask)
        return stats

    def _prefill(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        """Stage 1: gather the kept tokens of every image before the language model runs."""
        self._state.pop("prefill", None)
        prompt = self._prompt(kwargs, embeds)
        start = time.perf_counter()
        image_mask, mask, positions, length = (
            prompt["image_mask"],
            prompt["mask"],
            prompt["positions"],
            prompt["length"],
        )
        images = self._images(image_mask, embeds, positions, prompt["call"])
        keep = ~image_mask
        new_embeds = embeds.clone()
        stats = PruningStats(visual_tokens_in=image_mask.sum(1).tolist(), prompt_tokens=length)
        for image in images:
            kept, replaced = self.select(image)
            kept_positions = image.positions[kept]
            keep[image.sample, kept_positions] = True
            if replaced is not None:
                new_embeds[image.sample, kept_positions] = replaced.to(new_embeds.dtype)
        stats.record_kept(keep, image_mask)

        gather, real = gather_plan(keep)
        new_length = gather.shape[1]
        kwargs["inputs_embeds"] = new_embeds.gather(1, gather[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["attention_mask"] = torch.where(real, mask.gather(1, gather), 0)
        if self.renumber:
            kwargs["position_ids"] = renumbered(kwargs["attention_mask"])
        else:
            kwargs["position_ids"] = self._gather_positions(positions, gather, kwargs["attention_mask"])
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(new_length, device=embeds.device)
        self._state["prefill"] = PromptPlan(
            columns=gather,
            real=real,
            length=length,
            next_position=self._last_positions(kwargs["position_ids"]) + 1,
            position_shape=kwargs["position_ids"].shape[:-2],
            image_mask=image_mask,
            images=images,
        )
        stats.prefill_tokens = new_length
        stats.layer_tokens = [new_length] * len(self._adapter.language_model(self._model).layers)
        stats.stage_seconds["select"] = time.perf_counter() - start
        self._state["prefill_start"] = time.perf_counter()
        self.stats = stats
        return kwargs

    def _decode(self, kwargs: dict, embeds: torch.Tensor, cached: int) -> dict:
        """A decoding step after a prefill whose prompt the cache holds only in part."""
        prefill: PromptPlan = self._state["prefill"]
        new = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        step = cached - (prefill.length - prefill.dropped)  # tokens generated before this call
        if mask is None:  # all ones before pruning: the pad slots of shorter rows must stay masked
            if not bool(prefill.real.all()):
                ones = torch.ones(embeds.shape[0], step + new, dtype=torch.long, device=embeds.device)
                kwargs["attention_mask"] = torch.cat([prefill.real.long(), ones], 1)
        elif not isinstance(mask, dict):
            prompt = torch.where(prefill.real, mask[:, : prefill.length].gather(1, prefill.columns), 0)
            kwargs["attention_mask"] = torch.cat([prompt, mask[:, prefill.length :]], 1)
        if kwargs.get("cache_position") is not None:  # older transformers pass it: the shorter cache's
            kwargs["cache_position"] = torch.arange(cached, cached + new, device=embeds.device)
        base = prefill.next_position + step  # (batch,)
        offsets = torch.arange(new, device=embeds.device)
        positions = base[:, None] + offsets[None]
        positions = positions.expand(*prefill.position_shape, *positions.shape).contiguous()
        if positions.dim() == 3 and positions.shape[0] == 4:  # Qwen's text row: index in the kept cache
            positions[0] = cached + offsets
        kwargs["position_ids"] = positions
        return kwargs

    def _measure(self, module, args, kwargs, output):
        start = self._state.pop("prefill_start", None)
        if start is None or self.stats is None:
            return
        self.stats.stage_seconds["prefill"] = time.perf_counter() - start
        self.stats.kv_cache_bytes = cache_bytes(output_cache(output, kwargs))
        self._check_pruned()

    def _check_pruned(self) -> None:
        """After a prefill with ``budget < 1``: raise if no visual token was dropped although the
        budget says some must be (a hook that found nothing to act on), instead of reporting it."""
        stats = self.stats
        if (
            self.budget >= 1.0
            or not self.drops_visual_tokens
            or sum(stats.visual_tokens_kept) < sum(stats.visual_tokens_in)
        ):
            return
        binding = [n for n in stats.visual_tokens_in if n and self.kept_count_for(n) < n]
        if binding:
            raise patch_point_error(
                self._model,
                f"{type(self).__name__}(budget={self.budget}) kept all "
                f"{sum(stats.visual_tokens_in)} visual tokens: its pruning hooks "
                "never acted",
            )

    def kept_count_for(self, n: int) -> int:
        """How many of an image's ``n`` visual tokens the budget keeps: ``max(1, floor(budget * n))``."""
        return n if self.budget >= 1.0 else max(1, int(self.budget * n))

    # --- helpers ----------------------------------------------------------------------------------
    def _images(
        self,
        image_mask: torch.Tensor,
        embeds: torch.Tensor,
        positions: torch.Tensor | None,
        call: dict | None = None,
        layouts: bool = True,
    ) -> list[ImageTokens]:
        """Each image's tokens: one contiguous run of image tokens per image, in order of appearance.

        ``layouts=False`` (inside the LLM, after tokens were dropped) leaves ``layout`` unset.
        """
        runs: list[tuple[int, torch.Tensor]] = []
        for sample in range(image_mask.shape[0]):
            columns = image_mask[sample].nonzero()[:, 0]
            if len(columns) == 0:
                continue
            breaks = (columns[1:] - columns[:-1] != 1).nonzero()[:, 0] + 1
            for run in torch.tensor_split(columns, breaks.tolist()):
                runs.append((sample, run))
        found = self._adapter.patch_layouts(self._model, call or {}, runs, positions) if layouts else [None] * len(runs)
        return [
            ImageTokens(sample=sample, positions=run, embeds=embeds[sample, run], layout=layout, index=index)
            for index, ((sample, run), layout) in enumerate(zip(runs, found))
        ]

    @staticmethod
    def _gather_positions(positions: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 2:
            return positions.gather(1, columns)
        # (rows, batch, length): Qwen's mRoPE (3 rows, or 4 with a text row first)
        gathered = positions.gather(2, columns[None].expand(positions.shape[0], -1, -1))
        if positions.shape[0] == 4:
            # The text row only tells the mask builder where (packed) sequences start: it must
            # stay consecutive, so it is renumbered over the kept tokens (RoPE uses rows 1-3).
            gathered = gathered.clone()
            gathered[0] = renumbered(mask)
        return gathered

    @staticmethod
    def _last_positions(positions: torch.Tensor) -> torch.Tensor:
        """Per sample, the largest position in the (gathered) prompt: where text continues."""
        if positions.dim() == 3:  # mRoPE: the (t, h, w) rows, not Qwen's text row
            positions = positions[-3:].amax(0)
        return positions.amax(-1)


# --- the front door's row for token pruning (hasten.methods.METHODS) ---------------------------------
def pruning_target(model: Any) -> torch.nn.Module:
    """The model a pruner attaches to: the VLM itself (a ``ValueError`` for anything but a module)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"token pruning attaches to a transformers VLM (a torch module); got {type(model).__name__}")
    return model


def prepare_pruner(model: torch.nn.Module, pruner: TokenPruner) -> TokenPruner:
    """Check that ``pruner`` can attach to ``model`` (free, supported, patch points present); changes nothing."""
    pruner._check_model(model)
    return pruner


def attach_pruner(model: torch.nn.Module, pruner: TokenPruner) -> None:
    pruner._install(model)


def detach_pruner(model: torch.nn.Module, pruner: TokenPruner) -> None:
    pruner._uninstall()
