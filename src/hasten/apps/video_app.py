"""LatentWarp demo: translate a video, and see it beside its input and a per-frame translation.

Run it with ``hasten app video [--model micro-sd15] [--port 7860]`` or ``python -m hasten.apps.video_app``.
The model is loaded once, when the app is built. Every Run translates the video with LatentWarp
and, when "compare" is on, also frame by frame (no warping, no cross-frame attention) from the
same noise, then shows the input (the frames that were translated), both translations side by
side and the warp error of each (the output warped along the SOURCE video's optical flow onto
the next frame, occluded pixels left out: lower is more coherent).

The default model is ``micro-sd15``, the Stable Diffusion 1.5 micro-world trained on hasten's scenes
(:mod:`hasten.tiny.micro_sd15`): without an upload it translates a camera panning over one of its
held-out scenes with a prompt that recolours the object, and the report says in how many frames the
object reads as the asked colour. With another model, the input without an upload is a panned photo.

Any video OpenCV decodes can be uploaded (mp4v, MJPG, H.264, VP9, ...): the app shows it
re-encoded to VP9 WebM by OpenCV's own bundled encoder (no system ffmpeg needed), so it plays
in the browser whatever its codec.

Examples
--------
>>> demo = build_demo("tiny-sd15")  # random weights: fast, the pictures are noise
>>> shown, warped, per_frame, report = demo(None, "a watercolor painting", 0.75, 4, 0.8, True, True, api_name="run")
>>> all(path.endswith(".webm") for path in (shown, warped, per_frame)) and "warp error" in report
True
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import torch

from hasten.apps.launcher import add_common_args, connect_run, launch, random_weights_notice, size_text, whole_number
from hasten.loading import load_pipeline
from hasten.pipelines.latentwarp import LatentWarpPipeline
from hasten.tiny import scenes
from hasten.tiny.micro_sd15 import DRAW_SIZE, RecolourClip, recolour_clip, recolour_scores
from hasten.tiny.motion import panned
from hasten.video import read_video, write_video

__all__ = ["MICRO_SD15", "VideoRun", "build_demo", "main"]

MICRO_SD15 = "micro-sd15"
"""The default ``--model``: the trained SD 1.5 micro-world (:data:`hasten.loading.MICRO_WORLDS`)."""
MICRO_EXAMPLE_SEED = scenes.HELD_OUT_SEEDS[5]  # a held-out scene: a cyan square in view as the camera pans

MAX_FRAMES = 16  # the demo translates at most this many frames
MAX_SIDE = 512
DEFAULT_FPS = 8.0
EXAMPLE_STEPS = 8  # the example's steps: a few seconds on a CPU with the tiny model


def default_frames() -> np.ndarray:
    """The input without an upload: a camera panning over a photo, 8 frames of 64 x 96."""
    frames, _ = panned(frames=8, size=(64, 96), step=(3, 0))
    return frames


def micro_example() -> RecolourClip:
    """The micro-world's input without an upload: a camera panning over a held-out one-object scene, 8 frames
    at the size micro-sd15 draws, and the prompt that recolours the object."""
    return recolour_clip(MICRO_EXAMPLE_SEED, *DRAW_SIZE, frames=8)


class VideoRun:
    """The Translate button: the input as shown, LatentWarp's and per-frame translations, and a report."""

    def __init__(self, pipe: LatentWarpPipeline, model: str):
        self.pipe, self.model = pipe, model
        self.folder = Path(tempfile.mkdtemp(prefix="hasten-video-app-"))
        self.example = micro_example() if model == MICRO_SD15 else None

    def _write(self, frames: np.ndarray | torch.Tensor, name: str, fps: float) -> str:
        """VP9 WebM (plays in every browser), written by OpenCV's bundled encoder."""
        return str(write_video(frames, self.folder / f"{name}-{time.time_ns()}.webm", fps=fps))

    def source(self, video: str | None) -> tuple[np.ndarray, float, str]:
        """The frames the app translates (at most MAX_FRAMES, longest side at most MAX_SIDE, sides
        multiples of 8), their fps and a name; an unreadable upload is a ``gr.Error``."""
        if not video:
            if self.example is not None:
                scene = self.example.video.scene.objects[0].noun_phrase
                return self.example.video.frames, DEFAULT_FPS, f"a camera panning over {scene} (no upload)"
            return default_frames(), DEFAULT_FPS, "a panned photo (no upload)"
        try:
            clip = read_video(video, max_frames=MAX_FRAMES)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from error
        frames = clip.frames
        scale = min(1.0, MAX_SIDE / max(frames.shape[1:3]))
        height, width = int(frames.shape[1] * scale) // 8 * 8, int(frames.shape[2] * scale) // 8 * 8
        if min(height, width) < 8:
            raise gr.Error(f"the video is too small ({size_text(*frames.shape[1:3])}); 8 x 8 pixels at least")
        if (height, width) != frames.shape[1:3]:
            frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
        return frames, clip.fps, Path(video).name

    def preview(self, video: str | None) -> str:
        """The input as the app will translate it, re-encoded so the browser plays it (any upload codec)."""
        frames, fps, _ = self.source(video)
        return self._write(frames, "input", fps)

    def __call__(
        self,
        video: str | None,
        prompt: str,
        strength: float,
        steps: float | None,
        warp_end: float,
        cross_frame: bool,
        compare: bool,
    ) -> tuple[str, str, str | None, str]:
        frames, fps, name = self.source(video)
        settings = dict(
            prompt=prompt or "",
            strength=float(strength),
            num_inference_steps=whole_number("num_inference_steps", steps),
            progress=False,
        )
        runs = [("LatentWarp", dict(warp=True, warp_end=float(warp_end), cross_frame=bool(cross_frame)))]
        if compare:
            runs.append(("per-frame", dict(warp=False, cross_frame=False)))
        lines, videos = [], []
        try:
            for label, options in runs:
                start = time.perf_counter()
                out = self.pipe(video=frames, **settings, **options)
                seconds = time.perf_counter() - start
                videos.append(self._write(out.frames, label, fps))
                lines.append((label, out.warp_error, seconds, out.seconds, out.frames))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        # the default micro-world clip has a known object: say whether each run recoloured it
        judged = None if video else self.example
        header = "| run | warp error | seconds | flow + warp |"
        if judged is not None:
            header += f" object reads as {judged.target} |"
        report = [
            f"**{name}**: {len(frames)} frames of {size_text(*frames.shape[1:3])} at {fps:g} fps, "
            f"{self.model} on {self.pipe.device}",
            "",
            header,
            "|" + " --- |" * (header.count("|") - 1),
        ]
        for label, error, seconds, parts, output in lines:
            row = f"| {label} | {error:.4f} | {seconds:.2f} | {parts['flow'] + parts['warp']:.2f} |"
            if judged is not None:
                row += f" {recolour_scores(output, judged)['recoloured']:.0%} of frames |"
            report.append(row)
        if compare:
            ratio = lines[1][1] / max(lines[0][1], 1e-9)
            verdict = f"**{ratio:.2f}x lower**" if ratio >= 1 else f"**{1 / max(ratio, 1e-9):.2f}x higher**"
            report += ["", f"LatentWarp's warp error is {verdict} than per-frame translation's."]
        return self._write(frames, "input", fps), videos[0], (videos[1] if compare else None), "\n".join(report)


