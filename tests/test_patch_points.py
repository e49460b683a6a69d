"""When a transformers release moves an internal hasten hooks, pruning fails loudly, never silently.

Each test simulates one moved hook point on a tiny VLM and checks that the method raises a
PatchPointError naming the model class and the transformers version, at attach time where the
move is visible then, else at the prefill, instead of reporting "visual tokens 0/0".
"""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import DynamicCache

import hasten.transformers_conventions as conventions
from hasten import tiny
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import GUIKV, FastV, HiRED, ZipVL
from hasten.token_pruning.adapters import VLMAdapter
from hasten.transformers_conventions import CACHE_KEYWORDS, PatchPointError, cache_keyword, cache_of, output_cache


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny.vlm("llava")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[chat_prompt(processor, "What is it?")], return_tensors="pt")
    return model, inputs


def _names_model_and_version(error: pytest.ExceptionInfo) -> None:
    assert "LlavaForConditionalGeneration" in str(error.value)
    assert transformers.__version__ in str(error.value)


def test_the_installed_release_passes_the_cache_under_a_known_name(llava):
    model, inputs = llava
    keyword = cache_keyword(model.model.language_model)
    assert keyword in CACHE_KEYWORDS
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() == inputs["input_ids"].shape[1]


def test_a_cache_under_an_unknown_name_raises():
    assert cache_of({"cache": None, "past_key_values": None}) is None
    cache = DynamicCache()
    assert cache_of({"past_key_values": cache}) is cache and cache_of({"cache": cache}) is cache
    with pytest.raises(PatchPointError, match="`kv_states`"):
        cache_of({"kv_states": cache})


def test_a_language_model_without_a_cache_argument_fails_at_attach(llava, monkeypatch):
    model, _ = llava
    language_model = model.model.language_model
    monkeypatch.setattr(language_model, "forward", lambda inputs_embeds=None, attention_mask=None: None)
    with pytest.raises(PatchPointError, match="takes the KV cache under none of") as error:
        HiRED(budget=0.25).attach(model)
    assert transformers.__version__ in str(error.value)


def test_a_moved_language_model_fails_at_attach(llava, monkeypatch):
    model, _ = llava
    language_model = model.model.language_model
    monkeypatch.delattr(model.model, "language_model")
    monkeypatch.setattr(model.model, "text_model", language_model, raising=False)
    for method in (HiRED(budget=0.25), FastV(budget=0.25), ZipVL(), GUIKV(budget=0.25)):
        with pytest.raises(PatchPointError, match="not where the adapter looks") as error:
            method.attach(model)
        _names_model_and_version(error)
        assert method._model is None


def test_image_tokens_not_found_after_the_vision_tower_ran_raises(llava, monkeypatch):
    """The model ran its vision tower, but the adapter's image-token id finds nothing."""
    model, inputs = llava
    monkeypatch.setattr(VLMAdapter, "image_token_id", lambda self, model: -7)
    for method in (HiRED(budget=0.25), FastV(budget=0.25), ZipVL(), GUIKV(budget=0.25)):
        with method.apply(model), pytest.raises(PatchPointError, match="no image token") as error:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        _names_model_and_version(error)


def test_a_cache_renamed_after_attach_raises_instead_of_pruning_nothing(llava, monkeypatch):
    """transformers 5.24's break, replayed: hasten knows only an outdated name for the cache."""
    model, inputs = llava
    current = cache_keyword(model.model.language_model)
    for method in (HiRED(budget=0.25), FastV(budget=0.25)):
        with method.apply(model):
            monkeypatch.setattr(conventions, "CACHE_KEYWORDS", ("an_old_name",))
            with pytest.raises(PatchPointError, match=f"`{current}`"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
            monkeypatch.setattr(conventions, "CACHE_KEYWORDS", CACHE_KEYWORDS)


def test_attention_that_bypasses_the_registry_raises(llava, monkeypatch):
    """In-LLM and KV-cache methods score through transformers' attention-function registry; a
    model whose attention stops dispatching through it cannot be scored."""
    model, inputs = llava
    from hasten.token_pruning import scoring

    monkeypatch.setattr(scoring, "_wrapped_attention", lambda module, *args, **kwargs: _bypass(module, *args, **kwargs))
    for method in (FastV(budget=0.25), ZipVL(), GUIKV(budget=0.25)):
        with method.apply(model), pytest.raises(PatchPointError, match="attention-function registry") as error:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        _names_model_and_version(error)


def _bypass(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, without telling any hook."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = module.config._hasten_original_attn
    return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, **kwargs)


def test_nothing_pruned_at_a_binding_budget_raises(llava, monkeypatch):
    """A before-the-LLM method whose selection keeps everything although budget < 1."""
    model, inputs = llava
    method = HiRED(budget=0.25)
    monkeypatch.setattr(HiRED, "select", lambda self, image: (torch.arange(len(image.positions)), None))
    with method.apply(model), pytest.raises(PatchPointError, match="kept all"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
