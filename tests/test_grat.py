"""GRAT on real diffusers pipelines (tiny random-weight models): exact invariants and the public API."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

import hasten
from hasten import tiny
from hasten.hooks.grat import GratAttnProcessor, grat_state
from hasten.measure import compare_grat

FAMILIES = ("flux", "sd3", "hunyuan-video", "wan", "cogvideox")
STEPS = 2


@pytest.fixture(scope="module")
def pipes():
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = tiny.pipeline(kind)
            loaded[kind].set_progress_bar_config(disable=True)
        return loaded[kind]

    return get


def run(pipe, kind, **overrides):
    kwargs = dict(tiny.default_size(kind), prompt="a red fox in the snow", num_inference_steps=STEPS)
    kwargs.update(overrides)
    generator = torch.Generator().manual_seed(0)
    return pipe(**kwargs, generator=generator, output_type="pt", return_dict=False)[0]


@pytest.mark.parametrize("kind", FAMILIES)
def test_full_window_equals_dense_and_disable_restores_bits(pipes, kind):
    pipe = pipes(kind)
    dense = run(pipe, kind)

    config = hasten.enable_grat(pipe, pattern="block", group_size=2, window=64, backend="reference")
    full = run(pipe, kind)
    state = grat_state(pipe)
    grid = state.grid
    group = config.group_size
    # The test resolution gives partial groups along at least one axis.
    assert any(n % g for n, g in zip(grid, group) if g > 1), (grid, group)
    assert (full - dense).abs().max().item() < 1e-5

    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, backend="reference")
    sparse = run(pipe, kind)
    assert max(layout.density for layout in grat_state(pipe).layouts.values()) < 1
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max().item() > 1e-4

    pipe.disable_grat()
    assert grat_state(pipe) is None
    assert torch.equal(run(pipe, kind), dense)


# The prompt that feeds the text tokens of the joint attention; the others (pooled CLIP embeddings,
# which condition image tokens through the time embedding) stay fixed.
TEXT_PROMPT = {"flux": "prompt_2", "sd3": "prompt_3", "hunyuan-video": "prompt", "cogvideox": "prompt"}
FIXED_PROMPTS = {
    "flux": {"prompt": "a fox"},
    "sd3": {"prompt": "a fox", "prompt_2": "a fox"},
    "hunyuan-video": {},
    "cogvideox": {},
}


@pytest.mark.parametrize("kind", sorted(TEXT_PROMPT))
def test_text_tokens_sit_where_the_adapter_says(pipes, kind, monkeypatch):
    """The rows of the first joint attention's query that depend on the text tokens are the text rows
    the adapter names (text first or last), read through the model's real attention processor."""
    pipe = pipes(kind)
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, backend="reference")
    captured = []
    original_attend = GratAttnProcessor.attend

    def recording_attend(self, query, key, value, *args, **kwargs):
        if len(captured) < 1:
            captured.append((query.detach().clone(), grat_state(pipe).layouts[query.shape[-2]]))
        return original_attend(self, query, key, value, *args, **kwargs)

    monkeypatch.setattr(GratAttnProcessor, "attend", recording_attend)
    try:
        fixed = dict(FIXED_PROMPTS[kind])
        if kind == "hunyuan-video":
            # diffusers 0.42 encodes HunyuanVideo's pooled CLIP text from `prompt`, ignoring `prompt_2`:
            # pin the pooled embedding instead.
            fixed["pooled_prompt_embeds"] = torch.zeros(1, pipe.transformer.config.pooled_projection_dim)
        run(pipe, kind, num_inference_steps=1, **fixed, **{TEXT_PROMPT[kind]: "a red fox in the snow"})
        first, layout = captured.pop()
        run(pipe, kind, num_inference_steps=1, **fixed, **{TEXT_PROMPT[kind]: "blue whales under a frozen sea"})
        second, _ = captured.pop()
    finally:
        pipe.disable_grat()
    changed = (first - second).abs().amax(dim=(0, 1, 3)) > 0
    num_text = layout.num_text
    assert num_text > 0
    text_rows = torch.zeros_like(changed)
    if layout.text_first:
        text_rows[:num_text] = True
    else:
        text_rows[-num_text:] = True
    # Every text row depends on the prompt (padded text rows may not: allow those), no image row does.
    assert not changed[~text_rows].any(), f"{kind}: image rows depend on the prompt -> text order is wrong"
    assert changed[text_rows].any()


