"""ConsistEdit demo: paint the region to change (or name it), give two prompts, edit.

Run it with ``hasten app edit [--model micro-flux] [--port 7860]`` or ``python -m hasten.apps.edit_app``.
The model is loaded once, when the app is built; the default is ``micro-flux``, the FLUX
micro-world trained on hasten's captioned scenes, and it opens on a rendered scene with one
object's grid cell painted, to recolour that object and keep the rest. With an uploaded image the edit is real-mode
(the image is inverted first); without one both prompts are generated from one noise. The
region to change is the painted brush strokes (red), or, with no strokes, the attention of the
"edit words" of the source prompt; it is drawn in cyan over the source. ``alpha`` is the
structural-consistency knob (1.0 colour / material, 0.3 style / shape, 0.1 real images). The
report says how much changed inside the region and how well the rest was kept (PSNR outside
it) and, for micro-world prompts, what the attribute classifier finds in the source and the edit.

Examples
--------
>>> demo = build_demo("tiny-flux")
>>> source, edited, region, report = demo(None, "a red car", "a blue car", "red", 1.0, 4, api_name="run")
>>> "edit region" in report and "36 x 52" in report and edited is not None
True
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

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
from hasten.cli.generate import MICRO_FLUX
from hasten.loading import load_pipeline, working_size
from hasten.measure import psnr
from hasten.pipelines.consistedit import ConsistEditPipeline
from hasten.tiny.micro_diffusion import CALL_DEFAULTS

__all__ = ["EditRun", "build_demo", "main"]

DISPLAY_MIN_SIDE = 256
BRUSH_COLOUR = "#ff0000"
REGION_COLOUR = (0.0, 0.85, 1.0)  # cyan: the edit region over the source, distinct from the red brush
# micro-flux edits at its own call defaults (hasten.tiny.micro_diffusion.CALL_DEFAULTS: size, steps, text length)
MICRO_SIZE = {key: CALL_DEFAULTS[key] for key in ("height", "width")}
MICRO_STEPS = CALL_DEFAULTS["num_inference_steps"]
MICRO_ALPHA = 0.1  # the paper's value for real images
# The micro-world example: a rendered scene, its top-left grid cell painted, one object's colour changed.
MICRO_EXAMPLE = (
    "a red circle at the top left and a blue square at the bottom right",
    "a green circle at the top left and a blue square at the bottom right",
    "red, circle",
)
TINY_EXAMPLE = ("a photo of a red car", "a photo of a blue car", "red")


def micro_example(folder: Path) -> dict[str, object]:
    """The ImageEditor value of the micro-world example: the source caption's scene rendered at
    :data:`MICRO_SIZE`, with the top-left cell of the 3 x 3 layout (where its circle is) painted, as PNG files."""
    from hasten.tiny import scenes

    height, width = MICRO_SIZE["height"], MICRO_SIZE["width"]
    background = scenes.scene_from_caption(MICRO_EXAMPLE[0], height, width).render()
    strokes = np.zeros((height, width, 4), np.uint8)
    strokes[: height * 3 // 8, : width * 3 // 8] = (255, 0, 0, 255)  # the cell and a margin (centres jitter)
    paths = {"background": folder / "scene.png", "layers": [folder / "painted.png"], "composite": folder / "scene.png"}
    Image.fromarray(background).save(paths["background"])
    Image.fromarray(strokes).save(paths["layers"][0])
    return {
        "background": str(paths["background"]),
        "layers": [str(paths["layers"][0])],
        "composite": str(paths["composite"]),
    }


def _image_and_mask(value: dict | np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ImageEditor value -> (background RGB or None, painted mask or None)."""
    if value is None:
        return None, None
    if isinstance(value, np.ndarray):
        return value[..., :3], None
    background = value.get("background")
    if background is None:
        return None, None
    background = np.asarray(background)
    painted = None
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4:
            strokes = layer[..., 3] > 0
            painted = strokes if painted is None else painted | strokes
    if painted is not None and not painted.any():
        painted = None
    rgb = background[..., :3] if background.ndim == 3 else np.repeat(background[..., None], 3, -1)
    return (None if not rgb.any() and painted is None and rgb.max() == 0 else rgb), painted


