"""GRAT demo: one prompt, generated with dense attention and with GRAT, side by side and timed.

The default model is ``micro-flux``, the FLUX micro-world trained on hasten's generated scenes
(shipped with the package), so both images show real content, and the report adds the prompt
accuracy of each, judged by the shipped attribute classifier.

Run it with ``hasten app grat [--model micro-flux] [--port 7860]``, ``python apps/grat_app.py`` or
``python -m apps.grat_app`` (from the repository root). The pipeline is loaded once, when the
app is built; every Run calls :func:`hasten.pipelines.grat.compare_grat` (one warm-up call of
each variant, then one timed call each, same seed) and shows both images with the dense time,
the GRAT time, the speedup next to its attention bound (1/density, padding counted) and the PSNR between them.

Examples
--------
>>> demo = build_demo("tiny-flux")
>>> dense, grat, timing = demo("a red fox", 36, 52, "block", 4, 1, 2, 0, api_name="run")
>>> "speedup" in timing and "PSNR" in timing
True
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by file path (`hasten app grat`)
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from apps.launcher import add_common_args, launch, to_image  # noqa: E402
from hasten import tiny  # noqa: E402
from hasten.cli.generate import (MICRO_DEFAULTS, MICRO_FLUX, MICRO_GROUP, MICRO_PROMPT,  # noqa: E402
                                 load_model)
from hasten.pipelines.grat import GratConfig, compare_grat  # noqa: E402

__all__ = ["GratRun", "build_demo", "main", "to_image"]

FULL_SIZE = 1024  # default height and width for real (non-tiny) models
DISPLAY_MIN_SIDE = 256  # smaller outputs (tiny models) are shown enlarged, nearest-neighbour
TINY_GROUP, FULL_GROUP = 4, 16  # tiny flux/sd3 grids are 9 x 13 tokens; 16 x 16 is the Flux/SD3 default
TINY_STEPS, FULL_STEPS = 4, 28  # as `hasten generate`


def _integer(name: str, value: float | None) -> int:
    if value is None or value != int(value):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    return int(value)


def _positive(name: str, value: float | None) -> int:
    if _integer(name, value) <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


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

    def __call__(self, prompt: str, height: float | None, width: float | None, pattern: str,
                 group_size: float | None, window: float | None, steps: float | None,
                 seed: float | None) -> tuple[np.ndarray, np.ndarray, str]:
        """Run the comparison; bad settings raise ``gr.Error`` with hasten's message."""
        try:
            # GratConfig checks its own fields (positive sizes, a known pattern) and names them.
            config = GratConfig(pattern=pattern, group_size=_integer("group_size", group_size),
                                window=_integer("window", window))
            size = {"height": _positive("height", height), "width": _positive("width", width)}
            num_steps, seed_value = _positive("steps", steps), _integer("seed", seed)
            result = compare_grat(self.pipe, config, seed=seed_value, prompt=prompt or "",
                                  num_inference_steps=num_steps, **size, **self.call_kwargs)
            dense = to_image(result.dense, DISPLAY_MIN_SIDE)
            grat = to_image(result.grat, DISPLAY_MIN_SIDE)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        details = (f"{self.model} on {self.pipe.device}, {size['height']}x{size['width']}, {num_steps} steps, "
                   f"seed {seed_value}, group {result.config.group_size[1:]}"
                   + (f", window {result.config.window[1:]}" if pattern == "block" else "")
                   + ". Times are one call each, after one warm-up call of each."
                   + (f" Shown enlarged {dense.shape[0] // size['height']}x (nearest-neighbour)."
                      if dense.shape[0] > size["height"] else ""))
        accuracy = self._accuracy(prompt or "", size, result) if self.model == MICRO_FLUX else ""
        return dense, grat, f"**{result.summary()}**{accuracy}\n\n{details}"

    @staticmethod
    def _accuracy(prompt: str, size: dict, result) -> str:
        """Prompt accuracy of both images by the shipped classifier, for prompts in the micro-world's language."""
        from hasten.tiny import scenes
        from hasten.tiny.classifier import evaluate

        try:
            scene = scenes.scene_from_caption(prompt, size["height"], size["width"])
        except ValueError:
            return " | prompt accuracy: not judged (the prompt is outside the micro-world's caption language)"
        dense = evaluate(result.dense[:1], [scene])["object"]
        grat = evaluate(result.grat[:1], [scene])["object"]
        return f" | prompt accuracy (classifier): dense {dense:.0%}, GRAT {grat:.0%}"


