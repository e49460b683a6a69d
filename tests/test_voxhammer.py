"""TRELLIS-format sparse-structure models and VoxHammer voxel editing on the tiny set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hasten.tiny.trellis as tt
from hasten.hooks.feature_cache import FeatureCacheConfig
from hasten.models import trellis
from hasten.pipelines.voxhammer import VoxelEditPipeline, box_mask, occupancy_to_mesh, save_ply


@pytest.fixture(scope="module")
def editor():
    parts = tt.models()
    return VoxelEditPipeline(parts["flow"], parts["encoder"], parts["decoder"])


def _source() -> np.ndarray:
    grid = np.zeros((32, 32, 32), bool)
    grid[8:24, 8:24, 8:24] = True
    grid[12:20, 12:20, 24:28] = True
    return grid


def _cond(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, tt.COND_CHANNELS, generator=torch.Generator().manual_seed(seed))


def test_trellis_checkpoint_layout_round_trip_and_errors(tmp_path):
    name, args = tt.CONFIGS["ss_flow"]
    model = trellis.MODELS[name](**args)
    keys = set(model.state_dict())
    assert {
        "pos_emb",
        "t_embedder.mlp.0.weight",
        "input_layer.weight",
        "blocks.0.self_attn.to_qkv.weight",
        "blocks.0.self_attn.q_rms_norm.gamma",
        "blocks.0.cross_attn.to_kv.weight",
        "blocks.0.norm2.weight",
        "blocks.0.mlp.mlp.0.weight",
        "blocks.0.adaLN_modulation.1.weight",
        "out_layer.weight",
    } <= keys
    path = trellis.save_pretrained(model, tmp_path / "ss_flow", args)
    assert json.loads((tmp_path / "ss_flow.json").read_text())["name"] == "SparseStructureFlowModel"
    loaded = trellis.from_pretrained(path)
    x, t, c = torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0]), _cond()
    torch.testing.assert_close(loaded(x, t, c), model.eval()(x, t, c))
    from safetensors.torch import load_file, save_file

    state = load_file(f"{path}.safetensors")
    state["blocks.0.extra.weight"] = torch.zeros(1)
    del state["out_layer.bias"]
    save_file(state, f"{path}.safetensors")
    with pytest.raises(ValueError, match="missing.*out_layer.bias.*unexpected.*extra"):
        trellis.from_pretrained(path)
    (tmp_path / "other.json").write_text(json.dumps({"name": "StructuredLatentFlowModel", "args": {}}))
    save_file({}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not implemented"):
        trellis.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        trellis.from_pretrained(tmp_path / "missing")


def test_half_precision_models_keep_float32_norms(tmp_path):
    """TRELLIS's checkpoints run in half precision: loaded with dtype=bfloat16 the models run (norms in
    float32 over half-precision parameters), close to float32, and an edit keeps the outside voxels."""
    parts, full = tt.models(torch.bfloat16), tt.models()
    x, t, c = torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0]), _cond()
    torch.testing.assert_close(parts["flow"](x.bfloat16(), t, c).float(), full["flow"](x, t, c), atol=0.1, rtol=0.1)
    source, mask = _source(), box_mask(32, [(16, 0, 0, 32, 32, 32)])
    out = VoxelEditPipeline(parts["flow"], parts["encoder"], parts["decoder"]).edit(
        source, mask, _cond(1), num_inference_steps=3, progress=False
    )
    assert np.array_equal(out.occupancy[~mask], source[~mask])


def test_voxels_outside_the_edit_region_are_the_source(editor):
    source = _source()
    mask = box_mask(32, [(16, 0, 0, 32, 32, 32)])
    out = editor.edit(source, mask, _cond(1), num_inference_steps=5, progress=False)
    assert np.array_equal(out.occupancy[~mask], source[~mask])
    assert torch.equal(out.edit_cells, torch.from_numpy(_reference_cells(source, mask, 8))) and out.cache_bytes > 0
    vertices, faces = out.mesh()
    assert len(vertices) and len(faces) and vertices.min() >= 0 and vertices.max() <= 1


def _reference_cells(occupancy: np.ndarray, mask: np.ndarray, side: int) -> np.ndarray:
    """The reference's rule, cell by cell: regenerated unless the cell holds an occupied voxel outside the mask."""
    factor = occupancy.shape[0] // side
    cells = np.ones((side,) * 3, bool)
    for i in range(side):
        for j in range(side):
            for k in range(side):
                block = np.s_[
                    i * factor : (i + 1) * factor, j * factor : (j + 1) * factor, k * factor : (k + 1) * factor
                ]
                if (occupancy[block] & ~mask[block]).any():
                    cells[i, j, k] = False
    return cells


