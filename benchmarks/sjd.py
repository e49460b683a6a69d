"""Speculative Jacobi Decoding vs autoregressive decoding: forward passes and wall time per image.

For each model and each draft initialisation strategy, generates the same prompts with SJD and
with plain AR decoding (the same loop, window 0) in one process, and reports forward passes per
image (the prefill counted), tokens per decoding pass, wall time and the speedup.

Random weights make acceptance rates meaningless as quality evidence: a random model's
next-token distributions are close to uniform, and uniform random drafts are then accepted far
more often than with a trained model (the paper reports ~2x fewer passes). Read the tiny rows
as a check of the mechanics; the pass counts of a trained model come from its own run.

``--arch janus-pro-1b`` builds the Janus-Pro-1B architecture (Llama 2048 x 24 layers, 16 heads,
vocab 102400, 24 x 24 image tokens from a 16384-entry codebook) with random weights on the
device, and times one decoding pass at real shapes: AR (CFG batch 2, 1 new token) vs an SJD
window (CFG batch 2, 1 + L new tokens), plus whole images.

``--batch-sizes 1 4 8`` decodes 8 prompts in batches of each size (one cache per batch, the
batch advancing by its shortest accepted run) with SJD and with AR, and reports seconds and
passes per image. ``--host`` measures, per decoding pass, the host milliseconds outside the
model's forwards and the device-to-host reads (``.item()``, ``.tolist()``, ``int(tensor)``, ...:
each a sync on a GPU) with :class:`hasten.speculative.HostProfile`.

    python benchmarks/sjd.py --model tiny-janus tiny-emu3
    python benchmarks/sjd.py --model tiny-janus tiny-emu3 --init random --batch-sizes 1 4 8 --host
    python benchmarks/sjd.py --arch janus-pro-1b --device cuda
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hasten import tiny
from hasten.measure import timed
from hasten.pipelines.sjd import INIT_STRATEGIES, SJDConfig, SJDPipeline

from common import machine, median_ms, print_json

try:
    from hasten.speculative import HostProfile
except ImportError:  # measuring an older hasten commit (before/after): pass --profile-module
    HostProfile = None
from hasten.transformers_conventions import cache_keyword

PROMPTS = ["a red fox in the snow", "an old lighthouse on a cliff", "a bowl of fresh fruit"]


def janus_pro_1b(device: torch.device, dtype: torch.dtype):
    """The Janus-Pro-1B architecture with random weights (config values from its config.json)."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    _, processor = tiny.ar_image_model("janus")
    text = dict(
        model_type="llama",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=16384,
    )
    vision = dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=384,
        patch_size=16,
        projection_dim=2048,
        depth=2,
        num_image_tokens=576,
    )
    vq = dict(num_embeddings=16384, embed_dim=8, num_patches=24, image_token_embed_dim=2048, projection_dim=2048)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq)
    with torch.device(device):
        model = JanusForConditionalGeneration(config).to(dtype).eval()
    return model, processor


def run_pipeline(name: str, pipe: SJDPipeline, inits: list[str], window: int, repeats: int) -> list[dict]:
    device = pipe.model.device
    rows = []

    def generate(config):
        runs = [
            timed(lambda prompt=prompt, seed=seed: pipe(prompt, sjd=config, seed=seed), device)
            for seed, prompt in enumerate(PROMPTS * repeats)
        ]
        return [out for out, _ in runs], statistics.median(seconds for _, seconds in runs)

    pipe(PROMPTS[0], sjd=None, seed=0)  # warm-up
    ar, ar_s = generate(None)
    ar_forwards = statistics.mean(o.stats.forwards for o in ar)
    for init in inits:
        outs, s = generate(SJDConfig(window=window, init=init))
        forwards = statistics.mean(o.stats.forwards for o in outs)
        rows.append(
            dict(
                model=name,
                init=init,
                window=window,
                tokens=outs[0].stats.tokens,
                ar_forwards=round(ar_forwards, 1),
                sjd_forwards=round(forwards, 1),
                pass_reduction=round(ar_forwards / forwards, 2),
                tokens_per_pass=round(statistics.mean(o.stats.tokens_per_forward for o in outs), 2),
                ar_s=round(ar_s, 3),
                sjd_s=round(s, 3),
                speedup=round(ar_s / s, 2),
                weights="random (acceptance not meaningful)",
            )
        )
    return rows


BATCH_PROMPTS = PROMPTS + [
    "a green tree by a river",
    "a yellow taxi at night",
    "two cats on a sofa",
    "a mountain lake at dawn",
    "a snowy village street",
]


