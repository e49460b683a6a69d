"""GRAT demo: one prompt, generated with dense attention and with GRAT, side by side and timed.

The default model is ``micro-flux``, the FLUX micro-world trained on hasten's generated scenes
(shipped with the package), so both images show real content, and the report adds the prompt
accuracy of each, judged by the shipped attribute classifier. It opens at the canvas micro-flux draws on
(``hasten.tiny.micro_diffusion.DRAW_SIZE``, 192 x 192: 2304 latent tokens), where GRAT-X (the bands
backend on a CPU) is faster than dense end to end; below 128 x 128 attention is too small a share of
the time, and the report says so.

Run it with ``hasten app grat [--model micro-flux] [--port 7860]``, or
``python -m hasten.apps.grat_app``. The pipeline is loaded once, when the
app is built; every Run calls :func:`hasten.measure.compare_grat` (one warm-up call of
each variant, then one timed call each, same seed) and shows both images and their difference
(x4) with the dense time, the GRAT time, the speedup next to its attention bound (1/density,
padding counted) and the PSNR between them.

Examples
--------
>>> demo = build_demo("tiny-flux")
>>> dense, grat, difference, timing = demo("a red fox", 36, 52, "block", 4, 1, 2, 0, api_name="run")
>>> "speedup" in timing and "PSNR" in timing and "36 x 52" in timing
True
"""

from __future__ import annotations

import argparse
import sys

import gradio as gr
import numpy as np
import torch
from diffusers import DiffusionPipeline

from hasten import GratConfig, tiny
from hasten.apps.launcher import (
    add_common_args,
    connect_run,
    launch,
    prompt_accuracy,
    random_weights_notice,
    size_text,
    to_image,
    whole_number,
)
from hasten.cli.generate import (
    CPU_GAIN_SIDE,
    DIFFERENCE_GAIN,
    MICRO_DEFAULTS,
    MICRO_FLUX,
    MICRO_GROUP,
    MICRO_PROMPT,
)
from hasten.cli.generate import difference as difference_image  # (the app's own `difference` is a local)
from hasten.loading import load_pipeline
from hasten.measure import compare_grat

__all__ = ["GratRun", "build_demo", "main", "to_image"]

FULL_SIZE = 1024  # default height and width for real (non-tiny) models
DISPLAY_MIN_SIDE = 256  # smaller outputs (tiny models) are shown enlarged, nearest-neighbour
TINY_GROUP, FULL_GROUP = 4, 16  # tiny flux/sd3 grids are 9 x 13 tokens; 16 x 16 is the Flux/SD3 default
TINY_STEPS, FULL_STEPS = 4, 28  # as `hasten generate`
MICRO_EXAMPLE_STEPS = 8  # the example: micro-flux's size and group, fewer steps (about 20 s on a quiet CPU)


