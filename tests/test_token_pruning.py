"""Token pruning core: exact invariants on the four tiny VLMs (SDPA), batches, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hasten import tiny
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import HiRED, MustDrop, RandomKeep, SpatialPool
from hasten.transformers_conventions import output_cache


def _image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=tiny.VLM_KINDS)
def vlm(request):
    model, processor = tiny.vlm(request.param, dtype=torch.float64)
    return request.param, model, processor


def _inputs(processor, images, questions):
    return processor(
        images=images, text=[chat_prompt(processor, q) for q in questions], return_tensors="pt", padding=True
    )


def _methods(kind, budget):
    methods = [RandomKeep(budget=budget, seed=3)]
    if kind != "llava-next":
        methods.append(SpatialPool(budget=budget))
    methods.append(HiRED(budget=budget))
    return methods


@pytest.mark.parametrize("budget", [1.0])
def test_full_budget_is_the_unpruned_model(vlm, budget):
    kind, model, processor = vlm
    inputs = _inputs(processor, [_image(0)], ["What is in the picture?"])
    with torch.no_grad():
        reference = model(**inputs).logits
    greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for method in [*_methods(kind, budget), MustDrop(budget=budget, layers=(1,))]:
        with method.apply(model), torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference), type(method).__name__
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), greedy)
        assert method.stats.visual_tokens_kept == method.stats.visual_tokens_in
    with torch.no_grad():  # detached: the exact original model again
        assert torch.equal(model(**inputs).logits, reference)


def _masked_reference(model, inputs, dropped: torch.Tensor, kind: str):
    """The unpruned model with the dropped tokens masked out of attention, original positions kept."""
    kwargs = dict(inputs)
    mask = kwargs["attention_mask"].clone()
    if kind.startswith("qwen"):
        positions, _ = model.model.get_rope_index(
            kwargs["input_ids"],
            image_grid_thw=kwargs["image_grid_thw"],
            attention_mask=mask,
            mm_token_type_ids=kwargs["mm_token_type_ids"],
        )
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs["attention_mask"] = mask.masked_fill(dropped, 0)
    kwargs["position_ids"] = positions
    with torch.no_grad():
        return model(**kwargs).logits


def _dropped_positions(method, inputs, model):
    """Which prompt positions the method dropped, from its public stats (one flag per visual token)."""
    image = inputs["input_ids"] == model.config.image_token_id
    dropped = torch.zeros_like(image)
    for row, kept in enumerate(method.stats.visual_kept_mask):
        dropped[row, image[row].nonzero()[:, 0][~kept]] = True
    return dropped


def _kept_positions(method, inputs, model, row: int = 0):
    """The prompt positions the method kept in sample ``row`` (ascending)."""
    return (~_dropped_positions(method, inputs, model)[row]).nonzero()[:, 0]


def test_pruning_equals_masking_with_original_positions(vlm):
    """Dropping tokens == masking them out of attention, when every other position stays the same.

    Checks the prefill logits of every kept token and, through generate(), the logits of each
    decoding step against a teacher-forced run of the masked unpruned model.
    """
    kind, model, processor = vlm
    inputs = _inputs(processor, [_image(1)], ["Describe the picture."])
    for method in _methods(kind, 0.3):
        if isinstance(method, SpatialPool):
            continue  # pooling also replaces embeddings; masking alone cannot reproduce it
        with method.apply(model):
            with torch.no_grad():
                pruned = model(**inputs).logits
            dropped = _dropped_positions(method, inputs, model)
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        reference = _masked_reference(model, inputs, dropped, kind)
        kept = (~dropped)[0]
        torch.testing.assert_close(pruned[0], reference[0, kept], rtol=1e-7, atol=1e-7)
        # Decoding: feed prompt + generated tokens, still masking the dropped prompt tokens.
        full = dict(inputs)
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        full["input_ids"] = out.sequences[:, :-1]
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, :-1])], 1)
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated[:, :-1])], 1)
        dropped_full = torch.cat([dropped, torch.zeros_like(generated[:, :-1], dtype=torch.bool)], 1)
        teacher = _masked_reference(model, full, dropped_full, kind)
        length = inputs["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[0].double(), teacher[0, length - 1 + step], rtol=1e-5, atol=1e-5)


def test_kept_counts_follow_the_budget_and_only_visual_tokens_go(vlm):
    kind, model, processor = vlm
    inputs = _inputs(processor, [_image(2)], ["What is this?"])
    image_id = model.config.image_token_id
    for method in _methods(kind, 0.25):
        with method.apply(model), torch.no_grad():
            model(**inputs)
        stats = method.stats
        n = stats.visual_tokens_in[0]
        if isinstance(method, SpatialPool):
            assert stats.visual_tokens_kept[0] <= 0.25 * n
        elif isinstance(method, HiRED) and kind == "llava-next":  # over (k + 1) partitions of patches
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            vision = model.config.vision_config
            partitions = image_size_to_num_patches(
                image_size=inputs["image_sizes"][0].tolist(),
                grid_pinpoints=model.config.image_grid_pinpoints,
                patch_size=vision.image_size,
            )
            side = vision.image_size // vision.patch_size
            assert stats.visual_tokens_kept[0] == int(0.25 * partitions * side * side)
        else:
            assert stats.visual_tokens_kept[0] == max(1, int(0.25 * n))
        dropped = _dropped_positions(method, inputs, model)
        assert bool((inputs["input_ids"][dropped] == image_id).all()), "only image tokens may be dropped"
        assert stats.prefill_tokens == stats.prompt_tokens - (n - stats.visual_tokens_kept[0])
        assert stats.kv_cache_bytes > 0


@pytest.mark.parametrize("method_name", ["random", "fastv"])
def test_batch_of_two_matches_each_alone(vlm, method_name):
    """Left padding and different images: each sample's result equals running it alone."""
    from hasten.token_pruning import FastV

    kind, model, processor = vlm
    images, questions = [_image(3), _image(4, 40, 40)], ["What is in the picture?", "Describe it in detail."]
    # RandomKeep draws per image in batch order: image i alone is image 0, so seed i + 1 matches.
    make = {"random": lambda i: RandomKeep(budget=0.3, seed=1 + i), "fastv": lambda i: FastV(budget=0.3, layer=1)}
    with make[method_name](0).apply(model) as method:
        batch = _inputs(processor, images, questions)
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = list(method.stats.visual_tokens_kept)
    for i in range(2):
        with make[method_name](i).apply(model) as method:
            alone = _inputs(processor, [images[i]], [questions[i]])
            single = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(together[i], single[0]), (kind, i)
        assert method.stats.visual_tokens_kept == [kept_together[i]]