def run_batches(name: str, pipe: SJDPipeline, batch_sizes: list[int], window: int) -> list[dict]:
    """8 prompts decoded in batches of each size, SJD (random init) and AR, tokens only."""
    device = pipe.model.device
    rows = []

    def decode(config, batch_size):
        return timed(lambda: pipe(BATCH_PROMPTS, sjd=config, seed=0, batch_size=batch_size, decode=False), device)

    pipe(BATCH_PROMPTS[:2], sjd=SJDConfig(window=window), seed=0, batch_size=2, decode=False)  # warm-up
    base = {}
    for batch_size in batch_sizes:
        ar, ar_s = decode(None, batch_size)
        sjd, sjd_s = decode(SJDConfig(window=window), batch_size)
        images = len(BATCH_PROMPTS)
        base.setdefault("sjd", sjd_s)
        rows.append(
            dict(
                model=name,
                batch=batch_size,
                images=images,
                sjd_passes_per_image=round(sjd.stats.forwards / images, 2),
                ar_passes_per_image=round(ar.stats.forwards / images, 2),
                sjd_s_per_image=round(sjd_s / images, 4),
                ar_s_per_image=round(ar_s / images, 4),
                speedup_vs_ar=round(ar_s / sjd_s, 2),
                sjd_vs_batch1=round(base["sjd"] / sjd_s, 2),
            )
        )
    return rows


class LoopProfile:
    """Host ms and device reads inside the decoding loop only (``_Decoder.run``: prompt encoding and
    the image decoder excluded), the model's modules' forwards taken out. The same measurement
    runs on older hasten commits (it needs only ``_Decoder.run`` and a HostProfile)."""

    def __init__(self, pipe, profile_class):
        import hasten.pipelines.sjd as sjd_module

        self.module, self.profile_class = sjd_module, profile_class
        self.modules = list(pipe.model.model.children()) + list(pipe.model.children())
        self.host_s = self.model_s = 0.0
        self.syncs = 0

    def __enter__(self):
        original = self.original = self.module._Decoder.run
        loop = self

        def run(decoder, *args, **kwargs):
            with loop.profile_class(loop.modules) as profile:
                result = original(decoder, *args, **kwargs)
            loop.host_s += profile.host_seconds
            loop.model_s += profile.model_seconds
            loop.syncs += profile.syncs
            return result

        self.module._Decoder.run = run
        return self

    def __exit__(self, *exc):
        self.module._Decoder.run = self.original


def host_overhead(name: str, pipe: SJDPipeline, window: int, repeats: int = 4, profile_class=HostProfile) -> list[dict]:
    """Host ms (outside the model's modules) and device reads per decoding pass, in the decoding
    loop, batch 1."""
    rows = []
    pipe(PROMPTS[0], sjd=SJDConfig(window=window), seed=0)  # warm-up
    for label, config in (
        ("AR", None),
        ("SJD random", SJDConfig(window=window)),
        ("SJD repeat_horizontal", SJDConfig(window=window, init="repeat_horizontal")),
    ):
        host, syncs, model_ms, passes = [], [], [], []
        for seed in range(repeats):
            with LoopProfile(pipe, profile_class) as loop:
                out = pipe(PROMPTS[seed % len(PROMPTS)], sjd=config, seed=seed)
            count = len(out.stats.accepted_per_forward)
            host.append(1e3 * loop.host_s / count)
            syncs.append(loop.syncs / count)
            model_ms.append(1e3 * loop.model_s / count)
            passes.append(count)
        rows.append(
            dict(
                model=name,
                decoding=label,
                passes=round(statistics.mean(passes), 1),
                host_ms_per_pass=round(statistics.median(host), 3),
                model_ms_per_pass=round(statistics.median(model_ms), 3),
                syncs_per_pass=round(statistics.mean(syncs), 2),
            )
        )
    return rows