class GratRun:
    """The app's Run button: dense vs GRAT on the loaded pipeline, returned as two images and a report.

    Parameters
    ----------
    pipe : DiffusionPipeline
        A diffusion-transformer image pipeline (Flux, SD3, ...), loaded once.
    model : str
        Its name, shown in the report.
    """

    def __init__(self, pipe: DiffusionPipeline, model: str, call_kwargs: dict | None = None):
        self.pipe = pipe
        self.model = model
        self.call_kwargs = dict(call_kwargs or {})

    def __call__(
        self,
        prompt: str,
        height: float | None,
        width: float | None,
        pattern: str,
        group_size: float | None,
        window: float | None,
        steps: float | None,
        seed: float | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Run the comparison -> dense, GRAT, difference x4, report; bad settings raise ``gr.Error``."""
        # GratConfig checks the group and window sizes and the pattern itself, and names them.
        group, window_size = whole_number("group_size", group_size, None), whole_number("window", window, None)
        size = {"height": whole_number("height", height, 16), "width": whole_number("width", width, 16)}
        num_steps, seed_value = whole_number("steps", steps), whole_number("seed", seed, 0)
        try:
            config = GratConfig(pattern=pattern, group_size=group, window=window_size)
            result = compare_grat(
                self.pipe,
                config,
                seed=seed_value,
                prompt=prompt or "",
                num_inference_steps=num_steps,
                **size,
                **self.call_kwargs,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        dense, grat = to_image(result.dense, DISPLAY_MIN_SIDE), to_image(result.grat, DISPLAY_MIN_SIDE)
        difference = to_image(difference_image(result.dense, result.grat), DISPLAY_MIN_SIDE)
        details = (
            f"{self.model} on {self.pipe.device}, {size_text(size['height'], size['width'])}, {num_steps} "
            f"steps, seed {seed_value}, group {size_text(*result.config.group_size[1:])} tokens"
            + (f", window {size_text(*result.config.window[1:])} groups" if pattern == "block" else "")
            + ". Times are one call each, after one warm-up call of each."
            + (
                f" Shown enlarged {dense.shape[0] // size['height']}x (nearest-neighbour)."
                if dense.shape[0] > size["height"]
                else ""
            )
        )
        large = size["height"] * size["width"] >= CPU_GAIN_SIDE**2
        if result.speedup < 1 and (self.model != MICRO_FLUX or not large):
            details += (
                " **GRAT is slower here:** at this size attention is too small a share of the time for "
                f"sparsity to pay for the grouping; on a CPU micro-flux's GRAT-X gains from {CPU_GAIN_SIDE} x {CPU_GAIN_SIDE} on "
                "(benchmarks/results/grat_fidelity-cpu.txt)."
            )
        elif result.speedup < 1:
            details += (
                " **GRAT was slower in this run**, although it gains at this size in the benchmark "
                "(benchmarks/results/grat_fidelity-cpu.txt): one timed call each is noisy when other jobs "
                "share the CPU; run it again."
            )
        accuracy = ""
        if self.model == MICRO_FLUX:
            dense_accuracy, grat_accuracy = (
                prompt_accuracy(image, prompt or "") for image in (result.dense, result.grat)
            )
            accuracy = (
                " | prompt accuracy: not judged (the prompt is outside the micro-world's caption language)"
                if dense_accuracy is None
                else f" | prompt accuracy (classifier): dense {dense_accuracy:.0%}, GRAT {grat_accuracy:.0%}"
            )
        return dense, grat, difference, f"**{result.summary()}**{accuracy}\n\n{details}"


def build_demo(model: str = MICRO_FLUX, device: str | None = None, dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The GRAT comparison app for ``model`` (loaded here, once); launch it with :func:`hasten.apps.launcher.launch`.

    Parameters
    ----------
    model : str
        ``"micro-flux"`` (the trained micro-world, default), ``"tiny-flux"``/``"tiny-sd3"`` (offline
        random-weight tiny models) or a diffusers model id / folder of a diffusion-transformer image
        pipeline.
    device, dtype : optional
        As :func:`hasten.loading.load_pipeline`.

    Examples
    --------
    >>> demo = build_demo("tiny-flux")
    >>> [fn.api_name for fn in demo.fns.values()]
    ['run', 'load_example', 'run_example']
    >>> build_demo("tiny-wan")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the GRAT app shows images: `model` must be an image model such as tiny-flux or tiny-sd3, got 'tiny-wan' ...
    """
    is_tiny = tiny.is_tiny(model)
    call_kwargs: dict = {}
    if model == MICRO_FLUX:
        from hasten.tiny.micro_diffusion import CALL_DEFAULTS

        size = {"height": MICRO_DEFAULTS["height"], "width": MICRO_DEFAULTS["width"]}
        # the trained text length and guidance (true CFG against the empty prompt)
        call_kwargs.update(
            {key: CALL_DEFAULTS[key] for key in ("max_sequence_length", "true_cfg_scale", "negative_prompt")}
        )
    elif is_tiny:
        size = tiny.default_size(tiny.MODEL_IDS[model])
        if "num_frames" in size:
            raise ValueError(
                "the GRAT app shows images: `model` must be an image model such as tiny-flux or tiny-sd3, "
                f"got {model!r} (for video models use `hasten generate --compare`)"
            )
    else:
        size = {"height": FULL_SIZE, "width": FULL_SIZE}
    pipe = load_pipeline(model, dtype=dtype, device=device)
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(
            f"GRAT needs a diffusion transformer: `model` {model!r} loads {type(pipe).__name__}, which has none "
            "(use a Flux or SD3 model, e.g. tiny-flux)"
        )
    pipe.set_progress_bar_config(disable=True)  # the app reports its own timings
    run = GratRun(pipe, model, call_kwargs)
    micro = model == MICRO_FLUX
    group_default = MICRO_GROUP if micro else (TINY_GROUP if is_tiny else FULL_GROUP)
    steps_default = MICRO_DEFAULTS["num_inference_steps"] if micro else (TINY_STEPS if is_tiny else FULL_STEPS)
    prompt_default = MICRO_PROMPT if micro else "a lighthouse on a cliff at sunset, highly detailed"
    example = [
        prompt_default,
        size["height"],
        size["width"],
        "cross",
        group_default,
        1,
        MICRO_EXAMPLE_STEPS if micro else steps_default,
        0,
    ]

    with gr.Blocks(title="hasten · GRAT") as demo:
        gr.Markdown(
            f"# GRAT: grouped sparse attention\n"
            f"`{model}` ({type(pipe).__name__}) on `{pipe.device}`. The same prompt and seed run with dense "
            "attention and with GRAT; GRAT-X (cross) lets each token group attend to the groups in its row "
            "and column band, GRAT-B (block) to the groups within a window. It pays off when attention "
            f"dominates the time: for micro-flux's GRAT-X on a CPU from {CPU_GAIN_SIDE} x {CPU_GAIN_SIDE} "
            f"({(CPU_GAIN_SIDE // 4) ** 2} tokens) on; micro-flux draws its scenes at "
            f"{MICRO_DEFAULTS['height']} x {MICRO_DEFAULTS['width']}."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=prompt_default, lines=2, elem_id="prompt")
                with gr.Row():
                    height = gr.Number(label="Height", value=size["height"], precision=0, elem_id="height")
                    width = gr.Number(label="Width", value=size["width"], precision=0, elem_id="width")
                pattern = gr.Radio(
                    ["cross", "block"],
                    value="cross",
                    label="Pattern",
                    info="cross = GRAT-X, block = GRAT-B",
                    elem_id="pattern",
                )
                with gr.Row():
                    group_size = gr.Number(
                        label="Group size (latent tokens per side)",
                        value=group_default,
                        precision=0,
                        elem_id="group-size",
                    )
                    window = gr.Number(
                        label="Window (groups per side, block only)", value=1, precision=0, elem_id="window"
                    )
                with gr.Row():
                    steps = gr.Number(label="Steps", value=steps_default, precision=0, elem_id="steps")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_image = gr.Image(
                        label="Dense attention",
                        type="numpy",
                        format="png",
                        height=280,
                        interactive=False,
                        elem_id="dense-image",
                    )
                    grat_image = gr.Image(
                        label="GRAT", type="numpy", format="png", height=280, interactive=False, elem_id="grat-image"
                    )
                    difference_image = gr.Image(
                        label=f"Difference (x{DIFFERENCE_GAIN})",
                        type="numpy",
                        format="png",
                        height=280,
                        interactive=False,
                        elem_id="difference-image",
                    )
                timing = gr.Markdown("Press **Run** to compare, or the example below.", elem_id="timing")
        inputs = [prompt, height, width, pattern, group_size, window, steps, seed]
        outputs = [dense_image, grat_image, difference_image, timing]
        # One run at a time: compare_grat installs and removes GRAT on the one shared pipeline.
        connect_run(
            button,
            run,
            inputs,
            outputs,
            [example],
            f"Example: GRAT-X at {size_text(size['height'], size['width'])}, {example[6]} steps (one click)",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app grat``: parse the common app flags, build the demo and serve it until stopped.

    Examples
    --------
    >>> main(["--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
    """
    parser = argparse.ArgumentParser(
        prog="hasten app grat",
        description="Gradio app: one prompt with dense attention and with GRAT, side by side and timed.",
    )
    add_common_args(parser, default_model=MICRO_FLUX)
    args = parser.parse_args(argv)
    demo = build_demo(args.model, device=args.device, dtype=args.dtype)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
