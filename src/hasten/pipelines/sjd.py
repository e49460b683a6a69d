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

Steps 2-4 are :func:`hasten.speculative.chain_verify` (the acceptance core SpecVLM shares), and
the sampling settings are one :class:`hasten.speculative.Sampling`. Prompts decode in batches of
``batch_size`` (left-padded, CFG rows doubled as one batch): every row's drafts are tested on
their own and the batch advances by the shortest accepted run, as the official code does, so
one KV cache keeps one length (each row stays exact: see :mod:`hasten.speculative.acceptance`).
Drafts, their distributions, the tests and the draws stay on the model's device; a pass reads
back one integer (the batch's advance; plain AR reads back nothing).

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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .._validation import check_int, check_positive_int
from ..speculative.acceptance import chain_verify
from ..speculative.sampling import Sampling, draw
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
        check_positive_int(self.window, "window")
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"`init` must be one of {INIT_STRATEGIES}, got {self.init!r}")
        if self.grouped and self.greedy:
            raise ValueError("`grouped` acceptance is for sampling; it has no meaning with `greedy=True`")
        if self.group_radius < 0 or not 0.0 <= self.group_threshold <= 1.0:
            raise ValueError("`group_radius` must be >= 0 and `group_threshold` in [0, 1]")


@dataclass
class SJDStats:
    """What one image (or one call) cost. ``forwards`` counts every language-model call, the
    prefill included; an image decoded in a batch shares its batch's calls, which its stats hold.
    ``accepted_per_forward``: tokens emitted per decoding pass (per image; summed over the images
    in a call's total)."""

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
    """Images ``(B, 3, H, W)`` in [0, 1] (None with ``decode=False``), the span's sequence ids
    ``(B, length)`` and per-image stats."""

    images: torch.Tensor | None
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
        batch_size: int = 1,
        decode: bool = True,
        return_cache: bool = False,
        generator: torch.Generator | None = None,
    ) -> SJDOutput:
        """Generate one image per prompt.

        Parameters
        ----------
        prompt : str or list of str
            Prompts, decoded ``batch_size`` at a time.
        sjd : SJDConfig or None
            ``None`` runs plain autoregressive decoding through the same loop.
        guidance_scale : float, optional
            CFG weight ``s`` in ``uncond + s * (cond - uncond)`` (the official Janus/Emu3 form;
            ``s = 1`` is the conditional model alone, no unconditional row). Default: the
            family's official value (Janus 5.0, Emu3 3.0).
        negative_prompt : str, optional
            Unconditional prompt (Emu3 only; Janus masks the prompt instead).
        temperature, top_k, top_p
            Applied after CFG (top-k defaults to the family's official value: Emu3 2048), as one
            :class:`hasten.speculative.Sampling`.
        greedy : bool
            Argmax decoding, for AR (``sjd=None``) and SJD alike (SJD's output is then identical to
            greedy AR's). ``SJDConfig(greedy=True)`` asks for the same.
        height, width : int, optional
            Emu3: output size in pixels (multiples of its spatial factor 8). Janus: fixed grid.
        seed : int, optional
            Seeds every random draw (drafts, acceptance, sampling).
        batch_size : int, default 1
            Prompts decoded together (left-padded, one cache): each pass advances every row by the
            batch's shortest accepted run, the official code's rule. Greedy outputs do not depend
            on it; sampled ones follow the same distribution but use the random stream differently.
        decode : bool, default True
            Run the image decoder; ``False`` returns the tokens only (``images`` is None).
        return_cache : bool
            Keep the last batch's KV cache in the output (for inspection and tests).
        generator : torch.Generator, optional
            Every random draw comes from it instead of from ``seed`` (diffusers' convention); on
            the model's device (a generator seeded with ``s`` there gives the output of ``seed=s``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("`prompt` is empty")
        if not isinstance(greedy, bool):
            raise ValueError(f"`greedy` must be True or False, got {greedy!r}")
        check_positive_int(batch_size, "batch_size")
        if greedy and sjd is not None and sjd.grouped:
            raise ValueError("`greedy=True` with grouped (GSD) acceptance: grouped acceptance is for sampling")
        greedy = greedy or (sjd is not None and sjd.greedy)
        scale = self.adapter.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale < 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 disables CFG), got {scale}")
        if negative_prompt is not None and scale == 1.0:
            raise ValueError("`negative_prompt` needs CFG: pass `guidance_scale` > 1")
        top_k = self.adapter.default_top_k if top_k is None else top_k
        if (
            top_k is not None
            and not isinstance(top_k, bool)
            and isinstance(top_k, int)
            and top_k >= len(self.adapter.vocab_ids)
        ):
            top_k = None  # keeps every image token: no warper
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        layout = self.adapter.layout(height, width)
        if generator is None:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(torch.seed() if seed is None else check_int(seed, "seed", 0))
        elif not isinstance(generator, torch.Generator) or generator.device.type != self.model.device.type:
            raise ValueError(
                f"`generator` must be a torch.Generator on the model's device ({self.model.device}), "
                f"got {generator.device if isinstance(generator, torch.Generator) else type(generator).__name__}"
            )
        elif seed is not None:
            raise ValueError("pass `seed` or `generator`, not both")
        decoder = _Decoder(self.adapter, layout, sjd, scale, sampling, generator)

        ids, per_image, batches, cache = [], [], [], None
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            start = time.perf_counter()
            embeds, mask = self._encode(chunk, negative_prompt, scale > 1.0, layout)
            span, stats, cache = decoder.run(embeds, mask, len(chunk), self.progress_bar)
            stats.seconds = time.perf_counter() - start
            ids.append(span)
            batches.append((stats, len(chunk)))
            per_image += [replace(stats, accepted_per_forward=list(stats.accepted_per_forward)) for _ in chunk]
        tokens = torch.cat(ids)
        images = self.adapter.decode(tokens, layout) if decode else None
        total = SJDStats(
            forwards=sum(s.forwards for s, _ in batches),
            tokens=sum(s.tokens * n for s, n in batches),
            accepted_per_forward=[k * n for s, n in batches for k in s.accepted_per_forward],
            seconds=sum(s.seconds for s, _ in batches),
        )
        return SJDOutput(
            images=images, tokens=tokens, stats=total, per_image=per_image, cache=cache if return_cache else None
        )

    def _encode(self, prompts: list[str], negative_prompt: str | None, cfg: bool, layout: ImageLayout):
        """Input embeddings ``(R, S, H)`` and mask ``(R, S)`` of a batch, left-padded: the conditional
        rows of every prompt, then (with CFG) their unconditional rows."""
        unique = {text: None for text in prompts}  # a repeated prompt is encoded once
        for text in unique:
            unique[text] = self.adapter.encode_prompt(text, negative_prompt, cfg, layout)
        encoded = [unique[text] for text in prompts]
        length = max(e.shape[1] for e, _ in encoded)
        groups = encoded[0][0].shape[0]
        embeds, masks = [], []
        for group in range(groups):
            for e, m in encoded:
                pad = length - e.shape[1]
                embeds.append(torch.cat([e.new_zeros(pad, e.shape[2]), e[group]]))
                masks.append(torch.cat([m.new_zeros(pad), m[group]]))
        return torch.stack(embeds), torch.stack(masks)


class _Decoder:
    """The decoding loop for one layout and one set of sampling settings, over a batch of rows.

    Drafts live on the model's device as vocabulary indices (``-1`` at fixed layout positions)
    ``(rows, k)`` with the distributions they were drawn from ``(rows, k, V)``; the rows advance
    together (by the shortest accepted run), so a pass reads back one integer.
    """

    def __init__(
        self,
        adapter,
        layout: ImageLayout,
        sjd: SJDConfig | None,
        scale: float,
        sampling: Sampling,
        generator: torch.Generator,
    ):
        self.adapter, self.layout, self.sjd, self.scale = adapter, layout, sjd, scale
        self.sampling, self.greedy, self.generator = sampling, sampling.greedy, generator
        self.vocab_ids = adapter.vocab_ids
        self.device = self.vocab_ids.device
        self.vocab_size = len(self.vocab_ids)
        self.dtype = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)  # of distributions
        self.window = 0 if sjd is None else sjd.window
        fixed = torch.full((layout.length,), -1, dtype=torch.long)
        for position, token in layout.fixed.items():
            fixed[position] = token
        self.fixed_ids = fixed.to(self.device)
        self.init_mode, _, self.init_direction = (sjd.init if sjd else "random").partition("_")
        self._plans: dict[tuple[int, int], tuple] = {}

    # --- distributions ---------------------------------------------------------------------------
    def _distributions(self, hidden: torch.Tensor, rows: int) -> torch.Tensor:
        """Processed image-token probabilities ``(rows, n, V)`` for each input position."""
        logits = self.adapter.image_logits(hidden)
        logits = logits.to(self.dtype)
        if self.scale != 1.0:
            cond, uncond = logits[:rows], logits[rows:]
            logits = uncond + self.scale * (cond - uncond)
        return self.sampling.probs(logits)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per distribution of ``probs`` (argmax when greedy), on the device."""
        return draw(probs, self.generator, self.greedy)

    def _sequence_ids(self, start: int, indices: torch.Tensor) -> torch.Tensor:
        """Sequence ids ``(rows, k)`` of span positions ``start ..`` holding vocabulary ``indices``."""
        fixed = self.fixed_ids[start : start + indices.shape[1]]
        return torch.where(fixed >= 0, fixed, self.vocab_ids[indices.clamp_min(0)])

    # --- drafts ----------------------------------------------------------------------------------
    def _plan(self, start: int, count: int):
        """Per new slot: its chain's root slot and the known neighbour the chain starts from (host
        layout arithmetic, done once per (start, count) and kept as device tensors)."""
        key = (start, count)
        if key not in self._plans:
            roots, known = list(range(count)), [None] * count
            if self.init_direction:
                for slot, position in enumerate(range(start, start + count)):
                    neighbour = self.layout.neighbour(position, self.init_direction)
                    if neighbour is not None and neighbour >= start:  # a new slot too: same chain
                        roots[slot] = roots[neighbour - start]
                    else:
                        known[slot] = neighbour
            sources = [known[root] for root in roots]
            device = self.device
            self._plans[key] = (
                sources,
                torch.tensor(roots, device=device),
                torch.tensor([s if s is not None else 0 for s in sources], device=device),
                torch.tensor([s is not None for s in sources], device=device),
                self.fixed_ids[start : start + count] >= 0,
            )
        return self._plans[key]

    def _fresh_drafts(self, start: int, count: int, span_idx: torch.Tensor, dists: dict[int, torch.Tensor]):
        """Drafts ``(rows, count)`` and their distributions ``(rows, count, V)`` for span positions
        ``start .. start+count-1`` by the configured init strategy.

        A spatial prior reads each slot's neighbour (left or upper). Where that neighbour is
        itself one of the new slots, the slot follows the chain back to the new slot whose
        neighbour is known (its *root*), as the official code does: ``repeat_*`` copies the
        root's draft into every slot of the chain (the known neighbour's token, or the root's
        random draw), ``sample_*`` draws every slot of the chain from the known neighbour's last
        distribution (uniform where there is none).
        """
        rows = span_idx.shape[0]
        sources, roots, source_pos, has_source, fixed = self._plan(start, count)
        uniform = torch.full((rows, self.vocab_size), 1.0 / self.vocab_size, device=self.device, dtype=self.dtype)
        if self.init_mode == "sample":
            probs = torch.stack([dists.get(s, uniform) if s is not None else uniform for s in sources], 1)
            indices = self._draw(probs)
        else:
            probs = uniform[:, None].expand(rows, count, -1)
            indices = torch.randint(self.vocab_size, (rows, count), generator=self.generator, device=self.device)
        if self.init_mode == "repeat":
            source_idx = span_idx[:, source_pos]
            copies = has_source & (source_idx >= 0)
            indices = torch.where(
                copies, source_idx, indices[:, roots]
            )  # a chain without a known token: the root's draw
            repeat = copies | (roots != torch.arange(count, device=self.device))
            point = torch.nn.functional.one_hot(indices, self.vocab_size).to(uniform.dtype)
            probs = torch.where(repeat[..., None], point, probs)
        return torch.where(fixed, -1, indices), torch.where(fixed[:, None], 0.0, probs)

    def _group_accepts(self, drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """GSD's grouped test for every draft at once ``(rows, W)`` (LOSSY): accept with probability
        ``q(G) / p(G)``, G = the tokens within ``group_radius`` ranks of the draft in sorted-``q``
        order whose probability is within ``group_threshold`` of the draft's."""
        radius, vocab = self.sjd.group_radius, q.shape[-1]
        safe = drafts.clamp_min(0)
        order = torch.argsort(q, dim=-1, descending=True)
        rank = (order == safe[..., None]).long().argmax(-1)
        window = rank[..., None] + torch.arange(-radius, radius + 1, device=q.device)
        inside = (window >= 0) & (window < vocab)
        members = order.gather(-1, window.clamp(0, vocab - 1))
        q_members, p_members = q.gather(-1, members), p.gather(-1, members)
        q_draft = q.gather(-1, safe[..., None])
        group = inside & ((q_members - q_draft).abs() < self.sjd.group_threshold)
        ratio = (q_members * group).sum(-1) / (p_members * group).sum(-1).clamp_min(1e-30)
        return torch.rand(ratio.shape, generator=self.generator, device=q.device, dtype=ratio.dtype) < ratio

    # --- the loop --------------------------------------------------------------------------------
    def run(self, embeds: torch.Tensor, mask: torch.Tensor, rows: int, progress: bool):
        """Decode the span of ``rows`` prompts; ``embeds``/``mask``: their (CFG-doubled) prompt rows."""
        layout, lm, device = self.layout, self.adapter.language_model, embeds.device
        groups = embeds.shape[0] // rows  # 2 with CFG (conditional rows, then unconditional)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        cache_arg = cache_keyword(lm)
        stats = SJDStats()
        lm(
            inputs_embeds=embeds[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            **{cache_arg: cache},
            use_cache=True,
        )
        stats.forwards += 1
        pending = embeds[:, -1:]
        last_position = positions[:, -1:]
        mask = mask.clone()

        length = layout.length
        span_idx = torch.full((rows, length), -1, dtype=torch.long, device=device)  # accepted/drafted indices
        dists: dict[int, torch.Tensor] = {}  # latest q (rows, V) per position (only for "sample" inits)
        draft_idx = torch.empty(rows, 0, dtype=torch.long, device=device)
        draft_p = torch.empty(rows, 0, self.vocab_size, device=device, dtype=self.dtype)
        n = 0
        bar = tqdm(total=length, desc="SJD" if self.sjd else "AR", unit="tok", disable=not progress, leave=False)
        while n < length:
            width = min(self.window, length - n)
            if draft_idx.shape[1] < width:
                more_idx, more_p = self._fresh_drafts(
                    n + draft_idx.shape[1], width - draft_idx.shape[1], span_idx, dists
                )
                draft_idx, draft_p = torch.cat([draft_idx, more_idx], 1), torch.cat([draft_p, more_p], 1)
                span_idx[:, n : n + width] = draft_idx[:, :width]
            window_idx, window_p = draft_idx[:, :width], draft_p[:, :width]
            if width:
                ids = self._sequence_ids(n, window_idx).repeat(groups, 1)
                inputs = torch.cat([pending, self.adapter.embed(ids)], 1)
            else:
                inputs = pending
            step_positions = last_position + torch.arange(width + 1, device=device)
            step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], width)], 1)
            cached = cache.get_seq_length()
            hidden = lm(
                inputs_embeds=inputs,
                attention_mask=step_mask,
                position_ids=step_positions,
                **{cache_arg: cache},
                use_cache=True,
            ).last_hidden_state
            stats.forwards += 1
            q = self._distributions(hidden, rows)  # (rows, width + 1, V): q[:, k] is for span position n + k
            if self.init_mode == "sample":
                for k in range(width + 1):
                    dists[n + k] = q[:, k]
            grouped = self._group_accepts(window_idx, window_p, q[:, :width]) if self.sjd and self.sjd.grouped else None
            if width:
                verdict = chain_verify(
                    window_idx,
                    window_p,
                    q,
                    generator=self.generator,
                    greedy=self.greedy,
                    forced=self.fixed_ids[n : n + width] >= 0,
                    also_accept=grouped,
                    shortest=True,
                )
                accepted = int(verdict.advance[0])  # the pass's one device-to-host read
                tokens = verdict.tokens
            else:  # AR: nothing to verify, nothing to read back
                accepted, tokens = 0, None
            emitted = accepted
            if n + accepted < length:  # the replacement at the first rejection, or the extra token
                fixed = n + accepted in layout.fixed
                span_idx[:, n + accepted] = -1 if fixed else (tokens if tokens is not None else self._draw(q[:, 0]))
                emitted += 1

            # Keep the KV of the pending token and of the accepted drafts; the last emitted token
            # (a replacement or the extra one) is not in the cache yet: it becomes the pending one.
            dropped = cache.get_seq_length() - (cached + 1 + accepted)
            if dropped:
                cache.crop(-dropped)  # negative = entries to drop (every transformers 4.x/5.x)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], emitted)], 1)
            last_position = last_position + emitted
            stats.accepted_per_forward.append(emitted)
            bar.update(emitted)
            start, n = n, n + emitted
            if n < length:
                last = self._sequence_ids(n - 1, span_idx[:, n - 1 : n])
                pending = self.adapter.embed(last.repeat(groups, 1))

            # Jacobi update: drafts after the shared advance are re-drawn from this pass's q.
            if accepted == width:
                draft_idx, draft_p = draft_idx[:, :0], draft_p[:, :0]
            else:
                first, stop = start + accepted + 1, min(start + width + 1, length)
                rows_q = q[:, accepted + 1 : accepted + 1 + (stop - first)]
                redrawn = self._draw(rows_q)
                fixed = self.fixed_ids[first:stop] >= 0
                draft_idx = torch.where(fixed, -1, redrawn)
                draft_p = torch.where(fixed[:, None], 0.0, rows_q)
                span_idx[:, first:stop] = draft_idx
        bar.close()
        stats.tokens = length
        return self._sequence_ids(0, span_idx), stats, cache
