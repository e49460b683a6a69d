"""The front door: ``hasten.apply`` / ``hasten.remove`` for every method, on the tiny models.

Per method: (1) the output before; (2) with the method applied, an observable that goes red if
apply became a no-op; (3) after ``remove`` (and after leaving a ``with`` block) bit-identical
outputs and the model's own modules, processors, hooks and forwards (:func:`_fingerprint`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hasten
from hasten import tiny
from hasten.hooks.consistedit import ConsistEditConfig, edit_layers
from hasten.hooks.cross_frame import (
    CrossFrameAttnProcessor,
    CrossFrameConfig,
    CrossFrameState,
    FrameClock,
    cross_frame_state,
)
from hasten.hooks.grat import remove_grat
from hasten.pipelines.sjd import SJDConfig
from hasten.speculative import DraftModel, SpecVLM
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import GUIKV, FastV, HiRED, MustDrop, RandomKeep, SpatialPool, ZipVL
from hasten.token_pruning.core import cache_bytes
from hasten.transformers_conventions import output_cache


def _fingerprint(model: torch.nn.Module) -> list:
    """What a method could leave behind on a model: per module its instance attributes (a patched
    ``forward`` or ``get_image_features``, a hook registry), its hook counts, its attention processor
    object, and its config's attributes (a registered attention function)."""
    rows = []
    for name, module in model.named_modules():
        hooks = tuple(len(getattr(module, attr)) for attr in vars(module) if attr.endswith("_hooks"))
        config = getattr(module, "config", None)
        rows.append(
            (
                name,
                sorted(vars(module)),
                hooks,
                id(getattr(module, "processor", None)),
                sorted(vars(config)) if hasattr(config, "__dict__") else None,
                getattr(config, "_attn_implementation", None),
            )
        )
    return rows


# --- GRAT -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    pipe = tiny.pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_of(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt="a red fox",
        num_inference_steps=1,
        **tiny.default_size("flux"),
        generator=generator,
        output_type="pt",
        return_dict=False,
    )[0]


def _processor_classes(transformer) -> set[str]:
    return {type(p).__name__ for p in transformer.attn_processors.values()}


def test_grat_through_the_front_door(flux):
    transformer = flux.transformer
    before, fingerprint, processors = _image_of(flux), _fingerprint(transformer), _processor_classes(transformer)
    config = hasten.GratConfig(pattern="block", group_size=2, window=1, backend="reference")

    handle = hasten.apply(flux, config)
    assert handle.target is flux and handle.module is transformer and handle.config.group_size == (1, 2, 2)
    assert _processor_classes(transformer) == {"GratAttnProcessor"}
    sparse = _image_of(flux)
    assert (sparse - before).abs().max() > 1e-4  # a 3x3 group neighbourhood is not dense attention
    assert hasten.applied(flux) == [handle] == hasten.applied(transformer)
    hasten.remove(flux)
    assert not handle.active and hasten.applied(flux) == []
    assert _fingerprint(transformer) == fingerprint and _processor_classes(transformer) == processors
    assert torch.equal(_image_of(flux), before)

    with hasten.apply(transformer, config) as handle:  # the transformer itself, as a context manager
        assert torch.equal(_image_of(flux), sparse)
    assert not handle.active and _fingerprint(transformer) == fingerprint
    assert torch.equal(_image_of(flux), before)


def test_grat_spellings_share_the_front_door(flux):
    transformer = flux.transformer
    fingerprint = _fingerprint(transformer)
    in_effect = flux.enable_grat(group_size=4)
    assert [h.config for h in hasten.applied(flux)] == [in_effect]
    replaced = hasten.apply(flux, hasten.GratConfig(pattern="block", group_size=2))  # replaces, never stacks
    assert hasten.applied(flux) == [replaced]
    assert all(type(p.original).__name__ != "GratAttnProcessor" for p in transformer.attn_processors.values())
    flux.disable_grat()
    assert _fingerprint(transformer) == fingerprint
    with pytest.raises(ValueError, match="GRAT is not applied"):
        flux.disable_grat()
    remove_grat(flux)  # the low-level spelling stays a no-op when GRAT is off
    compiled = torch.compile(transformer)  # compiles on its first call only; GRAT changes the module inside
    fingerprint = _fingerprint(transformer)  # torch.compile marks the module it wraps
    handle = hasten.apply(compiled, hasten.GratConfig(group_size=4))
    assert handle.module is transformer and hasten.applied(compiled) == [handle] == hasten.applied(flux)
    hasten.remove(compiled)
    assert _fingerprint(transformer) == fingerprint
    del transformer._is_torch_compile  # torch.compile's mark, not GRAT's: the module-scoped pipeline stays plain


