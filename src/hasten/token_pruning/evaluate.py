"""Fidelity and speed of a pruning method against the unpruned model (used by the CLI and benchmark).

For each (image, question) sample the unpruned model first generates a greedy continuation.
With the method attached, the same model then:

- is teacher-forced along the continuation THROUGH ITS DECODING PATH (``generate()`` with a
  logits processor that forces each next token, reading the raw logits), so methods that act on
  the cache after the prefill (GUI-KV, ZipVL's quantised cache, MustDrop's survivors-only
  cache) are measured as they decode: top-1 agreement with the continuation and the mean
  KL(unpruned || pruned) over its positions;
- generates greedily: exact match with the unpruned continuation;
- is timed for prefill and decoding.

The result also gives visual tokens kept, KV bytes after the prefill, and the prefill-FLOPs
ratio (the bound on the prefill speedup).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .._validation import check_positive_int
from ..measure import median_seconds
from .core import TokenPruner

__all__ = [
    "METHODS",
    "TRAINED",
    "EvalRow",
    "TaskRow",
    "evaluate",
    "evaluate_task",
    "format_table",
    "format_task_table",
    "load_vlm",
    "make_method",
    "prefill_flops",
    "sample_images",
    "task_samples",
]


def _methods() -> dict[str, type[TokenPruner]]:
    from .baselines import RandomKeep, SpatialPool
    from .fastv import FastV
    from .guikv import GUIKV
    from .hired import HiRED
    from .mustdrop import MustDrop
    from .zipvl import ZipVL

    return {
        "random": RandomKeep,
        "pool": SpatialPool,
        "hired": HiRED,
        "fastv": FastV,
        "mustdrop": MustDrop,
        "zipvl": ZipVL,
        "guikv": GUIKV,
    }


METHODS = ("random", "pool", "hired", "fastv", "mustdrop", "zipvl", "guikv")
"""Method names accepted by :func:`make_method` (and ``hasten vlm --prune``)."""

TINY = {f"tiny-{kind}": kind for kind in ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")}
TRAINED = {f"trained-{name}": name for name in ("llava", "qwen2.5-vl")}
"""The micro-world VLMs trained on :mod:`hasten.tiny.vqa` (weights shipped; :mod:`hasten.tiny.micro_vlm`)."""


def make_method(name: str, budget: float) -> TokenPruner:
    """The pruning method ``name`` (one of :data:`METHODS`) at ``budget``, with its paper defaults.

    MustDrop's filter layers (2, 6, 10, 14) that a small LLM does not have are skipped (it warns
    once, at attach); methods are compared at one budget, so MustDrop runs with its budget cap
    (``cap_budget=True``; the released code has none, and there ``budget`` only picks the
    thresholds). ZipVL's ``budget`` caps its important fraction per layer (its mass rule,
    tau = 0.975, applies at every budget; nothing is dropped, the cache is quantised).
    """
    methods = _methods()
    if name not in methods:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "mustdrop":
        return methods[name](budget=budget, cap_budget=True)
    return methods[name](budget=budget)


def load_vlm(model: str, device: str | None = None) -> tuple[Any, Any]:
    """A tiny VLM (``tiny-llava``, ... random weights; ``trained-llava``, ``trained-qwen2.5-vl``: the
    micro-world models) or a hub id / folder, with its processor, in eval mode."""
    from .. import tiny
    from ..loading import load_transformers_model
    from ..tiny import micro_vlm

    loaders = {name: (lambda kind=kind: tiny.vlm(kind)) for name, kind in TINY.items()}
    loaders.update({name: (lambda trained=trained: micro_vlm.load(trained)) for name, trained in TRAINED.items()})
    return load_transformers_model(model, loaders, device)


def sample_images() -> list[tuple[Any, str]]:
    """Real photos that ship with scikit-image, each with a question."""
    from PIL import Image
    from skimage import data

    return [
        (Image.fromarray(data.astronaut()), "What is the person in the picture wearing?"),
        (Image.fromarray(data.chelsea()), "What animal is this, and what color is it?"),
        (Image.fromarray(data.coffee()), "Describe the objects on the table."),
    ]


def _layer_flops(config: Any, tokens: int) -> tuple[float, float]:
    """One decoder layer's prefill FLOPs over ``tokens``: (projections + MLP, attention)."""
    text = getattr(config, "text_config", config)
    hidden, inter = text.hidden_size, text.intermediate_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    kv_dim = hidden // heads * kv
    linear = 2 * tokens * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter)
    return float(linear), float(2 * 2 * tokens * tokens * hidden)


def prefill_flops(config: Any, tokens: int) -> float:
    """Approximate decoder FLOPs of a prefill of ``tokens`` (projections, MLP and attention)."""
    layers = getattr(config, "text_config", config).num_hidden_layers
    return layers * sum(_layer_flops(config, tokens))


