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
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .adapters import VLMAdapter, adapter_for

__all__ = ["ImageTokens", "PruningStats", "TokenPruner", "gather_plan"]


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
    """

    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    kv_cache_bytes: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    visual_kept_mask: list[torch.Tensor] = field(default_factory=list)

    def record_kept(self, keep: torch.Tensor, image_mask: torch.Tensor) -> None:
        """Fill the kept counts and masks from (batch, length) keep and image-token masks."""
        self.visual_tokens_kept = (keep & image_mask).sum(1).tolist()
        self.visual_kept_mask = [keep[row][image_mask[row]].cpu() for row in range(keep.shape[0])]


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
        Their merged input embeddings (the projector's output).
    grid : (rows, cols) or None
        Token grid in raster order, where the tokens form one.
    index : int
        Image number in the batch, in order of appearance (matches vision-tower batches).
    scores : Tensor (n,), optional
        Scores the stage computed for these tokens (e.g. the last prompt token's attention at an
        LLM layer, for in-LLM methods).
    """

    sample: int
    positions: torch.Tensor
    embeds: torch.Tensor
    grid: tuple[int, int] | None
    index: int
    scores: torch.Tensor | None = None


@dataclass
class TokenPruner:
    """Base class of the pruning methods: a budget, hooks, and per-call stats.

    Parameters
    ----------
    budget : float, default 1.0
        Fraction of each image's visual tokens kept, in (0, 1]; 1.0 keeps everything and gives
        exactly the unpruned model.
    """

    budget: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0.0 < self.budget <= 1.0:
            raise ValueError(f"`budget` must be in (0, 1], got {self.budget!r}")
        self.stats: PruningStats | None = None
        self._model = None
        self._handles: list[Any] = []
        self._state: dict[str, Any] = {}

    # --- what a method provides -----------------------------------------------------------------
    def kept_count(self, image: ImageTokens) -> int:
        """How many of the image's tokens to keep: ``max(1, floor(budget * n))``."""
        n = len(image.positions)
        return n if self.budget >= 1.0 else max(1, int(self.budget * n))

    def select(self, image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices (into ``image.positions``, ascending) to keep, and optional new embeddings for them."""
        raise NotImplementedError

    def _hook_vision(self, model, adapter: VLMAdapter) -> list[Any]:
        """Hooks a method installs inside the vision tower (e.g. to record CLS attention)."""
        return []

    # --- attach / detach ------------------------------------------------------------------------
    def attach(self, model) -> "TokenPruner":
        """Install the hooks on ``model`` (a supported transformers VLM); see :meth:`apply`."""
        if self._model is not None:
            raise ValueError(f"{type(self).__name__} is already attached to a model; detach() it first")
        adapter = adapter_for(model)
        self._adapter, self._model = adapter, model
        language_model = adapter.language_model(model)
        self._handles = [
            model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            language_model.register_forward_pre_hook(self._prune, with_kwargs=True),
            language_model.register_forward_hook(self._measure, with_kwargs=True),
            *self._hook_vision(model, adapter),
        ]
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._model, self._state = [], None, {}

    @contextlib.contextmanager
    def apply(self, model) -> Iterator["TokenPruner"]:
        """``with pruner.apply(model): model.generate(...)`` — attached inside, detached after."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    # --- hooks ------------------------------------------------------------------------------------
    def _record_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._state["call"] = {"input_ids": input_ids, "kwargs": kwargs}

    def _prune(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        if embeds is None:
            raise ValueError("token pruning needs the VLM to call its language model with `inputs_embeds`")
        if cached == 0:
            return args, self._prefill(kwargs, embeds)
        if "prefill" in self._state:
            return args, self._decode(kwargs, embeds, cached)
        return args, kwargs

    def _prefill(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        call = self._state.pop("call", None)
        self._state.pop("prefill", None)
        input_ids = call["input_ids"] if call else None
        if input_ids is None or input_ids.shape != embeds.shape[:2]:
            raise ValueError("token pruning needs `input_ids` (to find the image tokens), not only `inputs_embeds`")
        start = time.perf_counter()
        batch, length = input_ids.shape
        device = embeds.device
        image_mask = input_ids == self._adapter.image_token_id(self._model)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            raise ValueError("token pruning needs a 2-D attention mask (got precomputed 4-D masks)")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        positions = kwargs.get("position_ids")
        if positions is None:  # what the language model would use: 0 .. length-1
            positions = torch.arange(length, device=device).expand(batch, -1)

        images = self._images(image_mask, embeds, positions)
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
        kwargs["position_ids"] = self._gather_positions(positions, gather, kwargs["attention_mask"])
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(new_length, device=device)
        last = self._last_positions(kwargs["position_ids"])
        self._state["prefill"] = dict(columns=gather, real=real, length=length, dropped=length - new_length,
                                      next_position=last + 1, position_shape=kwargs["position_ids"].shape[:-2])
        stats.prefill_tokens = new_length
        stats.stage_seconds["select"] = time.perf_counter() - start
        self._state["prefill_start"] = time.perf_counter()
        self.stats = stats
        return kwargs

    def _decode(self, kwargs: dict, embeds: torch.Tensor, cached: int) -> dict:
        prefill = self._state["prefill"]
        new = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        step = cached - (prefill["length"] - prefill["dropped"])  # tokens generated before this call
        if mask is None:  # all ones before pruning: the pad slots of shorter rows must stay masked
            if not bool(prefill["real"].all()):
                ones = torch.ones(embeds.shape[0], step + new, dtype=torch.long, device=embeds.device)
                kwargs["attention_mask"] = torch.cat([prefill["real"].long(), ones], 1)
        elif not isinstance(mask, dict):
            prompt = torch.where(prefill["real"], mask[:, : prefill["length"]].gather(1, prefill["columns"]), 0)
            kwargs["attention_mask"] = torch.cat([prompt, mask[:, prefill["length"]:]], 1)
        if kwargs.get("cache_position") is not None:  # older transformers pass it: the shorter cache's
            kwargs["cache_position"] = torch.arange(cached, cached + new, device=embeds.device)
        base = prefill["next_position"] + step  # (batch,)
        offsets = torch.arange(new, device=embeds.device)
        positions = base[:, None] + offsets[None]
        positions = positions.expand(*prefill["position_shape"], *positions.shape).contiguous()
        if positions.dim() == 3 and positions.shape[0] == 4:  # Qwen's text row: index in the kept cache
            positions[0] = cached + offsets
        kwargs["position_ids"] = positions
        return kwargs

    def _measure(self, module, args, kwargs, output):
        start = self._state.pop("prefill_start", None)
        if start is None or self.stats is None:
            return
        self.stats.stage_seconds["prefill"] = time.perf_counter() - start
        cache = getattr(output, "past_key_values", None) or kwargs.get("past_key_values")
        total = 0
        for layer in getattr(cache, "layers", []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        self.stats.kv_cache_bytes = total

    # --- helpers ----------------------------------------------------------------------------------
    def _images(self, image_mask: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor) -> list[ImageTokens]:
        """Each image's tokens: one contiguous run of image tokens per image, in order of appearance."""
        runs: list[tuple[int, torch.Tensor]] = []
        for sample in range(image_mask.shape[0]):
            columns = image_mask[sample].nonzero()[:, 0]
            if len(columns) == 0:
                continue
            breaks = (columns[1:] - columns[:-1] != 1).nonzero()[:, 0] + 1
            for run in torch.tensor_split(columns, breaks.tolist()):
                runs.append((sample, run))
        grids = self._adapter.image_grids(self._model, runs, positions)
        return [ImageTokens(sample=sample, positions=run, embeds=embeds[sample, run], grid=grid, index=index)
                for index, ((sample, run), grid) in enumerate(zip(runs, grids))]

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
            gathered[0] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return gathered

    @staticmethod
    def _last_positions(positions: torch.Tensor) -> torch.Tensor:
        """Per sample, the largest position in the (gathered) prompt: where text continues."""
        if positions.dim() == 3:  # mRoPE: the (t, h, w) rows, not Qwen's text row
            positions = positions[-3:].amax(0)
        return positions.amax(-1)