def test_a_failed_replacement_leaves_the_method_off(flux):
    handle = hasten.apply(flux, hasten.GratConfig(group_size=4))
    with pytest.raises(ValueError, match="dense_blocks"):  # checked before anything changes
        hasten.apply(flux, hasten.GratConfig(dense_blocks=(999,)))
    assert handle.active and hasten.applied(flux) == [handle]
    handle.remove()
    handle.remove()  # twice: a no-op
    with pytest.raises(ValueError, match="already removed"):
        hasten.remove(flux, handle)


# --- ConsistEdit's attention control ---------------------------------------------------------------


def test_consistedit_control_through_the_front_door(flux):
    transformer, size = flux.transformer, tiny.default_size("flux")
    height, width = size["height"], size["width"]
    noise = flux.prepare_latents(
        1, transformer.config.in_channels // 4, height, width, torch.float32, "cpu", torch.Generator().manual_seed(0)
    )[0]

    def edit_call():  # source and target from one noise, as ConsistEdit's synthetic mode runs them
        return flux(
            prompt=["a red cat", "a blue dog"],
            latents=noise.repeat(2, 1, 1),
            num_inference_steps=2,
            **size,
            output_type="pt",
            return_dict=False,
        )[0]

    before, fingerprint = edit_call(), _fingerprint(transformer)
    rows, cols = height // 4, width // 4  # this tiny Flux: 4 pixels per token
    tokens = rows * cols
    mask = np.zeros((height, width), bool)
    mask[:, width // 2 :] = True  # edit the right half: token columns 7.. ; columns ..5 are kept (6 straddles)
    layer = edit_layers(transformer)[0][0]  # the first attention layer the control owns (a single-stream block)
    seen = []
    with hasten.apply(flux, ConsistEditConfig(mask, alpha=0.5, num_inference_steps=2)) as handle:
        assert handle.module is transformer
        observers = [
            getattr(layer, f"to_{kind}").register_forward_hook(
                lambda module, args, out, kind=kind: seen.append((kind, out[:, -tokens:].unflatten(1, (rows, cols))))
            )
            for kind in ("q", "v")
        ]  # registered after the control: they see what attention gets
        edited = edit_call()
        for observer in observers:
            observer.remove()
    (q0, v0), (q1, v1) = [(seen[i][1], seen[i + 1][1]) for i in (0, 2)]  # step 0, step 1 (q first, then v)
    kept, changed = (slice(None), slice(0, 6)), (slice(None), slice(7, None))
    for v in (v0, v1):  # V: the source's in the kept region at every step, the target's own in the edit region
        assert torch.equal(v[1][kept], v[0][kept]) and not torch.equal(v[1][changed], v[0][changed])
    assert torch.equal(q0[1], q0[0])  # Q: the source's everywhere while step < alpha * steps = 1 ...
    # ... then in the kept region only
    assert torch.equal(q1[1][kept], q1[0][kept]) and not torch.equal(q1[1][changed], q1[0][changed])
    assert not torch.equal(edited[1], before[1]) and torch.equal(edited[0], before[0])  # the source row is untouched
    assert _fingerprint(transformer) == fingerprint
    assert torch.equal(edit_call(), before)
    with pytest.raises(ValueError, match="source and target rows"), hasten.apply(flux, ConsistEditConfig(mask)):
        _image_of(flux)
    assert hasten.applied(flux) == [] and _fingerprint(transformer) == fingerprint
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConsistEditConfig(mask, alpha=0.5)


# --- token pruning ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny.vlm("llava")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[chat_prompt(processor, "What is here?")], return_tensors="pt")
    with torch.no_grad():  # transformers installs its own output-capturing hooks (for good) on first request
        model(**inputs, output_attentions=True, output_hidden_states=True)
        model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    return model, inputs


def _prefill(model, inputs) -> tuple[torch.Tensor, int]:
    """The prompt's last logits and the bytes of keys and values the cache holds after the prefill."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out.logits[:, -1], cache_bytes(output_cache(out))


PRUNERS = {
    "HiRED": lambda: HiRED(budget=0.25),
    "MustDrop": lambda: MustDrop(budget=0.1, key_fraction=0.25, layers=(1,), cap_budget=True),
    "FastV": lambda: FastV(budget=0.25, layer=1),
    "ZipVL": lambda: ZipVL(),
    "GUIKV": lambda: GUIKV(budget=0.25),
    "RandomKeep": lambda: RandomKeep(budget=0.25, seed=0),
    "SpatialPool": lambda: SpatialPool(budget=0.25),
}


@pytest.mark.parametrize("name", PRUNERS)
def test_token_pruning_through_the_front_door(llava, name):
    model, inputs = llava
    fingerprint = _fingerprint(model)
    logits, dense_bytes = _prefill(model, inputs)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)

    pruner = PRUNERS[name]()
    handle = hasten.apply(model, pruner)
    assert handle.config is pruner and handle.method.name == "token pruning"
    assert _fingerprint(model) != fingerprint
    pruned_logits, pruned_bytes = _prefill(model, inputs)
    # a no-op apply changes neither: every method keeps fewer (or fewer-bit) keys and values, or
    # (dropping before the last layers) changes what the prompt's last token sees
    assert pruned_bytes < dense_bytes or not torch.equal(pruned_logits, logits)
    hasten.remove(model, pruner)
    assert _fingerprint(model) == fingerprint
    after, after_bytes = _prefill(model, inputs)
    assert torch.equal(after, logits) and after_bytes == dense_bytes
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), greedy)

    with PRUNERS[name]().apply(model) as same:  # the familiar spelling: the same front door
        assert hasten.applied(model)[0].config is same
        assert torch.equal(_prefill(model, inputs)[0], pruned_logits)
    assert _fingerprint(model) == fingerprint and hasten.applied(model) == []
    assert torch.equal(_prefill(model, inputs)[0], logits)


def test_one_pruner_per_model_and_the_same_pruner_twice(llava):
    model, _ = llava
    fingerprint = _fingerprint(model)
    first = RandomKeep(budget=0.5).attach(model)
    second = hasten.apply(model, HiRED(budget=0.5))
    assert first._model is None and [h.config for h in hasten.applied(model)] == [second.config]
    with pytest.raises(ValueError, match="already attached"):
        hasten.apply(model, second.config)
    second.config.detach()
    first.detach()  # not attached any more: a no-op
    assert _fingerprint(model) == fingerprint


# --- cross-frame attention -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    pipe = tiny.pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frame(pipe, prompt: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt=prompt,
        num_inference_steps=1,
        **tiny.default_size("sd15"),
        generator=generator,
        output_type="pt",
        return_dict=False,
    )[0]


def test_cross_frame_attention_through_the_front_door(sd15):
    unet = sd15.unet
    first, second = _frame(sd15, "a cat", 0), _frame(sd15, "a dog", 1)
    fingerprint = _fingerprint(unet)
    attention = next(m for name, m in unet.named_modules() if name.endswith("attn1"))
    inputs: dict[str, list[torch.Tensor]] = {"q": [], "k": []}  # what this layer's query / key projections read
    observers = [
        getattr(attention, f"to_{kind}").register_forward_hook(
            lambda module, args, out, kind=kind: inputs[kind].append(args[0].clone())
        )
        for kind in inputs
    ]
    try:
        with hasten.apply(sd15, CrossFrameConfig()) as handle:
            assert handle.module is unet
            wrapped = {name for name, p in unet.attn_processors.items() if isinstance(p, CrossFrameAttnProcessor)}
            assert wrapped == {name for name in unet.attn_processors if name.endswith("attn1.processor")}
            assert torch.equal(_frame(sd15, "a cat", 0), first)  # frame 0 attends only itself: the plain call
            anchored = _frame(sd15, "a dog", 1)
            assert cross_frame_state(sd15).frame == 1
    finally:
        for observer in observers:
            observer.remove()
    (q0, q1), (k0, k1) = inputs["q"], inputs["k"]  # one UNet call per frame (one step)
    assert torch.equal(k0, q0)  # frame 0: keys from its own hidden states
    assert torch.equal(k1, q0) and not torch.equal(q1, q0)  # frame 1: keys (and values) from frame 0's
    assert not torch.equal(anchored, second)
    assert _fingerprint(unet) == fingerprint and cross_frame_state(sd15) is None
    assert torch.equal(_frame(sd15, "a dog", 1), second)
    config = CrossFrameConfig()
    old = hasten.apply(sd15, config)
    new = hasten.apply(unet, config)  # a frozen config applied again: replaces (a new video)
    assert not old.active and hasten.applied(sd15) == [new]
    hasten.remove(sd15)
    assert _fingerprint(unet) == fingerprint


def test_frame_clock_starts_a_frame_per_pipeline_call():
    state = CrossFrameState()
    clock = FrameClock(state)
    seen = []
    # two calls of a PNDM-like schedule (an inner timestep evaluated twice), then two one-step calls
    for timesteps in ([501, 1, 1], [501, 1, 1], [7], [7]):
        for t in timesteps:
            clock(None, (None, torch.tensor(t)), {})
            seen.append((state.frame, state.step))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (3, 0)]


# --- SpecVLM ----------------------------------------------------------------------------------------


def test_specvlm_makes_generate_speculative_until_removed(llava):
    model, inputs = llava
    fingerprint = _fingerprint(model)
    passes: list[int] = []  # tokens each target forward runs

    def count(module, args, kwargs):
        tokens = kwargs.get("input_ids")
        passes.append((tokens if tokens is not None else kwargs["inputs_embeds"]).shape[1])

    counter = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        plain, passes[:] = list(passes), []
        spec = SpecVLM(DraftModel.for_target(model), tree=None, depth=3)
        with hasten.apply(model, spec):
            assert torch.equal(model.generate(**inputs, max_new_tokens=8), greedy)  # lossless for greedy
            speculative, passes[:] = list(passes), []
            with pytest.raises(ValueError, match="`do_sample`"):
                model.generate(**inputs, max_new_tokens=8, do_sample=True)
            with pytest.raises(ValueError, match="`num_beams`"):
                model.generate(**inputs, max_new_tokens=8, num_beams=2)
        after = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        counter.remove()
    assert plain[1:] == [1] * 7  # generate: one token per pass after the prefill
    assert max(speculative[1:]) == 4 and len(speculative) == spec.stats.target_forwards  # verify 1 + 3 drafts a pass
    assert torch.equal(after, greedy) and passes == plain
    assert _fingerprint(model) == fingerprint and "generate" not in vars(model)
    first = hasten.apply(model, spec)
    second = hasten.apply(model, SpecVLM(spec.draft, tree=None))  # another SpecVLM replaces the first
    assert not first.active and hasten.applied(model) == [second] and model.generate.specvlm is second.config
    hasten.remove(model, second)
    assert _fingerprint(model) == fingerprint


# --- SJD --------------------------------------------------------------------------------------------


def test_sjd_is_a_pipeline_and_apply_says_so():
    model, _ = tiny.ar_image_model("janus")
    with pytest.raises(ValueError, match=r"SJDPipeline\(model, processor\)"):
        hasten.apply(model, SJDConfig())
    assert hasten.applied(model) == []


# --- errors -----------------------------------------------------------------------------------------


def test_bad_config_and_removing_nothing_raise_clearly(flux, llava):
    model, _ = llava
    for bad in ("grat", None, 0.2, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="`config` must be a method config"):
            hasten.apply(flux, bad)
    with pytest.raises(TypeError, match="not the class"):
        hasten.apply(flux, hasten.GratConfig)
    with pytest.raises(ValueError, match="no method is applied to this FluxPipeline"):
        hasten.remove(flux)
    with pytest.raises(ValueError, match="token pruning is not applied"):
        hasten.remove(model, HiRED)
    with pytest.raises(ValueError, match="no `transformer`"):
        hasten.apply(tiny.pipeline("sd15"), hasten.GratConfig())
    with pytest.raises(ValueError, match="torch module"):
        hasten.apply(flux, HiRED(budget=0.5))
    assert hasten.applied(flux) == [] and hasten.applied(model) == []
