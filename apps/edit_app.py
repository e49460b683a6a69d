"""ConsistEdit demo: paint the region to change (or name it), give two prompts, edit.

Run it with ``hasten app edit [--model tiny-flux] [--port 7860]`` or ``python apps/edit_app.py``.
The model is loaded once, when the app is built. With an uploaded image the edit is real-mode
(the image is inverted first); without one both prompts are generated from one noise. The
region to change is the painted brush strokes, or, with no strokes, the attention of the
"edit words" of the source prompt. ``alpha`` is the structural-consistency knob (1.0 colour /
material, 0.3 style / shape, 0.1 real images).

Examples
--------
>>> demo = build_demo("tiny-flux")
>>> source, edited, region, report = demo(None, "a red car", "a blue car", "red", 1.0, 4, api_name="run")
>>> "edit region" in report and edited is not None
True
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by file path (`hasten app edit`)
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from apps.launcher import add_common_args, launch, to_image  # noqa: E402
from hasten.pipelines.consistedit import ConsistEditPipeline  # noqa: E402
from hasten.pipelines.loading import load_pipeline, working_size  # noqa: E402

__all__ = ["EditRun", "build_demo", "main"]

DISPLAY_MIN_SIDE = 256


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

    def __call__(self, canvas, source_prompt: str, target_prompt: str, edit_words: str, alpha: float,
                 steps: float | None):
        image, painted = _image_and_mask(canvas)
        model = self.editor.model
        mask = None
        if painted is not None:
            mask = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize((model.width, model.height),
                                                                                       Image.NEAREST))
        words = [w for w in (edit_words or "").split(",") if w.strip()] or None
        if mask is None and words is None:
            raise gr.Error("Paint the region to change on the image, or give edit words from the source prompt.")
        if steps is None or steps < 1:
            raise gr.Error(f"`steps` must be a positive integer, got {steps!r}")
        start = time.perf_counter()
        try:
            out = self.editor.edit(source_prompt or "", target_prompt or "", edit_words=[w.strip() for w in words]
                                   if mask is None else None, mask=mask, alpha=float(alpha), image=image,
                                   num_inference_steps=int(steps), progress=False)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        seconds = time.perf_counter() - start
        region = out.edit_region.float()
        overlay = out.source.clone()
        grid = torch.nn.functional.interpolate(region[None, None], size=overlay.shape[-2:], mode="nearest")[0]
        overlay = overlay * (1 - 0.5 * grid) + torch.tensor([1.0, 0.2, 0.2])[:, None, None] * 0.5 * grid
        mode = "real (inverted)" if image is not None else "synthetic"
        report = (f"**{mode}** edit, {int(steps)} steps, alpha {float(alpha):.2f}: edit region "
                  f"{float(region.mean()):.0%} of the tokens ({'painted' if mask is not None else 'from the edit words'}),"
                  f" {seconds:.2f} s on {model.device} ({self.model})."
                  + (f" Source features recorded: {out.cache_bytes / 2**20:.2f} MiB." if out.cache_bytes else ""))
        return (to_image(out.source, DISPLAY_MIN_SIDE), to_image(out.target, DISPLAY_MIN_SIDE),
                to_image(overlay, DISPLAY_MIN_SIDE), report)


def build_demo(model: str = "tiny-flux", device: str | None = None,
               dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The editing app for ``model`` (``tiny-flux``, ``tiny-sd3`` or an SD3 / Flux id), loaded once."""
    editor = ConsistEditPipeline.from_pipe(load_pipeline(model, dtype, device), **working_size(model))
    if editor.video is not None:
        raise ValueError("the editing app edits images: use an SD3 or Flux model (videos: `hasten edit --video`)")
    run = EditRun(editor, model)
    with gr.Blocks(title="hasten · ConsistEdit") as demo:
        gr.Markdown(f"# ConsistEdit\n`{model}` at {editor.model.width} x {editor.model.height}. Upload an image "
                    "(or leave it empty to generate), paint what should change or name it, and edit.")
        with gr.Row():
            with gr.Column():
                canvas = gr.ImageEditor(label="Image and edit region (brush)", type="numpy", elem_id="canvas",
                                        brush=gr.Brush(colors=["#ff0000"], default_size=12))
                source = gr.Textbox(label="Source prompt", value="a photo of a red car", elem_id="source-prompt")
                target = gr.Textbox(label="Target prompt", value="a photo of a blue car", elem_id="target-prompt")
                words = gr.Textbox(label="Edit words (comma-separated, used when nothing is painted)", value="red",
                                   elem_id="edit-words")
                with gr.Row():
                    alpha = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="alpha (structure)", elem_id="alpha")
                    steps = gr.Number(label="Steps", value=8 if model.startswith("tiny") else 28, precision=0,
                                      elem_id="steps")
                button = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column():
                with gr.Row():
                    out_source = gr.Image(label="Source", type="numpy", elem_id="out-source", interactive=False)
                    out_edit = gr.Image(label="Edit", type="numpy", elem_id="out-edit", interactive=False)
                out_region = gr.Image(label="Edit region", type="numpy", elem_id="out-region", interactive=False)
                report = gr.Markdown("Press **Edit**.", elem_id="report")
        button.click(run, [canvas, source, target, words, alpha, steps], [out_source, out_edit, out_region, report],
                     api_name="run", concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app edit``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app edit", description="Gradio app: ConsistEdit image editing.")
    add_common_args(parser, default_model="tiny-flux")
    args = parser.parse_args(argv)
    launch(build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port,
           share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
