"""KV-cache compression: bytes, decode speed and fidelity against the full cache, one process.

Part 1 (one photo and a question, max_new_tokens decoded):
- full: the model's own DynamicCache;
- transformers' QuantizedCache (quanto backend, 4 and 2 bits; needs `pip install optimum-quanto`,
  skipped with a note otherwise);
- hasten's mixed-precision cache with no importance verdict (every token at 4 bits);
- ZipVL with the paper's rules (its defaults: tau 0.975, 64 + 64 probes, p counted on the probe
  attention's column sums, attention among the important tokens only, important tokens 4-bit and
  the rest 2-bit, each block of 100 generated tokens split the same way);
- ZipVL with the paper's rules but hasten's former sparse prefill (every query over the important
  keys, ``sparse_prefill="keys"``): the two prefill rules side by side;
- ZipVL with hasten's former rules (p counted on normalised scores, 5% + 5% probes, every query over
  the important keys, generated tokens all 4-bit behind a 32-token full-precision window).

For each ZipVL row: the mean important fraction over layers and the prefill's attention FLOPs as
a share of the dense causal attention's (``ZipVL.prefill_flops()``; probe scoring not included,
printed separately in the JSON rows).

Part 2 (a GUI-agent trajectory of --steps synthetic screenshots, hasten.tiny.gui): full cache
vs GUI-KV at --budget.

Part 3 (no model): prefill attention pairs of one layer of a full-size prompt (--prompt-tokens)
at several important fractions, for the paper's sparse prefill (important x important), the
former rule (every query x important keys) and dense attention, counted causally.

Part 4 (no model): the bytes the mixed-precision cache stores for one layer of a full-size
geometry (--geometry, default Qwen2.5-VL-7B: 4 KV heads x 128 dims) after a --prompt-token
prefill, at several important fractions: the storage ratio depends only on the geometry and
that fraction, and random weights give ZipVL's mass rule a near-uniform attention (~97%
important) where trained models give ~37% (paper: LLaVA-Next-13B, tau 0.975).

Bytes are what each cache stores after decoding (codes, scales, zero points and full-precision
windows), also as a ratio to a 16-bit cache of the same tokens. Fidelity: top-1 agreement and
mean KL(full || compressed) with the full cache's greedy continuation forced through each
cache's decoding path, and greedy exact match. Random weights make fidelity a mechanics check.

Defaults decode 128 tokens, so the block of 100 generated tokens is compressed once.

    python benchmarks/kv_cache.py                                    # tiny Qwen2.5-VL, CPU
    python benchmarks/kv_cache.py --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from hasten.measure import median_seconds
from hasten.tiny.gui import trajectory
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import GUIKV, ZipVL
from hasten.token_pruning.evaluate import TINY, load_vlm, sample_images
from hasten.token_pruning.kv_cache import MixedPrecisionConfig, mixed_precision_cache
from hasten.transformers_conventions import cache_keyword, output_cache

from common import machine


def zipvl_former() -> ZipVL:
    """ZipVL with hasten's rules before issue 25 (each now an option)."""
    return ZipVL(
        count_scores="normalized",
        probe_fraction=0.05,
        sparse_prefill="keys",
        split_generated=False,
        cache=MixedPrecisionConfig(residual=32),
    )


def _stored_bytes(cache) -> int:
    """Bytes a cache stores, whatever its layers are (tensors found in their attributes)."""
    seen, total = set(), 0

    def visit(value, depth=0):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                inner = [t for t in value.__dict__.values() if isinstance(t, torch.Tensor)] if depth < 3 else []
                if inner and type(value) is not torch.Tensor:  # a quanto tensor subclass: its parts
                    for tensor in inner:
                        visit(tensor, depth + 1)
                else:
                    total += value.numel() * value.element_size()
        elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
            for item in value.__dict__.values():
                visit(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)

    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes
        else:
            visit(layer)
    return total


class _Force:
    def __init__(self, continuation, prompt_length):
        self.continuation, self.prompt_length = continuation, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        return torch.full_like(scores, float("-inf")).scatter_(1, self.continuation[:, step : step + 1], 0.0)


REPEATS = 3  # timed generate() calls per measurement (median), after a warm-up; --repeats