class EditRun:
    """The Edit button on the loaded editor -> source, edit, edit region overlay, report."""

    def __init__(self, editor: ConsistEditPipeline, model: str):
        self.editor, self.model = editor, model

    def __call__(
        self, canvas, source_prompt: str, target_prompt: str, edit_words: str, alpha: float, steps: float | None
    ):
        image, painted = _image_and_mask(canvas)
        model = self.editor.model
        mask = None
        if painted is not None:
            mask = np.asarray(
                Image.fromarray(painted.astype(np.uint8) * 255).resize((model.width, model.height), Image.NEAREST)
            )
        words = [w.strip() for w in (edit_words or "").split(",") if w.strip()] or None
        if mask is None and words is None:
            raise gr.Error("Paint the region to change on the image, or give edit words from the source prompt.")
        num_steps = whole_number("steps", steps)
        start = time.perf_counter()
        try:
            out = self.editor.edit(
                source_prompt or "",
                target_prompt or "",
                edit_words=words if mask is None else None,
                mask=mask,
                alpha=float(alpha),
                image=image,
                num_inference_steps=num_steps,
                progress=False,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        seconds = time.perf_counter() - start
        region = out.edit_region.float()
        pixels = torch.nn.functional.interpolate(region[None, None], size=out.source.shape[-2:], mode="nearest")[0]
        colour = torch.tensor(REGION_COLOUR)[:, None, None]
        overlay = out.source * (1 - 0.5 * pixels) + colour * 0.5 * pixels
        mode = "real (inverted)" if image is not None else "synthetic"
        report = (
            f"**{mode}** edit at {size_text(model.height, model.width)}, {num_steps} steps, alpha "
            f"{float(alpha):.2f}: edit region {float(region.mean()):.0%} of the tokens "
            f"({'painted' if mask is not None else 'from the edit words'}), {seconds:.2f} s on {model.device} "
            f"({self.model})."
            + (f" Source features recorded: {out.cache_bytes / 2**20:.2f} MiB." if out.cache_bytes else "")
        )
        report += "\n\n" + self._what_changed(out.source, out.target, pixels.bool()[0], source_prompt, target_prompt)
        return (
            to_image(out.source, DISPLAY_MIN_SIDE),
            to_image(out.target, DISPLAY_MIN_SIDE),
            to_image(overlay, DISPLAY_MIN_SIDE),
            report,
        )

    def _what_changed(
        self, source: torch.Tensor, target: torch.Tensor, inside: torch.Tensor, source_prompt: str, target_prompt: str
    ) -> str:
        """Change inside the region, PSNR outside it, and the classifier's view of both (micro-world prompts)."""
        change = (source - target).abs().mean(0)
        parts = [f"mean change inside the region {float(change[inside].mean()) if inside.any() else 0:.3f}"]
        if (~inside).any():
            kept = psnr(source[:, ~inside], target[:, ~inside])
            parts.append(
                f"outside it PSNR {kept:.1f} dB (source vs edit" + (", identical)" if kept == float("inf") else ")")
            )
        source_accuracy = prompt_accuracy(source, source_prompt)
        target_accuracy = prompt_accuracy(target, target_prompt)
        if source_accuracy is not None and target_accuracy is not None:
            parts.append(
                f"prompt accuracy (classifier): source {source_accuracy:.0%} of its objects, "
                f"edit {target_accuracy:.0%} of the target's"
            )
        return "; ".join(parts) + "."


def build_demo(model: str = MICRO_FLUX, device: str | None = None, dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The editing app for ``model`` (``micro-flux``, ``tiny-flux``, ``tiny-sd3`` or an SD3 / Flux id), loaded once.

    Examples
    --------
    >>> [fn.api_name for fn in build_demo("tiny-sd3").fns.values()]
    ['run', 'load_example', 'run_example']
    """
    micro = model == MICRO_FLUX
    if micro:
        size = dict(MICRO_SIZE, max_sequence_length=CALL_DEFAULTS["max_sequence_length"])
    else:
        size = working_size(model)
    editor = ConsistEditPipeline.from_pipe(load_pipeline(model, dtype, device), **size)
    if editor.video is not None:
        raise ValueError("the editing app edits images: use an SD3 or Flux model (videos: `hasten edit --video`)")
    run = EditRun(editor, model)
    source_default, target_default, words_default = MICRO_EXAMPLE if micro else TINY_EXAMPLE
    steps_default = MICRO_STEPS if micro else (8 if model.startswith("tiny") else 28)
    canvas_default = micro_example(Path(tempfile.mkdtemp(prefix="hasten-edit-app-"))) if micro else None
    alpha_default = MICRO_ALPHA if micro else 1.0
    with gr.Blocks(title="hasten · ConsistEdit") as demo:
        gr.Markdown(
            f"# ConsistEdit\n`{model}` at {size_text(editor.model.height, editor.model.width)}. Upload an "
            "image (or leave it empty to generate both prompts from one noise), paint what should change "
            "(red brush) or name it with edit words, and edit: the region (cyan) takes the target prompt, "
            "the rest keeps the source."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.ImageEditor(
                    label="Image and edit region (red brush)",
                    type="numpy",
                    elem_id="canvas",
                    value=canvas_default,
                    brush=gr.Brush(colors=[BRUSH_COLOUR], default_size=12),
                )
                source = gr.Textbox(label="Source prompt", value=source_default, elem_id="source-prompt")
                target = gr.Textbox(label="Target prompt", value=target_default, elem_id="target-prompt")
                words = gr.Textbox(
                    label="Edit words (comma-separated, used when nothing is painted)",
                    value=words_default,
                    elem_id="edit-words",
                )
                with gr.Row():
                    alpha = gr.Slider(
                        0.0, 1.0, value=alpha_default, step=0.05, label="alpha (structure)", elem_id="alpha"
                    )
                    steps = gr.Number(label="Steps", value=steps_default, precision=0, elem_id="steps")
                button = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    out_source = gr.Image(
                        label="Source", type="numpy", format="png", height=300, elem_id="out-source", interactive=False
                    )
                    out_edit = gr.Image(
                        label="Edit", type="numpy", format="png", height=300, elem_id="out-edit", interactive=False
                    )
                    out_region = gr.Image(
                        label="Edit region (cyan) on the source",
                        type="numpy",
                        format="png",
                        height=300,
                        elem_id="out-region",
                        interactive=False,
                    )
                report = gr.Markdown("Press **Edit**, or the example below.", elem_id="report")
        connect_run(
            button,
            run,
            [canvas, source, target, words, alpha, steps],
            [out_source, out_edit, out_region, report],
            [[canvas_default, source_default, target_default, words_default, alpha_default, steps_default]],
            "Example: change one object's colour, keep the rest (one click)",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app edit``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app edit", description="Gradio app: ConsistEdit image editing.")
    add_common_args(parser, default_model=MICRO_FLUX)
    args = parser.parse_args(argv)
    launch(
        build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port, share=args.share
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
