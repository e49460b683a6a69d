"""VoxHammer: training-free local editing of 3-D assets in TRELLIS's native sparse-structure latent.

Input: a source occupancy grid (``R^3`` bool, R = 64 for TRELLIS), an edit region (boxes in voxel
coordinates, or a voxel mask) and the edit condition (condition tokens ``(1, N, C)``, e.g. from
DINOv2 features of an edited render, or text features; see below). Stage 1 of VoxHammer:

1. Encode the source to the 16^3 latent; invert it with the second-order midpoint solver (part
   1's :mod:`.inversion`), 25 steps, time rescaled by 3.0, classifier-free guidance only for
   ``t`` in [0.5, 1.0] (the paper's defaults). At every noise level the latent is kept, and the
   self-attention K/V of the PRESERVED latent cells are recorded
   (:class:`~hasten.hooks.feature_replay.FeatureReplay` on the fused ``to_qkv`` into a bounded
   :class:`~hasten.hooks.feature_cache.FeatureCache`: region-only, bf16 by
   default, int8 / disk on request). VoxHammer's own code keeps every (t, order, cond, layer)
   K/V in fp32 on the CPU and grows ~1 GB per step.
2. Denoise from the inverted noise with the edit condition: preserved cells' K/V are replayed,
   and after every step ``x <- x * M + cached_x * (1 - M)`` (``M`` = 1 on the edit region).
3. Decode, and copy every voxel outside the edit region from the source, exactly.

A latent cell is kept (replayed from the source) exactly when it holds a preserved occupied voxel,
as in the reference (:func:`edit_cells`); empty space is free. An empty edit region returns the source; an edit region covering everything
regenerates the whole asset from the inverted noise (both documented, never a crash). The
second TRELLIS stage (structured latents: appearance, Gaussians, meshes with texture) is out of
scope: the output is geometry (occupancy, and a mesh by marching cubes).

Conditions come from :class:`VoxelConditioner` (DINOv2-with-registers for images, CLIP for
text). With an image condition, the condition patches outside the image's edited area can keep
the source's cross-attention K/V (``preserved_condition``). Meshes are voxelised by
``hasten edit3d`` (trimesh).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..hooks.feature_cache import FeatureCache, FeatureCacheConfig
from ..hooks.feature_replay import FeatureReplay, ProjectionSite
from .inversion import invert_and_replay

__all__ = [
    "VoxelConditioner",
    "VoxelEditPipeline",
    "VoxelEditOutput",
    "box_mask",
    "edit_cells",
    "occupancy_to_mesh",
    "save_ply",
]


def box_mask(resolution: int, boxes: Sequence[Sequence[int]]) -> np.ndarray:
    """A voxel mask (``resolution^3`` bool) of the union of boxes ``(x0, y0, z0, x1, y1, z1)`` (end-exclusive)."""
    mask = np.zeros((resolution,) * 3, bool)
    for box in boxes:
        if len(box) != 6:
            raise ValueError(f"a box is (x0, y0, z0, x1, y1, z1); got {tuple(box)}")
        x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution and 0 <= z0 < z1 <= resolution):
            raise ValueError(f"box {tuple(box)} is empty or leaves the {resolution}^3 grid")
        mask[x0:x1, y0:y1, z0:z1] = True
    return mask


def occupancy_to_mesh(occupancy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes (scikit-image) of an occupancy grid: vertices in [0, 1]^3, triangle faces."""
    from skimage.measure import marching_cubes

    if not occupancy.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    padded = np.pad(occupancy.astype(np.float32), 1)
    vertices, faces, _, _ = marching_cubes(padded, 0.5)
    # the 0.5 level sits half a voxel outside the occupied cells: [0.5, R + 0.5] in padded coordinates
    return ((vertices - 0.5) / occupancy.shape[0]).astype(np.float32), faces.astype(np.int64)


