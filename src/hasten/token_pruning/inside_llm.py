"""The in-LLM stage: drop visual tokens after chosen decoder layers, during prefill and decoding.

Layers up to the first pruning layer see every token. Each pruning layer scores the visual
tokens still present, from the exact queries and keys it uses: the last prompt token's
attention (FastV) or every text token's attention (MustDrop). The next layer's pre-hook gathers
the kept tokens' hidden states and hands every later layer matching position embeddings and an
attention mask, so a layer's KV cache holds only the tokens that reached it, and at every
decoding step each layer gets the columns of the mask that match its cache.

Positions are kept unless the method renumbers: RoPE of the early layers was already applied
from the original position ids, and later layers get the kept tokens' original cos/sin.

Optionally (MustDrop's "output-aware" decoding policy) the cache is compacted after the prefill:
every layer's cache then keeps only the tokens that survived the last pruning layer, and
decoding sees the same short prompt at every layer.

A method that also drops tokens before the LLM (``prunes_before_llm``) runs the shared stage
of :mod:`.core` first; the in-LLM stage then works on what it kept.

:class:`LLMLayerPruner` owns the mechanics. A method (e.g. :class:`hasten.token_pruning.FastV`)
says which layers prune and which tokens to keep from the scores (:meth:`select_in_llm`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..transformers_conventions import cache_of, output_cache, patch_point_error
from .core import ImageTokens, PromptPlan, TokenPruner, gather_plan, renumbered
from .scoring import QueryAttention

__all__ = ["LLMLayerPruner"]


@dataclass
class LayerPlan:
    """What the layers after one pruning layer hold: generate()'s prompt columns that reached them.

    ``columns`` ``(batch, kept)`` ascending per row, left-padded; ``real`` False on pad slots;
    with ``renumber``, the kept tokens' consecutive positions and where each row continues.
    """

    columns: torch.Tensor
    real: torch.Tensor
    renumbered: torch.Tensor | None = None
    next_position: torch.Tensor | None = None


@dataclass
class LLMPass:
    """One call's in-LLM state: the prompt the language model received and what each pruning
    stage kept (``plans``), then, while decoding, the current step.

    ``step`` holds the decoding step's ``generated`` count, ``queries`` and one additive mask
    per stage; ``compacted`` is None until the prefill ends, then whether every layer's cache was
    cut to the survivors (``"all_layers"``); ``first_pruning_layer_final``: the first pruning
    layer's cache too holds only the survivors (``"official"``).
    """

    length: int
    plans: list[LayerPlan] = field(default_factory=list)
    image_mask: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    step: dict | None = None
    compacted: bool | None = None
    first_pruning_layer_final: bool = False


@dataclass
class LLMLayerPruner(TokenPruner):
    """Base class of methods that drop visual tokens inside the LLM, after chosen decoder layers.

    A subclass provides :meth:`pruning_layers` and :meth:`select_in_llm`, and may set
    ``scored_by = "text"`` (score by every text token's attention instead of the last one's),
    ``prunes_before_llm = True`` (also run :meth:`select` before the LLM) and override
    :meth:`decode_cache_policy`.
    """

    scored_by: ClassVar[str] = "last"
    prunes_before_llm: ClassVar[bool] = False

    # --- what a method provides ------------------------------------------------------------------
    def pruning_layers(self, num_layers: int) -> list[int]:
        """The decoder layers (0-based, ascending) whose attention scores the tokens; each must
        leave at least one layer after it."""
        raise NotImplementedError

    def select_in_llm(self, image: ImageTokens, stage: int) -> torch.Tensor:
        """Indices (into ``image.positions``, ascending) to keep after pruning layer number ``stage``."""
        raise NotImplementedError

    def decode_cache_policy(self) -> str:
        """What each layer's cache keeps once the prefill is done:

        ``"per_layer"`` (default): the tokens that reached the layer; ``"all_layers"``: every
        layer only the final survivors (the prompt is one short sequence for decoding);
        ``"official"``: layers from the first pruning layer on only the final survivors, earlier
        layers the whole prompt (MustDrop's released code).
        """
        return "per_layer"

    # --- hooks ----------------------------------------------------------------------------------------
    def _extra_hooks(self, model, adapter, language_model) -> list:
        layers = language_model.layers
        pruning = self.pruning_layers(len(layers))
        if not pruning or any(not 0 <= layer < len(layers) - 1 for layer in pruning) or sorted(set(pruning)) != pruning:
            raise ValueError(
                f"pruning layers must be ascending and in [0, {len(layers) - 2}] for this "
                f"{len(layers)}-layer LLM, got {pruning!r}"
            )
        self._pruning = pruning
        self._recorder = QueryAttention(pruning)
        stage_of = {index: sum(layer < index for layer in pruning) for index in range(len(layers))}
        self._stage_of = stage_of
        return [
            *(
                layer.register_forward_pre_hook(functools.partial(self._layer_inputs, index=index), with_kwargs=True)
                for index, layer in enumerate(layers)
                if stage_of[index] > 0 or index == pruning[0]
            ),
            *(super()._extra_hooks(model, adapter, language_model) if self.prunes_before_llm else []),
        ]

    def _attention_hook(self, language_model):
        return self._recorder

    # --- the language model's inputs --------------------------------------------------------------
    def _before_llm(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached == 0:
            return args, self._start_prefill(kwargs, embeds)
        llm = self._state.get("llm")
        if llm is None:
            return args, kwargs
        if "prefill" in self._state:  # the LLM-level prompt is shorter than generate() thinks
            kwargs = self._decode(kwargs, embeds, cached)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            raise ValueError("token pruning needs a 2-D attention mask (got precomputed 4-D masks)")
        queries = embeds.shape[1]
        llm.step = dict(
            generated=cached - llm.length,
            queries=queries,
            masks=[self._decode_mask(plan, mask, cached, queries, embeds.dtype) for plan in llm.plans],
        )
        return args, kwargs

    def _start_prefill(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        self._state = {"call": self._state.get("call")}  # nothing of an earlier call survives
        if self.budget < 1.0 and self.prunes_before_llm:
            kwargs = self._prefill(kwargs, embeds)  # stage 1 (sets stats and the LLM-level plan)
            before = self._state["prefill"]
            input_ids_mask = before.image_mask.gather(1, before.columns) & before.real
            prompt = dict(
                image_mask=input_ids_mask,
                mask=kwargs["attention_mask"],
                positions=kwargs["position_ids"],
                length=kwargs["inputs_embeds"].shape[1],
            )
        else:
            prompt = self._prompt(kwargs, kwargs.get("inputs_embeds"))
            self.stats = self._full_prompt_stats(prompt)
        self._state["prefill_start"] = time.perf_counter()
        if self.budget >= 1.0:
            self._recorder.active = False
            return kwargs  # nothing to drop: the exact unpruned model
        prompt.pop("call", None)
        self._state["llm"] = LLMPass(
            length=prompt["length"],
            image_mask=prompt["image_mask"],
            mask=prompt["mask"],
            positions=prompt["positions"],
            protected=self._protected(prompt),
        )
        valid = prompt["mask"].bool()
        self._recorder.rows = self._text_rows(prompt["image_mask"], valid) if self.scored_by == "text" else None
        self._recorder.active = True
        return kwargs

    def _protected(self, prompt: dict) -> torch.Tensor | None:
        """Tokens of the LLM input that no in-LLM stage may drop (None: none)."""
        return None

    @staticmethod
    def _text_rows(image_mask: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        """The text tokens that score visual tokens (``scored_by = "text"``). MustDrop's released
        code takes the text after the image; the tokens before it cannot attend it (causal), so
        every non-image token gives the same scores."""
        return [(valid[b] & ~image_mask[b]).nonzero()[:, 0] for b in range(image_mask.shape[0])]

    # --- every decoder layer after the first pruning layer ---------------------------------------
    def _layer_inputs(self, module, args, kwargs, index: int):
        llm = self._state.get("llm")
        if llm is None:
            return args, kwargs
        stage = self._stage_of[index]
        if stage == 0:  # the first pruning layer: decoding over the survivors only under the "official" policy
            if llm.step is None or not llm.first_pruning_layer_final:
                return args, kwargs
            stage = 1
        hidden = args[0] if args else kwargs["hidden_states"]
        if llm.step is None and stage > len(llm.plans):  # prefill: this layer follows a pruning layer
            hidden = self._drop(hidden, stage)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        if stage > len(llm.plans):  # compacted after the prefill: nothing per layer
            return args, kwargs
        plan = llm.plans[stage - 1]
        if llm.step is None:
            kwargs["attention_mask"] = self._prefill_mask(plan, hidden.dtype)
            self._positions(kwargs, hidden, plan, llm, decoding=None)
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = torch.arange(plan.columns.shape[1], device=hidden.device)
        else:
            step = llm.step
            kwargs["attention_mask"] = step["masks"][stage - 1]
            if self.renumber:
                self._positions(kwargs, hidden, plan, llm, decoding=step)
        return args, kwargs

    def _positions(
        self, kwargs: dict, hidden: torch.Tensor, plan: LayerPlan, llm: LLMPass, decoding: dict | None
    ) -> None:
        """Position ids and cos/sin of the tokens this layer sees (original, or renumbered)."""
        if self.renumber:
            if decoding is None:
                positions = plan.renumbered
            else:
                positions = (
                    plan.next_position[:, None]
                    + decoding["generated"]
                    + torch.arange(decoding["queries"], device=hidden.device)[None]
                )
            kwargs["position_ids"] = positions
            if kwargs.get("position_embeddings") is not None:
                kwargs["position_embeddings"] = self._language_model.rotary_emb(hidden, positions)
            return
        columns = plan.columns
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(self._gather_sequence(t, columns) for t in cos_sin)
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[-1] == llm.length:
            index = columns.expand(*positions.shape[:-2], *columns.shape) if positions.dim() > 2 else columns
            kwargs["position_ids"] = positions.gather(-1, index)

    def _drop(self, hidden: torch.Tensor, stage: int) -> torch.Tensor:
        """Score, select and gather at pruning layer number ``stage`` (1-based) of the prefill."""
        start = time.perf_counter()
        llm = self._state["llm"]
        layer = self._pruning[stage - 1]
        batch, length = hidden.shape[:2]
        if llm.plans:
            previous = llm.plans[-1]
        else:
            columns = torch.arange(length, device=hidden.device).expand(batch, -1)
            previous = LayerPlan(columns=columns, real=torch.ones_like(columns, dtype=torch.bool))
        image = llm.image_mask.gather(1, previous.columns) & previous.real
        protected = None
        if llm.protected is not None:
            protected = llm.protected.gather(1, previous.columns) & previous.real
        scores = self._recorder.scores.pop(layer, None)
        if scores is None:
            raise patch_point_error(
                self._model,
                f"{type(self).__name__}: decoder layer {layer}'s attention did not go "
                "through transformers' attention-function registry "
                "(`config._attn_implementation`), so it could not be scored",
            )
        keep = ~image & previous.real
        for tokens in self._images(image, hidden, None, None, layouts=False):
            if protected is not None:
                tokens.protected = protected[tokens.sample, tokens.positions]
            if self.scored_by == "text":
                tokens.text_attention = scores[tokens.sample][:, tokens.positions]
            else:
                tokens.scores = scores[tokens.sample, tokens.positions]
            kept = self.select_in_llm(tokens, stage)
            if protected is not None:  # the method's protected tokens always stay
                flags = torch.zeros(len(tokens.positions), dtype=torch.bool, device=kept.device)
                flags[kept] = True
                kept = (flags | protected[tokens.sample, tokens.positions].to(kept.device)).nonzero()[:, 0]
            keep[tokens.sample, tokens.positions[kept.to(tokens.positions.device)]] = True
        relative, real = gather_plan(keep)
        columns = previous.columns.gather(1, relative)
        valid = real & llm.mask.gather(1, columns).bool()
        plan = LayerPlan(columns=columns, real=real)
        if self.renumber:
            plan.renumbered = renumbered(valid)
            plan.next_position = plan.renumbered.amax(-1) + 1
        llm.plans.append(plan)
        if self.scored_by == "text":
            self._recorder.rows = self._text_rows(llm.image_mask.gather(1, columns) & real, valid)
        if stage == len(self._pruning):
            self._recorder.active = False
        self._record_stats(stage)
        seconds = self.stats.stage_seconds
        seconds["select_in_llm"] = seconds.get("select_in_llm", 0.0) + time.perf_counter() - start
        return hidden.gather(1, relative[..., None].expand(-1, -1, hidden.shape[-1]))

    def _record_stats(self, stage: int) -> None:
        """Kept tokens (as flags over the ORIGINAL prompt's visual tokens) and per-layer lengths."""
        llm = self._state["llm"]
        plan = llm.plans[-1]
        columns, real = plan.columns, plan.real
        before = self._state.get("prefill")
        if before is not None:  # stage 1 ran: map back to the original prompt
            image_mask = before.image_mask
            columns, real = before.columns.gather(1, columns), real & before.real.gather(1, columns)
        else:
            image_mask = llm.image_mask
        keep = ~image_mask
        for row in range(keep.shape[0]):
            keep[row, columns[row][real[row]]] = True
        self.stats.record_kept(keep, image_mask)
        self.stats.prefill_tokens = plan.columns.shape[1]
        self.stats.layer_tokens = [
            llm.length
            if self._stage_of[i] == 0
            else llm.plans[min(self._stage_of[i], len(llm.plans)) - 1].columns.shape[1]
            for i in range(len(self._stage_of))
        ]

    # --- after the prefill -------------------------------------------------------------------------
    def _after_llm(self, module, args, kwargs, output):
        llm = self._state.get("llm")
        cache = output_cache(output, kwargs)
        if llm is not None and llm.plans and llm.step is None and llm.compacted is None:
            self._recorder.active = False
            policy = self.decode_cache_policy()
            if policy == "all_layers" and cache is not None:
                self._compact(cache)
            elif policy == "official" and cache is not None:
                self._compact_pruned_layers(cache)
            llm.compacted = policy == "all_layers"
        self._measure(module, args, kwargs, output)

    def _keep_final(self, cache, from_layer: int) -> None:
        """Cut the cache of every layer from ``from_layer`` on to the final survivors."""
        llm = self._state["llm"]
        final = llm.plans[-1]
        for index, layer in enumerate(getattr(cache, "layers", [])):
            stage = self._stage_of.get(index, 0)
            if index < from_layer or stage == len(llm.plans):
                continue
            if stage == 0:
                relative = final.columns
            else:  # where each final column sits in this layer's shorter cache
                plan = llm.plans[stage - 1]
                columns = torch.where(plan.real, plan.columns, llm.length)  # pad slots: a spare column
                where = torch.zeros(columns.shape[0], llm.length + 1, dtype=torch.long, device=columns.device)
                where.scatter_(1, columns, torch.arange(columns.shape[1], device=columns.device).expand_as(columns))
                relative = where.gather(1, final.columns)
            index_ = relative[:, None, :, None]
            layer.keys = layer.keys.gather(2, index_.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, index_.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))

    def _compact_pruned_layers(self, cache) -> None:
        """``"official"`` policy: the layers from the first pruning layer on keep only the final
        survivors, the earlier layers the whole prompt; decoding gives each the mask (and,
        renumbering, the positions) of what its cache holds."""
        self._keep_final(cache, from_layer=self._pruning[0])
        llm = self._state["llm"]
        llm.plans = [llm.plans[-1]] * len(llm.plans)
        llm.first_pruning_layer_final = True

    def _compact(self, cache) -> None:
        """``"all_layers"`` policy: only the final survivors in every layer's cache; decoding then
        sees one short prompt."""
        llm = self._state["llm"]
        final = llm.plans[-1]
        self._keep_final(cache, from_layer=0)
        # the LLM-level plan: generate()'s prompt -> the compacted cache
        before = self._state.get("prefill")
        columns, real = final.columns, final.real
        positions = llm.positions
        if before is not None:
            columns, real = before.columns.gather(1, columns), real & before.real.gather(1, columns)
            length, position_shape = before.length, before.position_shape
        else:
            length, position_shape = llm.length, positions.shape[:-2]
        if self.renumber:
            next_position = final.next_position
        else:
            gathered = positions.gather(
                -1,
                final.columns.expand(*positions.shape[:-2], *final.columns.shape)
                if positions.dim() > 2
                else final.columns,
            )
            next_position = self._last_positions(gathered) + 1
        self._state["prefill"] = PromptPlan(
            columns=columns, real=real, length=length, next_position=next_position, position_shape=position_shape
        )
        # from now on the LLM-level rewrite is the whole story: no per-layer plans
        self._state["llm"] = LLMPass(length=final.columns.shape[1], compacted=True)

    # --- masks -----------------------------------------------------------------------------------
    def _prefill_mask(self, plan: dict, dtype) -> torch.Tensor:
        """Additive (batch, 1, n, n) causal mask over the kept tokens (pad slots see only themselves)."""
        columns, real = plan.columns, plan.real
        valid = real & self._state["llm"].mask.gather(1, columns).bool()
        n = columns.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=columns.device).tril()
        allowed = causal & valid[:, None, :]
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=columns.device)  # no empty rows: no NaN
        return self._additive(allowed[:, None], dtype)

    def _decode_mask(self, plan: dict, mask, cached: int, queries: int, dtype) -> torch.Tensor:
        """Additive (batch, 1, queries, kept + generated) mask of a decoding step for one stage's layers.

        ``mask`` is the LLM's 2-D mask over its prompt + generated tokens (or None: all ones);
        ``cached`` the length of the first layer's cache, which holds the whole LLM prompt.
        """
        columns, real = plan.columns, plan.real
        llm = self._state["llm"]
        length = llm.length
        generated = cached - length + queries  # generated tokens, this step's included
        prompt = real & llm.mask.gather(1, columns).bool()
        if mask is None:
            later = torch.ones(columns.shape[0], generated, dtype=torch.bool, device=columns.device)
        else:
            later = mask[:, length : length + generated].bool()
        keys = torch.cat([prompt, later], 1)
        total = keys.shape[1]
        query_positions = total - queries + torch.arange(queries, device=columns.device)
        causal = torch.arange(total, device=columns.device)[None] <= query_positions[:, None]
        return self._additive(keys[:, None, None, :] & causal[None, None], dtype)

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    @staticmethod
    def _gather_sequence(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Gather the sequence axis (-2) of a cos/sin table ``(..., batch, length, dim)``."""
        lead = tensor.dim() - 3
        index = columns.view(*([1] * lead), *columns.shape, 1).expand(
            *tensor.shape[:-2], columns.shape[1], tensor.shape[-1]
        )
        return tensor.gather(-2, index)