def _run(model, inputs, tokens: int, make_cache, method, continuation=None, repeats: int | None = None):
    """(sequences, raw logits of forced decoding, bytes, decode tokens/s) for one cache setup."""
    from transformers import LogitsProcessorList

    repeats = REPEATS if repeats is None else repeats
    context = method.apply(model) if method is not None else contextlib.nullcontext()
    with context, torch.no_grad():

        def generate(new, force=None):
            cache = make_cache()
            kwargs = {cache_keyword(model): cache} if cache is not None else {}
            if force is not None:
                kwargs["logits_processor"] = LogitsProcessorList([_Force(force, inputs["input_ids"].shape[1])])
            out = model.generate(
                **inputs,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **kwargs,
            )
            return out

        greedy = generate(tokens)
        forced = generate(tokens, continuation if continuation is not None else greedy.sequences[:, -tokens:])
        stored = _stored_bytes(output_cache(forced))

        def seconds(new):
            return median_seconds(lambda: generate(new), model.device, warmup=1, repeats=repeats)

        decode = (tokens - 1) / max(seconds(tokens) - seconds(1), 1e-9)
    return greedy.sequences, torch.stack(forced.logits, 1).float(), stored, decode


def _sixteen_bit(model, tokens: int) -> int:
    text = getattr(model.config, "text_config", model.config)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * tokens * kv_heads * head_dim * 2


