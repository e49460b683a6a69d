"""The record/replay mechanism itself, seen where it acts: tests that go red when replay is a no-op.

The preserved-region invariants of the editing pipelines come from their final latent paste and hold
by construction; these tests look under it: what the hooks write into the projections, and whether
turning replay (or ConsistEdit's source -> target copy) off changes the edit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hasten.tiny
import hasten.tiny.trellis as tt
from hasten.hooks.feature_cache import FeatureCache, FeatureCacheConfig
from hasten.hooks.feature_replay import FeatureReplay, ProjectionSite
from hasten.pipelines import ConsistEditPipeline
from hasten.pipelines.masked_kv import MaskedKVEditPipeline
from hasten.pipelines.voxhammer import VoxelEditPipeline, box_mask
from hasten.tiny.motion import photo

EXACT = FeatureCacheConfig(dtype="float32")


# --- the mechanism on one projection ----------------------------------------------------------------------
def test_replay_writes_the_recorded_rows_exactly_and_detach_restores_the_module():
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 6)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    plain = proj(y)
    replay = FeatureReplay(FeatureCache(EXACT), rows=torch.tensor([1, 3]))
    replay.attach([ProjectionSite(0, "kv", proj, lambda out: out[..., 2:])])
    replay.mode, replay.sigma = "record", 0.25
    recorded = proj(x)
    replay.mode = "replay"
    out = proj(y)
    assert replay.recorded == 1 and replay.replayed == 1
    assert torch.equal(out[:, [1, 3], 2:], recorded[:, [1, 3], 2:])  # replayed: the recording, exactly
    assert torch.equal(out[:, [0, 2, 4]], plain[:, [0, 2, 4]])  # other tokens untouched
    assert torch.equal(out[..., :2], plain[..., :2])  # other channels untouched
    replay.sigma = 0.5  # a level never recorded: left alone, and counted as not replayed
    assert torch.equal(proj(y), plain) and replay.replayed == 1
    replay.detach()
    assert torch.equal(proj(y), plain)
    with pytest.raises(ValueError, match="mode"):
        replay.mode = "replayed"


def test_one_recorded_row_broadcasts_and_a_mismatch_is_an_error():
    replay = FeatureReplay(FeatureCache(EXACT))
    replay.sigma, replay.batch_rows = 0.5, [1]
    replay.record(0, "v", torch.arange(12.0).view(3, 2, 2))
    target = torch.zeros(4, 2, 2)
    replay.batch_rows = [0, 2]
    assert replay.replay(0, "v", target)
    assert torch.equal(target[0], torch.arange(4.0, 8.0).view(2, 2)) and torch.equal(target[0], target[2])
    assert not target[1].any() and not target[3].any()
    replay.batch_rows = None
    replay.record(1, "v", torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="cannot replay them into 2 rows"):
        replay.replay(1, "v", torch.zeros(2, 2, 2))


def _no_replay(monkeypatch):
    monkeypatch.setattr(FeatureReplay, "replay", lambda self, layer, kind, features: False)


# --- VoxHammer on TRELLIS-format models -----------------------------------------------------------------
@pytest.fixture(scope="module")
def voxel_editor():
    parts = tt.models()
    return VoxelEditPipeline(parts["flow"], parts["encoder"], parts["decoder"])


def _voxel_case():
    source = np.zeros((32, 32, 32), bool)
    source[8:24, 8:24, 8:24] = True
    cond = torch.randn(1, 4, tt.COND_CHANNELS, generator=torch.Generator().manual_seed(3))
    return source, box_mask(32, [(16, 0, 0, 32, 32, 32)]), cond


def test_voxhammer_replay_changes_the_edit(voxel_editor, monkeypatch):
    source, mask, cond = _voxel_case()
    replayed = voxel_editor.edit(source, mask, cond, num_inference_steps=4, cache=EXACT, progress=False)
    _no_replay(monkeypatch)
    plain = voxel_editor.edit(source, mask, cond, num_inference_steps=4, cache=EXACT, progress=False)
    edited = replayed.edit_cells.flatten()
    difference = (replayed.latent - plain.latent).flatten(2)[..., edited].abs().max()
    # both runs are deterministic fp32 computations from the same inputs: any difference is the replay's
    # (measured 4e-4 on the tiny random TRELLIS, whose regenerated cells attend a few preserved ones)
    assert difference > 1e-5, "replaying the preserved cells' K/V must change the regenerated cells"


def _logged_projections(monkeypatch) -> list[tuple[str, tuple, torch.Tensor]]:
    """(mode, key, the projection's output as attention will see it) for every hooked projection call."""
    log = []
    original = FeatureReplay.__call__

    def logged(self, layer, kind, output, select=lambda out: out):
        out = original(self, layer, kind, output, select)
        log.append((self.mode, self.key(layer, kind), out.detach().clone()))
        return out

    monkeypatch.setattr(FeatureReplay, "__call__", logged)
    return log


def _check_replayed(log, preserved: torch.Tensor, channels: slice) -> None:
    recorded = {key: out for mode, key, out in log if mode == "record"}
    replays = [(key, out) for mode, key, out in log if mode == "replay" and key in recorded]
    assert len(replays) >= len(recorded) // 2, "most recorded levels must be replayed"
    for key, out in replays:  # exact (fp32 cache): attention sees the recording in the preserved tokens
        source = recorded[key]
        rows = source.shape[0] if out.shape[0] == source.shape[0] else 1
        assert torch.equal(
            out[:, preserved, channels], source[:rows, preserved, channels].expand_as(out[:, preserved, channels])
        ), key


def test_voxhammer_replayed_keys_and_values_are_the_recorded_ones(voxel_editor, monkeypatch):
    source, mask, cond = _voxel_case()
    log = _logged_projections(monkeypatch)
    out = voxel_editor.edit(source, mask, cond, num_inference_steps=3, cache=EXACT, progress=False)
    channels = log[0][2].shape[-1] // 3
    _check_replayed(log, (~out.edit_cells).flatten().nonzero()[:, 0], slice(channels, None))
    queries = [out_[..., :channels] for mode, _, out_ in log if mode == "replay"]
    assert not torch.equal(queries[-1], log[0][2][..., :channels])  # the queries stay the edit's own


# --- masked K/V replay on diffusers models ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_masked_kv_replay_writes_the_recorded_features_and_changes_the_edit(kind, monkeypatch):
    editor = MaskedKVEditPipeline.from_pipe(
        hasten.tiny.pipeline(kind), **hasten.tiny.default_size(kind), max_sequence_length=32
    )
    model = editor.model
    mask = np.zeros((model.height, model.width))
    mask[:, : model.width // 2] = 1
    image = photo("chelsea")
    log = _logged_projections(monkeypatch)
    replayed = editor.edit(image, mask, "a photo of a dog", num_inference_steps=3, cache=EXACT, progress=False)
    _check_replayed(
        [(m, k, out[:, -model.tokens :]) for m, k, out in log],
        (~replayed.edit_region.flatten()).nonzero()[:, 0],
        slice(None),
    )
    _no_replay(monkeypatch)
    plain = editor.edit(image, mask, "a photo of a dog", num_inference_steps=3, cache=EXACT, progress=False)
    edited = ~model.latent_keep((~replayed.edit_region.flatten()).float()).bool().expand_as(plain.latents)
    assert (replayed.latents - plain.latents)[edited].abs().max() > 1e-4


# --- ConsistEdit's source -> target copy, without latent blending ----------------------------------------
def test_consistedit_copies_the_sources_values_into_the_preserved_target_tokens():
    editor = ConsistEditPipeline.from_pipe(
        hasten.tiny.pipeline("flux"), **hasten.tiny.default_size("flux"), max_sequence_length=32
    )
    model = editor.model
    mask = np.zeros((model.height, model.width))
    mask[:, : model.width // 2] = 1
    layer = model.pipe.transformer.single_transformer_blocks[-1].attn
    values: list[torch.Tensor] = []
    # no copy: the control (hooked after this one, when the edit starts) edits the same tensor in place
    handle = layer.to_v.register_forward_hook(lambda m, a, out: values.append(out.detach()))
    try:
        out = editor.edit(
            "a red car",
            "a blue bicycle",
            mask=mask,
            alpha=0.0,
            seed=1,
            num_inference_steps=3,
            blend_latents=False,
            progress=False,
        )
    finally:
        handle.remove()
    preserved = ~out.edit_region.flatten()
    edit_calls = [v[:, -model.tokens :] for v in values if v.shape[0] == 2]
    assert edit_calls
    for v in edit_calls:
        assert torch.equal(v[1, preserved], v[0, preserved])  # target = source where preserved
    assert any(not torch.allclose(v[1, ~preserved], v[0, ~preserved]) for v in edit_calls)
    assert not torch.allclose(out.target, out.source, atol=1e-3)  # no paste hides anything: blending is off


# --- cross-frame attention's per-frame features ------------------------------------------------------------
def test_cross_frame_state_holds_at_most_three_frames_and_returns_first_and_previous():
    from hasten.hooks.cross_frame import CrossFrameState

    state = CrossFrameState()
    per_frame = []
    for frame in range(6):
        state.begin_frame(frame)
        for step in range(2):
            state.step = step
            hidden = torch.full((1, 4, 8), float(frame * 10 + step))
            context = state.context("attn1", hidden)
            if frame == 0:
                assert context is None
            elif frame == 1:
                assert torch.equal(context, torch.full((1, 4, 8), float(step)))  # the first frame only
            else:  # first frame, then the previous one, at the same step
                assert torch.equal(context[:, :4], torch.full((1, 4, 8), float(step)))
                assert torch.equal(context[:, 4:], torch.full((1, 4, 8), float((frame - 1) * 10 + step)))
        per_frame.append(state.nbytes)
        state.end_frame()
    one_frame = 2 * 4 * 8 * 4  # two steps of (4, 8) float32
    assert max(per_frame) == 3 * one_frame, "first + previous + current, never more"
    small = CrossFrameState(cache=FeatureCacheConfig(dtype="bfloat16"))
    small.context("attn1", torch.ones(1, 4, 8))
    assert small.nbytes == 4 * 8 * 2
