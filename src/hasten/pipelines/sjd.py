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

from .sjd_adapters import ARImageAdapter, ImageLayout, adapter_for

__all__ = ["INIT_STRATEGIES", "SJDConfig", "SJDOutput", "SJDPipeline", "SJDStats"]

INIT_STRATEGIES = ("random", "sample_horizontal", "sample_vertical", "repeat_horizontal", "repeat_vertical")


@dataclass
class SJDConfig:
    """Speculative Jacobi Decoding settings.

    Parameters
    ----------
    window : int, default 16
        Draft tokens verified per forward pass (the paper's and official code's ``L``).
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


@dataclass
class _Draft:
    token: int
    p: torch.Tensor | None  # (V,) the distribution it was drawn from; None for a fixed layout token


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
            For ``sjd=None``: argmax decoding. With SJD use ``SJDConfig(greedy=True)``.
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
        greedy = sjd.greedy if sjd is not None else greedy
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
    """The decoding loop for one layout and one set of sampling settings."""

    def __init__(self, adapter, layout: ImageLayout, sjd: SJDConfig | None, scale: float, warpers, greedy: bool,
                 generator: torch.Generator):
        self.adapter, self.layout, self.sjd, self.scale = adapter, layout, sjd, scale
        self.warpers, self.greedy, self.generator = warpers, greedy, generator
        self.vocab_ids = adapter.vocab_ids
        self.vocab_size = len(self.vocab_ids)
        self.index_of = {int(t): i for i, t in enumerate(self.vocab_ids.tolist())}
        self.window = 0 if sjd is None else sjd.window

    # --- distributions -------------------------------------------------------------------------
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

    def _draw(self, probs: torch.Tensor) -> int:
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _uniform(self) -> torch.Tensor:
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, device=self.vocab_ids.device)

    # --- drafts ----------------------------------------------------------------------------------
    def _fresh_draft(self, position: int, tokens: dict[int, int], dists: dict[int, torch.Tensor]) -> _Draft:
        fixed = self.layout.fixed.get(position)
        if fixed is not None:
            return _Draft(fixed, None)
        mode, _, direction = self.sjd.init.partition("_")
        neighbour = self.layout.neighbour(position, direction) if direction else None
        if mode == "repeat" and neighbour in tokens:
            index = self.index_of[tokens[neighbour]]
            point = torch.zeros(self.vocab_size, device=self.vocab_ids.device)
            point[index] = 1.0
            return _Draft(tokens[neighbour], point)
        probs = dists.get(neighbour) if mode == "sample" else None
        if probs is None:
            probs = self._uniform()
        if self.greedy and mode == "random":  # greedy still draws random starting drafts
            index = int(torch.randint(self.vocab_size, (1,), generator=self.generator, device=probs.device))
        else:
            index = self._draw(probs)
        return _Draft(int(self.vocab_ids[index]), probs)

    def _accepts(self, draft: _Draft, q: torch.Tensor) -> bool:
        index = self.index_of[draft.token]
        if self.greedy:
            return index == int(q.argmax())
        ratio = q[index] / draft.p[index].clamp_min(1e-30)
        r = torch.rand((), generator=self.generator, device=q.device)
        if bool(r < ratio):
            return True
        if self.sjd is not None and self.sjd.grouped:
            return self._group_accepts(index, draft.p, q)
        return False

    def _group_accepts(self, index: int, p: torch.Tensor, q: torch.Tensor) -> bool:
        order = torch.argsort(q, descending=True)
        rank = int((order == index).nonzero())
        lo, hi = max(0, rank - self.sjd.group_radius), rank + self.sjd.group_radius + 1
        group = order[lo:hi]
        group = group[(q[group] - q[index]).abs() < self.sjd.group_threshold]
        ratio = q[group].sum() / p[group].sum().clamp_min(1e-30)
        return bool(torch.rand((), generator=self.generator, device=q.device) < ratio)

    def _replacement(self, draft: _Draft, q: torch.Tensor) -> int:
        if self.greedy:
            return int(self.vocab_ids[int(q.argmax())])
        residual = (q - draft.p).clamp_min(0)
        total = residual.sum()
        probs = residual / total if total > 0 else q  # q == p exactly: any draw from q is exact
        return int(self.vocab_ids[self._draw(probs)])

    # --- the loop --------------------------------------------------------------------------------
    def run(self, embeds: torch.Tensor, mask: torch.Tensor, progress: bool):
        layout, lm = self.layout, self.adapter.language_model
        rows = embeds.shape[0]
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        stats = SJDStats()
        lm(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
           past_key_values=cache, use_cache=True)
        stats.forwards += 1
        pending = embeds[:, -1:]
        last_position = positions[:, -1:]
        mask = mask.clone()

        span: list[int] = []
        tokens: dict[int, int] = {}  # span position -> accepted or drafted token
        dists: dict[int, torch.Tensor] = {}  # span position -> its latest q
        drafts: list[_Draft] = []
        bar = tqdm(total=layout.length, desc="SJD" if self.sjd else "AR", unit="tok", disable=not progress, leave=False)
        while len(span) < layout.length:
            n = len(span)
            width = min(self.window, layout.length - n)
            while len(drafts) < width:
                position = n + len(drafts)
                drafts.append(self._fresh_draft(position, tokens, dists))
                tokens[position] = drafts[-1].token
            window = drafts[:width]
            ids = torch.tensor([[d.token for d in window]] * rows, device=embeds.device, dtype=torch.long)
            inputs = torch.cat([pending, self.adapter.embed(ids)], 1) if width else pending
            step_positions = last_position + torch.arange(width + 1, device=embeds.device)
            step_mask = torch.cat([mask, mask.new_ones(rows, width)], 1)
            cached = cache.get_seq_length()
            hidden = lm(inputs_embeds=inputs, attention_mask=step_mask, position_ids=step_positions,
                        past_key_values=cache, use_cache=True).last_hidden_state
            stats.forwards += 1
            q = self._distributions(hidden)  # (width + 1, V): q[k] is for span position n + k

            emitted: list[int] = []
            rejected = None
            for k, draft in enumerate(window):
                position = n + k
                if draft.p is None:  # fixed layout token
                    emitted.append(draft.token)
                    continue
                dists[position] = q[k]
                if self._accepts(draft, q[k]):
                    emitted.append(draft.token)
                    continue
                emitted.append(self._replacement(draft, q[k]))
                rejected = k
                break
            if rejected is None and n + width < layout.length:  # every draft accepted: one more from q
                position = n + width
                fixed = layout.fixed.get(position)
                dists[position] = q[width]
                emitted.append(fixed if fixed is not None else int(self.vocab_ids[self._draw(q[width])]))

            # Keep the KV of the pending token and of the accepted drafts; the last emitted token
            # (a replacement or the extra one) is not in the cache yet: it becomes the pending one.
            fed_and_kept = 1 + (rejected if rejected is not None else width)
            rejected_entries = cache.get_seq_length() - (cached + fed_and_kept)
            if rejected_entries:
                cache.crop(-rejected_entries)  # negative = entries to drop (every transformers 4.x/5.x)
            for offset, token in enumerate(emitted):
                tokens[n + offset] = token
            span.extend(emitted)
            mask = torch.cat([mask, mask.new_ones(rows, len(emitted))], 1)
            last_position = last_position + len(emitted)
            if len(span) < layout.length:
                last = torch.tensor([[span[-1]]] * rows, device=embeds.device, dtype=torch.long)
                pending = self.adapter.embed(last)
            stats.accepted_per_forward.append(len(emitted))
            bar.update(len(emitted))

            # Jacobi update: drafts after the rejection are re-drawn from this pass's q.
            drafts = []
            if rejected is not None:
                for k in range(rejected + 1, width + 1):
                    position = n + k
                    if position >= layout.length:
                        break
                    fixed = layout.fixed.get(position)
                    if fixed is not None:
                        drafts.append(_Draft(fixed, None))
                    else:
                        dists[position] = q[k]
                        drafts.append(_Draft(int(self.vocab_ids[self._draw(q[k])]), q[k]))
                    tokens[position] = drafts[-1].token
        bar.close()
        stats.tokens = len(span)
        return torch.tensor(span[: layout.length], device=embeds.device), stats, cache
