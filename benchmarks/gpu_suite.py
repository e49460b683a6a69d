"""Every full-size GPU measurement in one command, each section on its own time budget.

    python benchmarks/gpu_suite.py                  # one H100/H200, about 9 minutes
    python benchmarks/gpu_suite.py --smoke          # tiny shapes on the CPU, about a minute

Random weights throughout: speed does not depend on weights. Sections, in order:

``grat_attention``
    GRAT-X and GRAT-B attention alone at Flux 4096², 8192², HunyuanVideo 720p and Flux 2048²,
    in that order (head dim 128, 24 heads; Flux: 512 text tokens first, 16x16 groups; video:
    720x1280x129f, a 33x45x80 latent grid, 256 text tokens last, 4x8x8 groups): the Triton
    kernel and compiled FlexAttention, each as the whole grouped call (``grouped_attention``)
    and as the kernel alone on inputs already in group order, and Triton's call the way it ran
    before (index_select copies around the kernel: ``unfused_call_ms``), against dense SDPA
    restricted to cuDNN (then flash) in the same process, with the layout's bound and the
    fraction of it reached. Rows come from ``grat_attention.run``.
``grat_pipeline``
    One transformer forward of the Flux-dev (2048², 4096²) and HunyuanVideo (544x960x61f)
    architectures, dense vs GRAT-X vs GRAT-B, with attention's measured share and the Amdahl
    bound (``grat_pipeline.main``).
``vlm_pruning``
    LLaVA-1.5-7B and Qwen2.5-VL-7B architectures, one photo, 8 new tokens: every pruning method
    the model supports at budgets 0.2 / 0.1 against the unpruned model (budget 1.0): prefill
    ms, decode tokens/s, peak memory, KV bytes (``hasten.token_pruning.evaluate.evaluate``; if
    the one call fails, again one call per method, so a failing method is reported and the
    others kept).
``kv_decode``
    One decoding query of a Qwen2.5-VL-7B layer (28 query heads, 4 KV heads, head dim 128)
    against a cached context of 8k and 32k tokens: the fused Triton decode kernel over the
    4-bit and 2-bit KIVI cache vs dequantise-then-SDPA vs SDPA over a bf16 cache, and the
    mixed-precision cache (36.7% of tokens at 4 bits, the rest at 2) through its own decoding
    path, fused vs torch, with the bytes each reads; fused and unfused results are checked equal.
``sjd``
    Janus-Pro-1B architecture: one decoding pass, AR (1 new token) vs an SJD window (1 + 16),
    at prompt batch 1 (``sjd.pass_timing``: CFG rows 2) and batch 4 (CFG rows 8).
``specvlm``
    LLaVA-1.5-7B architecture: one plain decoding step and one speculative round (drafting +
    one verification) per drafting setting (``specvlm.main --arch llava-1.5-7b``).

Each section gets a budget in seconds (``SECTIONS``, and never more than what is left of the
total). A section that raises, or runs past its budget (a SIGALRM timer interrupts it), is
recorded as a ``SKIPPED`` line with the reason; rows it measured before that are kept, and
the following sections still run. Output, under ``--out`` (default
``<--results-root>/<gpu>-<date>/``, root ``benchmarks/results``): one ``<section>.txt`` per
section (its table or skip line), ``suite.md`` (all of them), ``suite.jsonl`` (one JSON
object per row, with ``section``; skips as ``{"section": ..., "skipped": ...}``) and
``machine.json`` (GPU, library versions, date, command).

``--smoke`` runs the same section functions on tiny shapes on the CPU (tiny models from
``hasten.tiny``, the Triton kernels under ``TRITON_INTERPRET=1`` on tiny shapes), with less of
each: the reference backend stands in for compiled FlexAttention (whose CPU compile alone
outlasts the smoke budget), one tiny VLM with one method per pruning stage at budget 0.2, one
photo for SpecVLM, one context for the KV decode. It writes to a temporary folder unless
``--out`` or ``--results-root`` is given, and is what ``tests/test_gpu_suite.py`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import pathlib
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the scripts beside this one import `common` as a top-level module
    sys.path.insert(0, str(HERE))

TOTAL_BUDGET_S = 520.0  # 9 minutes on one H100/H200, less ~20 s of imports and the machine line
SMOKE_BUDGET_S = 74.0

# (name, GPU budget s, smoke budget s): the GPU budgets add up to TOTAL_BUDGET_S.
SECTIONS: tuple[tuple[str, float, float], ...] = (
    ("grat_attention", 115.0, 16.0),
    ("grat_pipeline", 135.0, 10.0),
    ("vlm_pruning", 115.0, 20.0),
    ("kv_decode", 30.0, 6.0),
    ("sjd", 45.0, 8.0),
    ("specvlm", 80.0, 14.0),
)


class SectionTimeout(Exception):
    """Raised inside a section when its budget runs out."""


@dataclass
class Section:
    """What one section produced: table text, JSON rows and at most one skip reason."""

    name: str
    budget_s: float
    text: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    def table(self, text: str) -> None:
        self.text.append(text.rstrip("\n"))

    def add(self, rows: list[dict], **extra) -> None:
        self.rows.extend({**extra, **row} for row in rows)


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (no-op where SIGALRM is missing).

    Yields a dict whose ``"fired"`` turns True when the timer went off, so that a timeout that
    library code re-raised as another exception (the Triton interpreter wraps it) is still
    recognised as one.
    """
    state = {"fired": False}
    if not hasattr(signal, "setitimer"):
        yield state
        return

    def fire(signum, frame):
        state["fired"] = True
        raise SectionTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, budget_s: float, fn: Callable[[Section], None]) -> Section:
    """Run ``fn(section)`` under a ``budget_s`` timer; a failure or timeout becomes ``section.skipped``.

    Rows and tables ``fn`` recorded before it stopped are kept.
    """
    section = Section(name, budget_s)
    start = time.perf_counter()
    state = {"fired": False}
    try:
        if budget_s <= 0:
            raise SectionTimeout("no time left in the suite's total budget")
        with _alarm(budget_s) as state:
            fn(section)
    except SectionTimeout as error:
        section.skipped = f"budget: {error}"
    except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
        if state["fired"]:  # the timeout, re-raised by library code as another exception
            section.skipped = f"budget: ran past its budget of {budget_s:.0f} s ({type(error).__name__})"
            section.seconds = time.perf_counter() - start
            _release_memory()
            return section
        last = traceback.extract_tb(error.__traceback__)[-1]
        section.skipped = (
            f"error: {type(error).__name__}: {str(error)[:300]} ({pathlib.Path(last.filename).name}:{last.lineno})"
        )
    section.seconds = time.perf_counter() - start
    _release_memory()
    return section


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _captured(main: Callable[[list[str]], None], argv: list[str]) -> tuple[str, list[dict]]:
    """Run a benchmark script's ``main(argv)``; return its printed table and its JSON lines."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    text, rows = [], []
    for line in buffer.getvalue().splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
        else:
            text.append(line)
    return "\n".join(text), rows


@dataclass
class Settings:
    smoke: bool
    device: str

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# --------------------------------------------------------------------------- grat_attention


@contextlib.contextmanager
def _patched(module, **attributes):
    """Temporarily set module attributes (the shape list of a benchmark script)."""
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _dense_backends():
    """SDPA restricted to cuDNN first (then flash, then memory-efficient) on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority
        return sdpa_kernel(order)