def test_edit_cells_keep_exactly_the_cells_with_preserved_geometry():
    """A 64^3 shell with a box edit (the issue's case): the reference regenerates every cell without a
    preserved occupied voxel, empty space included, and keeps boundary cells that hold geometry."""
    from hasten.pipelines.voxhammer import edit_cells

    grid = np.indices((64, 64, 64)) - 31.5
    radius = np.sqrt((grid**2).sum(0))
    shell = (radius > 24) & (radius < 27)
    mask = box_mask(64, [(30, 0, 0, 64, 30, 64)])
    cells = edit_cells(shell, mask, 16)
    assert np.array_equal(cells, _reference_cells(shell, mask, 16))
    assert cells[8, 8, 8], "empty space inside the shell is free"
    per_cell = (16, 4, 16, 4, 16, 4)
    edited_geometry = (shell & mask).reshape(per_cell).any(axis=(1, 3, 5))
    kept_geometry = (shell & ~mask).reshape(per_cell).any(axis=(1, 3, 5))
    assert (edited_geometry & kept_geometry).any() and not cells[edited_geometry & kept_geometry].any(), (
        "cells holding both edited and preserved geometry are kept"
    )
    touching = torch.from_numpy(mask).reshape(16, 4, 16, 4, 16, 4).any(5).any(3).any(1).numpy()
    assert int(cells.sum()) > int(touching.sum()), "more cells than the box touches are free (empty space)"


def test_empty_and_full_edit_regions_are_documented_behaviour(editor):
    source = _source()
    nothing = editor.edit(source, np.zeros_like(source), _cond(), num_inference_steps=3, progress=False)
    assert np.array_equal(nothing.occupancy, source) and nothing.cache_bytes == 0
    everything = editor.edit(source, np.ones_like(source), _cond(), num_inference_steps=3, progress=False)
    assert everything.occupancy.shape == source.shape and bool(everything.edit_cells.all())
    with pytest.raises(ValueError, match="leaves"):
        box_mask(32, [(20, 0, 0, 40, 8, 8)])
    with pytest.raises(ValueError, match="empty"):
        box_mask(32, [(4, 4, 4, 4, 8, 8)])
    with pytest.raises(ValueError, match="edit_mask"):
        editor.edit(source, np.zeros((16, 16, 16), bool), _cond(), progress=False)


