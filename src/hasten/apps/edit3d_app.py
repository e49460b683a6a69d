"""VoxHammer demo: edit the inside of a box of a 3-D shape; everything outside stays exactly as it was.

Run it with ``hasten app edit3d [--model tiny-trellis] [--port 7860]`` or ``python -m hasten.apps.edit3d_app``.
The models are loaded once, when the app is built. Upload a mesh (or use the built-in sample),
set the edit box in voxel coordinates of the model's grid, give a text prompt (or an image), and
edit: the app shows the source and the edited mesh side by side (``gr.Model3D``), both from the
same camera and both with the edit box drawn in orange (so both views frame the same extent:
outside the box the shapes are identical), and what changed.

Examples
--------
>>> demo = build_demo("tiny-trellis")
>>> before, after, report = demo(None, 16, 0, 0, 32, 32, 32, "a rounded top", None, 3, api_name="run")
>>> "changed" in report and before.endswith(".glb")
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

from hasten.apps.launcher import add_common_args, connect_run, launch, random_weights_notice, whole_number
from hasten.cli.edit3d import _load, voxelize
from hasten.pipelines.voxhammer import VoxelEditPipeline, box_mask, occupancy_to_mesh

__all__ = ["Edit3DRun", "build_demo", "main"]

CAMERA = (70.0, 65.0, 2.4)  # (alpha, beta in degrees, radius in shape widths): the same for both views
SHAPE_COLOUR = (190, 190, 200, 255)
BOX_COLOUR = (255, 140, 0, 255)  # the edit box's edges
BOX_EDGE = 0.006  # half the thickness of a box edge, in shape widths
BOX_NAMES = ("x0", "y0", "z0", "x1", "y1", "z1")


def _sample(resolution: int) -> np.ndarray:
    """A table-like sample shape: a slab on four legs."""
    grid = np.zeros((resolution,) * 3, bool)
    r = resolution
    grid[r // 4 : 3 * r // 4, r // 4 : 3 * r // 4, r // 2 : r // 2 + max(2, r // 8)] = True
    for x in (r // 4, 3 * r // 4 - 2):
        for y in (r // 4, 3 * r // 4 - 2):
            grid[x : x + 2, y : y + 2, r // 8 : r // 2] = True
    return grid


class Edit3DRun:
    """The Edit button on the loaded models -> source mesh, edited mesh, report."""

    def __init__(self, model: str):
        flow, encoder, decoder, self.conditioner = _load(model)
        self.editor, self.model = VoxelEditPipeline(flow, encoder, decoder), model
        self.resolution = flow.resolution * 4
        self.folder = Path(tempfile.mkdtemp(prefix="hasten-edit3d-app-"))

    def _write(self, occupancy: np.ndarray, box: list[int], name: str) -> str:
        """A GLB of the shape (grey) with the edit box's twelve edges (orange), in grid-width units."""
        import trimesh
        from trimesh.visual import TextureVisuals
        from trimesh.visual.material import PBRMaterial

        def painted(mesh: trimesh.Trimesh, colour: tuple[int, ...]) -> trimesh.Trimesh:
            mesh.visual = TextureVisuals(material=PBRMaterial(baseColorFactor=colour, metallicFactor=0.0))
            return mesh

        scene = trimesh.Scene()
        vertices, faces = occupancy_to_mesh(occupancy)
        if len(faces):
            scene.add_geometry(painted(trimesh.Trimesh(vertices, faces), SHAPE_COLOUR), geom_name="shape")
        low, high = np.array(box[:3]) / self.resolution, np.array(box[3:]) / self.resolution
        for axis in range(3):
            others = [a for a in range(3) if a != axis]
            for corner in ((low, low), (low, high), (high, low), (high, high)):
                start, end = low.copy(), high.copy()
                for other, bound in zip(others, corner):
                    start[other] = bound[other] - BOX_EDGE
                    end[other] = bound[other] + BOX_EDGE
                start[axis], end[axis] = low[axis] - BOX_EDGE, high[axis] + BOX_EDGE
                scene.add_geometry(painted(trimesh.creation.box(bounds=[start, end]), BOX_COLOUR))
        # voxel z is up; the viewer's up is y: turn the scene -90 degrees about x (z -> y)
        scene.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
        path = self.folder / f"{name}-{time.time_ns()}.glb"
        scene.export(path)
        return str(path)

    def __call__(self, mesh: str | None, x0, y0, z0, x1, y1, z1, prompt: str, image, steps):
        box = [
            whole_number(name, value, 0, self.resolution) for name, value in zip(BOX_NAMES, (x0, y0, z0, x1, y1, z1))
        ]
        num_steps = whole_number("steps", steps)
        try:
            occupancy = voxelize(Path(mesh), self.resolution) if mesh else _sample(self.resolution)
            mask = box_mask(self.resolution, [box])
            if image is not None:
                cond = self.conditioner.image(image)
            elif prompt:
                cond = self.conditioner.text(prompt)
            else:
                raise ValueError("give a prompt or an image for the edit region")
            start = time.perf_counter()
            out = self.editor.edit(occupancy, mask, cond, num_inference_steps=num_steps, progress=False)
            seconds = time.perf_counter() - start
        except ValueError as error:
            raise gr.Error(str(error)) from error
        changed = int((out.occupancy != occupancy).sum())
        outside = int((out.occupancy != occupancy)[~mask].sum())
        x0, y0, z0, x1, y1, z1 = box
        report = (
            f"**{self.model}**, {self.resolution}^3 grid, box x {x0}-{x1}, y {y0}-{y1}, z {z0}-{z1}: "
            f"**{changed} voxels changed** inside the box, {outside} outside it (the shape there is the "
            f"source's, voxel for voxel); {int(occupancy.sum())} occupied before, {int(out.occupancy.sum())} "
            f"after; {seconds:.2f} s; source K/V {out.cache_bytes / 2**20:.2f} MiB."
        )
        return self._write(occupancy, box, "source"), self._write(out.occupancy, box, "edited"), report