def build_demo(model: str = MICRO_SD15, device: str | None = None, dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The LatentWarp app for ``model`` (``micro-sd15``, ``tiny-sd15`` or a Stable Diffusion 1.x/2.x id), loaded once.

    Examples
    --------
    >>> [fn.api_name for fn in build_demo("tiny-sd15").fns.values()]
    ['run', 'load_example', 'run_example', 'preview']
    """
    pipe = LatentWarpPipeline.from_pipe(load_pipeline(model, dtype, device))
    run = VideoRun(pipe, model)
    steps_default = EXAMPLE_STEPS if model.startswith("tiny") else 20
    if run.example is not None:
        # the micro-world's example is its default clip (no upload), judged in the report
        example, prompt_default, example_steps = None, run.example.prompt, steps_default
    else:
        # an upload as OpenCV writes it by default (mp4v in .mp4): browsers cannot play that codec,
        # so the example also shows the re-encoding at work
        example = str(write_video(default_frames(), run.folder / "panned-photo.mp4", fps=DEFAULT_FPS))
        prompt_default, example_steps = "a watercolor painting", EXAMPLE_STEPS
    with gr.Blocks(title="hasten · LatentWarp video translation") as demo:
        gr.Markdown(
            f"# LatentWarp video-to-video translation\n`{model}` on `{pipe.device}`. Each frame is "
            "translated from the same noise; the previous frame's latent is warped along the source "
            "video's optical flow during the first steps, and self-attention reads the first and "
            f"previous frames. Up to {MAX_FRAMES} frames, longest side {MAX_SIDE}. Lower warp error = "
            "more coherent from frame to frame."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.File(
                    label="Source video (any codec OpenCV reads; empty: "
                    + ("a panning scene)" if run.example is not None else "a panned photo)"),
                    file_types=["video"],
                    type="filepath",
                    elem_id="source",
                )
                prompt = gr.Textbox(label="Prompt", value=prompt_default, elem_id="prompt")
                with gr.Row():
                    strength = gr.Slider(0.1, 1.0, value=0.75, step=0.05, label="Strength", elem_id="strength")
                    steps = gr.Number(label="Steps", value=steps_default, precision=0, elem_id="steps")
                warp_end = gr.Slider(
                    0.0,
                    1.0,
                    value=0.8,
                    step=0.05,
                    label="Warp during the first (of the full schedule; paper: 0.8)",
                    elem_id="warp-end",
                )
                with gr.Row():
                    cross = gr.Checkbox(label="Cross-frame attention", value=True, elem_id="cross-frame")
                    compare = gr.Checkbox(label="Compare with per-frame translation", value=True, elem_id="compare")
                button = gr.Button("Translate", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                with gr.Row():
                    shown = gr.Video(
                        label="Input (the frames translated)",
                        value=run.preview(None),
                        interactive=False,
                        autoplay=True,
                        loop=True,
                        elem_id="input",
                    )
                    warped = gr.Video(label="LatentWarp", interactive=False, autoplay=True, loop=True, elem_id="result")
                    per_frame = gr.Video(
                        label="Per-frame translation", interactive=False, autoplay=True, loop=True, elem_id="per-frame"
                    )
                report = gr.Markdown("Press **Translate**, or the example below.", elem_id="report")
        inputs = [source, prompt, strength, steps, warp_end, cross, compare]
        outputs = [shown, warped, per_frame, report]
        connect_run(
            button,
            run,
            inputs,
            outputs,
            [[example, prompt_default, 0.75, example_steps, 0.8, True, True]],
            "Example: LatentWarp vs per-frame (one click)"
            if example is None
            else "Example: an mp4v upload, LatentWarp vs per-frame (one click)",
        )
        source.change(run.preview, source, shown, api_name="preview")
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app video``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app video", description="Gradio app: LatentWarp video translation.")
    add_common_args(parser, default_model=MICRO_SD15)
    args = parser.parse_args(argv)
    launch(
        build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port, share=args.share
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