def test_cache_modes_bytes_and_results(editor):
    source = _source()
    mask = box_mask(32, [(0, 0, 16, 32, 32, 32)])
    outs = {
        name: editor.edit(source, mask, _cond(2), num_inference_steps=4, cache=config, progress=False)
        for name, config in (
            ("fp32", FeatureCacheConfig(dtype="float32")),
            ("bf16", FeatureCacheConfig()),
            ("int8", FeatureCacheConfig(quantize=True)),
        )
    }
    flow = editor.flow
    channels = flow.blocks[0].self_attn.channels
    preserved = int((~outs["fp32"].edit_cells).sum())
    # the inversion's midpoint evaluations (at each step's start and middle, going up); CFG (batch 2)
    # for t in [0.5, 1]; K and V of the preserved cells, fp32
    ascending = VoxelEditPipeline.sigmas(4).flip(0)
    rows = 0
    for a, b in zip(ascending[:-1], ascending[1:]):
        for level in (float(a), float(a + (b - a) / 2)):
            rows += 2 if 0.5 <= level <= 1.0 else 1
    assert outs["fp32"].cache_bytes == rows * len(flow.blocks) * preserved * 2 * channels * 4
    assert outs["bf16"].cache_bytes * 2 == outs["fp32"].cache_bytes
    assert outs["int8"].cache_bytes < outs["fp32"].cache_bytes / 3
    naive = rows * len(flow.blocks) * flow.tokens * 3 * channels * 4  # fp32 Q/K/V of every cell
    assert naive / outs["bf16"].cache_bytes >= 4
    for name in ("bf16", "int8"):
        assert np.array_equal(outs[name].occupancy[~mask], source[~mask])
        agreement = (outs[name].occupancy[mask] == outs["fp32"].occupancy[mask]).mean()
        assert agreement > 0.95, (name, agreement)


def test_ply_export(tmp_path):
    vertices, faces = occupancy_to_mesh(_source())
    path = save_ply(tmp_path / "mesh.ply", vertices, faces)
    data = path.read_bytes()
    assert data.startswith(b"ply\nformat binary_little_endian 1.0\n") and f"element face {len(faces)}".encode() in data


def test_conditioners_and_cli(tmp_path, capsys):
    import trimesh
    from PIL import Image

    from hasten.cli import main

    conditioner = tt.conditioner()
    assert conditioner.text("a chair with tall legs").shape == (1, 77, tt.COND_CHANNELS)
    assert conditioner.image(Image.new("RGB", (40, 30), "red")).shape[-1] == tt.COND_CHANNELS
    trimesh.creation.box(extents=(1.0, 0.6, 0.8)).export(tmp_path / "box.obj")
    assert (
        main(
            [
                "edit3d",
                "--mesh",
                str(tmp_path / "box.obj"),
                "--box",
                "16",
                "0",
                "0",
                "32",
                "32",
                "32",
                "--prompt",
                "a rounded top",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "out.glb"),
            ]
        )
        == 0
    )
    assert "inside the edit boxes" in capsys.readouterr().out
    assert len(trimesh.load(tmp_path / "out.glb", force="mesh").vertices) > 0
    np.save(tmp_path / "grid.npy", _source())
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "cond.png")
    assert (
        main(
            [
                "edit3d",
                "--occupancy",
                str(tmp_path / "grid.npy"),
                "--box",
                "0",
                "0",
                "16",
                "32",
                "32",
                "32",
                "--image",
                str(tmp_path / "cond.png"),
                "--steps",
                "3",
                "--out",
                str(tmp_path / "out.npy"),
            ]
        )
        == 0
    )
    edited = np.load(tmp_path / "out.npy")
    mask = box_mask(32, [(0, 0, 16, 32, 32, 32)])
    assert np.array_equal(edited[~mask], _source()[~mask])
    Image.new("RGB", (40, 30), "red").save(tmp_path / "render.png")
    area = np.zeros((30, 40), np.uint8)
    area[:15] = 255
    Image.fromarray(area).save(tmp_path / "area.png")
    assert (
        main(
            [
                "edit3d",
                "--occupancy",
                str(tmp_path / "grid.npy"),
                "--box",
                "0",
                "0",
                "16",
                "32",
                "32",
                "32",
                "--image",
                str(tmp_path / "cond.png"),
                "--source-image",
                str(tmp_path / "render.png"),
                "--image-mask",
                str(tmp_path / "area.png"),
                "--steps",
                "3",
                "--out",
                str(tmp_path / "out2.npy"),
            ]
        )
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "out2.npy")[~mask], _source()[~mask])
    assert (
        main(
            [
                "edit3d",
                "--occupancy",
                str(tmp_path / "grid.npy"),
                "--box",
                "0",
                "0",
                "16",
                "32",
                "32",
                "32",
                "--image",
                str(tmp_path / "cond.png"),
                "--image-mask",
                str(tmp_path / "area.png"),
                "--out",
                str(tmp_path / "bad.npy"),
            ]
        )
        == 2
    )
    assert "needs --source-image" in capsys.readouterr().err
    assert (
        main(
            [
                "edit3d",
                "--occupancy",
                str(tmp_path / "grid.npy"),
                "--box",
                "0",
                "0",
                "16",
                "40",
                "32",
                "32",
                "--prompt",
                "x",
                "--out",
                str(tmp_path / "bad.npy"),
            ]
        )
        == 2
    )
    assert "leaves" in capsys.readouterr().err