def _flops_ratio(config: Any, stats, method: TokenPruner | None = None) -> float:
    """Prefill FLOPs with the method / without, layer by layer (in-LLM methods run their early
    layers on every token). A method that counts the query-key pairs its prefill attends
    (ZipVL's sparse prefill: ``method.attention``) keeps every token in the projections and the
    MLP; each layer's attention term is scaled by its attended pairs plus half its probe pairs
    (the probes compute scores only) over the dense causal pairs."""
    counts = getattr(method, "attention", None)
    if isinstance(counts, dict) and counts.get("dense_pairs") and all(counts["dense_pairs"]):
        linear, attention = _layer_flops(config, stats.prompt_tokens)
        with_method = sum(
            linear + attention * (pairs + probes / 2) / dense
            for pairs, probes, dense in zip(counts["pairs"], counts["probe_pairs"], counts["dense_pairs"])
        )
        return with_method / (len(counts["pairs"]) * (linear + attention))
    layers = stats.layer_tokens or [stats.prefill_tokens]
    full = prefill_flops(config, stats.prompt_tokens)
    return sum(prefill_flops(config, tokens) for tokens in layers) / (len(layers) * full)


class _ForceTokens:
    """Logits processor: the next token is the given continuation's (teacher forcing in generate)."""

    def __init__(self, continuation: torch.Tensor, prompt_length: int):
        self.continuation, self.prompt_length = continuation, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.continuation[:, step : step + 1], 0.0)
        return forced


def _forced_logits(model: Any, inputs: dict, continuation: torch.Tensor) -> torch.Tensor:
    """Raw logits of each continuation position, decoding step by step with the continuation forced."""
    from transformers import LogitsProcessorList

    out = model.generate(
        **inputs,
        max_new_tokens=continuation.shape[1],
        min_new_tokens=continuation.shape[1],
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([_ForceTokens(continuation, inputs["input_ids"].shape[1])]),
    )
    return torch.stack(out.logits, 1).float()


_QUANTISED_CACHE = {"zipvl"}  # every token stays, at fewer bits: no visual/text split of the bytes
_EVICTS_TEXT_TOO = {"guikv"}  # the budget spans every prompt token: the visual share is the kept count's


@dataclass
class EvalRow:
    """One method at one budget, averaged over the samples."""

    method: str
    budget: float
    visual_in: float
    visual_kept: float
    prefill_tokens: float
    top1_agreement: float
    mean_kl: float
    exact_match: float
    prefill_ms: float
    decode_tokens_per_s: float
    kv_bytes: float
    flops_ratio: float
    peak_memory_mb: float | None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    methods: Sequence[tuple[str, float]],
    samples: Sequence[tuple[Any, str]],
    max_new_tokens: int = 16,
    repeats: int = 3,
) -> list[EvalRow]:
    """Fidelity and speed of each ``(method name, budget)`` against the unpruned model.

    Times are medians of ``repeats`` calls after a warm-up: prefill = one forward over the
    prompt; decode tokens/s = ``(max_new_tokens - 1) / (t(generate max_new_tokens) - t(generate 1))``.

    Examples
    --------
    >>> from hasten.token_pruning.evaluate import evaluate, load_vlm, sample_images
    >>> model, processor = load_vlm("tiny-llava", "cpu")
    >>> rows = evaluate(model, processor, [("random", 1.0)], sample_images()[:1], max_new_tokens=4)
    >>> rows[0].top1_agreement, rows[0].exact_match
    (1.0, 1.0)
    """
    from ..tiny.vlms import chat_prompt

    device = model.device
    prepared = []
    for image, question in samples:
        inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt").to(device)
        reference = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        continuation = reference[:, inputs["input_ids"].shape[1] :]
        logits = _forced_logits(model, inputs, continuation)
        prepared.append((inputs, continuation, logits))
    for inputs, *_ in prepared:  # warm-up, so that the first timed row is not the coldest
        for _ in range(3):
            model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    rows = []
    for name, budget in methods:
        method = make_method(name, budget)
        per_sample = []
        for inputs, continuation, reference_logits in prepared:
            with method.apply(model):
                logits = _forced_logits(model, inputs, continuation)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                prefill_s = median_seconds(lambda: model(**inputs), device, warmup=1, repeats=repeats)
                stats = method.stats
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                one_s = median_seconds(
                    lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False),
                    device,
                    warmup=1,
                    repeats=repeats,
                )
                all_s = median_seconds(
                    lambda: model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False),
                    device,
                    warmup=1,
                    repeats=repeats,
                )
            new = generated[:, inputs["input_ids"].shape[1] :]
            kl = (
                torch.nn.functional.kl_div(
                    logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="none"
                )
                .sum(-1)
                .mean()
            )
            decode_s = all_s - one_s
            per_sample.append(
                dict(
                    visual_in=sum(stats.visual_tokens_in),
                    visual_kept=sum(stats.visual_tokens_kept),
                    prefill_tokens=stats.prefill_tokens,
                    top1=float((logits.argmax(-1) == continuation).float().mean()),
                    kl=float(kl),
                    exact=float(new.shape == continuation.shape and bool((new == continuation).all())),
                    prefill_ms=prefill_s * 1000,
                    decode_tps=(new.shape[1] - 1) / decode_s if decode_s > 0 and new.shape[1] > 1 else float("nan"),
                    kv=stats.kv_cache_bytes,
                    flops=_flops_ratio(model.config, stats, method),
                    peak=peak,
                )
            )
        mean = lambda key: statistics.mean(s[key] for s in per_sample)  # noqa: E731
        rows.append(
            EvalRow(
                method=name,
                budget=budget,
                visual_in=mean("visual_in"),
                visual_kept=mean("visual_kept"),
                prefill_tokens=mean("prefill_tokens"),
                top1_agreement=mean("top1"),
                mean_kl=mean("kl"),
                exact_match=mean("exact"),
                prefill_ms=mean("prefill_ms"),
                decode_tokens_per_s=mean("decode_tps"),
                kv_bytes=mean("kv"),
                flops_ratio=mean("flops"),
                peak_memory_mb=None if per_sample[0]["peak"] is None else mean("peak"),
            )
        )
    return rows


