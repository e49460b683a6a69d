"""Transformer forward end to end: dense vs GRAT-X vs GRAT-B, with the Amdahl bound, one process.

The Amdahl bound 1 / ((1 - a) + a * w) uses ``a``, attention's measured share of the dense
forward, and ``w``, the layout's attention work relative to dense (density, padding counted) (every ``scaled_dot_product_attention`` call timed inside the dense run).

``--arch tiny`` runs the embedded tiny models (head dim 16: far from real attention shapes).
``--arch full`` builds the Flux-dev or HunyuanVideo architecture from the classes' default
config with random weights (bf16 on CUDA; speed does not depend on weights); ``--layers`` and
``--heads`` trim it (head dim stays 128) so that a CPU run fits in minutes.

    python benchmarks/grat_pipeline.py --model flux --arch full --layers 1 --heads 2 --height 2048 --width 2048
    python benchmarks/grat_pipeline.py --model flux --arch full --height 2048 --width 2048 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import hasten
from hasten import tiny
from hasten.hooks.grat import grat_state

from common import machine, median_ms, print_json


class _AttentionTimer(TorchFunctionMode):
    """Accumulates the wall time of every scaled_dot_product_attention call."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.seconds = device, 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self._sync()
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self._sync()
        self.seconds += time.perf_counter() - start
        return out


def build_transformer(
    model: str, arch: str, layers: int | None, heads: int | None, device: torch.device, dtype: torch.dtype
):
    if arch == "tiny":
        return tiny.pipeline(model).transformer.to(device=device, dtype=dtype).eval()
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel

    cls = {"flux": FluxTransformer2DModel, "hunyuan-video": HunyuanVideoTransformer3DModel}[model]
    overrides = {} if layers is None else {"num_layers": layers, "num_single_layers": layers}
    if heads is not None:
        overrides["num_attention_heads"] = heads
    # The classes' default arguments are the released architectures (Flux-dev, HunyuanVideo).
    with torch.device("meta"):
        transformer = cls(**overrides)
    transformer = transformer.to_empty(device=device).to(dtype)
    torch.manual_seed(0)
    for parameter in transformer.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    return transformer.eval()


def forward_inputs(model: str, transformer, height: int, width: int, frames: int, text: int, device, dtype) -> dict:
    cfg = transformer.config
    if model == "flux":
        h, w = height // 16, width // 16
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1], ids[..., 2] = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None]
        inputs = dict(
            hidden_states=torch.randn(1, h * w, cfg.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, device=device, dtype=dtype),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.tensor([0.5], device=device, dtype=dtype),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3, device=device),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)
        return inputs
    latent_frames = (frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(
            1, cfg.in_channels, latent_frames, height // 8, width // 8, device=device, dtype=dtype
        ),
        encoder_hidden_states=torch.randn(1, text, cfg.text_embed_dim, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.bool),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device),
        guidance=torch.tensor([6.0], device=device, dtype=dtype),
    )


def timed(transformer, inputs, device, warmup: int, repeats: int) -> float:
    with torch.no_grad():
        return median_ms(lambda: transformer(**inputs, return_dict=False), device, warmup, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["flux", "hunyuan-video"], default="flux")
    parser.add_argument("--arch", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="full arch: blocks per block list")
    parser.add_argument(
        "--heads",
        type=int,
        default=None,
        help="full arch: attention heads (head dim stays 128; fewer heads fit a CPU run)",
    )
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=61, help="video frames (hunyuan-video)")
    parser.add_argument("--text", type=int, default=None, help="text tokens (default 512 flux, 256 video)")
    parser.add_argument("--group-size", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text = args.text or (512 if args.model == "flux" else 256)

    transformer = build_transformer(args.model, args.arch, args.layers, args.heads, device, dtype)
    inputs = forward_inputs(args.model, transformer, args.height, args.width, args.frames, text, device, dtype)
    dense_ms = timed(transformer, inputs, device, args.warmup, args.repeats)
    timer = _AttentionTimer(device)
    with timer, torch.no_grad():
        transformer(**inputs, return_dict=False)
    share = min(1.0, timer.seconds * 1000 / dense_ms)

    print(
        f"# GRAT transformer forward | {args.model} ({args.arch}) {args.height}x{args.width}"
        f"{f'x{args.frames}f' if args.model != 'flux' else ''} | {machine(device)}"
    )
    print(f"dense forward {dense_ms:.1f} ms, attention share a = {share:.0%}")
    group = None if args.group_size is None else tuple(args.group_size)
    rows = []
    for pattern in ("cross", "block"):
        config = hasten.enable_grat(transformer, pattern=pattern, group_size=group, window=1, backend=args.backend)
        grat_ms = timed(transformer, inputs, device, args.warmup, args.repeats)
        layout = max(grat_state(transformer).layouts.values(), key=lambda layout: layout.seq_len)
        hasten.disable_grat(transformer)
        bound = 1 / ((1 - share) + share * layout.relative_work)
        row = dict(
            model=args.model,
            arch=args.arch,
            pattern=pattern,
            resolution=f"{args.height}x{args.width}",
            tokens=layout.seq_len,
            group=list(config.group_size),
            density=round(layout.density, 4),
            attention_share=round(share, 3),
            dense_ms=round(dense_ms, 1),
            grat_ms=round(grat_ms, 1),
            speedup=round(dense_ms / grat_ms, 2),
            amdahl_bound=round(bound, 2),
        )
        rows.append(row)
        print(
            f"GRAT-{'X' if pattern == 'cross' else 'B'}: {grat_ms:.1f} ms, speedup {row['speedup']:.2f}x "
            f"(Amdahl bound {bound:.2f}x at density {layout.density:.1%})"
        )
    if args.json:
        print_json(rows)


if __name__ == "__main__":
    main()