def build_demo(model: str = MICRO_FLUX, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The GRAT comparison app for ``model`` (loaded here, once); launch it with :func:`apps.launcher.launch`.

    Parameters
    ----------
    model : str
        ``"micro-flux"`` (the trained micro-world, default), ``"tiny-flux"``/``"tiny-sd3"`` (offline
        random-weight tiny models) or a diffusers model id / folder of a diffusion-transformer image
        pipeline.
    device, dtype : optional
        As :func:`hasten.pipelines.loading.load_pipeline`.

    Examples
    --------
    >>> demo = build_demo("tiny-flux")
    >>> [fn.api_name for fn in demo.fns.values()]
    ['run']
    >>> build_demo("tiny-wan")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the GRAT app shows images: `model` must be an image model such as tiny-flux or tiny-sd3, got 'tiny-wan' ...
    """
    is_tiny = tiny.is_tiny(model)
    call_kwargs: dict = {}
    if model == MICRO_FLUX:
        from hasten.tiny.micro_diffusion import MAX_SEQUENCE_LENGTH

        size = {"height": MICRO_DEFAULTS["height"], "width": MICRO_DEFAULTS["width"]}
        call_kwargs["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    elif is_tiny:
        size = tiny.default_size(tiny.MODEL_IDS[model])
        if "num_frames" in size:
            raise ValueError(
                "the GRAT app shows images: `model` must be an image model such as tiny-flux or tiny-sd3, "
                f"got {model!r} (for video models use `hasten generate --compare`)"
            )
    else:
        size = {"height": FULL_SIZE, "width": FULL_SIZE}
    pipe = load_model(model, dtype=dtype, device=device)
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

    with gr.Blocks(title="hasten · GRAT") as demo:
        gr.Markdown(
            f"# GRAT: grouped sparse attention\n"
            f"`{model}` ({type(pipe).__name__}) on `{pipe.device}`. The same prompt and seed run with dense "
            "attention and with GRAT; GRAT-X (cross) lets each token group attend to the groups in its row "
            "and column band, GRAT-B (block) to the groups within a window."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=MICRO_PROMPT if micro else
                                    "a lighthouse on a cliff at sunset, highly detailed",
                                    lines=2, elem_id="prompt")
                with gr.Row():
                    height = gr.Number(label="Height", value=size["height"], precision=0, minimum=1, elem_id="height")
                    width = gr.Number(label="Width", value=size["width"], precision=0, minimum=1, elem_id="width")
                pattern = gr.Radio(["cross", "block"], value="cross", label="Pattern",
                                   info="cross = GRAT-X, block = GRAT-B", elem_id="pattern")
                with gr.Row():
                    group_size = gr.Number(label="Group size (latent tokens per side)",
                                           value=group_default, precision=0,
                                           elem_id="group-size")
                    window = gr.Number(label="Window (groups per side, block only)", value=1, precision=0,
                                       elem_id="window")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=steps_default, precision=0,
                                      elem_id="steps")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_image = gr.Image(label="Dense attention", type="numpy", format="png", height=320,
                                           interactive=False, elem_id="dense-image")
                    grat_image = gr.Image(label="GRAT", type="numpy", format="png", height=320,
                                          interactive=False, elem_id="grat-image")
                timing = gr.Markdown("Press **Run** to compare.", elem_id="timing")
        # One run at a time: compare_grat installs and removes GRAT on the one shared pipeline.
        button.click(run, [prompt, height, width, pattern, group_size, window, steps, seed],
                     [dense_image, grat_image, timing], api_name="run", concurrency_limit=1)
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