def test_qwen_kept_tokens_keep_their_mrope_positions():
    model, processor = tiny.vlm("qwen2-vl")
    inputs = _inputs(processor, [_image(5)], ["Where is it?"])
    original, _ = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    seen = {}

    def record(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    method = RandomKeep(budget=0.25)
    with method.apply(model), torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)  # after pruning
        try:
            model(**inputs)
        finally:
            handle.remove()
    columns = _kept_positions(method, inputs, model)
    torch.testing.assert_close(seen["positions"][-3:, 0], original[-3:, 0, columns])


def test_spatial_pool_merges_windows_at_top_left_positions():
    model, processor = tiny.vlm("llava")
    inputs = _inputs(processor, [_image(6)], ["What?"])
    method = SpatialPool(budget=0.25)  # 8 x 8 grid -> 2 x 2 windows -> 16 tokens
    with method.apply(model), torch.no_grad():
        model(**inputs)
    assert method.stats.visual_tokens_kept == [16]
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    kept = _kept_positions(method, inputs, model)
    kept_image = kept[torch.isin(kept, image_positions)] - image_positions[0]
    assert kept_image.tolist() == [r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)]


def test_hired_keeps_the_top_cls_attention_patches():
    """HiRED's q/k-hook scores equal the vision tower's own (eager) attention weights."""
    model, processor = tiny.vlm("llava", attn_implementation="eager")
    inputs = _inputs(processor, [_image(7)], ["What?"])
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = model.config.vision_feature_layer % (len(vision.attentions) + 1) - 1
    cls_attention = vision.attentions[layer][0, :, 0, 1:].sum(0)
    method = HiRED(budget=0.25)
    with method.apply(model), torch.no_grad():
        model(**inputs)
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    kept = _kept_positions(method, inputs, model)
    kept_image = (kept[torch.isin(kept, image_positions)] - image_positions[0]).sort().values
    expected = cls_attention.topk(16).indices.sort().values
    assert torch.equal(kept_image, expected)


