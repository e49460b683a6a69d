"""VoxHammer demo: edit the inside of a box of a 3-D shape; everything outside stays exactly as it was.

Run it with ``hasten app edit3d [--model tiny-trellis] [--port 7860]`` or ``python apps/edit3d_app.py``.
The models are loaded once, when the app is built. Upload a mesh (or use the built-in sample),
set the edit box in voxel coordinates of the model's grid, give a text prompt (or an image), and
edit: the app shows the source and the edited mesh side by side (``gr.Model3D``) and what changed.

Examples
--------
>>> demo = build_demo("tiny-trellis")
>>> before, after, report = demo(None, 16, 0, 0, 32, 32, 32, "a rounded top", None, 3, api_name="run")
>>> "changed" in report
True
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by file path (`hasten app edit3d`)
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from apps.launcher import add_common_args, launch  # noqa: E402
from hasten.cli.edit3d import _load, voxelize  # noqa: E402
from hasten.pipelines.voxhammer import VoxelEditPipeline, box_mask, occupancy_to_mesh  # noqa: E402

__all__ = ["Edit3DRun", "build_demo", "main"]


def _sample(resolution: int) -> np.ndarray:
    """A table-like sample shape: a slab on four legs."""
    grid = np.zeros((resolution,) * 3, bool)
    r = resolution
    grid[r // 4: 3 * r // 4, r // 4: 3 * r // 4, r // 2: r // 2 + max(2, r // 8)] = True
    for x in (r // 4, 3 * r // 4 - 2):
        for y in (r // 4, 3 * r // 4 - 2):
            grid[x:x + 2, y:y + 2, r // 8: r // 2] = True
    return grid


class Edit3DRun:
    """The Edit button on the loaded models -> source mesh, edited mesh, report."""

    def __init__(self, model: str):
        flow, encoder, decoder, self.conditioner = _load(model)
        self.editor, self.model = VoxelEditPipeline(flow, encoder, decoder), model
        self.resolution = flow.resolution * 4
        self.folder = Path(tempfile.mkdtemp(prefix="hasten-edit3d-app-"))

    def _write(self, occupancy: np.ndarray, name: str) -> str:
        import trimesh

        vertices, faces = occupancy_to_mesh(occupancy)
        path = self.folder / f"{name}-{time.time_ns()}.glb"
        trimesh.Trimesh(vertices, faces).export(path)
        return str(path)

    def __call__(self, mesh: str | None, x0, y0, z0, x1, y1, z1, prompt: str, image, steps):
        try:
            occupancy = voxelize(Path(mesh), self.resolution) if mesh else _sample(self.resolution)
            box = [int(v) for v in (x0, y0, z0, x1, y1, z1)]
            mask = box_mask(self.resolution, [box])
            if image is not None:
                cond = self.conditioner.image(image)
            elif prompt:
                cond = self.conditioner.text(prompt)
            else:
                raise ValueError("give a prompt or an image for the edit region")
            if not steps or steps < 1:
                raise ValueError(f"`steps` must be a positive integer, got {steps!r}")
            start = time.perf_counter()
            out = self.editor.edit(occupancy, mask, cond, num_inference_steps=int(steps), progress=False)
            seconds = time.perf_counter() - start
        except ValueError as error:
            raise gr.Error(str(error)) from error
        changed = int((out.occupancy != occupancy).sum())
        report = (f"**{self.model}**, {self.resolution}^3 grid, box {tuple(box)}: {changed} voxels changed (all inside "
                  f"the box; outside it the shape is the source's, voxel for voxel), {int(out.occupancy.sum())} "
                  f"occupied; {seconds:.2f} s; source K/V {out.cache_bytes / 2**20:.2f} MiB.")
        return self._write(occupancy, "source"), self._write(out.occupancy, "edited"), report


def build_demo(model: str = "tiny-trellis", device: str | None = None,
               dtype: str | torch.dtype | None = None) -> gr.Blocks:
    """The VoxHammer app for ``model`` (``tiny-trellis`` or a TRELLIS folder), loaded once."""
    run = Edit3DRun(model)
    side = run.resolution
    with gr.Blocks(title="hasten · VoxHammer 3-D editing") as demo:
        gr.Markdown(f"# VoxHammer 3-D editing\n`{model}`, a {side}^3 voxel grid. Everything outside the box stays "
                    "exactly as it was.")
        with gr.Row():
            with gr.Column():
                mesh = gr.File(label="Mesh (OBJ/PLY/GLB; empty: a sample table)", elem_id="mesh")
                with gr.Row():
                    corners = [gr.Number(label=label, value=value, precision=0, elem_id=f"box-{label}")
                               for label, value in (("x0", side // 2), ("y0", 0), ("z0", 0), ("x1", side), ("y1", side),
                                                    ("z1", side))]
                prompt = gr.Textbox(label="Prompt for the box", value="a rounded shape", elem_id="prompt")
                image = gr.Image(label="...or an image condition", type="pil", elem_id="image")
                steps = gr.Number(label="Steps", value=8 if model.startswith("tiny") else 25, precision=0,
                                  elem_id="steps")
                button = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column():
                before = gr.Model3D(label="Source", elem_id="before")
                after = gr.Model3D(label="Edited", elem_id="after")
                report = gr.Markdown("Press **Edit**.", elem_id="report")
        button.click(run, [mesh, *corners, prompt, image, steps], [before, after, report], api_name="run",
                     concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app edit3d``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app edit3d", description="Gradio app: VoxHammer 3-D editing.")
    add_common_args(parser, default_model="tiny-trellis")
    args = parser.parse_args(argv)
    launch(build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port,
           share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