def pass_timing(model, processor, device, window: int) -> list[dict]:
    """One decoding pass at real shapes: AR (1 token) vs SJD (1 + window tokens), CFG batch 2."""
    from transformers import DynamicCache

    pipe = SJDPipeline(model, processor)
    adapter = pipe.adapter
    layout = adapter.layout(None, None)
    embeds, mask = adapter.encode_prompt(PROMPTS[0], None, True, layout)
    lm = adapter.language_model
    rows = []
    for context in (64, 320, 576):  # image tokens already decoded
        cache = DynamicCache()
        prefix = torch.cat([embeds, adapter.embed(torch.zeros(2, context, dtype=torch.long, device=device))], 1)
        with torch.no_grad():
            lm(inputs_embeds=prefix, **{cache_keyword(lm): cache}, use_cache=True)
        for new in (1, 1 + window):
            step = adapter.embed(torch.zeros(2, new, dtype=torch.long, device=device))

            def one_pass():
                with torch.no_grad():
                    hidden = lm(inputs_embeds=step, **{cache_keyword(lm): cache}, use_cache=True).last_hidden_state
                    adapter.image_logits(hidden)
                cache.crop(-new)

            rows.append(
                dict(
                    shape="janus-pro-1b",
                    context=embeds.shape[1] + context,
                    new_tokens=new,
                    pass_ms=round(median_ms(one_pass, device, 3, 20), 2),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        nargs="+",
        default=["tiny-janus", "tiny-emu3"],
        help="tiny-janus, tiny-emu3, or a hub id / folder of a Janus or Emu3 model",
    )
    parser.add_argument("--arch", choices=["janus-pro-1b"], help="full-size architecture, random weights")
    parser.add_argument("--init", nargs="+", default=list(INIT_STRATEGIES), choices=INIT_STRATEGIES)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="times each prompt is generated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also decode 8 prompts in batches of these sizes (SJD random init and AR)",
    )
    parser.add_argument("--host", action="store_true", help="also measure host ms and device reads per pass")
    parser.add_argument(
        "--profile-module",
        default=None,
        help="import HostProfile from this module (to measure an older hasten commit with the "
        "same profiler, e.g. a copy of hasten/speculative/profiling.py)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-inits", action="store_true", help="skip the per-init table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# SJD vs AR | {machine(device)}")
    rows: list[dict] = []
    if args.arch:
        model, processor = janus_pro_1b(device, dtype)
        timing = pass_timing(model, processor, device, args.window)
        print(f"{'shape':14s} {'context':>8s} {'new tokens':>10s} {'pass ms':>8s}")
        for row in timing:
            print(f"{row['shape']:14s} {row['context']:8d} {row['new_tokens']:10d} {row['pass_ms']:8.2f}")
        rows += timing
        pipe = SJDPipeline(model, processor)
        pipe.progress_bar = False
        rows += run_pipeline(args.arch, pipe, args.init, args.window, args.repeats)
    else:
        for name in args.model:
            kind = name.removeprefix("tiny-")
            if name.startswith("tiny-"):
                model, processor = tiny.ar_image_model(kind)
            else:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
                processor = AutoProcessor.from_pretrained(name)
            pipe = SJDPipeline(model.to(device), processor)
            pipe.progress_bar = False
            if not args.skip_inits:
                rows += run_pipeline(name, pipe, args.init, args.window, args.repeats)
            if args.batch_sizes:
                rows += run_batches(name, pipe, args.batch_sizes, args.window)
            if args.host:
                profile_class = HostProfile
                if args.profile_module:
                    import importlib

                    profile_class = importlib.import_module(args.profile_module).HostProfile
                rows += host_overhead(name, pipe, args.window, profile_class=profile_class)
    generation = [r for r in rows if "init" in r]
    print(
        f"{'model':14s} {'init':18s} {'tokens':>6s} {'AR passes':>9s} {'SJD passes':>10s} {'fewer':>6s} "
        f"{'tok/pass':>8s} {'AR s':>7s} {'SJD s':>7s} {'speedup':>7s}"
    )
    for r in generation:
        print(
            f"{r['model']:14s} {r['init']:18s} {r['tokens']:6d} {r['ar_forwards']:9.1f} {r['sjd_forwards']:10.1f} "
            f"{r['pass_reduction']:5.2f}x {r['tokens_per_pass']:8.2f} {r['ar_s']:7.3f} {r['sjd_s']:7.3f} "
            f"{r['speedup']:6.2f}x"
        )
    print("(random weights: acceptance rates are not evidence of quality or of a trained model's speedup)")
    batches = [r for r in rows if "batch" in r]
    if batches:
        print(
            f"\n{'model':14s} {'batch':>5s} {'SJD passes/img':>14s} {'AR passes/img':>13s} {'SJD s/img':>9s} "
            f"{'AR s/img':>8s} {'vs AR':>6s} {'vs batch 1':>10s}"
        )
        for r in batches:
            print(
                f"{r['model']:14s} {r['batch']:5d} {r['sjd_passes_per_image']:14.2f} {r['ar_passes_per_image']:13.2f} "
                f"{r['sjd_s_per_image']:9.4f} {r['ar_s_per_image']:8.4f} {r['speedup_vs_ar']:5.2f}x "
                f"{r['sjd_vs_batch1']:9.2f}x"
            )
    host = [r for r in rows if "host_ms_per_pass" in r]
    if host:
        print(
            f"\n{'model':14s} {'decoding':22s} {'passes':>6s} {'host ms/pass':>12s} {'model ms/pass':>13s} "
            f"{'reads/pass':>10s}"
        )
        for r in host:
            print(
                f"{r['model']:14s} {r['decoding']:22s} {r['passes']:6.1f} {r['host_ms_per_pass']:12.3f} "
                f"{r['model_ms_per_pass']:13.3f} {r['syncs_per_pass']:10.2f}"
            )
    if args.json:
        print_json(rows)


if __name__ == "__main__":
    main()