def test_inputs_without_images_are_a_no_op():
    model, processor = tiny.vlm("llava")
    inputs = processor.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
        with RandomKeep(budget=0.2).apply(model) as method:
            assert torch.equal(model(**inputs).logits, reference)
    assert method.stats.visual_tokens_in == [0] and method.stats.visual_tokens_kept == [0]


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, True])
def test_budget_must_be_a_fraction(budget):
    with pytest.raises(ValueError, match="budget"):
        RandomKeep(budget=budget)


def test_unsupported_model_and_method_combinations():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        RandomKeep(budget=0.5).attach(text_only)
    qwen, _ = tiny.vlm("qwen2-vl")
    with pytest.raises(ValueError, match="renumber"):
        RandomKeep(budget=0.5, renumber=True).attach(qwen)
    next_model, next_processor = tiny.vlm("llava-next")
    inputs = _inputs(next_processor, [_image(8)], ["What?"])
    with SpatialPool(budget=0.5).apply(next_model), pytest.raises(ValueError, match="grid"):
        next_model(**inputs)
    method = RandomKeep(budget=0.5).attach(qwen)
    with pytest.raises(ValueError, match="already attached"):
        method.attach(qwen)
    method.detach()


# --- in-LLM stage (FastV) -------------------------------------------------------------------------


def _masked_after_layer(model, inputs, kept: torch.Tensor, layer: int):
    """Reference: the unpruned model whose layers after `layer` cannot attend the dropped tokens."""
    layers = model.model.language_model.layers

    def mask_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = (causal & kept[None, :n]) | torch.eye(n, dtype=torch.bool)
        kwargs["attention_mask"] = torch.zeros(1, 1, n, n, dtype=hidden.dtype).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min
        )
        return args, kwargs

    handles = [block.register_forward_pre_hook(mask_hook, with_kwargs=True) for block in layers[layer + 1 :]]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


def test_fastv_equals_masking_the_dropped_tokens_after_its_layer(vlm):
    from hasten.token_pruning import FastV

    kind, model, processor = vlm
    inputs = _inputs(processor, [_image(9)], ["Describe the picture."])
    method = FastV(budget=0.4, layer=1)
    with method.apply(model):
        with torch.no_grad():
            pruned = model(**inputs).logits
        columns = _kept_positions(method, inputs, model)
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    n = method.stats.visual_tokens_in[0]
    assert method.stats.visual_tokens_kept == [max(1, int(0.4 * n))]
    length = inputs["input_ids"].shape[1]
    kept = torch.zeros(length, dtype=torch.bool)
    kept[columns] = True
    image_id = model.config.image_token_id
    assert bool((inputs["input_ids"][0][~kept] == image_id).all())
    reference = _masked_after_layer(model, inputs, kept, 1)
    torch.testing.assert_close(pruned[0], reference[0, kept], rtol=1e-7, atol=1e-7)
    # Decoding steps against the teacher-forced reference over prompt + generated tokens.
    generated = out.sequences[:, length:]
    full = dict(inputs)
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated[:, :-1])], 1)
    teacher = _masked_after_layer(
        model, full, torch.cat([kept, torch.ones(generated.shape[1] - 1, dtype=torch.bool)]), 1
    )
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0].double(), teacher[0, length - 1 + step], rtol=1e-5, atol=1e-5)