def test_preserved_condition_patches_take_the_sources_condition(editor):
    """Condition tokens marked preserved carry the source's cross-attention K/V: with every token preserved
    the edit equals the edit under the source condition; the patch mask follows the edited pixels."""
    from PIL import Image

    conditioner = tt.conditioner()  # 28 px, patch 14: 2 x 2 patches after CLS + 4 registers
    source_image, edited_image = Image.new("RGB", (28, 28), "red"), Image.new("RGB", (28, 28), "blue")
    source_cond, cond = conditioner.image(source_image), conditioner.image(edited_image)
    edited = np.zeros((100, 100))
    edited[:40, :40] = 1  # the top-left quadrant of the condition image was edited
    preserved = conditioner.preserved_patches(edited)
    assert preserved.tolist() == [False] * 5 + [False, True, True, True] and len(preserved) == cond.shape[1]
    source, mask = _source(), box_mask(32, [(16, 0, 0, 32, 32, 32)])
    everything = torch.ones(cond.shape[1], dtype=torch.bool)
    replayed = editor.edit(
        source,
        mask,
        cond,
        source_cond=source_cond,
        preserved_condition=everything,
        num_inference_steps=3,
        progress=False,
    )
    reference = editor.edit(source, mask, source_cond, source_cond=source_cond, num_inference_steps=3, progress=False)
    torch.testing.assert_close(replayed.latent, reference.latent, rtol=0, atol=0)
    partial = editor.edit(
        source,
        mask,
        cond,
        source_cond=source_cond,
        preserved_condition=preserved,
        num_inference_steps=3,
        progress=False,
    )
    assert not torch.equal(partial.latent, reference.latent)
    assert np.array_equal(partial.occupancy[~mask], source[~mask])
    with pytest.raises(ValueError, match="source_cond"):
        editor.edit(source, mask, cond, preserved_condition=preserved, num_inference_steps=3, progress=False)
    with pytest.raises(ValueError, match="one per condition token"):
        editor.edit(
            source,
            mask,
            cond,
            source_cond=source_cond,
            preserved_condition=preserved[:3],
            num_inference_steps=3,
            progress=False,
        )
    with pytest.raises(ValueError, match="edited"):
        conditioner.preserved_patches(np.zeros(5))


def test_guidance_is_trellis_cfg_strength():
    """TRELLIS's sampler applies (1 + g) * cond - g * uncond: VoxHammer's strengths 5 and 6 are
    plain CFG scales 6 and 7; strength 0 is the conditional model alone."""
    calls = []

    def flow(x, t, cond):  # velocity 3 for a conditioned row, 1 for the unconditional (zero) condition
        calls.append(len(x))
        return torch.stack([torch.full_like(x[i], 3.0 if bool(cond[i].any()) else 1.0) for i in range(len(x))])

    pipe = VoxelEditPipeline(flow, None, None)
    x, cond = torch.zeros(1, 2), torch.ones(1, 4, 8)
    torch.testing.assert_close(pipe._velocity(x, 0.7, cond, 5.0, (0.5, 1.0)), torch.full_like(x, 6 * 3.0 - 5 * 1.0))
    assert pipe._velocity(x, 0.2, cond, 5.0, (0.5, 1.0)).eq(3.0).all(), "outside the CFG interval: conditional only"
    assert pipe._velocity(x, 0.7, cond, 0.0, (0.5, 1.0)).eq(3.0).all() and calls[-1] == 1


