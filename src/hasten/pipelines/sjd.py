"""Speculative Jacobi Decoding (SJD) for autoregressive text-to-image models (Janus, Emu3).

SJD (Teng et al., ICLR 2025) decodes a window of ``L`` draft image tokens per forward pass and
accepts them with the speculative-sampling rule, so the images keep sampling's randomness and
follow the model's own distribution while the model runs about half as many passes. One loop
serves both SJD and plain autoregressive (AR) decoding (``sjd=None``: a window of 0), so the two
are compared on the same code path:

1. Prefill the prompt (conditional and unconditional rows as one doubled batch for CFG). The
   last prompt token stays *pending*: the next forward starts with it.
2. Each iteration feeds ``[pending, d_n, ..., d_{n+W-1}]`` (the window of drafts) and gets the
   processed distribution ``q`` (CFG, temperature, top-k, top-p) for positions ``n .. n+W``.
3. Scan the drafts: accept ``d_i`` if ``r < min(1, q_i(d_i) / p_i(d_i))`` (``p_i``: the
   distribution ``d_i`` was drawn from); at the first rejection draw a replacement from
   ``normalize(max(0, q_i - p_i))`` and stop. If every draft is accepted, one more token is drawn
   from ``q_{n+W}``. Every iteration therefore emits at least one token.
4. The KV entries of rejected drafts are cropped from the cache; the last emitted token becomes
   the pending one. Drafts after the rejection stay, re-drawn from this pass's ``q`` (the Jacobi
   update) with ``p`` set to it; new window slots are initialised by :attr:`SJDConfig.init`.
5. Deterministic layout tokens (Emu3's end-of-line) are placed, never sampled.

Greedy mode (:attr:`SJDConfig.greedy`) is plain Jacobi decoding: a draft is accepted while it
equals ``argmax q``; its token ids equal greedy AR decoding's. Grouped acceptance (GSD,
:attr:`SJDConfig.grouped`) is lossy and off by default.

Examples
--------
>>> import hasten.tiny
>>> from hasten.pipelines import SJDConfig, SJDPipeline
>>> pipe = SJDPipeline(*hasten.tiny.ar_image_model("janus"))
>>> out = pipe("a red fox in the snow", sjd=SJDConfig(window=16), seed=0)
>>> out.images.shape, out.stats.tokens
(torch.Size([1, 3, 64, 64]), 64)
>>> out.stats.forwards < 64 + 1          # AR needs one pass per token plus the prefill
True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..transformers_conventions import cache_keyword
from .sjd_adapters import ARImageAdapter, ImageLayout, adapter_for

__all__ = ["INIT_STRATEGIES", "SJDConfig", "SJDOutput", "SJDPipeline", "SJDStats"]

INIT_STRATEGIES = ("random", "sample_horizontal", "sample_vertical", "repeat_horizontal", "repeat_vertical")


@dataclass(frozen=True)
class SJDConfig:
    """Speculative Jacobi Decoding settings.

    Parameters
    ----------
    window : int, default 16
        Draft tokens verified per forward pass, besides the pending token every pass also feeds:
        a pass runs ``window + 1`` tokens. The official code's ``max_num_new_tokens`` counts the
        pending token too (its default 16 is the pending token + 15 drafts): ``window=15``
        reproduces the official setting.
    init : str, default "random"
        How a new window slot gets its draft: ``"random"`` (uniform over the image vocabulary,
        the paper's default), ``"sample_horizontal"`` / ``"sample_vertical"`` (drawn from the last
        distribution of the left / upper neighbour), ``"repeat_horizontal"`` /
        ``"repeat_vertical"`` (a copy of that neighbour's token, a point-mass draft). Every
        strategy is lossless: acceptance uses the distribution the draft was drawn from.
    greedy : bool, default False
        Plain Jacobi decoding with argmax: output identical to greedy AR decoding.
    grouped : bool, default False
        GSD grouped acceptance (So et al., 2025): LOSSY, faster. A rejected draft is accepted
        anyway with probability ``min(1, q(G) / p(G))``, G = the tokens within
        ``group_radius`` ranks of the draft in sorted-``q`` order whose probability differs from
        the draft's by less than ``group_threshold``.
    group_radius : int, default 7
    group_threshold : float, default 0.15
    """

    window: int = 16
    init: str = "random"
    greedy: bool = False
    grouped: bool = False
    group_radius: int = 7
    group_threshold: float = 0.15

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"`window` must be an integer >= 1, got {self.window!r}")
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"`init` must be one of {INIT_STRATEGIES}, got {self.init!r}")
        if self.grouped and self.greedy:
            raise ValueError("`grouped` acceptance is for sampling; it has no meaning with `greedy=True`")
        if self.group_radius < 0 or not 0.0 <= self.group_threshold <= 1.0:
            raise ValueError("`group_radius` must be >= 0 and `group_threshold` in [0, 1]")


@dataclass
class SJDStats:
    """What one image cost. ``forwards`` counts every language-model call, the prefill included."""

    forwards: int = 0
    tokens: int = 0
    accepted_per_forward: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Image-span tokens emitted per decoding pass (the prefill is not a decoding pass)."""
        passes = len(self.accepted_per_forward)
        return self.tokens / passes if passes else 0.0


@dataclass
class SJDOutput:
    """Images ``(B, 3, H, W)`` in [0, 1], the span's sequence ids ``(B, length)`` and per-image stats."""

    images: torch.Tensor
    tokens: torch.Tensor
    stats: SJDStats
    per_image: list[SJDStats]
    cache: Any = None


class SJDPipeline:
    """Text-to-image generation with an autoregressive model, by SJD or plain AR decoding.

    Parameters
    ----------
    model : JanusForConditionalGeneration or Emu3ForConditionalGeneration
        An unmodified transformers model (e.g. ``from_pretrained("deepseek-community/Janus-Pro-1B")``).
    processor : the model's processor (``JanusProcessor`` / ``Emu3Processor``).

    Examples
    --------
    >>> import hasten.tiny
    >>> pipe = SJDPipeline(*hasten.tiny.ar_image_model("emu3"))
    >>> greedy = SJDConfig(greedy=True)
    >>> a = pipe("a lighthouse", sjd=greedy, guidance_scale=3.0)
    >>> b = pipe("a lighthouse", sjd=None, guidance_scale=3.0, greedy=True)
    >>> bool((a.tokens == b.tokens).all())
    True
    """

    def __init__(self, model: Any, processor: Any):
        self.adapter: ARImageAdapter = adapter_for(model, processor)
        self.model = model
        self.processor = processor
        self.progress_bar = True

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        sjd: SJDConfig | None = SJDConfig(),
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        return_cache: bool = False,
    ) -> SJDOutput:
        """Generate one image per prompt.

        Parameters
        ----------
        prompt : str or list of str
            Prompts are decoded one after another (each with its own acceptance pattern).
        sjd : SJDConfig or None
            ``None`` runs plain autoregressive decoding through the same loop.
        guidance_scale : float, optional
            CFG weight ``s`` in ``uncond + s * (cond - uncond)`` (the official Janus/Emu3 form;
            ``s = 1`` is the conditional model alone, no unconditional row). Default: the
            family's official value (Janus 5.0, Emu3 3.0).
        negative_prompt : str, optional
            Unconditional prompt (Emu3 only; Janus masks the prompt instead).
        temperature, top_k, top_p
            Applied after CFG (top-k defaults to the family's official value: Emu3 2048).
        greedy : bool
            Argmax decoding, for AR (``sjd=None``) and SJD alike (SJD's output is then identical to
            greedy AR's). ``SJDConfig(greedy=True)`` asks for the same.
        height, width : int, optional
            Emu3: output size in pixels (multiples of its spatial factor 8). Janus: fixed grid.
        seed : int, optional
            Seeds every random draw (drafts, acceptance, sampling).
        return_cache : bool
            Keep the last prompt's KV cache in the output (for inspection and tests).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("`prompt` is empty")
        if not isinstance(greedy, bool):
            raise ValueError(f"`greedy` must be True or False, got {greedy!r}")
        if greedy and sjd is not None and sjd.grouped:
            raise ValueError("`greedy=True` with grouped (GSD) acceptance: grouped acceptance is for sampling")
        greedy = greedy or (sjd is not None and sjd.greedy)
        scale = self.adapter.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale < 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 disables CFG), got {scale}")
        if negative_prompt is not None and scale == 1.0:
            raise ValueError("`negative_prompt` needs CFG: pass `guidance_scale` > 1")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"`top_k` must be >= 1, got {top_k}")
        top_k = self.adapter.default_top_k if top_k is None else top_k
        layout = self.adapter.layout(height, width)
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        if top_k is not None and top_k < len(self.adapter.vocab_ids):
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(torch.seed() if seed is None else seed)
        decoder = _Decoder(self.adapter, layout, sjd, scale, warpers, greedy, generator)

        ids, per_image, cache = [], [], None
        for text in prompts:
            start = time.perf_counter()
            embeds, mask = self.adapter.encode_prompt(text, negative_prompt, scale > 1.0, layout)
            span, stats, cache = decoder.run(embeds, mask, self.progress_bar)
            stats.seconds = time.perf_counter() - start
            ids.append(span)
            per_image.append(stats)
        tokens = torch.stack(ids)
        images = self.adapter.decode(tokens, layout)
        total = SJDStats(
            forwards=sum(s.forwards for s in per_image), tokens=sum(s.tokens for s in per_image),
            accepted_per_forward=[n for s in per_image for n in s.accepted_per_forward],
            seconds=sum(s.seconds for s in per_image),
        )
        return SJDOutput(images=images, tokens=tokens, stats=total, per_image=per_image,
                         cache=cache if return_cache else None)


class _Decoder:
    """The decoding loop for one layout and one set of sampling settings.

    Drafts live on the model's device as vocabulary indices (``-1`` at fixed layout positions)
    with the distributions they were drawn from, so one verification costs one small
    device-to-host copy, whatever the window.
    """

    def __init__(self, adapter, layout: ImageLayout, sjd: SJDConfig | None, scale: float, warpers, greedy: bool,
                 generator: torch.Generator):
        self.adapter, self.layout, self.sjd, self.scale = adapter, layout, sjd, scale
        self.warpers, self.greedy, self.generator = warpers, greedy, generator
        self.vocab_ids = adapter.vocab_ids
        self.vocab_list = self.vocab_ids.tolist()  # host copy: mapping emitted tokens costs no device sync
        self.device = self.vocab_ids.device
        self.vocab_size = len(self.vocab_ids)
        self.window = 0 if sjd is None else sjd.window
        fixed = torch.full((layout.length,), -1, dtype=torch.long)
        for position, token in layout.fixed.items():
            fixed[position] = token
        self.fixed_ids = fixed.to(self.device)
        self.init_mode, _, self.init_direction = (sjd.init if sjd else "random").partition("_")

    # --- distributions ---------------------------------------------------------------------------
    def _distributions(self, hidden: torch.Tensor) -> torch.Tensor:
        """Processed image-token probabilities ``(n, V)`` for each input position."""
        logits = self.adapter.image_logits(hidden).float()
        if self.scale != 1.0:
            cond, uncond = logits[0], logits[1]
            logits = uncond + self.scale * (cond - uncond)
        else:
            logits = logits[0]
        logits = self.warpers(None, logits)
        return torch.softmax(logits, dim=-1)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs`` (argmax when greedy), on the device."""
        if self.greedy:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def _sequence_ids(self, positions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sequence ids of span ``positions`` holding vocabulary ``indices`` (fixed tokens where fixed)."""
        fixed = self.fixed_ids[positions]
        return torch.where(fixed >= 0, fixed, self.vocab_ids[indices.clamp_min(0)])

    # --- drafts ----------------------------------------------------------------------------------
    def _fresh_drafts(self, start: int, count: int, span_idx: torch.Tensor, dists: dict[int, torch.Tensor]):
        """Drafts for span positions ``start .. start+count-1`` by the configured init strategy.

        A spatial prior reads each slot's neighbour (left or upper). Where that neighbour is
        itself one of the new slots, the slot follows the chain back to the new slot whose
        neighbour is known (its *root*), as the official code does: ``repeat_*`` copies the
        root's draft into every slot of the chain (the known neighbour's token, or the root's
        random draw), ``sample_*`` draws every slot of the chain from the known neighbour's last
        distribution (uniform where there is none).
        """
        positions = range(start, start + count)
        uniform = torch.full((self.vocab_size,), 1.0 / self.vocab_size, device=self.device)
        roots, known = list(range(count)), [None] * count  # per slot: its chain's root slot, root's neighbour
        if self.init_direction:
            for slot, position in enumerate(positions):
                neighbour = self.layout.neighbour(position, self.init_direction)
                if neighbour is not None and neighbour >= start:  # a new slot too: same chain
                    roots[slot] = roots[neighbour - start]
                else:
                    known[slot] = neighbour
        sources = [known[root] for root in roots]  # the known neighbour each slot's chain starts from
        if self.init_mode == "sample":
            probs = torch.stack([dists.get(source, uniform) if source is not None else uniform for source in sources])
            indices = self._draw(probs)
        else:
            probs = uniform.expand(count, -1)
            indices = torch.randint(self.vocab_size, (count,), generator=self.generator, device=self.device)
        if self.init_mode == "repeat":
            source_idx = span_idx[torch.tensor([s if s is not None else 0 for s in sources], device=self.device)]
            copies = torch.tensor([s is not None for s in sources], device=self.device) & (source_idx >= 0)
            roots_t = torch.tensor(roots, device=self.device)
            root_idx = indices[roots_t]  # a chain without a known token: the root's draw
            indices = torch.where(copies, source_idx, root_idx)
            repeat = copies | (roots_t != torch.arange(count, device=self.device))
            point = torch.nn.functional.one_hot(indices, self.vocab_size).to(uniform.dtype)
            probs = torch.where(repeat[:, None], point, probs)
        fixed = self.fixed_ids[start:start + count] >= 0
        return torch.where(fixed, -1, indices), torch.where(fixed[:, None], 0.0, probs)

    def _group_accepts(self, index: int, p: torch.Tensor, q: torch.Tensor) -> bool:
        order = torch.argsort(q, descending=True)
        rank = int((order == index).nonzero())
        lo, hi = max(0, rank - self.sjd.group_radius), rank + self.sjd.group_radius + 1
        group = order[lo:hi]
        group = group[(q[group] - q[index]).abs() < self.sjd.group_threshold]
        ratio = q[group].sum() / p[group].sum().clamp_min(1e-30)
        return bool(torch.rand((), generator=self.generator, device=q.device) < ratio)

    def _verify(self, indices: torch.Tensor, probs: torch.Tensor, q: torch.Tensor) -> tuple[list[bool], list[int]]:
        """Per draft: accepted?, and its vocabulary index (one device-to-host copy)."""
        safe = indices.clamp_min(0)
        q_draft = q.gather(1, safe[:, None])[:, 0]
        if self.greedy:
            ok = safe == q.argmax(-1)
        else:
            p_draft = probs.gather(1, safe[:, None])[:, 0]
            r = torch.rand(len(indices), generator=self.generator, device=self.device)
            ok = r * p_draft < q_draft  # r < q / p, and p > 0 for every drawn token
        ok = ok | (indices < 0)
        ok_list, index_list = torch.stack([ok.long(), indices]).tolist()
        return [bool(v) for v in ok_list], index_list

    # --- the loop --------------------------------------------------------------------------------
    def run(self, embeds: torch.Tensor, mask: torch.Tensor, progress: bool):
        layout, lm, device = self.layout, self.adapter.language_model, embeds.device
        rows = embeds.shape[0]
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        cache_arg = cache_keyword(lm)
        stats = SJDStats()
        lm(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
           **{cache_arg: cache}, use_cache=True)
        stats.forwards += 1
        pending = embeds[:, -1:]
        last_position = positions[:, -1:]
        mask = mask.clone()

        span: list[int] = []  # emitted sequence ids
        span_idx = torch.full((layout.length,), -1, dtype=torch.long, device=device)  # accepted/drafted indices
        dists: dict[int, torch.Tensor] = {}  # latest q per position (only for "sample" inits)
        draft_idx = torch.empty(0, dtype=torch.long, device=device)
        draft_p = torch.empty(0, self.vocab_size, device=device)
        bar = tqdm(total=layout.length, desc="SJD" if self.sjd else "AR", unit="tok", disable=not progress, leave=False)
        while len(span) < layout.length:
            n = len(span)
            width = min(self.window, layout.length - n)
            if len(draft_idx) < width:
                more_idx, more_p = self._fresh_drafts(n + len(draft_idx), width - len(draft_idx), span_idx, dists)
                draft_idx, draft_p = torch.cat([draft_idx, more_idx]), torch.cat([draft_p, more_p])
                span_idx[n:n + width] = draft_idx[:width]
            window_idx, window_p = draft_idx[:width], draft_p[:width]
            window_positions = torch.arange(n, n + width, device=device)
            if width:
                ids = self._sequence_ids(window_positions, window_idx).expand(rows, -1)
                inputs = torch.cat([pending, self.adapter.embed(ids)], 1)
            else:
                inputs = pending
            step_positions = last_position + torch.arange(width + 1, device=device)
            step_mask = torch.cat([mask, mask.new_ones(rows, width)], 1)
            cached = cache.get_seq_length()
            hidden = lm(inputs_embeds=inputs, attention_mask=step_mask, position_ids=step_positions,
                        **{cache_arg: cache}, use_cache=True).last_hidden_state
            stats.forwards += 1
            q = self._distributions(hidden)  # (width + 1, V): q[k] is for span position n + k
            if self.init_mode == "sample":
                for k in range(width + 1):
                    dists[n + k] = q[k]

            ok, indices = self._verify(window_idx, window_p, q[:width]) if width else ([], [])
            rejected = next((k for k, accepted in enumerate(ok) if not accepted), None)
            while rejected is not None and self.sjd.grouped and \
                    self._group_accepts(indices[rejected], window_p[rejected], q[rejected]):
                rejected = next((k for k in range(rejected + 1, width) if not ok[k]), None)
            accepted = width if rejected is None else rejected
            emitted = [layout.fixed.get(n + k, None) for k in range(accepted)]
            emitted = [f if f is not None else self.vocab_list[indices[k]] for k, f in enumerate(emitted)]
            last = None
            if rejected is not None:  # replacement from normalize(max(0, q - p))
                residual = q[rejected] if self.greedy else (q[rejected] - window_p[rejected]).clamp_min(0)
                total = residual.sum()
                # q == p exactly leaves no residual; a draw from q is then exact (no host sync to check)
                residual = torch.where(total > 0, residual / total.clamp_min(1e-30), q[rejected])
                last = int(self._draw(residual[None])[0])
            elif n + width < layout.length and layout.fixed.get(n + width) is None:  # all accepted: one more
                last = int(self._draw(q[width:width + 1])[0])
            if rejected is not None or n + width < layout.length:
                position = n + len(emitted)
                fixed = layout.fixed.get(position)
                emitted.append(fixed if fixed is not None else self.vocab_list[last])
                span_idx[position] = -1 if fixed is not None else last

            # Keep the KV of the pending token and of the accepted drafts; the last emitted token
            # (a replacement or the extra one) is not in the cache yet: it becomes the pending one.
            dropped = cache.get_seq_length() - (cached + 1 + accepted)
            if dropped:
                cache.crop(-dropped)  # negative = entries to drop (every transformers 4.x/5.x)
            span.extend(emitted)
            mask = torch.cat([mask, mask.new_ones(rows, len(emitted))], 1)
            last_position = last_position + len(emitted)
            if len(span) < layout.length:
                pending = self.adapter.embed(torch.tensor([[span[-1]]] * rows, device=device))
            stats.accepted_per_forward.append(len(emitted))
            bar.update(len(emitted))

            # Jacobi update: drafts after the rejection are re-drawn from this pass's q.
            if rejected is None:
                draft_idx, draft_p = draft_idx[:0], draft_p[:0]
            else:
                first, stop = n + rejected + 1, min(n + width + 1, layout.length)
                rows_q = q[rejected + 1:rejected + 1 + (stop - first)]
                redrawn = self._draw(rows_q) if len(rows_q) else rows_q.new_empty(0, dtype=torch.long)
                fixed = self.fixed_ids[first:stop] >= 0
                draft_idx = torch.where(fixed, -1, redrawn)
                draft_p = torch.where(fixed[:, None], 0.0, rows_q)
                span_idx[first:stop] = draft_idx
        bar.close()
        stats.tokens = len(span)
        return torch.tensor(span, device=device), stats, cache