def test_fastv_full_budget_detach_and_errors():
    from hasten.token_pruning import FastV

    model, processor = tiny.vlm("llava")
    inputs = _inputs(processor, [_image(10)], ["What?"])
    with torch.no_grad():
        reference = model(**inputs).logits
        with FastV(budget=1.0, layer=1).apply(model):
            assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model(**inputs).logits, reference)
    assert model.model.language_model.config._attn_implementation == "sdpa"
    layers = len(model.model.language_model.layers)
    with pytest.raises(ValueError, match="layer"):
        FastV(layer=layers - 1).attach(model)
    with pytest.raises(ValueError, match="layer"):
        FastV(layer=-1).attach(model)


# --- HiRED on anyres partitions ------------------------------------------------------------------


class _PlantedCLS:
    """Stands in for the recorded CLS attention: (vision rows, patches) per layer."""

    def __init__(self, scores):
        self.scores = scores


def test_hired_gives_more_budget_to_the_sub_image_with_planted_content():
    """2 x 2 sub-images; the full image's layer-0 CLS attention sits on the bottom-right quarter."""
    from hasten.token_pruning.core import ImageTokens

    side = 4
    base = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    rows = [torch.cat([torch.zeros(side * side, 1, dtype=torch.long), base], 1)]
    for global_row in range(2 * side):  # unpadded 8 x 8 grid of 4 sub-images, newline per row
        for global_col in range(2 * side):
            partition = 1 + (global_row // side) * 2 + global_col // side
            rows.append(torch.tensor([[partition, global_row % side, global_col % side]]))
        rows.append(torch.full((1, 3), -1))
    layout = torch.cat(rows)
    n = len(layout)
    layer0 = torch.full((5, side * side), 0.01)
    layer0[0].view(side, side)[2:, 2:] = 1.0  # bottom-right of the full image
    feature = torch.rand(5, side * side, generator=torch.Generator().manual_seed(0))
    method = HiRED(budget=0.25)  # int(0.25 * 5 * 16) = 20 tokens: 10 to the full image, 10 to the sub-images
    method._cls, method._feature_layer = _PlantedCLS({0: layer0, 2: feature}), 2
    image = ImageTokens(sample=0, positions=torch.arange(n), embeds=torch.zeros(n, 8), layout=layout, index=0)
    kept, _ = method.select(image)
    budget = int(0.25 * 5 * side * side)  # the official budget: (k + 1) partitions of side^2 patches
    assert len(kept) == budget and len(set(kept.tolist())) == budget
    partition_of = layout[kept, 0]
    per_partition = [int((partition_of == p).sum()) for p in range(5)]
    assert per_partition[0] == int(0.5 * budget)  # alpha = 0.5 to the full image
    assert per_partition[4] == max(per_partition[1:]) and per_partition[4] > per_partition[1]
    assert not bool((partition_of < 0).any()), "newline tokens carry no patch"
    # inside a partition: the top feature-layer CLS attention patches
    full_image = kept[partition_of == 0]
    expected = feature[0].topk(per_partition[0]).indices.sort().values
    assert torch.equal(layout[full_image, 1] * side + layout[full_image, 2], expected)


def test_llava_next_layout_follows_the_models_own_packing():
    """Each token's (partition, row, col) reproduces the packed features transformers builds."""
    model, processor = tiny.vlm("llava-next")
    inputs = _inputs(processor, [_image(11, 40, 72)], ["What?"])
    from hasten.token_pruning.adapters import ADAPTERS

    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    layout = ADAPTERS["LlavaNextForConditionalGeneration"].patch_layouts(
        model, dict(inputs), [(0, image_positions)], None
    )[0]
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True)
        features = model.model.multi_modal_projector(vision.hidden_states[model.config.vision_feature_layer][:, 1:])
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    patch = layout[:, 0] >= 0
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    torch.testing.assert_close(merged[patch], features[layout[patch, 0], layout[patch, 1] * side + layout[patch, 2]])
    torch.testing.assert_close(merged[~patch], model.model.image_newline.expand(int((~patch).sum()), -1))