def test_text_unconditional_input_is_the_empty_prompts_embedding(tmp_path, monkeypatch):
    """TRELLIS's text models guide against CLIP(""), its image models against zeros."""
    seen = []

    def flow(x, t, cond):
        seen.append(cond[: len(x) // 2].clone() if len(x) == 2 else None)
        return torch.zeros_like(x)

    pipe = VoxelEditPipeline(flow, None, None)
    x, cond, empty = torch.zeros(1, 2), torch.ones(1, 4, 8), torch.full((1, 4, 8), 0.5)
    pipe._velocity(x, 0.7, cond, 5.0, (0.5, 1.0))
    assert not seen[-1].any(), "default (image models): zeros"
    pipe._velocity(x, 0.7, cond, 5.0, (0.5, 1.0), uncond=empty)
    assert torch.equal(seen[-1], empty)
    from hasten.cli import main

    calls = {}
    original = VoxelEditPipeline.edit

    def spy(self, *args, **kwargs):
        calls.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VoxelEditPipeline, "edit", spy)
    np.save(tmp_path / "grid.npy", _source())
    assert (
        main(
            [
                "edit3d",
                "--occupancy",
                str(tmp_path / "grid.npy"),
                "--box",
                "0",
                "0",
                "16",
                "32",
                "32",
                "32",
                "--prompt",
                "a chair",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "out.npy"),
            ]
        )
        == 0
    )
    torch.testing.assert_close(calls["uncond"], tt.conditioner().text(""))


def test_image_condition_normalises_dinov2s_pre_norm_features():
    """TRELLIS: layer_norm of the last block's output BEFORE DINOv2's own final norm."""
    from PIL import Image

    conditioner = tt.conditioner()
    encoder = conditioner.image_encoder
    with torch.no_grad():  # a non-trivial final norm, so pre- and post-norm features differ
        encoder.layernorm.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
        encoder.layernorm.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
    image = Image.new("RGB", (28, 28), "red")
    features = conditioner.image(image)
    size = conditioner.image_size
    array = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pixels = torch.from_numpy((array - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = encoder(pixel_values=pixels, output_hidden_states=True)
    prenorm = out.hidden_states[-1]
    torch.testing.assert_close(features, torch.nn.functional.layer_norm(prenorm, prenorm.shape[-1:]))
    postnorm = torch.nn.functional.layer_norm(out.last_hidden_state, prenorm.shape[-1:])
    assert not torch.allclose(features, postnorm, atol=1e-3)


def test_mesh_voxelisation_is_trellis_surface_voxels_in_the_unit_cube_z_up(tmp_path):
    import trimesh

    from hasten.cli.edit3d import voxelize

    trimesh.creation.icosphere(subdivisions=3).export(tmp_path / "sphere.obj")
    sphere = voxelize(tmp_path / "sphere.obj", 64)
    assert not sphere[32, 32, 32] and sphere[:, 32, 32].sum() == 2 * 1, "surface voxels, not a solid"
    occupied = np.argwhere(sphere)
    assert occupied.min() == 0 and occupied.max() == 63, "the largest extent fills the unit cube"
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))  # longest along z in the file's own axes
    box.export(tmp_path / "box.ply")
    box.export(tmp_path / "box.glb")
    ply, glb = np.argwhere(voxelize(tmp_path / "box.ply", 64)), np.argwhere(voxelize(tmp_path / "box.glb", 64))
    assert np.ptp(ply[:, 2]) == 63 and np.ptp(ply[:, 1]) < 40  # PLY: taken as z-up already
    assert np.ptp(glb[:, 1]) == 63 and np.ptp(glb[:, 2]) < 40  # glTF y-up -> z-up: the file's z becomes -y
