"""Speculative Jacobi Decoding demo: one prompt by SJD and by plain AR decoding, side by side.

Run it with ``hasten app sjd [--model trained-janus] [--port 7860]`` or ``python -m hasten.apps.sjd_app``.
The model is loaded once, when the app is built. Every Run generates the prompt with SJD and
(when "compare" is on) with plain autoregressive decoding through the same loop and seed, then
shows both images with forward passes, tokens per pass and wall time. It opens on the micro
Janus trained on hasten's captioned scenes (``trained-janus``) and a one-click example.

Examples
--------
>>> demo = build_demo("tiny-janus")
>>> sjd, ar, report = demo("a red fox", 16, "random", 5.0, 0, True, api_name="run")
>>> "64 x 64" in report
True
>>> "forward passes" in report and ar is not None
True
"""

from __future__ import annotations

import argparse
import sys
import time

import gradio as gr
import numpy as np
import torch

from hasten.apps.launcher import (
    add_common_args,
    connect_run,
    launch,
    random_weights_notice,
    size_text,
    to_image,
    whole_number,
)
from hasten.cli.t2i_ar import DEFAULT_PROMPT, TRAINED, _load
from hasten.pipelines.sjd import INIT_STRATEGIES, SJDConfig, SJDPipeline

__all__ = ["SJDRun", "build_demo", "main"]

DISPLAY_MIN_SIDE = 256  # tiny 64 x 64 outputs are shown enlarged, nearest-neighbour
WINDOW = 16  # draft tokens per pass (as `hasten t2i-ar`)


class SJDRun:
    """The app's Run button: SJD (and optionally AR) on the loaded model -> images and a report."""

    def __init__(self, pipe: SJDPipeline, model: str):
        self.pipe = pipe
        self.model = model

    def __call__(
        self,
        prompt: str,
        window: float | None,
        init: str,
        guidance_scale: float | None,
        seed: float | None,
        compare: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Generate; bad settings raise ``gr.Error`` with hasten's message."""
        window_size, seed_value = whole_number("window", window), whole_number("seed", seed, 0)
        try:
            config = SJDConfig(window=window_size, init=init)
            runs = [("SJD", config)] + ([("AR", None)] if compare else [])
            images, lines = {}, []
            for name, sjd in runs:
                start = time.perf_counter()
                out = self.pipe(prompt or "", sjd=sjd, guidance_scale=guidance_scale, seed=seed_value)
                seconds = time.perf_counter() - start
                images[name] = to_image(out.images, DISPLAY_MIN_SIDE)
                lines.append((name, out.stats.forwards, out.stats.tokens_per_forward, seconds))
                size = size_text(*out.images.shape[-2:])
        except ValueError as error:
            raise gr.Error(str(error)) from error
        report = "\n".join(
            f"- **{name}**: {forwards} forward passes, {per_pass:.2f} tokens per decoding pass, {seconds:.2f} s"
            for name, forwards, per_pass, seconds in lines
        )
        if compare:
            (_, sjd_f, _, sjd_s), (_, ar_f, _, ar_s) = lines
            report += f"\n\n**SJD: {ar_f / sjd_f:.2f}x fewer forward passes, {ar_s / sjd_s:.2f}x faster.**"
        report += (
            f"\n\n{self.model} on {self.pipe.model.device}, {size} pixels, seed {seed_value}. "
            "SJD is lossless: its images "
            "follow the model's own sampling distribution (not the same image as AR for a seed)."
        )
        return images["SJD"], images.get("AR"), report


def build_demo(model: str = TRAINED, device: str | None = None, dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The SJD app for ``model`` (``trained-janus``: the micro Janus trained on scenes; ``tiny-janus``,
    ``tiny-emu3``: random weights; or a Janus / Emu3 id), loaded once.

    ``dtype`` is accepted for the shared launcher flags; the model loads in bfloat16 on CUDA and
    float32 on the CPU.

    Examples
    --------
    >>> [fn.api_name for fn in build_demo("tiny-emu3").fns.values()]
    ['run', 'load_example', 'run_example']
    """
    pipe = SJDPipeline(*_load(model, device))
    pipe.progress_bar = False  # the app reports its own numbers
    run = SJDRun(pipe, model)
    default_scale = pipe.adapter.default_guidance_scale

    with gr.Blocks(title="hasten · Speculative Jacobi Decoding") as demo:
        gr.Markdown(
            f"# Speculative Jacobi Decoding\n`{model}` ({type(pipe.model).__name__}) on `{pipe.model.device}`. "
            "SJD verifies a window of draft image tokens per forward pass and keeps the model's sampling "
            "distribution; plain autoregressive decoding needs one pass per token."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="prompt")
                with gr.Row():
                    window = gr.Number(
                        label="Window (draft tokens per pass)", value=WINDOW, precision=0, elem_id="window"
                    )
                    init = gr.Dropdown(
                        list(INIT_STRATEGIES), value="random", label="Draft initialisation", elem_id="init"
                    )
                with gr.Row():
                    scale = gr.Number(label="Guidance scale", value=default_scale, elem_id="guidance")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                compare = gr.Checkbox(label="Also run plain AR decoding (side by side)", value=True, elem_id="compare")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    sjd_image = gr.Image(
                        label="SJD", type="numpy", format="png", height=320, interactive=False, elem_id="sjd-image"
                    )
                    ar_image = gr.Image(
                        label="Autoregressive",
                        type="numpy",
                        format="png",
                        height=320,
                        interactive=False,
                        elem_id="ar-image",
                    )
                report = gr.Markdown("Press **Run** to generate, or the example below.", elem_id="report")
        connect_run(
            button,
            run,
            [prompt, window, init, scale, seed, compare],
            [sjd_image, ar_image, report],
            [[DEFAULT_PROMPT, WINDOW, "random", default_scale, 0, True]],
            "Example: SJD and plain AR decoding side by side, passes counted (one click)",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app sjd``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(
        prog="hasten app sjd", description="Gradio app: Speculative Jacobi Decoding vs autoregressive decoding."
    )
    add_common_args(parser, default_model=TRAINED)
    args = parser.parse_args(argv)
    demo = build_demo(args.model, device=args.device, dtype=args.dtype)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
