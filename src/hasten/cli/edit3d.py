"""``hasten edit3d``: VoxHammer local editing of a 3-D shape in TRELLIS's sparse-structure latent."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._types import positive

OUT_SUFFIXES = (".ply", ".obj", ".glb", ".stl", ".npy")


def register(commands) -> None:
    parser = commands.add_parser(
        "edit3d",
        help="training-free local 3-D editing (VoxHammer on TRELLIS's sparse-structure models)",
        description="Edit the inside of one or more boxes of a shape (a mesh, voxelised, or a .npy occupancy grid) "
        "toward an image or text condition; everything outside the boxes stays exactly as it was. Writes a mesh "
        "(.ply/.obj/.glb/.stl, marching cubes) or the occupancy (.npy).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--mesh",
        type=Path,
        help="source mesh (OBJ/PLY/GLB/... via trimesh): its surface "
        "voxels in the unit cube, z-up (glTF rotated from y-up), as TRELLIS voxelises",
    )
    source.add_argument("--occupancy", type=Path, help="source occupancy grid, an R^3 boolean .npy")
    parser.add_argument(
        "--box",
        type=int,
        nargs=6,
        action="append",
        required=True,
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="edit box in voxel coordinates, end-exclusive (repeatable)",
    )
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--image", type=Path, help="image condition (DINOv2 features)")
    condition.add_argument("--prompt", help="text condition (CLIP features)")
    parser.add_argument(
        "--source-image", type=Path, help="with --image: a render of the source; it conditions the inversion"
    )
    parser.add_argument(
        "--image-mask",
        type=Path,
        help="with --source-image: the edited area of --image (nonzero pixels); the condition patches "
        "outside it keep the source's cross-attention K/V",
    )
    parser.add_argument(
        "--model",
        default="tiny-trellis",
        help="tiny-trellis, or a TRELLIS folder holding ckpts/ss_flow_*, ss_enc_*, ss_dec_* (.json + .safetensors)",
    )
    parser.add_argument("--steps", type=positive, default=25, help="inversion / editing steps (VoxHammer: 25)")
    parser.add_argument("--out", type=Path, required=True, help="output .ply / .obj / .glb / .stl / .npy")
    parser.set_defaults(run=run)


def _load(model: str):
    from .. import tiny  # noqa: F401 - the tiny package
    from ..models import trellis

    if model == "tiny-trellis":
        from ..tiny import trellis as tiny_trellis

        parts = tiny_trellis.models()
        return parts["flow"], parts["encoder"], parts["decoder"], tiny_trellis.conditioner()
    if not Path(model).is_dir():
        raise ValueError(
            f"--model {model}: not tiny-trellis and not a folder; give tiny-trellis or a TRELLIS folder "
            "holding ckpts/ss_flow_*, ss_enc_*, ss_dec_* (.json + .safetensors)"
        )
    folder = Path(model) / "ckpts"
    found = {}
    for prefix in ("ss_flow", "ss_enc", "ss_dec"):
        matches = sorted(folder.glob(f"{prefix}*.json"))
        if not matches:
            raise ValueError(
                f"--model {model}: {folder} has no {prefix}*.json checkpoint (a TRELLIS folder holds "
                "ckpts/ss_flow_*, ss_enc_*, ss_dec_*)"
            )
        found[prefix] = trellis.from_pretrained(matches[0].with_suffix(""))
    from ..loading import resolve_model
    from ..pipelines.voxhammer import VoxelConditioner

    # the condition encoders come from the Hub: say at once when one is neither cached nor reachable
    text = resolve_model("openai/clip-vit-large-patch14", "transformers", "the text condition encoder")
    image = resolve_model("facebook/dinov2-with-registers-large", "transformers", "the image condition encoder")
    return found["ss_flow"], found["ss_enc"], found["ss_dec"], VoxelConditioner.from_pretrained(text, image)


def voxelize(path: Path, resolution: int):
    """A mesh file -> an R^3 occupancy grid of its SURFACE voxels, as TRELLIS voxelises its training meshes.

    TRELLIS (``dataset_toolkits/voxelize.py``) normalises the mesh into the unit cube centred at the
    origin (scaled by its largest extent), z-up, and marks every voxel of the ``[-0.5, 0.5]^3`` grid
    that the surface passes through. glTF files (.glb / .gltf) are y-up, so they are rotated to z-up
    first (+90 degrees about x, as Blender's importer does in TRELLIS's pipeline). Voxels are found
    by subdividing the triangles below half a voxel and marking the voxel of every vertex.
    """
    import numpy as np

    try:
        import trimesh
        from trimesh.remesh import subdivide_to_size
    except ImportError as error:  # pragma: no cover - trimesh is a dependency
        raise ValueError("mesh input needs trimesh (pip install trimesh)") from error
    if not Path(path).is_file():
        raise ValueError(f"--mesh {path} does not exist")
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as error:  # noqa: BLE001 - trimesh raises many kinds on a bad file
        detail = (
            error.args[0] % error.args[1:]
            if len(error.args) > 1 and isinstance(error.args[0], str) and "%" in error.args[0]
            else (str(error) or type(error).__name__)
        )
        raise ValueError(f"--mesh {path}: not a mesh trimesh can read ({detail})") from None
    if not isinstance(mesh, trimesh.Trimesh) or mesh.is_empty or not len(mesh.faces):
        raise ValueError(f"--mesh {path} holds no triangles")
    vertices = np.asarray(mesh.vertices, np.float64)
    if Path(path).suffix.lower() in (".glb", ".gltf"):  # y-up -> z-up: (x, y, z) -> (x, -z, y)
        vertices = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
    low, high = vertices.min(0), vertices.max(0)
    vertices = (vertices - (low + high) / 2) / max(float((high - low).max()), 1e-12)  # the unit cube
    pitch = 1.0 / resolution
    dense, _ = subdivide_to_size(vertices, np.asarray(mesh.faces), max_edge=pitch / 2, max_iter=64)
    index = np.clip(np.floor((np.clip(dense, -0.5, 0.5) + 0.5) / pitch), 0, resolution - 1).astype(np.int64)
    out = np.zeros((resolution,) * 3, bool)
    out[index[:, 0], index[:, 1], index[:, 2]] = True
    return out


def _write(path: Path, occupancy) -> None:
    """The occupancy (.npy) or its marching-cubes mesh, written to a temporary file beside ``path`` and
    renamed, so a failure never leaves half a file; the mode of a new file (umask respected)."""
    import tempfile

    import numpy as np

    from ..jobs.manifest import respect_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    tmp = Path(name)
    try:
        if path.suffix.lower() == ".npy":
            np.save(tmp, occupancy)
        else:
            import trimesh

            from ..pipelines.voxhammer import occupancy_to_mesh

            vertices, faces = occupancy_to_mesh(occupancy)
            trimesh.Trimesh(vertices, faces).export(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    respect_umask(path)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..pipelines.voxhammer import VoxelEditPipeline, box_mask
    from ._common import check_output_file

    try:
        check_output_file(args.out, "--out", OUT_SUFFIXES)
        flow, encoder, decoder, conditioner = _load(args.model)
        resolution = flow.resolution * 4  # TRELLIS: a 16^3 latent for a 64^3 grid
        if args.mesh is not None:
            occupancy = voxelize(args.mesh, resolution)
        else:
            occupancy = np.load(args.occupancy).astype(bool)
            if occupancy.shape != (resolution,) * 3:
                raise ValueError(f"--occupancy is {occupancy.shape}; this model edits {resolution}^3 grids")
        try:
            mask = box_mask(resolution, args.box)
        except ValueError as error:
            raise ValueError(f"--box: {error} (voxel coordinates, end-exclusive, each in 0..{resolution})") from None
        source_cond = preserved = uncond = None
        if (args.source_image or args.image_mask) and args.image is None:
            raise ValueError("--source-image and --image-mask go with an image condition (--image)")
        if args.image_mask is not None and args.source_image is None:
            raise ValueError("--image-mask needs --source-image (the source's condition patches to keep)")
        if args.image is not None:
            from PIL import Image

            cond = conditioner.image(Image.open(args.image))
            if args.source_image is not None:
                source_cond = conditioner.image(Image.open(args.source_image))
            if args.image_mask is not None:
                preserved = conditioner.preserved_patches(np.asarray(Image.open(args.image_mask).convert("L")))
        else:
            cond = conditioner.text(args.prompt)
            uncond = conditioner.text("")  # TRELLIS's text models: the empty prompt's embedding
        if cond.shape[-1] != flow.blocks[0].cross_attn.to_kv.in_features:
            raise ValueError(
                f"the condition has {cond.shape[-1]} channels; the flow model expects "
                f"{flow.blocks[0].cross_attn.to_kv.in_features} (an image model needs --image, a text "
                "model --prompt)"
            )
        out = VoxelEditPipeline(flow, encoder, decoder).edit(
            occupancy,
            mask,
            cond,
            source_cond=source_cond,
            num_inference_steps=args.steps,
            preserved_condition=preserved,
            uncond=uncond,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"hasten edit3d: {error}", file=sys.stderr)
        return 2
    _write(args.out, out.occupancy)
    changed = int((out.occupancy != occupancy).sum())
    print(
        f"wrote {args.out}: {int(out.occupancy.sum())} occupied voxels of {resolution}^3, {changed} changed, all inside "
        f"the edit boxes; source K/V {out.cache_bytes / 2**20:.2f} MiB; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in out.seconds.items())
    )
    return 0
