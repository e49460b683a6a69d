"""SpecVLM: accepted length, target passes per token and speedup against plain generate(), one process.

A draft is distilled from the target first (online, --train-steps on scikit-image photos), then
each setting generates greedily on the photos: plain ``generate()``, chain drafting (depth 5)
and the dynamic tree (top-k 10, 60 tokens, depth 7), each with the draft's visual compressor
on (2x2 pooling) and off (every visual token). Every output is checked equal to the target's.
Random weights make acceptance depend on how repetitive the random target is: read the
mechanics (passes per token, overhead per pass), not the paper's numbers.

``--arch llava-1.5-7b`` builds LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + a 7B Llama, 576
visual tokens) with random weights in bf16 and adds what transfers to a trained model: the time
of one plain decoding step and of one speculative round (draft + ONE verification forward), so
the decode speedup at the paper's accepted lengths (3.59 EagleVLM, 3.67 SpecVLM, LLaVA-1.5-7B,
1 epoch) is ``tau * step / round``. A random 7B target's next-token scores are nearly tied, so the
multi-token verification forward can round differently from one-token decoding: for ``--arch``
(and any bf16 model) outputs are compared with generate()'s and reported, not asserted.

Per setting it also reports the host milliseconds per round outside the target's and the draft's
forwards and the device-to-host reads per round (each a sync on a GPU), with
:class:`hasten.speculative.HostProfile`, and a batch row: chain drafting over all photos in one
left-padded batch (each row checked against the batch's ``generate()``).

    python benchmarks/specvlm.py                                    # tiny LLaVA, CPU
    python benchmarks/specvlm.py --model llava-hf/llava-1.5-7b-hf --device cuda --train-steps 2000
    python benchmarks/specvlm.py --arch llava-1.5-7b --device cuda --train-steps 200
    python benchmarks/specvlm.py --model trained-llava --microworld 16 --max-new-tokens 64 \
        --draft src/hasten/tiny/weights/llava-draft      # the micro-world LLaVA describing scenes
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hasten import tiny
from hasten.measure import median_seconds
from hasten.speculative import DraftModel, HostProfile, TreeConfig, speculative_generate, train_draft
from hasten.tiny import micro_vlm
from hasten.tiny.vlms import chat_prompt
from hasten.tiny.vqa import held_out
from hasten.token_pruning.evaluate import load_vlm, sample_images

from common import build_model, machine

PAPER_ACCEPTED = {"EagleVLM": 3.59, "SpecVLM": 3.67}  # LLaVA-1.5-7B, temperature 0, 1 epoch (arXiv 2509.11815)


def llava_1_5_7b(device: str, dtype: torch.dtype = torch.bfloat16):
    """LLaVA-1.5-7B's architecture (config values of llava-hf/llava-1.5-7b-hf), random weights, with a
    336-px processor around the tiny LLaVA's tokenizer."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _, small = tiny.vlm("llava")
    tokenizer = small.tokenizer
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = build_model(LlavaForConditionalGeneration, config, device, dtype)
    model.generation_config.eos_token_id = None  # random weights: time a fixed number of tokens
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=small.chat_template,
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--arch", choices=["llava-1.5-7b"], help="full-size architecture, random weights (GPU)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="of the --arch model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--microworld",
        type=int,
        default=0,
        metavar="N",
        help="the trained micro-world LLaVA describing N held-out scenes ('Describe the picture.', ~40-token "
        "answers) instead of the photos; the draft trains on training-seed scenes",
    )
    parser.add_argument("--draft", default=None, help="a saved draft folder to use instead of distilling one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch:
        model, processor = llava_1_5_7b(args.device, getattr(torch, args.dtype))
    else:
        model, processor = load_vlm(args.model, args.device)
    exact = not args.arch and next(model.parameters()).dtype in (torch.float32, torch.float64)  # then asserted
    samples, training_pairs, continuation = sample_images(), None, 16
    if args.microworld:
        held = held_out("scene", args.microworld, kinds=["describe"], size=micro_vlm.scene_size("llava"))
        samples = [(sample.images[0], sample.question) for sample in held]
        training_pairs, continuation = micro_vlm.describe_pairs(200), micro_vlm.DRAFT_CONTINUATION
    print(
        f"# SpecVLM | {machine(torch.device(args.device))} | {args.arch or args.model} "
        f"({str(next(model.parameters()).dtype)[6:]}) | {args.max_new_tokens} new "
        f"tokens, "
        + (f"draft {args.draft}" if args.draft else f"draft distilled for {args.train_steps} steps")
        + (f" | {args.microworld} held-out micro-world scenes, 'Describe the picture.'" if args.microworld else "")
    )
    prompts = [
        processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt").to(model.device)
        for image, question in samples
    ]
    references = [model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False) for inputs in prompts]

    def timed(fn):
        return fn(), median_seconds(fn, model.device, warmup=0, repeats=args.repeats)

    with torch.no_grad():
        prefill = statistics.mean(timed(lambda inputs=inputs: model(**inputs))[1] for inputs in prompts)
    plain = [
        timed(lambda inputs=inputs: model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False))[1]
        for inputs in prompts
    ]
    step = (statistics.mean(plain) - prefill) / (args.max_new_tokens - 1)  # one plain decoding step
    rows = [
        dict(
            setting="generate()",
            compressor="-",
            tokens_per_pass=1.0,
            passes_per_token=1.0,
            seconds=round(statistics.mean(plain), 4),
            speedup=1.0,
            identical=1.0,
            round_ms=round(1e3 * step, 2),
        )
    ]
    for compressor in ("pool", "none") if not args.draft else ("saved",):
        if args.draft:
            draft = DraftModel.from_pretrained(args.draft, model)
        else:
            draft = DraftModel.for_target(model, compressor=compressor)
            if args.train_steps:
                pairs = training_pairs or samples
                train_draft(
                    model, processor, pairs, draft, steps=args.train_steps, continuation=continuation, progress=False
                )
        for setting, tree in (("chain (depth 5)", None), ("tree (10 / 60 / 7)", TreeConfig())):
            accepted, passes, seconds, rounds, identical, host, reads = [], [], [], [], [], [], []
            for inputs, reference in zip(prompts, references):
                (out, stats), took = timed(
                    lambda inputs=inputs: speculative_generate(
                        model, inputs, draft, max_new_tokens=args.max_new_tokens, tree=tree
                    )
                )
                if exact:
                    assert torch.equal(out, reference), "speculative output differs from the target's"
                identical.append(float(torch.equal(out, reference)))
                accepted.append(stats.mean_accepted)
                passes.append(stats.target_forwards_per_token)
                seconds.append(took)
                rounds.append((took - prefill) / len(stats.accepted))  # draft + one verification, per round
                modules = [model, draft, model.get_input_embeddings(), model.get_output_embeddings()]
                with HostProfile(modules) as profile:
                    _, stats = speculative_generate(model, inputs, draft, max_new_tokens=args.max_new_tokens, tree=tree)
                host.append(1e3 * profile.host_seconds / len(stats.accepted))
                reads.append(profile.syncs / len(stats.accepted))
            rows.append(
                dict(
                    setting=setting,
                    compressor=compressor,
                    tokens_per_pass=round(statistics.mean(accepted), 3),
                    host_ms_per_round=round(statistics.median(host), 3),
                    reads_per_round=round(statistics.mean(reads), 2),
                    passes_per_token=round(statistics.mean(passes), 3),
                    seconds=round(statistics.mean(seconds), 4),
                    speedup=round(statistics.mean(plain) / statistics.mean(seconds), 3),
                    identical=round(statistics.mean(identical), 2),
                    round_ms=round(1e3 * statistics.mean(rounds), 2),
                )
            )
        if compressor == "pool":  # one left-padded batch of every photo, chain drafting
            processor.tokenizer.padding_side = "left"
            batch = processor(
                images=[image for image, _ in samples],
                text=[chat_prompt(processor, question) for _, question in samples],
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            batch_reference = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            (out, stats), took = timed(
                lambda: speculative_generate(model, batch, draft, max_new_tokens=args.max_new_tokens)
            )
            # reported, not asserted: a float32 padded batch's multi-token verification can round differently
            (_, plain_batch) = timed(
                lambda: model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            )
            rows.append(
                dict(
                    setting=f"chain, batch {len(samples)}",
                    compressor=compressor,
                    tokens_per_pass=round(stats.mean_accepted, 3),
                    passes_per_token=round(stats.target_forwards_per_token, 3),
                    seconds=round(took / len(samples), 4),
                    speedup=round(plain_batch / took, 3),
                    identical=float(torch.equal(out, batch_reference)),
                    round_ms=round(1e3 * took / len(stats.accepted), 2),
                    host_ms_per_round=None,
                    reads_per_round=None,
                )
            )
    print(
        f"\n{'setting':20s} {'compressor':10s} {'tokens/pass':>11s} {'passes/token':>12s} {'seconds':>8s} {'speedup':>8s} "
        f"{'identical':>9s} {'ms/round':>8s} {'host ms/round':>13s} {'reads/round':>11s}"
    )
    for row in rows:
        host_ms = "-" if row.get("host_ms_per_round") is None else f"{row['host_ms_per_round']:.2f}"
        reads = "-" if row.get("reads_per_round") is None else f"{row['reads_per_round']:.1f}"
        print(
            f"{row['setting']:20s} {row['compressor']:10s} {row['tokens_per_pass']:11.2f} {row['passes_per_token']:12.3f} "
            f"{row['seconds']:8.3f} {row['speedup']:7.2f}x {row['identical']:9.2f} {row['round_ms']:8.2f} "
            f"{host_ms:>13s} {reads:>11s}"
        )
    print(
        "(a batch row: seconds per prompt, speedup against generate() on the same batch; generate()'s speedup is "
        "1 by definition)"
    )
    print(
        f"(prefill {1e3 * prefill:.1f} ms; 'ms/round' of generate() is one plain decoding step; 'identical': share of "
        f"prompts whose output equals generate()'s)"
    )
    print("\nDecode speedup at the paper's accepted lengths, tau * (plain step) / (measured round):")
    for row in [r for r in rows[1:] if "batch" not in r["setting"]]:
        projected = {name: round(tau * step * 1e3 / row["round_ms"], 2) for name, tau in PAPER_ACCEPTED.items()}
        row["projected_decode_speedup"] = projected
        print(
            f"  {row['setting']:20s} {row['compressor']:6s} "
            + "  ".join(f"{k} tau={PAPER_ACCEPTED[k]}: {v:.2f}x" for k, v in projected.items())
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