def grat_attention_section(section: Section, settings: Settings) -> None:
    import grat_attention

    if settings.smoke:
        # Tiny image and video shapes with the same text placement as the real ones; head dim 16.
        shapes = [
            dict(name="flux-tiny-8x8", resolution="128", grid=(1, 8, 8), text=16, text_first=True, group=(1, 4, 4)),
            dict(
                name="video-tiny-4x6x6", resolution="4x6x6", grid=(4, 6, 6), text=8, text_first=False, group=(2, 4, 4)
            ),
        ]
        head_dim, heads, backends, warmup, repeats = 16, 1, ("triton", "reference"), 0, 1
    else:
        flux = {row["resolution"]: row for row in grat_attention.shapes([2048, 4096, 8192], video=False)}
        # HunyuanVideo 720p: 720x1280, 129 frames -> 33 x 45 x 80 latent tokens (VAE 4x/8x, patch 2).
        video = dict(
            name="hunyuan-720x1280x129f",
            resolution="720x1280x129",
            grid=(33, 45, 80),
            text=256,
            text_first=False,
            group=(4, 8, 8),
        )
        # The goals first (4096² GRAT-X, 8192² GRAT-B), so that a timeout cuts the least.
        shapes = [flux[4096], flux[8192], video, flux[2048]]
        head_dim, heads, backends, warmup, repeats = grat_attention.HEAD_DIM, 24, ("triton", "flex"), 2, 5
    dtype = "bfloat16" if settings.cuda else "float32"
    by_key: dict[tuple, dict] = {}
    for shape in shapes:  # one shape at a time, so that a timeout keeps the shapes already done
        for backend in backends:
            args = argparse.Namespace(
                resolution=[],
                micro=[],
                video=False,
                heads=heads,
                device=settings.device,
                dtype=dtype,
                backend=backend,
                warmup=warmup,
                repeats=repeats,
            )
            dense = _dense_backends() if settings.cuda else contextlib.nullcontext()  # a fresh one each time
            with (
                _patched(grat_attention, shapes=lambda *_, shape=shape: [shape], HEAD_DIM=head_dim),
                dense,
            ):
                rows = grat_attention.run(args)
            if backend == "triton":  # the same call the way it ran before the kernel gathered itself
                before = _unfused_triton_ms(shape, heads, head_dim, dtype, settings, warmup, repeats)
                for row in rows:
                    row["unfused_call_ms"] = round(before[row["pattern"]], 2)
            section.add(rows, section="grat_attention")
            for row in rows:
                merged = by_key.setdefault(
                    (row["shape"], row["pattern"]),
                    dict(shape=row["shape"], pattern=row["pattern"], density=row["density"], bound=row["bound"]),
                )
                merged.setdefault("dense_ms", []).append(row["dense_ms"])
                merged[backend] = row
        section.text = [_attention_table(by_key, backends, settings)]