def test_flex_backend_in_a_pipeline(pipes):
    pipe = pipes("flux")
    dense = run(pipe, "flux")
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=64, backend="flex")
    try:
        assert (run(pipe, "flux") - dense).abs().max().item() < 1e-5
    finally:
        pipe.disable_grat()


def test_grid_smaller_than_one_group(pipes):
    # Default Flux groups are 16x16 latent tokens; the tiny grid is smaller: one partial group.
    pipe = pipes("flux")
    dense = run(pipe, "flux")
    config = pipe.enable_grat(backend="reference")
    try:
        assert config.group_size == (1, 16, 16)
        assert (run(pipe, "flux") - dense).abs().max().item() < 1e-5
    finally:
        pipe.disable_grat()


def test_dense_steps_and_dense_blocks_stay_exactly_dense(pipes):
    pipe = pipes("flux")
    dense = run(pipe, "flux")
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, dense_steps=STEPS, backend="reference")
    assert torch.equal(run(pipe, "flux"), dense)
    blocks = hasten.adapters.adapter_for(pipe.transformer).num_blocks(pipe.transformer)
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, dense_blocks=range(blocks), backend="reference")
    assert torch.equal(run(pipe, "flux"), dense)
    # One dense step of two: differs from dense, and from all-sparse.
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, dense_steps=1, backend="reference")
    half = run(pipe, "flux")
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, backend="reference")
    sparse = run(pipe, "flux")
    pipe.disable_grat()
    assert not torch.equal(half, dense) and not torch.equal(half, sparse)


def test_enable_touches_no_weights(pipes):
    pipe = pipes("sd3")
    before = {name: (p.data_ptr(), p.clone()) for name, p in pipe.transformer.named_parameters()}
    pipe.enable_grat(backend="reference")
    run(pipe, "sd3")
    pipe.disable_grat()
    for name, p in pipe.transformer.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name


def test_composes_with_first_block_cache():
    dense_pipe, grat_pipe = tiny.pipeline("flux"), tiny.pipeline("flux")
    for pipe in (dense_pipe, grat_pipe):
        pipe.set_progress_bar_config(disable=True)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
    hasten.enable_grat(grat_pipe, pattern="block", group_size=2, window=64, backend="reference")
    out = run(grat_pipe, "flux", num_inference_steps=4)
    assert (out - run(dense_pipe, "flux", num_inference_steps=4)).abs().max().item() < 1e-5
    grat_pipe.disable_grat()


def test_torch_compile_does_not_recompile_every_step():
    import torch._dynamo.testing

    torch._dynamo.reset()
    pipe = tiny.pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    hasten.enable_grat(pipe, pattern="block", group_size=2, window=1, dense_steps=1, backend="reference")
    eager = run(pipe, "flux", num_inference_steps=4)
    counter = torch._dynamo.testing.CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    compiled = run(pipe, "flux", num_inference_steps=4)
    first_run = counter.frame_count
    run(pipe, "flux", num_inference_steps=4)
    warmed_up = counter.frame_count
    run(pipe, "flux", num_inference_steps=4)
    # Compilation is per variant (dense step / sparse step), not per step: at most one more
    # round when the dense first step comes again after sparse steps, then nothing new.
    assert warmed_up - first_run <= first_run
    assert counter.frame_count == warmed_up
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", FAMILIES)
def test_grat_x_by_bands_equals_the_gathered_reference_in_a_pipeline(pipes, kind, monkeypatch):
    """The CPU default for GRAT-X (bands, "auto"; images and videos) gives the pipeline output of the
    gathered reference backend, and both differ from dense (the pattern is sparse at this size)."""
    from hasten.kernels import bands

    calls = []
    original = bands.band_cross_attention
    monkeypatch.setattr(bands, "band_cross_attention", lambda *args: calls.append(1) or original(*args))
    pipe = pipes(kind)
    dense = run(pipe, kind)
    hasten.enable_grat(pipe, pattern="cross", group_size=2, backend="reference")
    reference = run(pipe, kind)
    hasten.enable_grat(pipe, pattern="cross", group_size=2, backend="auto")
    banded = run(pipe, kind)
    assert calls  # "auto" ran the bands on CPU
    assert max(layout.density for layout in grat_state(pipe).layouts.values()) < 1
    pipe.disable_grat()
    torch.testing.assert_close(banded, reference, atol=1e-5, rtol=1e-4)
    assert (reference - dense).abs().max().item() > 1e-4


