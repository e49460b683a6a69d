"""LatentWarp demo: translate an uploaded video, and see how coherent the result is.

Run it with ``hasten app video [--model tiny-sd15] [--port 7860]`` or ``python apps/video_app.py``.
The model is loaded once, when the app is built. Every Run translates the video with LatentWarp
and, when "compare" is on, also frame by frame (no warping, no cross-frame attention) from the
same noise, then shows the translated video and the warp error of each (the output warped
along the SOURCE video's optical flow onto the next frame, occluded pixels left out: lower is
more coherent). Without an upload it uses a panned photo.

Examples
--------
>>> demo = build_demo("tiny-sd15")
>>> video, report = demo(None, "a watercolor painting", 0.75, 4, 0.8, True, True, api_name="run")
>>> video.endswith(".webm") and "warp error" in report
True
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by file path (`hasten app video`)
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from apps.launcher import add_common_args, launch  # noqa: E402
from hasten.pipelines.latentwarp import LatentWarpPipeline  # noqa: E402
from hasten.pipelines.loading import load_pipeline  # noqa: E402
from hasten.tiny.motion import panned  # noqa: E402
from hasten.video import read_video, write_video  # noqa: E402

__all__ = ["VideoRun", "build_demo", "main"]

MAX_FRAMES = 16  # the demo translates at most this many frames
MAX_SIDE = 512


class VideoRun:
    """The Run button: translate (and optionally compare) -> the output video path and a report."""

    def __init__(self, pipe: LatentWarpPipeline, model: str):
        self.pipe, self.model = pipe, model
        self.folder = Path(tempfile.mkdtemp(prefix="hasten-video-app-"))

    def _source(self, video: str | None):
        if not video:
            frames, _ = panned(frames=8, size=(64, 96), step=(3, 0))
            return frames, 8.0, "a panned photo (no upload)"
        try:
            clip = read_video(video, max_frames=MAX_FRAMES)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from error
        frames = clip.frames
        scale = min(1.0, MAX_SIDE / max(frames.shape[1:3]))
        height, width = int(frames.shape[1] * scale) // 8 * 8, int(frames.shape[2] * scale) // 8 * 8
        if min(height, width) < 8:
            raise gr.Error(f"the video is too small ({frames.shape[2]} x {frames.shape[1]}); 8 x 8 pixels at least")
        if (height, width) != frames.shape[1:3]:
            frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
        return frames, clip.fps, Path(video).name

    def __call__(self, video: str | None, prompt: str, strength: float, steps: float | None, warp_end: float,
                 cross_frame: bool, compare: bool) -> tuple[str, str]:
        frames, fps, name = self._source(video)
        if steps is None or steps != int(steps):
            raise gr.Error(f"`steps` must be an integer, got {steps!r}")
        settings = dict(prompt=prompt or "", strength=float(strength), num_inference_steps=int(steps),
                        progress=False)
        runs = [("LatentWarp", dict(warp=True, warp_end=float(warp_end), cross_frame=bool(cross_frame)))]
        if compare:
            runs.append(("per-frame", dict(warp=False, cross_frame=False)))
        lines, output = [], None
        try:
            for label, options in runs:
                start = time.perf_counter()
                out = self.pipe(video=frames, **settings, **options)
                seconds = time.perf_counter() - start
                if output is None:
                    output = write_video(out.frames, self.folder / f"translated-{time.time_ns()}.webm", fps=fps)
                lines.append((label, out.warp_error, seconds, out.seconds))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        report = [f"**{name}**: {len(frames)} frames at {frames.shape[2]} x {frames.shape[1]}, "
                  f"{self.model} on {self.pipe.device}", "", "| run | warp error | seconds | flow + warp |",
                  "| --- | --- | --- | --- |"]
        for label, error, seconds, parts in lines:
            report.append(f"| {label} | {error:.4f} | {seconds:.2f} | {parts['flow'] + parts['warp']:.2f} |")
        if compare:
            ratio = lines[1][1] / max(lines[0][1], 1e-9)
            report += ["", f"LatentWarp's warp error is **{ratio:.2f}x lower** than per-frame translation."]
        return str(output), "\n".join(report)


def build_demo(model: str = "tiny-sd15", device: str | None = None,
               dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The LatentWarp app for ``model`` (``tiny-sd15`` or a Stable Diffusion 1.x/2.x id), loaded once."""
    pipe = LatentWarpPipeline.from_pipe(load_pipeline(model, dtype, device))
    run = VideoRun(pipe, model)
    with gr.Blocks(title="hasten · LatentWarp video translation") as demo:
        gr.Markdown(f"# LatentWarp video-to-video translation\n`{model}` on `{pipe.device}`. Each frame is "
                    "translated from the same noise; the previous frame's latent is warped along the source "
                    "video's optical flow during the first steps, and self-attention reads the first and "
                    f"previous frames. Up to {MAX_FRAMES} frames, longest side {MAX_SIDE}.")
        with gr.Row():
            with gr.Column():
                source = gr.Video(label="Source video (empty: a panned photo)", elem_id="source")
                prompt = gr.Textbox(label="Prompt", value="a watercolor painting", elem_id="prompt")
                with gr.Row():
                    strength = gr.Slider(0.1, 1.0, value=0.75, step=0.05, label="Strength", elem_id="strength")
                    steps = gr.Number(label="Steps", value=20 if not model.startswith("tiny") else 8, precision=0,
                                      elem_id="steps")
                    warp_end = gr.Slider(0.0, 1.0, value=0.8, step=0.05,
                                         label="Warp during the first (of the full schedule; paper: 0.8)",
                                         elem_id="warp-end")
                with gr.Row():
                    cross = gr.Checkbox(label="Cross-frame attention", value=True, elem_id="cross-frame")
                    compare = gr.Checkbox(label="Compare with per-frame translation", value=True, elem_id="compare")
                button = gr.Button("Translate", variant="primary", elem_id="run")
            with gr.Column():
                result = gr.Video(label="Translated", elem_id="result", interactive=False)
                report = gr.Markdown("Press **Translate**.", elem_id="report")
        button.click(run, [source, prompt, strength, steps, warp_end, cross, compare], [result, report],
                     api_name="run", concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app video``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app video", description="Gradio app: LatentWarp video translation.")
    add_common_args(parser, default_model="tiny-sd15")
    args = parser.parse_args(argv)
    launch(build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port,
           share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