def _unfused_triton_ms(
    shape: dict, heads: int, head_dim: int, dtype: str, settings: Settings, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms per pattern of Triton's grouped call as it ran before the kernel read and wrote
    through the group index: index_select copies into group order, the kernel, index_select back."""
    import math

    import torch

    from hasten.kernels import block_sparse_attention, group_layout

    from common import median_ms

    device = torch.device(settings.device)
    tokens = shape["text"] + math.prod(shape["grid"])
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=getattr(torch, dtype)) for _ in range(3))
    result = {}
    for pattern in ("cross", "block"):
        layout = group_layout(
            shape["grid"],
            shape["group"],
            num_text=shape["text"],
            text_first=shape["text_first"],
            pattern=pattern,
            window=(1, 1, 1),
        ).to(device)

        def call():
            index = layout.gather_index
            out = block_sparse_attention(
                q.index_select(-2, index),
                k.index_select(-2, index),
                v.index_select(-2, index),
                layout.kv_indices,
                layout.kv_counts,
                layout.key_valid[None],
                layout.tile,
                backend="triton",
                static_valid=layout.key_valid,
            )
            return out.index_select(-2, layout.scatter_index)

        result[pattern] = median_ms(call, device, warmup, repeats)
    return result


def _attention_table(by_key: dict, backends, settings: Settings) -> str:
    dense_name = "cuDNN dense" if settings.cuda else "dense SDPA"
    head = f"| shape | pattern | density | bound | {dense_name} ms |"
    rule = "| --- | --- | --- | --- | --- |"
    for backend in backends:
        head += f" {backend} call ms | x | of bound | {backend} kernel ms | kernel x | of bound |"
        rule += " --- | --- | --- | --- | --- | --- |"
        if backend == "triton":
            head += " triton copies ms | x | of bound |"
            rule += " --- | --- | --- |"
    lines = [head, rule]
    for merged in by_key.values():
        dense_ms = statistics.median(merged["dense_ms"])
        line = (
            f"| {merged['shape']} | GRAT-{'X' if merged['pattern'] == 'cross' else 'B'} | {merged['density']:.1%} "
            f"| {merged['bound']:.2f}x | {dense_ms:.2f} |"
        )
        for backend in backends:
            row = merged.get(backend)
            if row is None:
                line += " - | - | - | - | - | - |"
                continue
            line += (
                f" {row['grat_ms']:.2f} | {row['speedup']:.2f}x | {row['fraction_of_bound']:.0%} "
                f"| {row['kernel_ms']:.2f} | {row['kernel_speedup']:.2f}x "
                f"| {row['kernel_speedup'] / row['bound']:.0%} |"
            )
            if backend == "triton":
                unfused = row["dense_ms"] / row["unfused_call_ms"]
                line += f" {row['unfused_call_ms']:.2f} | {unfused:.2f}x | {unfused / row['bound']:.0%} |"
        lines.append(line)
    lines.append(
        "(call = the whole grouped call: Triton loads and stores through the group index; flex and the "
        "reference gather and scatter copies. kernel = inputs already in group order. triton copies = the "
        "Triton call as it ran before, index_select copies in and out around the kernel. Each backend's "
        "speedups use the dense time measured in its own run.)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- grat_pipeline


def grat_pipeline_section(section: Section, settings: Settings) -> None:
    import grat_pipeline

    if settings.smoke:
        runs = [["--model", "flux", "--arch", "tiny", "--height", "128", "--width", "192", "--group-size", "4", "4"]]
        common = ["--device", settings.device, "--warmup", "0", "--repeats", "1", "--json"]
    else:
        runs = [
            ["--model", "flux", "--arch", "full", "--height", "2048", "--width", "2048"],
            ["--model", "flux", "--arch", "full", "--height", "4096", "--width", "4096"],
            ["--model", "hunyuan-video", "--arch", "full", "--height", "544", "--width", "960", "--frames", "61"],
        ]
        common = ["--device", settings.device, "--backend", "auto", "--warmup", "1", "--repeats", "2", "--json"]
    for run in runs:
        text, rows = _captured(grat_pipeline.main, run + common)
        section.table(text)
        section.add(rows, section="grat_pipeline")
        _release_memory()


# --------------------------------------------------------------------------- vlm_pruning


def qwen2_5_vl_7b(device: str):
    """Qwen2.5-VL-7B's architecture (config values of Qwen/Qwen2.5-VL-7B-Instruct), random bf16 weights,
    with the tiny Qwen2.5-VL's tokenizer and an image processor of the released patch geometry
    (14-px patches, 2x2 merge) capped at 448x448 pixels (256 visual tokens)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from hasten import tiny
    from hasten.tiny.vlms import Qwen2VLImageOnlyProcessor

    from common import build_model

    _, small = tiny.vlm("qwen2.5-vl")
    tokenizer = small.tokenizer
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    model = build_model(Qwen2_5_VLForConditionalGeneration, config, device, torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: time a fixed number of tokens
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=448 * 448, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
    return model, processor


def vlm_pruning_section(section: Section, settings: Settings) -> None:
    from hasten.cli.vlm import supported_methods
    from hasten.token_pruning.evaluate import EvalRow, evaluate, format_table, load_vlm, sample_images

    samples = sample_images()[:1]
    if settings.smoke:
        builders = [("tiny-llava", lambda: load_vlm("tiny-llava", settings.device))]
        budgets, new_tokens, repeats = (0.2,), 3, 1
    else:
        import specvlm

        builders = [
            ("llava-1.5-7b (random)", lambda: specvlm.llava_1_5_7b(settings.device)),
            ("qwen2.5-vl-7b (random)", lambda: qwen2_5_vl_7b(settings.device)),
        ]
        budgets, new_tokens, repeats = (0.2, 0.1), 8, 1
    for name, build in builders:
        model, processor = build()
        methods = supported_methods(model)
        if settings.smoke:  # one method per stage: before the LLM, inside it, the quantised cache
            methods = [m for m in methods if m in ("random", "pool", "fastv", "zipvl")]
        pairs = [(m, b) for m in methods for b in ((1.0,) if m == "random" else budgets)]
        notes = []
        try:  # one call: the reference continuation and the warm-up are paid once per model
            rows: list[EvalRow] = evaluate(model, processor, pairs, samples, max_new_tokens=new_tokens, repeats=repeats)
        except SectionTimeout:
            raise
        except Exception as error:  # noqa: BLE001 - then one call per method, so one failing method keeps the rest
            notes.append(
                f"(all methods in one call failed: {type(error).__name__}: {str(error)[:200]}; "
                f"measured one method at a time)"
            )
            rows = []
            for method in methods:
                try:
                    rows += evaluate(
                        model,
                        processor,
                        [p for p in pairs if p[0] == method],
                        samples,
                        max_new_tokens=new_tokens,
                        repeats=repeats,
                    )
                except SectionTimeout:
                    raise
                except Exception as method_error:  # noqa: BLE001
                    reason = f"error: {type(method_error).__name__}: {str(method_error)[:200]}"
                    notes.append(f"SKIPPED {method}: {reason}")
                    section.rows.append(dict(section="vlm_pruning", model=name, method=method, skipped=reason))
        section.add([row.as_dict() for row in rows], section="vlm_pruning", model=name)
        baseline = next((row for row in rows if row.method == "random" and row.budget == 1.0), None)
        table = format_table(rows, baseline=baseline) if rows else "(no rows)"
        section.table(
            "\n".join(
                [f"## {name} ({type(model).__name__}), {new_tokens} new tokens, {len(samples)} photo", table, *notes]
            )
        )
        del model, processor
        _release_memory()


# --------------------------------------------------------------------------- kv_decode


def kv_decode_section(section: Section, settings: Settings) -> None:
    import torch
    import torch.nn.functional as F

    from hasten.kernels.kv_quant import QuantizedKV
    from hasten.kernels.triton_kv_quant import triton_kv_available, triton_partial_attention
    from hasten.token_pruning.kv_cache import MixedPrecisionConfig, MixedPrecisionLayer

    from common import median_ms

    device = torch.device(settings.device)
    if not triton_kv_available():
        raise RuntimeError("triton cannot run here (no CUDA and TRITON_INTERPRET is not 1)")
    heads, kv_heads, dim = (4, 2, 32) if settings.smoke else (28, 4, 128)  # Qwen2.5-VL-7B: 28 / 4 / 128
    contexts = (64,) if settings.smoke else (8192, 32768)
    warmup, repeats = (0, 1) if settings.smoke else (3, 20)
    dtype = torch.bfloat16
    scaling = dim**-0.5
    lines = [
        "| context | heads / KV heads / dim | cache | ms | vs bf16 SDPA | bytes read | vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for context in contexts:
        generator = torch.Generator(device=device).manual_seed(0)
        keys = torch.randn(kv_heads, context, dim, device=device, dtype=dtype, generator=generator)
        values = torch.randn(kv_heads, context, dim, device=device, dtype=dtype, generator=generator)
        query = torch.randn(heads, dim, device=device, dtype=dtype, generator=generator)

        def sdpa(k, v):
            return F.scaled_dot_product_attention(
                query[None, :, None], k[None], v[None], scale=scaling, enable_gqa=True
            )

        base_ms = median_ms(lambda: sdpa(keys, values), device, warmup, repeats)
        base_bytes = 2 * keys.numel() * keys.element_size()
        results = [("bf16 cache, SDPA", base_ms, base_bytes)]
        for bits in (4, 2):
            qk = QuantizedKV.quantize(keys, bits, "channel")
            qv = QuantizedKV.quantize(values, bits, "token")
            quant_bytes = qk.nbytes + qv.nbytes
            fused_ms = median_ms(lambda: triton_partial_attention(query, qk, qv, scaling), device, warmup, repeats)
            deq_ms = median_ms(lambda: sdpa(qk.dequantize(), qv.dequantize()), device, warmup, repeats)
            # The fused kernel must agree with dequantise-then-SDPA (same codes, same softmax).
            fused, _ = triton_partial_attention(query, qk, qv, scaling)
            reference = sdpa(qk.dequantize(), qv.dequantize())[0, :, 0].float()
            error = float((fused - reference).abs().max())
            if error > 0.05:
                raise AssertionError(f"fused decode kernel differs from dequantise-then-SDPA by {error:.3g}")
            results += [
                (f"{bits}-bit KIVI, fused Triton", fused_ms, quant_bytes),
                (f"{bits}-bit KIVI, dequantise + SDPA", deq_ms, quant_bytes),
            ]
        # The mixed-precision cache as ZipVL leaves it: important tokens (the paper's 36.7%) at 4 bits,
        # the rest at 2, read by the layer's own decoding path (fused kernel per segment, or the torch
        # reference that dequantises), partial results merged by their log-sum-exps.
        layer = MixedPrecisionLayer(MixedPrecisionConfig(residual=0))
        layer.update(keys[None], values[None])
        important = torch.rand(1, context, generator=generator, device=device) < 0.367
        layer.compress(important)
        step = query[None, :, None]

        def mixed(backend):
            return layer.decode_attention(step, layer.keys, layer.values, None, scaling, backend=backend)

        error = float((mixed("triton").float() - mixed("torch").float()).abs().max())
        if error > 0.05:
            raise AssertionError(f"mixed cache: fused and torch decoding differ by {error:.3g}")
        results += [
            (
                "mixed 4/2-bit (36.7% at 4), fused Triton",
                median_ms(lambda: mixed("triton"), device, warmup, repeats),
                layer.nbytes,
            ),
            (
                "mixed 4/2-bit (36.7% at 4), torch dequantise",
                median_ms(lambda: mixed("torch"), device, warmup, repeats),
                layer.nbytes,
            ),
        ]
        for label, ms, nbytes in results:
            lines.append(
                f"| {context} | {heads} / {kv_heads} / {dim} | {label} | {ms:.3f} | {base_ms / ms:.2f}x "
                f"| {nbytes} | {nbytes / base_bytes:.3f} |"
            )
            section.rows.append(
                dict(
                    section="kv_decode",
                    context=context,
                    heads=heads,
                    kv_heads=kv_heads,
                    dim=dim,
                    cache=label,
                    ms=round(ms, 4),
                    speedup_vs_bf16=round(base_ms / ms, 3),
                    bytes=nbytes,
                    bytes_vs_bf16=round(nbytes / base_bytes, 4),
                )
            )
        section.text = ["\n".join(lines)]


# --------------------------------------------------------------------------- sjd


def sjd_section(section: Section, settings: Settings) -> None:
    import sjd
    import torch

    from hasten import tiny

    device = torch.device(settings.device)
    window = 16
    if settings.smoke:
        model, processor = tiny.ar_image_model("janus")
        model = model.to(device)
        contexts, warmup, repeats = (8, 32), 0, 1
    else:
        model, processor = sjd.janus_pro_1b(device, torch.bfloat16)
        contexts, warmup, repeats = (64, 320, 576), 3, 20
    if settings.smoke:  # sjd.pass_timing's contexts are for a 576-token image; the tiny model has 64
        rows = _sjd_passes(model, processor, device, window, 1, contexts, warmup, repeats)
    else:
        rows = [dict(row, prompts=1, cfg_rows=2) for row in sjd.pass_timing(model, processor, device, window)]
    section.add(rows, section="sjd")
    batched = _sjd_passes(model, processor, device, window, 4, contexts, warmup, repeats)
    section.add(batched, section="sjd")
    rows = rows + batched
    lines = [
        "| prompts (CFG rows) | context tokens | new tokens | pass ms | SJD pass / AR pass |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ar = next(
            r
            for r in rows
            if r["prompts"] == row["prompts"] and r["context"] == row["context"] and r["new_tokens"] == 1
        )
        lines.append(
            f"| {row['prompts']} ({row['cfg_rows']}) | {row['context']} | {row['new_tokens']} "
            f"| {row['pass_ms']:.2f} | {row['pass_ms'] / ar['pass_ms']:.2f} |"
        )
    lines.append(
        "(one decoding pass with a KV cache of `context` tokens; random weights, so acceptance rates and "
        "whole-image speedups are not measured here)"
    )
    section.text = ["\n".join(lines)]


def _sjd_passes(model, processor, device, window: int, prompts: int, contexts, warmup: int, repeats: int) -> list[dict]:
    """One decoding pass for ``prompts`` prompts at once (CFG doubles the rows): AR vs an SJD window.

    ``sjd.pass_timing`` times one prompt at the full image's contexts; this repeats its
    measurement for a batch of prompts (and for the tiny model's shorter contexts).
    """
    import sjd
    import torch
    from transformers import DynamicCache

    from hasten.pipelines.sjd import SJDPipeline
    from hasten.transformers_conventions import cache_keyword

    from common import median_ms

    pipe = SJDPipeline(model, processor)
    adapter = pipe.adapter
    layout = adapter.layout(None, None)
    embeds, _ = adapter.encode_prompt(sjd.PROMPTS[0], None, True, layout)
    embeds = embeds.repeat(prompts, 1, 1)
    rows_in = embeds.shape[0]
    lm = adapter.language_model
    rows = []
    for context in contexts:
        cache = DynamicCache()
        prefix = torch.cat([embeds, adapter.embed(torch.zeros(rows_in, context, dtype=torch.long, device=device))], 1)
        with torch.no_grad():
            lm(inputs_embeds=prefix, **{cache_keyword(lm): cache}, use_cache=True)
        for new in (1, 1 + window):
            step = adapter.embed(torch.zeros(rows_in, new, dtype=torch.long, device=device))

            def one_pass():
                with torch.no_grad():
                    hidden = lm(inputs_embeds=step, **{cache_keyword(lm): cache}, use_cache=True).last_hidden_state
                    adapter.image_logits(hidden)
                cache.crop(-new)

            rows.append(
                dict(
                    shape="janus",
                    context=embeds.shape[1] + context,
                    new_tokens=new,
                    prompts=prompts,
                    cfg_rows=rows_in,
                    pass_ms=round(median_ms(one_pass, device, warmup, repeats), 2),
                )
            )
    return rows


# --------------------------------------------------------------------------- specvlm


def specvlm_section(section: Section, settings: Settings) -> None:
    import specvlm

    if settings.smoke:
        argv = ["--model", "tiny-llava", "--train-steps", "0", "--max-new-tokens", "4", "--repeats", "1"]
    else:
        argv = ["--arch", "llava-1.5-7b", "--train-steps", "0", "--max-new-tokens", "16", "--repeats", "1"]
    # Smoke: one photo instead of three (specvlm.main times every setting on each).
    every = specvlm.sample_images
    photos = (lambda: every()[:1]) if settings.smoke else every
    with _patched(specvlm, sample_images=photos):
        text, rows = _captured(specvlm.main, argv + ["--device", settings.device, "--json"])
    section.table(text)
    section.add(rows, section="specvlm")


SECTION_FUNCTIONS: dict[str, Callable[[Section, Settings], None]] = {
    "grat_attention": grat_attention_section,
    "grat_pipeline": grat_pipeline_section,
    "vlm_pruning": vlm_pruning_section,
    "kv_decode": kv_decode_section,
    "sjd": sjd_section,
    "specvlm": specvlm_section,
}


# --------------------------------------------------------------------------- driver


def machine_info(settings: Settings, argv: list[str]) -> dict:
    import torch

    info = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        command=" ".join(["python", "benchmarks/gpu_suite.py", *argv]),
        smoke=settings.smoke,
        device=settings.device,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cpu=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    if settings.cuda:
        info["gpu"] = torch.cuda.get_device_name(torch.device(settings.device))
        info["cudnn"] = torch.backends.cudnn.version()
    for package in ("triton", "transformers", "diffusers"):
        try:
            info[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001 - a missing library is recorded, not fatal
            info[package] = f"unavailable ({type(error).__name__})"
    return info


def default_out(settings: Settings, root: pathlib.Path | None = None) -> pathlib.Path:
    """``<root>/<gpu>-<date>/``, root ``benchmarks/results`` (a temporary folder for ``--smoke``)."""
    if settings.smoke and root is None:
        return pathlib.Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_"))
    import torch

    gpu = torch.cuda.get_device_name(torch.device(settings.device)) if settings.cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return (root or HERE / "results") / f"{slug}-{time.strftime('%Y-%m-%d', time.gmtime())}"


def write_section(out: pathlib.Path, section: Section) -> str:
    """Write ``<section>.txt`` and return its text (table, then a SKIPPED line if it stopped)."""
    parts = [f"# {section.name} ({section.seconds:.1f} s of a {section.budget_s:.0f} s budget)", *section.text]
    if section.skipped:
        parts.append(f"SKIPPED {section.name}: {section.skipped}")
    text = "\n\n".join(parts) + "\n"
    (out / f"{section.name}.txt").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default: see above)")
    parser.add_argument(
        "--results-root",
        type=pathlib.Path,
        default=None,
        help="write <results-root>/<gpu>-<date>/ instead (e.g. a folder copied back from the GPU)",
    )
    parser.add_argument(
        "--sections", nargs="+", default=[name for name, _, _ in SECTIONS], choices=[name for name, _, _ in SECTIONS]
    )
    parser.add_argument("--device", default=None, help="default cuda, cpu for --smoke")
    parser.add_argument(
        "--total-budget",
        type=float,
        default=None,
        help=f"seconds for all sections (default {TOTAL_BUDGET_S:.0f}, smoke {SMOKE_BUDGET_S:.0f})",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        # Before triton is imported anywhere: its kernels then run in the CPU interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here (use --smoke for the CPU run)")
    settings = Settings(smoke=args.smoke, device=device)
    total = args.total_budget or (SMOKE_BUDGET_S if args.smoke else TOTAL_BUDGET_S)
    if args.out is not None and args.results_root is not None:
        parser.error("give --out or --results-root, not both")
    out = args.out or default_out(settings, args.results_root)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(settings, argv)
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
    header = (
        f"# hasten GPU suite | {info.get('gpu', info['cpu'])} | torch {info['torch']} | triton {info['triton']} "
        f"| transformers {info['transformers']} | diffusers {info['diffusers']} | {info['date']}\n"
        f"`{info['command']}`{' (smoke: tiny shapes, CPU)' if args.smoke else ''}\n"
    )
    print(header, flush=True)
    report, jsonl = [header], []
    start = time.perf_counter()
    for name, gpu_budget, smoke_budget in SECTIONS:
        if name not in args.sections:
            continue
        left = total - (time.perf_counter() - start)
        budget = min(smoke_budget if args.smoke else gpu_budget, left)
        section = run_section(name, budget, lambda s, name=name: SECTION_FUNCTIONS[name](s, settings))
        text = write_section(out, section)
        report.append(text)
        jsonl.extend(section.rows)
        if section.skipped:
            jsonl.append(dict(section=name, skipped=section.skipped))
        (out / "suite.md").write_text("\n".join(report))
        (out / "suite.jsonl").write_text("".join(json.dumps(row) + "\n" for row in jsonl))
        print(text, flush=True)
    print(f"# written to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
