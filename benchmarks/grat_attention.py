"""Attention alone at Flux / HunyuanVideo shapes: dense SDPA vs GRAT-X vs GRAT-B, one process.

Flux shapes: head dim 128, 512 text tokens (text first), latent grid = resolution / 16 per
side, 16x16 groups. ``--micro`` adds the trained micro-flux's shapes (head dim 32, 24 text tokens,
latent grid = side / 4, 4x4 groups: the demo's). The video shape is HunyuanVideo-like: 544x960, 61 frames -> a 16x34x60
latent grid (patch 2, VAE 8x spatial / 4x temporal), 256 text tokens (text last), 4x8x8 groups.

GRAT time is the whole grouped call a model pays: gather into groups, the block-sparse kernel,
scatter back (``kernel_ms`` is the kernel alone; the bands and windows backends, "auto" on CPU for
GRAT-X and GRAT-B (images, small groups), work in model order and have no separate kernel, so there it is the whole call). ``density`` is the fraction of tile pairs
computed; ``bound`` is the most GRAT can gain over dense attention on the unpadded sequence
(1 / (computed tile pairs x tile² / tokens²): 1/density with padding counted as cost).

    python benchmarks/grat_attention.py --resolution 1024 2048 --heads 1 --device cpu --json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hasten.kernels import (
    BACKENDS,
    GROUPED_BACKENDS,
    block_sparse_attention,
    group_layout,
    grouped_attention,
    grouped_backend,
)

from common import machine, median_ms, print_json

HEAD_DIM = 128
MICRO_HEAD_DIM = 32


def shapes(resolutions: list[int], video: bool, micro: list[int] = ()) -> list[dict]:
    rows = [
        dict(name=f"flux-{r}", resolution=r, grid=(1, r // 16, r // 16), text=512, text_first=True, group=(1, 16, 16))
        for r in resolutions
    ]
    rows += [
        dict(
            name=f"micro-flux-{side}",
            resolution=side,
            grid=(1, side // 4, side // 4),
            text=24,
            text_first=True,
            group=(1, 4, 4),
            head_dim=MICRO_HEAD_DIM,
        )
        for side in micro
    ]
    if video:
        rows.append(
            dict(
                name="hunyuan-544x960x61f",
                resolution="544x960x61",
                grid=(16, 34, 60),
                text=256,
                text_first=False,
                group=(4, 8, 8),
            )
        )
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    results = []
    for shape in shapes(args.resolution, args.video, args.micro):
        tokens = shape["text"] + shape["grid"][0] * shape["grid"][1] * shape["grid"][2]
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(1, args.heads, tokens, shape.get("head_dim", HEAD_DIM), device=device, dtype=dtype)
            for _ in range(3)
        )
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, args.warmup, args.repeats)
        for pattern, window in (("cross", (1, 1, 1)), ("block", (1, 1, 1))):
            if GROUPED_BACKENDS.get(args.backend, pattern) != pattern:
                continue  # "bands" computes GRAT-X only, "windows" GRAT-B only
            layout = group_layout(
                shape["grid"],
                shape["group"],
                num_text=shape["text"],
                text_first=shape["text_first"],
                pattern=pattern,
                window=window,
            ).to(device)
            backend = grouped_backend(args.backend, layout, device)
            grat_ms = median_ms(
                lambda: grouped_attention(q, k, v, layout, backend=backend), device, args.warmup, args.repeats
            )
            qk = [x.index_select(-2, layout.gather_index) for x in (q, k, v)]
            kernel_ms = (
                grat_ms
                if backend in ("bands", "windows")
                else median_ms(
                    lambda: block_sparse_attention(
                        *qk,
                        layout.kv_indices,
                        layout.kv_counts,
                        layout.key_valid[None],
                        layout.tile,
                        backend=backend,
                        static_valid=layout.key_valid,
                    ),
                    device,
                    args.warmup,
                    args.repeats,
                )
            )
            row = dict(
                pattern=pattern,
                shape=shape["name"],
                resolution=shape["resolution"],
                tokens=tokens,
                heads=args.heads,
                backend=backend,
                dtype=args.dtype,
                density=round(layout.density, 4),
                bound=round(layout.bound, 2),
                dense_ms=round(dense_ms, 2),
                grat_ms=round(grat_ms, 2),
                kernel_ms=round(kernel_ms, 2),
                speedup=round(dense_ms / grat_ms, 2),
                kernel_speedup=round(dense_ms / kernel_ms, 2),
            )
            row["fraction_of_bound"] = round(row["speedup"] / row["bound"], 2)
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="*", default=[1024, 2048], choices=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto: triton on CUDA; on CPU bands for GRAT-X, windows for GRAT-B on images with small groups, else reference",
    )
    parser.add_argument("--video", action="store_true", help="also the HunyuanVideo-like 3-D shape")
    parser.add_argument(
        "--micro", type=int, nargs="*", default=[], metavar="SIDE", help="also micro-flux shapes at these image sides"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row after the table")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    print(f"# GRAT attention benchmark | {machine(torch.device(args.device))}")
    results = run(args)
    header = f"{'shape':<22}{'pattern':<8}{'backend':<10}{'tokens':>8}{'density':>9}{'bound':>8}{'dense ms':>10}{'grat ms':>10}{'kernel ms':>11}{'speedup':>9}{'of bound':>9}"
    print(header)
    for r in results:
        print(
            f"{r['shape']:<22}{r['pattern']:<8}{r['backend']:<10}{r['tokens']:>8}{r['density']:>9.3f}{r['bound']:>8.2f}"
            f"{r['dense_ms']:>10.1f}{r['grat_ms']:>10.1f}{r['kernel_ms']:>11.1f}{r['speedup']:>8.2f}x"
            f"{r['fraction_of_bound']:>8.0%}"
        )
    if args.json:
        print_json(results)


if __name__ == "__main__":
    main()