# --- MustDrop ------------------------------------------------------------------------------------


def test_mustdrop_merges_similar_windows_then_picks_the_key_set_on_the_merged_tokens():
    """The released code merges first (blind to the key set), then marks the key set on the merged
    sequence: a window of high-norm tokens merges, and the merged token is a key token."""
    from hasten.token_pruning.core import ImageTokens

    side = 6  # 2 x 2 windows of 3 x 3
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(side * side, 16, generator=generator)
    grid = embeds.view(side, side, -1)
    grid[:3, :3] = torch.randn(16, generator=generator) + 0.01 * torch.randn(3, 3, 16, generator=generator)
    grid[3:, 3:] = torch.randn(16, generator=generator) * 5  # constant, and the largest norms
    layout = torch.stack(
        [
            torch.zeros(side * side, dtype=torch.long),
            torch.arange(side * side) // side,
            torch.arange(side * side) % side,
        ],
        1,
    )
    method = MustDrop(budget=0.5, key_fraction=0.1)  # ceil(0.1 * 20 merged tokens) = 2 key tokens
    method._cls = None  # no CLS (as on Qwen): the key set by L2 norm
    image = ImageTokens(sample=0, positions=torch.arange(side * side), embeds=embeds, layout=layout, index=0)
    kept, replaced = method.select(image)
    top_left = [r * side + c for r in range(3) for c in range(3)]
    bottom_right = [r * side + c for r in range(3, 6) for c in range(3, 6)]
    assert len(kept) == side * side - 16, "both similar windows merge, the high-norm one too"
    assert {0, 21} <= set(kept.tolist()) and not set(top_left[1:] + bottom_right[1:]) & set(kept.tolist())
    torch.testing.assert_close(replaced[kept.tolist().index(0)], embeds[top_left].mean(0))
    ((_, key),) = method._state["key_set"]
    norms = replaced.norm(dim=-1)
    assert 21 in key.tolist(), "the merged high-norm window is a key token"
    assert set(key.tolist()) == set(kept[norms.topk(2).indices].tolist())


def _last_layer_cls_attention(model, inputs) -> torch.Tensor:
    """The vision tower's last-layer CLS attention to each patch (mean over heads), from its own eager
    attention weights."""
    tower = model.model.vision_tower
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = implementation
    return attentions[-1][0, :, 0, 1:].mean(0)


def test_mustdrop_key_set_is_the_last_vit_layer_cls_top_and_is_never_dropped():
    model, processor = tiny.vlm("llava")
    inputs = _inputs(processor, [_image(12)], ["What is this?"])
    method = MustDrop(budget=0.1, key_fraction=0.25, layers=(1,), cap_budget=True)
    with method.apply(model), torch.no_grad():
        model(**inputs)
    assert method.stats.visual_tokens_in == [64]
    # no window merges on this random model: the key set is the top ceil(0.25 * 64) = 16 patches
    key = _last_layer_cls_attention(model, inputs).topk(16).indices
    kept = method.stats.visual_kept_mask[0]
    assert bool(kept[key].all())
    assert method.stats.visual_tokens_kept == [16], "budget 6 < key set 16: the key set alone stays"


def _masked_layers(model, inputs, allowed_at):
    """Reference: the unpruned model whose layer i attends by the (n, n) bool matrix allowed_at(i, n)."""
    layers = model.model.language_model.layers

    def hook_for(index):
        def mask_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            allowed = allowed_at(index, hidden.shape[1]) | torch.eye(hidden.shape[1], dtype=torch.bool)
            kwargs["attention_mask"] = torch.zeros(1, 1, *allowed.shape, dtype=hidden.dtype).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min
            )
            return args, kwargs

        return mask_hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(layers)]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("policy", ["official", "all_layers"])