def build_demo(
    model: str = "tiny-trellis", device: str | None = None, dtype: str | torch.dtype | None = None
) -> gr.Blocks:
    """The VoxHammer app for ``model`` (``tiny-trellis`` or a TRELLIS folder), loaded once."""
    run = Edit3DRun(model)
    side = run.resolution
    steps_default = 8 if model.startswith("tiny") else 25
    box_default = (side // 2, 0, 0, side, side, side)  # the right half: half the table top and two legs
    with gr.Blocks(title="hasten · VoxHammer 3-D editing") as demo:
        gr.Markdown(
            f"# VoxHammer 3-D editing\n`{model}`, a {side}^3 voxel grid. The shape is regenerated inside "
            "the orange box from the prompt; everything outside it stays exactly as it was. Both views use "
            "the same camera (drag to turn them)."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                mesh = gr.File(label="Mesh (OBJ/PLY/GLB; empty: a sample table)", elem_id="mesh")
                gr.Markdown(f"Edit box, in voxels of the {side}^3 grid (z is up; from x0, y0, z0 up to x1, y1, z1):")
                corners = []
                for row in range(2):
                    with gr.Row():
                        corners += [
                            gr.Number(label=name, value=value, precision=0, min_width=60, elem_id=f"box-{name}")
                            for name, value in zip(BOX_NAMES[3 * row : 3 * row + 3], box_default[3 * row : 3 * row + 3])
                        ]
                prompt = gr.Textbox(label="Prompt for the box", value="a rounded shape", elem_id="prompt")
                image = gr.Image(label="...or an image condition", type="pil", height=160, elem_id="image")
                steps = gr.Number(label="Steps", value=steps_default, precision=0, elem_id="steps")
                button = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    before = gr.Model3D(
                        label="Source (orange: the edit box)", camera_position=CAMERA, height=360, elem_id="before"
                    )
                    after = gr.Model3D(label="Edited", camera_position=CAMERA, height=360, elem_id="after")
                report = gr.Markdown("Press **Edit**, or the example below.", elem_id="report")
        connect_run(
            button,
            run,
            [mesh, *corners, prompt, image, steps],
            [before, after, report],
            [[None, *box_default, "a rounded shape", None, steps_default]],
            "Example: regenerate the right half of the sample table (one click)",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app edit3d``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app edit3d", description="Gradio app: VoxHammer 3-D editing.")
    add_common_args(parser, default_model="tiny-trellis")
    args = parser.parse_args(argv)
    launch(
        build_demo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port, share=args.share
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