def save_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """A binary little-endian PLY mesh."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    face_records = np.zeros(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face_records["n"], face_records["v"] = 3, faces
    with open(path, "wb") as handle:
        handle.write(header.encode())
        handle.write(vertices.astype("<f4").tobytes())
        handle.write(face_records.tobytes())
    return path


def edit_cells(occupancy: np.ndarray, edit_mask: np.ndarray, side: int) -> np.ndarray:
    """VoxHammer's latent edit region: ``(side,)*3`` bool, True for the latent cells that are regenerated.

    As the reference: a cell is KEPT (its latent replayed from the source) exactly when it holds a
    preserved occupied voxel — an occupied voxel outside ``edit_mask``; every other cell (inside the
    edit region, or empty space anywhere) is free to change. Voxels outside ``edit_mask`` are copied
    from the source at the end in any case, so the freedom of empty cells only lets new geometry grow
    into the edit box's surroundings in latent space without touching a preserved voxel.

    Examples
    --------
    >>> occupancy = np.zeros((8, 8, 8), bool); occupancy[:4] = True   # geometry in the lower half
    >>> cells = edit_cells(occupancy, box_mask(8, [(0, 0, 0, 2, 8, 8)]), side=4)
    >>> bool(cells[0].all()), bool(cells[1].any()), bool(cells[2:].all())  # edited; kept (geometry); empty
    (True, False, True)
    """
    resolution = occupancy.shape[0]
    factor = resolution // side
    preserved = (occupancy & ~edit_mask).reshape(side, factor, side, factor, side, factor)
    return ~preserved.any(axis=(1, 3, 5))


@dataclass
class VoxelEditOutput:
    """The edited occupancy (``R^3`` bool), its latent, the latent edit region and what it cost."""

    occupancy: np.ndarray
    latent: torch.Tensor
    edit_cells: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    cache_bytes: int = 0

    def mesh(self) -> tuple[np.ndarray, np.ndarray]:
        return occupancy_to_mesh(self.occupancy)


def _keys_and_values(qkv: torch.Tensor) -> torch.Tensor:
    """The K and V channels of a fused ``to_qkv`` output (a view)."""
    return qkv[..., qkv.shape[-1] // 3 :]


class VoxelEditPipeline:
    """VoxHammer stage-1 editing on TRELLIS sparse-structure models (see the module docstring).

    Examples
    --------
    >>> import numpy as np, torch, hasten.tiny.trellis as tt
    >>> parts = tt.models()
    >>> editor = VoxelEditPipeline(parts["flow"], parts["encoder"], parts["decoder"])
    >>> source = np.zeros((32, 32, 32), bool); source[8:24, 8:24, 8:24] = True
    >>> cond = torch.randn(1, 4, tt.COND_CHANNELS)
    >>> out = editor.edit(source, box_mask(32, [(16, 0, 0, 32, 32, 32)]), cond, num_inference_steps=4, progress=False)
    >>> bool((out.occupancy[:16] == source[:16]).all())
    True
    """

    def __init__(self, flow: Any, encoder: Any, decoder: Any):
        self.flow, self.encoder, self.decoder = flow, encoder, decoder

    def _velocity(
        self,
        x: torch.Tensor,
        sigma: float,
        cond: torch.Tensor,
        guidance: float,
        interval: tuple[float, float],
        uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """TRELLIS's guided velocity ``(1 + g) * cond - g * uncond`` (its ``cfg_strength`` g: 0 is the
        conditional model alone), inside the CFG ``interval`` of noise levels; ``uncond`` defaults to
        zeros (TRELLIS's image models)."""
        t = torch.full((1,), sigma * 1000.0, device=x.device)
        if guidance != 0.0 and interval[0] <= sigma <= interval[1]:  # CFG as one batch [uncond, cond]
            uncond = torch.zeros_like(cond) if uncond is None else uncond.expand_as(cond)
            both = self.flow(torch.cat([x, x]), t.expand(2), torch.cat([uncond, cond]))
            uncond, conditional = both.chunk(2)
            return conditional + guidance * (conditional - uncond)
        return self.flow(x, t, cond)

    @staticmethod
    def sigmas(steps: int, rescale: float = 3.0) -> torch.Tensor:
        """TRELLIS's schedule: ``steps + 1`` times from 1 to 0, rescaled by ``rescale``."""
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return rescale * t / (1 + (rescale - 1) * t)

    @torch.no_grad()
    def edit(
        self,
        occupancy: np.ndarray,
        edit_mask: np.ndarray,
        cond: torch.Tensor,
        source_cond: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        rescale_t: float = 3.0,
        invert_guidance: float = 5.0,
        edit_guidance: float = 6.0,
        cfg_interval: tuple[float, float] = (0.5, 1.0),
        cache: FeatureCacheConfig | None = None,
        progress: bool = True,
        preserved_condition: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
    ) -> VoxelEditOutput:
        """Edit the ``edit_mask`` region of ``occupancy`` toward ``cond`` (see the module docstring).

        ``source_cond`` (default: ``cond``) conditions the inversion; guidance strengths and the
        CFG interval are VoxHammer's stage-1 defaults, in TRELLIS's form: strength ``g`` gives
        ``(1 + g) * cond - g * uncond`` (so 5 is a plain CFG scale of 6).

        ``uncond``: the unconditional condition of classifier-free guidance, as TRELLIS builds it:
        zeros for image conditions (the default), the CLIP embedding of the empty prompt for text
        conditions (``VoxelConditioner.text("")``; ``hasten edit3d --prompt`` passes it).

        ``preserved_condition`` ``(N,)`` bool marks the condition tokens whose cross-attention K/V
        come from the source (VoxHammer: the unmasked patches of the edited image, e.g. from
        :meth:`VoxelConditioner.preserved_patches`); it needs ``source_cond`` of ``cond``'s shape.
        TRELLIS's cross-attention K/V are a per-token function of the condition alone
        (``to_kv(context)``, the same at every step), so the source's K/V of a token are exactly
        those of the source's token: they are replayed by taking those tokens from ``source_cond``,
        with nothing to record.
        """
        flow = self.flow
        resolution = occupancy.shape[0]
        if occupancy.shape != (resolution,) * 3:
            raise ValueError(f"`occupancy` must be a cube R^3, got {occupancy.shape}")
        if edit_mask.shape != occupancy.shape:
            raise ValueError(f"`edit_mask` is {edit_mask.shape}; expected {occupancy.shape}")
        side = flow.resolution
        if resolution % side:
            raise ValueError(f"the occupancy resolution {resolution} is not a multiple of the latent's {side}")
        device = next(flow.parameters()).device
        dtype = next(flow.parameters()).dtype
        cells = torch.from_numpy(edit_cells(occupancy, edit_mask, side))
        source_grid = torch.from_numpy(occupancy.astype(np.float32))[None, None].to(device, dtype)
        x0 = self.encoder(source_grid)
        if not edit_mask.any():  # nothing to edit: the source, exactly
            return VoxelEditOutput(occupancy.copy(), x0, torch.zeros_like(cells))
        edit = cells.flatten().to(device)
        preserved = (~edit).nonzero()[:, 0]
        keep = (~cells).to(device, dtype)[None, None]  # 1 on preserved cells
        cond = cond.to(device, dtype)
        if preserved_condition is not None:
            if source_cond is None or source_cond.shape != cond.shape:
                raise ValueError(
                    "`preserved_condition` replays the source's condition K/V: give `source_cond` of "
                    f"`cond`'s shape {tuple(cond.shape)}"
                )
            preserved_condition = torch.as_tensor(preserved_condition, dtype=torch.bool)
            if preserved_condition.shape != (cond.shape[1],):
                raise ValueError(
                    f"`preserved_condition` must be ({cond.shape[1]},) bool (one per condition token), "
                    f"got {tuple(preserved_condition.shape)}"
                )
            cond = torch.where(preserved_condition.to(device)[None, :, None], source_cond.to(device, dtype), cond)
        source_cond = cond if source_cond is None else source_cond.to(device, dtype)
        if uncond is not None:
            uncond = uncond.to(device, dtype)
            if uncond.shape[-1] != cond.shape[-1] or uncond.shape[0] != 1:
                raise ValueError(f"`uncond` must be (1, N, {cond.shape[-1]}) like `cond`, got {tuple(uncond.shape)}")
        sigmas = self.sigmas(num_inference_steps, rescale_t)
        features = FeatureCache(cache or FeatureCacheConfig())
        replay = FeatureReplay(features, rows=preserved).attach(
            [
                ProjectionSite(index, "kv", block.self_attn.to_qkv, _keys_and_values)
                for index, block in enumerate(flow.blocks)
            ]
        )
        try:
            x, seconds = invert_and_replay(
                lambda y, level: self._velocity(y, level, source_cond, invert_guidance, cfg_interval, uncond),
                lambda y, level: self._velocity(y, level, cond, edit_guidance, cfg_interval, uncond),
                x0,
                sigmas,
                keep,
                replay,
                progress,
            )
            start = time.perf_counter()
            decoded = (self.decoder(x)[0, 0] > 0).cpu().numpy()
            seconds["edit"] += time.perf_counter() - start
        finally:
            replay.detach()
            cache_bytes = features.nbytes
            features.close()
        out = np.where(edit_mask, decoded, occupancy)  # every voxel outside the edit region is the source's
        return VoxelEditOutput(out, x, cells, seconds, cache_bytes)


class VoxelConditioner:
    """Condition tokens for TRELLIS's sparse-structure flow: CLIP text or DINOv2 (with registers) images.

    TRELLIS conditions its text models on CLIP ViT-L/14's last hidden states (77 tokens; the
    unconditional input is the embedding of ``""``) and its image model on the layer-normalised
    pre-norm output of DINOv2-with-registers ViT-L/14's last block (518 px; unconditional: zeros).
    ``from_pretrained`` loads them from the hub; ``hasten.tiny.trellis.conditioner()`` gives tiny
    random ones whose width matches the tiny flow model.
    """

    def __init__(
        self, text_encoder: Any = None, tokenizer: Any = None, image_encoder: Any = None, image_size: int = 518
    ):
        self.text_encoder, self.tokenizer, self.image_encoder = text_encoder, tokenizer, image_encoder
        self.image_size = image_size

    @classmethod
    def from_pretrained(
        cls,
        text: str | None = "openai/clip-vit-large-patch14",
        image: str | None = "facebook/dinov2-with-registers-large",
    ) -> "VoxelConditioner":
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel

        return cls(
            CLIPTextModel.from_pretrained(text) if text else None,
            AutoTokenizer.from_pretrained(text) if text else None,
            AutoModel.from_pretrained(image) if image else None,
        )

    def preserved_patches(self, edited: np.ndarray) -> torch.Tensor:
        """``(N,)`` bool over the image condition's tokens: True for the patches with no edited pixel.

        ``edited`` ``(H, W)``: nonzero where the condition image was edited (any size; resized to
        the encoder's input). The class and register tokens summarise the whole image, so they are
        never preserved. Pass the result as ``VoxelEditPipeline.edit(preserved_condition=...)``.
        """
        if self.image_encoder is None:
            raise ValueError("this conditioner has no image encoder")
        edited = np.asarray(edited)
        if edited.ndim != 2 or not edited.size:
            raise ValueError(f"`edited` must be an (H, W) mask, got shape {edited.shape}")
        config = self.image_encoder.config
        side = self.image_size // config.patch_size
        grid = (
            torch.nn.functional.adaptive_max_pool2d(
                torch.from_numpy((edited != 0).astype(np.float32))[None, None], (side, side)
            )[0, 0]
            > 0
        )
        prefix = torch.zeros(1 + getattr(config, "num_register_tokens", 0), dtype=torch.bool)
        return torch.cat([prefix, ~grid.flatten()])

    @torch.no_grad()
    def text(self, prompt: str) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("this conditioner has no text encoder; give an image condition")
        ids = self.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.text_encoder(input_ids=ids["input_ids"].to(self.text_encoder.device)).last_hidden_state

    @torch.no_grad()
    def image(self, image: Any) -> torch.Tensor:
        if self.image_encoder is None:
            raise ValueError("this conditioner has no image encoder; give a text condition")
        from PIL import Image

        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        size = self.image_size
        array = np.asarray(picture.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
        mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
        pixels = torch.from_numpy((array - mean) / std).permute(2, 0, 1)[None].to(self.image_encoder.device)
        # TRELLIS layer-normalises (no affine) the PRE-norm output of the last block, not the model's
        # already-normalised last_hidden_state
        features = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        return torch.nn.functional.layer_norm(features, features.shape[-1:])