@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_mustdrop_compacted_cache_equals_masking(kind, policy):
    """No merges, an open filter and the budget cap at layer 1: prompt tokens after layer 1 see only
    the survivors; generated tokens see only the survivors at layer 1 and after, and before it the
    whole prompt ("official", the released code) or the survivors too ("all_layers")."""
    model, processor = tiny.vlm(kind, dtype=torch.float64)
    inputs = _inputs(processor, [_image(13)], ["Describe the picture."])
    method = MustDrop(
        budget=0.3,
        merge_threshold=1.0,
        key_fraction=0.0,
        layers=(1,),
        global_threshold=0.0,
        individual_threshold=0.0,
        decode_cache=policy,
        cap_budget=True,
    )
    with method.apply(model):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    length = inputs["input_ids"].shape[1]
    n = method.stats.visual_tokens_in[0]
    assert method.stats.visual_tokens_kept == [int(0.3 * n)]
    image_id = model.config.image_token_id
    kept = inputs["input_ids"][0] != image_id
    kept[inputs["input_ids"][0] == image_id] = method.stats.visual_kept_mask[0]
    layers = len(model.model.language_model.layers)
    full_layers = 1 if policy == "official" else 0  # layer 0, before the filter layer
    per_layer = _full_cache_bytes(model, inputs) / layers
    assert method.stats.kv_cache_bytes == per_layer * (full_layers * length + (layers - full_layers) * int(kept.sum()))
    generated = out.sequences[:, length:]
    full = dict(inputs)
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated[:, :-1])], 1)
    total = full["input_ids"].shape[1]
    visible = torch.cat([kept, torch.ones(total - length, dtype=torch.bool)])

    def allowed_at(index, size):
        causal = torch.ones(size, size, dtype=torch.bool).tril()
        if index == 0 and policy == "official":  # before the filter layer: everything, always
            return causal
        if index <= 1:  # up to the filter layer: the prompt sees the whole prompt, generated tokens the survivors
            rows = torch.arange(size)[:, None] < length
            return causal & (rows | visible[None, :size])
        return causal & visible[None, :size]

    teacher = _masked_layers(model, full, allowed_at)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0].double(), teacher[0, length - 1 + step], rtol=1e-6, atol=1e-6)


def _full_cache_bytes(model, inputs):
    """Bytes per prompt token of the unpruned cache."""
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    from hasten.token_pruning.core import cache_bytes

    return cache_bytes(cache) / inputs["input_ids"].shape[1]


def test_mustdrop_batch_of_two_matches_each_alone():
    model, processor = tiny.vlm("llava", dtype=torch.float64)
    images, questions = [_image(14), _image(15, 40, 40)], ["What is in the picture?", "Describe it in detail."]
    make = lambda: MustDrop(  # noqa: E731
        budget=0.3,
        layers=(1, 2),
        global_threshold=0.01,
        individual_threshold=0.05,
        cap_budget=True,
    )
    with make().apply(model) as method:
        batch = _inputs(processor, images, questions)
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = list(method.stats.visual_tokens_kept)
    for i in range(2):
        with make().apply(model) as method:
            alone = _inputs(processor, [images[i]], [questions[i]])
            single = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(together[i], single[0]), i
        assert method.stats.visual_tokens_kept == [kept_together[i]]


def test_mustdrop_errors_and_layer_warning():
    model, _ = tiny.vlm("llava")
    with pytest.raises(ValueError, match="layers"):
        MustDrop(layers=(20, 30)).attach(model)
    with pytest.raises(ValueError, match="merge_threshold"):
        MustDrop(merge_threshold=1.5)
    with pytest.raises(ValueError, match="window"):
        MustDrop(window=1)
    with pytest.warns(UserWarning, match="6, 10, 14"):
        MustDrop().attach(model).detach()
    assert MustDrop(budget=64 / 576).global_threshold == 0.011


def test_renumber_gives_consecutive_positions():
    model, processor = tiny.vlm("llava")
    inputs = _inputs(processor, [_image(16)], ["Where?"])
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("positions", []).append(kwargs["position_ids"])

    method = RandomKeep(budget=0.25, renumber=True)
    with method.apply(model):
        handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            handle.remove()
    prefill, *steps = seen["positions"]
    n = method.stats.prefill_tokens
    assert prefill[0].tolist() == list(range(n))
    assert [int(step[0, -1]) for step in steps] == [n, n + 1]