def test_compare_grat_reports_times_psnr_density(pipes):
    pipe = pipes("flux")
    kwargs = dict(tiny.default_size("flux"), prompt="a fox", num_inference_steps=STEPS)
    result = compare_grat(
        pipe, hasten.GratConfig(pattern="cross", group_size=2, backend="reference"), warmup=False, **kwargs
    )
    assert result.dense.shape == result.grat.shape
    assert result.dense_seconds > 0 and result.grat_seconds > 0 and 0 < result.density < 1
    assert 0 < result.psnr < float("inf")
    assert "speedup" in result.summary() and "PSNR" in result.summary()
    assert grat_state(pipe) is None  # left as found


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group_size=0), "group_size"),
        (dict(group_size=(4, -1)), "group_size"),
        (dict(window=0), "window"),
        (dict(pattern="diagonal"), "pattern"),
        (dict(backend="cudnn"), "backend"),
        (dict(backend="windows"), "backend"),  # the windows compute GRAT-B; the default pattern is GRAT-X
        (dict(pattern="block", backend="bands"), "backend"),
        (dict(dense_steps=-1), "dense_steps"),
        (dict(dense_blocks=(999,)), "dense_blocks"),
        (dict(group_size=(2, 2, 2)), "group_size"),  # (t, h, w) with t > 1 on an image model
    ],
)
def test_bad_config_names_the_argument(pipes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hasten.enable_grat(pipes("flux"), **kwargs)
    assert grat_state(pipes("flux")) is None


def test_video_group_needs_three_axes(pipes):
    with pytest.raises(ValueError, match=r"\(t, h, w\)"):
        hasten.enable_grat(pipes("wan"), group_size=(8, 8))


def test_unsupported_models_list_supported_classes(pipes):
    with pytest.raises(ValueError, match="transformer"):
        hasten.enable_grat(tiny.pipeline("sd15"))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        hasten.enable_grat(torch.nn.Linear(2, 2))


def test_lora_keeps_working_under_grat():
    """GRAT wraps the model's own processor, so LoRA-adapted projections are what it attends with."""
    from peft import LoraConfig

    pipe = tiny.pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with_lora = run(pipe, "flux")
    pipe.transformer.disable_adapters()
    without_lora = run(pipe, "flux")
    pipe.transformer.enable_adapters()
    assert (with_lora - without_lora).abs().max().item() > 1e-3  # the adapter does something

    hasten.enable_grat(pipe, pattern="block", group_size=2, window=64, backend="reference")
    assert (run(pipe, "flux") - with_lora).abs().max().item() < 1e-5
    pipe.disable_grat()


def test_processor_without_sdpa_call_fails_loudly():
    """A processor routed to a non-native attention backend would silently stay dense: GRAT says so."""
    from hasten.hooks.grat import GratState

    def not_sdpa(attn, hidden_states):
        return hidden_states * 2

    processor = GratAttnProcessor(not_sdpa, GratState(), "reference")
    with pytest.raises(ValueError, match="native attention backend"):
        processor(None, torch.ones(1, 4, 8))


def test_attention_masks_that_are_not_key_padding_are_refused():
    from hasten.hooks.grat import _key_padding

    assert _key_padding(torch.tensor([[[[0.0, float("-inf"), 0.0]]]]), 3).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="attn_mask"):
        _key_padding(torch.ones(1, 1, 3, 3, dtype=torch.bool), 3)
