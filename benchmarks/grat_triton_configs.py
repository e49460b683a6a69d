"""Sweep the Triton block-sparse kernel's launch configurations at GRAT shapes (CUDA only).

For each shape and pattern, times the kernel alone (inputs already in group order) for every
(BLOCK_M, BLOCK_N, num_warps, num_stages) in the grid, next to compiled FlexAttention on the
same block list and dense SDPA on the same tokens, and checks each output against flex. The
default table in ``hasten/kernels/triton_block_sparse.py`` (``_launch_config``) should hold the
fastest row.

    python benchmarks/grat_triton_configs.py --resolution 4096 --video
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

import torch
import torch.nn.functional as F
from grat_attention import HEAD_DIM, shapes

from hasten.kernels import block_sparse_attention, group_layout
from hasten.kernels import triton_block_sparse as tbs

from common import machine, median_ms, print_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="+", default=[4096], choices=[1024, 2048, 4096, 8192])
    parser.add_argument("--video", action="store_true")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    print(f"# Triton launch-config sweep | {machine(device)} | bf16, head dim {HEAD_DIM}, {args.heads} heads")
    print(
        f"{'shape':20s} {'pattern':8s} {'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} {'ms':>8s} "
        f"{'flex ms':>8s} {'dense ms':>8s} {'max err':>8s}"
    )
    rows = []
    for shape in shapes(args.resolution, args.video):
        tokens = shape["text"] + shape["grid"][0] * shape["grid"][1] * shape["grid"][2]
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, args.warmup, args.repeats)
        for pattern in ("cross", "block"):
            layout = group_layout(
                shape["grid"],
                shape["group"],
                num_text=shape["text"],
                text_first=shape["text_first"],
                pattern=pattern,
                window=(1, 1, 1),
            ).to(device)
            qkv = [x.index_select(-2, layout.gather_index) for x in (q, k, v)]
            call = dict(
                kv_indices=layout.kv_indices,
                kv_counts=layout.kv_counts,
                key_valid=layout.key_valid[None],
                tile=layout.tile,
                static_valid=layout.key_valid,
            )
            flex = lambda: block_sparse_attention(*qkv, **call, backend="flex")  # noqa: E731
            expected = flex().float()
            flex_ms = median_ms(flex, device, args.warmup, args.repeats)
            grid = itertools.product(args.block_m, args.block_n, args.warps, args.stages)
            for block_m, block_n, warps, stages in grid:
                if block_m > layout.tile or block_n > layout.tile:
                    continue
                with mock.patch.object(tbs, "_launch_config", lambda *a, c=(block_m, block_n, warps, stages): c):
                    triton = lambda: block_sparse_attention(*qkv, **call, backend="triton")  # noqa: E731
                    try:
                        error = (triton().float() - expected).abs().max().item()
                        ms = median_ms(triton, device, args.warmup, args.repeats)
                    except Exception as exc:  # out of shared memory / registers for this config
                        print(
                            f"{shape['name']:20s} {pattern:8s} {block_m:4d} {block_n:4d} {warps:5d} {stages:6d} "
                            f"failed: {type(exc).__name__}"
                        )
                        continue
                row = dict(
                    shape=shape["name"],
                    pattern=pattern,
                    block_m=block_m,
                    block_n=block_n,
                    warps=warps,
                    stages=stages,
                    ms=round(ms, 3),
                    flex_ms=round(flex_ms, 3),
                    dense_ms=round(dense_ms, 3),
                    max_err=round(error, 4),
                    density=round(layout.density, 4),
                )
                rows.append(row)
                print(
                    f"{shape['name']:20s} {pattern:8s} {block_m:4d} {block_n:4d} {warps:5d} {stages:6d} "
                    f"{ms:8.2f} {flex_ms:8.2f} {dense_ms:8.2f} {error:8.4f}"
                )
    best = {}
    for row in rows:
        key = (row["shape"], row["pattern"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    print("# fastest per shape")
    for row in best.values():
        print(
            f"{row['shape']:20s} {row['pattern']:8s} BM {row['block_m']} BN {row['block_n']} warps {row['warps']} "
            f"stages {row['stages']}: {row['ms']:.2f} ms (flex {row['flex_ms']:.2f}, dense {row['dense_ms']:.2f})"
        )
    if args.json:
        print_json(rows)


if __name__ == "__main__":
    main()