def test_mustdrop_filter_keeps_the_dual_attention_rule_of_eager_attention():
    """Without the budget cap (the released code) and without merges, the tokens kept at the filter
    layer are exactly those the dual-attention rule keeps on the unpruned model's own eager
    attention at that layer: head-averaged attention of the text after the image; dropped when its
    share of the total is below the global threshold AND its peak below the individual one."""
    model, processor = tiny.vlm("llava", dtype=torch.float64, attn_implementation="eager")
    inputs = _inputs(processor, [_image(16)], ["Which colour is the object in the picture?"])
    image = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1][0].mean(0)  # layer 1, (q, k)
    after = image.long().cumsum(0) > 0
    text = (~image & after).nonzero()[:, 0]
    rows = attention[text][:, image]
    share = rows.sum(0) / rows.sum()
    peak = rows.amax(0)
    global_threshold, individual_threshold = float(share.median()), float(peak.quantile(0.75))
    expected = (share >= global_threshold) | (peak >= individual_threshold)
    assert 0 < int(expected.sum()) < len(expected), "the planted thresholds split the tokens"
    method = MustDrop(
        budget=0.5,
        merge_threshold=1.0,
        key_fraction=0.0,
        layers=(1,),
        global_threshold=global_threshold,
        individual_threshold=individual_threshold,
    )
    with method.apply(model), torch.no_grad():
        model(**inputs)
    assert torch.equal(method.stats.visual_kept_mask[0], expected)


def test_mustdrop_without_the_cap_may_keep_everything():
    """By default (the released code) the budget only picks the thresholds; an open filter keeps
    every token."""
    model, processor = tiny.vlm("llava")
    inputs = _inputs(processor, [_image(17)], ["What is this?"])
    method = MustDrop(budget=0.3, merge_threshold=1.0, layers=(1,), global_threshold=0.0, individual_threshold=0.0)
    with method.apply(model), torch.no_grad():
        model(**inputs)
    assert method.stats.visual_tokens_kept == method.stats.visual_tokens_in
    with pytest.raises(ValueError, match="decode_cache"):
        MustDrop(decode_cache="compact")


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_fastv_keeps_the_top_of_the_last_tokens_eager_attention(kind):
    """FastV's rule, written independently: at layer K the visual tokens with the largest
    head-averaged attention from the last prompt token, read from the unpruned model's own eager
    attention weights."""
    from hasten.token_pruning import FastV

    model, processor = tiny.vlm(kind, dtype=torch.float64, attn_implementation="eager")
    inputs = _inputs(processor, [_image(18)], ["What is in the picture?"])
    image = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)  # layer 1, last query
    n = int(image.sum())
    expected = torch.zeros(n, dtype=torch.bool)
    expected[attention[image].topk(int(0.25 * n)).indices] = True
    method = FastV(budget=0.25, layer=1)
    with method.apply(model), torch.no_grad():
        model(**inputs)
    assert torch.equal(method.stats.visual_kept_mask[0], expected)


def test_hired_llava_next_budget_counts_full_partitions_of_patches():
    """The official budget on LLaVA-Next: int(rate * (k + 1) * P) over the (k + 1) partitions of P
    patches, not over the LLM-side tokens (which add row newlines and lose unpadded rows)."""
    model, processor = tiny.vlm("llava-next")
    inputs = _inputs(processor, [_image(19, 48, 96)], ["What?"])
    method = HiRED(budget=0.2)
    with method.apply(model), torch.no_grad():
        model(**inputs)
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    count = image_size_to_num_patches(
        image_size=inputs["image_sizes"][0].tolist(),
        grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )
    assert count > 1, "an anyres image: the full image and sub-images"
    n = method.stats.visual_tokens_in[0]
    assert method.stats.visual_tokens_kept == [int(0.2 * count * side * side)]
    assert method.stats.visual_tokens_kept != [int(0.2 * n)], "the LLM-side count would differ here"
