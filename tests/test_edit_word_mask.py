"""ConsistEdit's edit-word map equals the attention the model itself computes (independent oracle).

The oracle captures the query and key tensors each controlled layer hands to
``scaled_dot_product_attention`` (after the layer's norms and rotary embedding, exactly as the
model attends) and recomputes the image queries' attention to the word tokens from them:
softmaxed over every key for SD3 / Flux, over the text keys only for CogVideoX (the reference's
rule). The control computes its map from its own projection hooks; the two must agree, so a
map that skipped RoPE or normalised over the wrong keys goes red.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import hasten.tiny
from hasten.hooks.consistedit import ConsistEditControl
from hasten.pipelines.flow_models import FlowModel

WORDS = [1, 2, 3]  # text-sequence positions of the "edit words"


def _captured_sdpa():
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.detach().float(), key.detach().float()))
        return original(query, key, value, *args, **kwargs)

    return calls, mock.patch("torch.nn.functional.scaled_dot_product_attention", spy)


def _oracle(calls, image_tokens: int, text_first: bool, text_keys_only: bool) -> torch.Tensor:
    """Mean over layers of the image queries' attention to WORDS, heads averaged, row 0."""
    total = 0
    for query, key in calls:  # (batch, heads, tokens, dim)
        q, k = query[:1], key[:1]
        text = q.shape[2] - image_tokens
        image = slice(text, None) if text_first else slice(0, image_tokens)
        columns = WORDS if text_first else [image_tokens + w for w in WORDS]
        if text_keys_only:
            k = k[:, :, :text] if text_first else k[:, :, image_tokens:]
            columns = WORDS
        probs = torch.softmax(q[:, :, image] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        total = total + probs[..., columns].sum(-1).mean(1)[0]
    return total / len(calls)


def _flow_case(kind):
    pipe = hasten.tiny.pipeline(kind)
    model = FlowModel(pipe, **hasten.tiny.default_size(kind), max_sequence_length=32)
    cond = model.encode(["a red car on a street"], guidance_scale=1.0)
    x = model.noise(seed=1)
    return pipe, model.tokens, lambda: model.velocity(x, 0.6, cond)


def _cogvideox_case():
    pipe = hasten.tiny.pipeline("cogvideox")
    size = hasten.tiny.default_size("cogvideox")
    transformer = pipe.transformer
    frames = (size["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    rows, cols = size["height"] // pipe.vae_scale_factor_spatial, size["width"] // pipe.vae_scale_factor_spatial
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, frames, transformer.config.in_channels, rows, cols, generator=generator)
    text = torch.randn(1, 24, transformer.config.text_embed_dim, generator=generator)
    rotary = pipe._prepare_rotary_positional_embeddings(size["height"], size["width"], frames, "cpu")  # latent frames
    tokens = frames * (rows // 2) * (cols // 2)

    def forward():
        with torch.no_grad():
            transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                timestep=torch.tensor([600]),
                image_rotary_emb=rotary,
                return_dict=False,
            )

    return pipe, tokens, forward


# (text first in the joint sequence, normalised over the text keys only): the reference's rule per family
REFERENCE = {"sd3": (False, False), "flux": (True, False), "cogvideox": (True, True)}


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_word_map_is_the_models_own_attention(kind):
    pipe, tokens, forward = _cogvideox_case() if kind == "cogvideox" else _flow_case(kind)
    control = ConsistEditControl(pipe.transformer, tokens).install()
    control.mode, control.word_positions, control.mask_rows = "mask", WORDS, [0]
    calls, spy = _captured_sdpa()
    try:
        with spy:
            forward()
    finally:
        control.remove()
    controlled = calls[-len(control.layers) :]  # Flux: the single-stream blocks run last
    layout = control.layout
    expected = _oracle(controlled, tokens, *REFERENCE[kind])
    got = control._mask_sum / control._mask_count
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if layout.rope != "none":  # the rotary embedding changes the map: skipping it would be caught
        without = ConsistEditControl(pipe.transformer, tokens)
        without.layout = type(layout)(**{**layout.__dict__, "rope": "none"})
        without.install()
        without.mode, without.word_positions, without.mask_rows = "mask", WORDS, [0]
        try:
            forward()
        finally:
            without.remove()
        assert not torch.allclose(without._mask_sum / without._mask_count, expected, rtol=1e-3, atol=1e-5)