def format_table(rows: Sequence[EvalRow], baseline: EvalRow | None = None) -> str:
    """A readable table; prefill time and KV bytes also as ratios to ``baseline`` (budget 1.0).

    ``vis KV x`` is the visual part of the KV cache relative to the unpruned one, from measured
    bytes: in the unpruned cache every token costs the same, which gives the text tokens' bytes;
    the rest is visual (for in-LLM methods the early layers' full caches count). GUI-KV evicts text
    too (its budget spans every prompt token), so there it is the visual entries kept (averaged
    over layers and heads) over the visual tokens. A quantised cache (ZipVL) has no such split: ``-``.
    """
    head = (
        f"{'method':8s} {'budget':>6s} {'visual':>11s} {'prefill':>7s} {'top1':>6s} {'KL':>8s} {'exact':>6s} "
        f"{'prefill ms':>10s} {'x':>6s} {'bound':>6s} {'dec tok/s':>9s} {'KV KiB':>8s} {'KV x':>6s} {'vis KV x':>8s}"
    )
    lines = [head]
    for row in rows:
        base = baseline or row
        text_bytes = base.kv_bytes * (base.prefill_tokens - base.visual_in) / base.prefill_tokens
        visual_kv = (row.kv_bytes - text_bytes) / max(base.kv_bytes - text_bytes, 1e-9)
        if row.method in _EVICTS_TEXT_TOO:
            visual_kv = row.visual_kept / max(row.visual_in, 1e-9)
        visual_column = "       -" if row.method in _QUANTISED_CACHE else f"{visual_kv:8.3f}"
        lines.append(
            f"{row.method:8s} {row.budget:6.2f} {row.visual_kept:5.0f}/{row.visual_in:<5.0f} {row.prefill_tokens:7.0f} "
            f"{row.top1_agreement:6.3f} {row.mean_kl:8.4f} {row.exact_match:6.2f} {row.prefill_ms:10.2f} "
            f"{base.prefill_ms / row.prefill_ms:5.2f}x {1 / row.flops_ratio:5.2f}x {row.decode_tokens_per_s:9.1f} "
            f"{row.kv_bytes / 1024:8.1f} {row.kv_bytes / base.kv_bytes:6.3f} {visual_column}"
        )
    return "\n".join(lines)


def task_samples(model_name: str, count: int) -> list[Any]:
    """The held-out micro-world questions of a ``trained-*`` model (:data:`TRAINED`), types balanced."""
    from ..tiny import micro_vlm

    if model_name not in TRAINED:
        raise ValueError(f"task accuracy needs a trained micro-world model ({', '.join(TRAINED)}); got {model_name!r}")
    return micro_vlm.held_out_set(TRAINED[model_name], count)