def _compare(name, model, inputs, setups, tokens, rows, json_lines):
    reference_sequences, reference_logits, reference_bytes, reference_decode = _run(
        model, inputs, tokens, lambda: None, None
    )
    continuation = reference_sequences[:, -tokens:]
    total_tokens = reference_sequences.shape[1] - 1  # cached after the last step
    sixteen = _sixteen_bit(model, total_tokens)
    print(f"\n## {name}: {inputs['input_ids'].shape[1]} prompt tokens + {tokens} decoded")
    print(
        f"{'cache':28s} {'KV KiB':>9s} {'vs 16-bit':>9s} {'top1':>6s} {'KL':>9s} {'exact':>6s} {'dec tok/s':>9s} "
        f"{'important':>9s} {'attn FLOPs':>10s}"
    )
    for label, make_cache, method in setups:
        try:
            sequences, logits, stored, decode = _run(model, inputs, tokens, make_cache, method, continuation)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            print(f"{label:28s} skipped: {type(error).__name__}: {str(error)[:90]}")
            continue
        if method is None and make_cache() is None:
            logits, stored = reference_logits, reference_bytes
        top1 = float((logits.argmax(-1) == continuation).float().mean())
        kl = float(
            torch.nn.functional.kl_div(
                logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="none"
            )
            .sum(-1)
            .mean()
        )
        exact = float(torch.equal(sequences, reference_sequences))
        row = dict(
            part=name,
            cache=label,
            kv_bytes=stored,
            vs_16bit=round(stored / sixteen, 4),
            top1=round(top1, 4),
            kl=round(kl, 5),
            exact=exact,
            decode_tokens_per_s=round(decode, 1),
        )
        extra = ""
        if isinstance(method, ZipVL):
            flops = method.prefill_flops()
            important = statistics.mean(method.stats.layer_important)
            row.update(
                important=round(important, 4),
                prefill_attention_flops=flops["sparse"],
                dense_attention_flops=flops["dense"],
                probe_flops=flops["probes"],
                flops_vs_dense=round(flops["sparse"] / flops["dense"], 4),
            )
            extra = f" {important:9.3f} {flops['sparse'] / flops['dense']:10.3f}"
        print(
            f"{label:28s} {stored / 1024:9.1f} {stored / sixteen:9.3f} {top1:6.3f} {kl:9.2e} {exact:6.2f} "
            f"{decode:9.1f}{extra}"
        )
        rows.append(row)
    if json_lines:
        for row in rows:
            print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help=f"{', '.join(TINY)} or a hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="screenshots in the GUI trajectory")
    parser.add_argument("--budget", type=float, default=0.2, help="GUI-KV budget")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--kv-heads", type=int, default=4, help="part 3 geometry (Qwen2.5-VL-7B: 4)")
    parser.add_argument("--head-dim", type=int, default=128, help="part 3 geometry (Qwen2.5-VL-7B: 128)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="part 3 prefill length")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls per decode-speed measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    global REPEATS
    REPEATS = args.repeats
    print(f"# KV-cache compression | {machine(torch.device(args.device))} | model {args.model} | {args.dtype}")
    model, processor = load_vlm(args.model, args.device)
    model.to(getattr(torch, args.dtype))
    layers = len(
        getattr(model.config, "text_config", model.config).layer_types
        if hasattr(getattr(model.config, "text_config", model.config), "layer_types")
        else range(getattr(model.config, "text_config", model.config).num_hidden_layers)
    )

    def quantized(bits):
        from transformers import QuantizedCache

        text = getattr(model.config, "text_config", model.config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return lambda: QuantizedCache(
            backend="quanto", config=model.config, nbits=bits, residual_length=32, q_group_size=min(64, head_dim)
        )

    image, question = sample_images()[0]
    inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt").to(model.device)
    setups = [
        ("full (DynamicCache)", lambda: None, None),
        ("QuantizedCache quanto 4-bit", quantized(4), None),
        ("QuantizedCache quanto 2-bit", quantized(2), None),
        ("hasten mixed, all 4-bit", lambda: mixed_precision_cache(MixedPrecisionConfig(), layers), None),
        ("ZipVL paper rules (default)", lambda: None, ZipVL()),
        ("ZipVL paper, keys prefill", lambda: None, ZipVL(sparse_prefill="keys")),
        ("ZipVL former rules", lambda: None, zipvl_former()),
    ]
    rows: list[dict] = []
    _compare("one photo", model, inputs, setups, args.max_new_tokens, rows, False)

    shots, _ = trajectory(steps=args.steps, size=(448, 320) if not args.model.startswith("tiny") else (96, 64))
    prompt = chat_prompt(processor, "You are a GUI agent. What is the next action?", images=args.steps)
    gui_inputs = processor(images=shots, text=[prompt], return_tensors="pt").to(model.device)
    gui_setups = [
        ("full (DynamicCache)", lambda: None, None),
        (f"GUI-KV budget {args.budget}", lambda: None, GUIKV(budget=args.budget)),
        ("ZipVL paper rules (default)", lambda: None, ZipVL()),
        ("ZipVL paper, keys prefill", lambda: None, ZipVL(sparse_prefill="keys")),
        ("ZipVL former rules", lambda: None, zipvl_former()),
    ]
    _compare(
        f"GUI trajectory, {args.steps} screenshots", model, gui_inputs, gui_setups, args.max_new_tokens, rows, args.json
    )
    _prefill_pairs(args.prompt_tokens)
    _geometry(args.kv_heads, args.head_dim, args.prompt_tokens)


def _prefill_pairs(tokens: int) -> None:
    """Causal query-key pairs of one layer's prefill per important fraction, for each sparse-prefill rule."""
    print(f"\n## prefill attention pairs of one layer, {tokens}-token prompt (random important set, causal count)")
    print(
        f"{'important':>9s} {'Q[T]K[T] (paper)':>17s} {'all Q x K[T]':>13s} {'dense':>12s} {'paper/dense':>11s} "
        f"{'keys/dense':>10s}"
    )
    generator = torch.Generator().manual_seed(0)
    dense = tokens * (tokens + 1) // 2
    for fraction in (1.0, 0.71, 0.56, 0.43, 0.367):
        flags = torch.rand(tokens, generator=generator) < fraction
        flags[0] = True
        p = int(flags.sum())
        paper = p * (p + 1) // 2
        keys = int(flags.long().cumsum(0).sum())  # query i sees the important keys j <= i
        print(f"{fraction:9.3f} {paper:17d} {keys:13d} {dense:12d} {paper / dense:11.3f} {keys / dense:10.3f}")
        print(
            json.dumps(
                dict(
                    part="prefill pairs",
                    tokens=tokens,
                    important=round(p / tokens, 4),
                    paper_pairs=paper,
                    keys_pairs=keys,
                    dense_pairs=dense,
                )
            )
        )


def _geometry(kv_heads: int, head_dim: int, tokens: int) -> None:
    """Stored bytes of one mixed-precision layer after a prefill, per important fraction."""
    from hasten.token_pruning.kv_cache import MixedPrecisionLayer

    print(
        f"\n## one cache layer, {kv_heads} KV heads x {head_dim} dims, {tokens}-token prefill (ZipVL defaults: "
        f"4/2 bits, group 32, KIVI layouts)"
    )
    print(f"{'important':>9s} {'bytes':>10s} {'vs 16-bit':>9s}")
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, kv_heads, tokens, head_dim, generator=generator).to(torch.bfloat16)
    values = torch.randn(1, kv_heads, tokens, head_dim, generator=generator).to(torch.bfloat16)
    sixteen = 2 * keys.numel() * 2
    for fraction in (1.0, 0.97, 0.5, 0.367, 0.0):
        layer = MixedPrecisionLayer(MixedPrecisionConfig())
        layer.update(keys, values)
        important = torch.rand(1, tokens, generator=generator) < fraction
        layer.compress(important)
        print(f"{fraction:9.3f} {layer.nbytes:10d} {layer.nbytes / sixteen:9.3f}")


if __name__ == "__main__":
    main()