@dataclass
class TaskRow:
    """One method at one budget on a question-answering task.

    ``accuracy`` (and ``per_kind``, by question type): greedy answer equals the ground truth;
    ``agreement``: equals the unpruned model's answer. ``visual_kept``/``visual_in``,
    ``flops_ratio`` (prefill FLOPs with / without the method), ``kv_bytes`` (after the prefill)
    and ``ms_per_answer`` (median batch-1 wall time of a whole greedy answer) are averaged over
    the timing samples, each run alone so that no padding counts.
    """

    method: str
    budget: float
    accuracy: float
    agreement: float
    per_kind: dict[str, float]
    visual_in: float
    visual_kept: float
    flops_ratio: float
    kv_bytes: float
    ms_per_answer: float

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (
                round(v, 4)
                if isinstance(v, float)
                else {kk: round(vv, 4) for kk, vv in v.items()}
                if isinstance(v, dict)
                else v
            )
            for k, v in self.__dict__.items()
        }


@torch.no_grad()
def evaluate_task(
    model: Any,
    processor: Any,
    methods: Sequence[tuple[str, float]],
    samples: Sequence[Any],
    batch_size: int = 32,
    timing_samples: int = 6,
    max_new_tokens: int = 4,
    progress: bool = False,
) -> list[TaskRow]:
    """Task accuracy, agreement with the unpruned model, and cost of each ``(method, budget)``.

    ``samples`` are :class:`hasten.tiny.vqa.VQASample` (images, question, answer, kind). Answers
    are greedy (``generate``), in left-padded batches of ``batch_size`` with the method attached.

    Examples
    --------
    >>> from hasten.token_pruning.evaluate import evaluate_task, load_vlm, task_samples
    >>> model, processor = load_vlm("trained-llava", "cpu")
    >>> rows = evaluate_task(model, processor, [("random", 1.0)], task_samples("trained-llava", 10))
    >>> rows[0].agreement
    1.0
    """
    from tqdm.auto import tqdm

    from ..tiny.micro_vlm import _inputs, answer, prompts

    if not samples:
        raise ValueError("`samples` is empty")
    check_positive_int(batch_size, "batch_size")
    device = model.device

    def answers() -> list[str]:
        return [
            text
            for begin in range(0, len(samples), batch_size)
            for text in answer(model, processor, samples[begin : begin + batch_size], max_new_tokens)
        ]

    reference = answers()
    timed = [
        _inputs(processor, [sample], prompts(processor, [sample])).to(device) for sample in samples[:timing_samples]
    ]
    rows = []
    for name, budget in tqdm(methods, disable=not progress, desc="methods x budgets"):
        method = make_method(name, budget)
        with method.apply(model):
            got = answers()
            cost = []
            for inputs in timed:
                seconds = median_seconds(
                    lambda: model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False),
                    device,
                    warmup=1,
                    repeats=2,
                )
                model(**inputs)  # the prefill alone, for its stats
                stats = method.stats
                cost.append(
                    (
                        sum(stats.visual_tokens_in),
                        sum(stats.visual_tokens_kept),
                        _flops_ratio(model.config, stats, method),
                        stats.kv_cache_bytes,
                        seconds * 1000,
                    )
                )
        per_kind: dict[str, list[bool]] = {}
        for sample, text in zip(samples, got):
            per_kind.setdefault(sample.kind, []).append(text == sample.answer)
        column = lambda index: statistics.mean(c[index] for c in cost)  # noqa: E731
        rows.append(
            TaskRow(
                method=name,
                budget=budget,
                accuracy=sum(text == sample.answer for sample, text in zip(samples, got)) / len(samples),
                agreement=sum(a == b for a, b in zip(got, reference)) / len(samples),
                per_kind={kind: sum(flags) / len(flags) for kind, flags in per_kind.items()},
                visual_in=column(0),
                visual_kept=column(1),
                flops_ratio=column(2),
                kv_bytes=column(3),
                ms_per_answer=column(4),
            )
        )
    return rows


def format_task_table(rows: Sequence[TaskRow]) -> str:
    """Accuracy (overall and per question type), agreement with unpruned, visual tokens, the
    prefill-FLOPs bound (1 / ratio), KV KiB and ms per answer, one row per method x budget."""
    kinds = list(rows[0].per_kind)
    head = (
        f"{'method':8s} {'budget':>6s} {'acc':>6s} {'agree':>6s} "
        + " ".join(f"{k[:8]:>8s}" for k in kinds)
        + f" {'visual':>9s} {'bound':>6s} {'KV KiB':>7s} {'ms/ans':>7s}"
    )
    lines = [head]
    for row in rows:
        lines.append(
            f"{row.method:8s} {row.budget:6.2f} {row.accuracy:6.3f} {row.agreement:6.3f} "
            + " ".join(f"{row.per_kind.get(k, float('nan')):8.3f}" for k in kinds)
            + f" {row.visual_kept:4.0f}/{row.visual_in:<4.0f} {1 / row.flops_ratio:5.2f}x "
            f"{row.kv_bytes / 1024:7.1f} {row.ms_per_answer:7.1f}"
        )
    return "\n".join(lines)
