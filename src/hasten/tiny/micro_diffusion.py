"""The diffusion micro-world: a small FLUX pipeline trained on :mod:`hasten.tiny.scenes`.

``hasten tiny train flux`` (:func:`train_flux`) trains, on one seeded, resumable run:

1. a small ``AutoencoderKL`` (2 levels: 2x down-sampling, 4 latent channels, like FLUX.1's VAE
   without quant convs; no mid-block attention, so it is purely convolutional: trained on 32 x 32
   crops, it decodes any canvas size the same way, and its cost stays linear in the pixels) on
   rendered scenes, reconstruction from the posterior mean (L2 + L1) + a small KL term; then its latent
   ``shift_factor`` / ``scaling_factor`` are measured on training scenes, as FLUX.1 ships them;
2. the *look* phase: a ``FluxTransformer2DModel`` (2 double-stream + 2 single-stream blocks, 4 heads
   of 32, RoPE axes 8/12/12) with rectified flow (``x_t = (1 - s) x_0 + s noise``, target
   ``noise - x_0``, the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``), sigmas
   logit-normal and shifted by the same resolution-dependent ``mu`` the pipeline uses at inference,
   on scenes of 1-4 objects and canvases from 48 to 128 pixels (12 to 32 tokens a side, several
   aspect ratios, a constant token budget per batch) so the model learns the scenes' look and
   generalises to larger grids through RoPE; jointly with a tiny T5 encoder over a word-level
   tokenizer of the caption vocabulary. The CLIP encoder (pooled vector) stays frozen here;
3. the VAE decoder alone (encoder frozen, object pixels weighted), for exact colours;
4. the *prompt* phase: transformer, T5 *and* CLIP (whose pooled vector modulates every block) on
   scenes of :data:`PROMPT_OBJECTS` object(s) on one 64 x 64 canvas (:data:`PROMPT_SIDES`), twice the
   samples per step and :data:`MAX_SEQUENCE_LENGTH` text tokens. The look phase alone learned the
   scenes' look but not the prompts (the same noise with four prompts gave the same image); this phase
   is where each caption word changes what is drawn. Its canvas size is fixed because a place word
   names a cell relative to the canvas while the transformer sees absolute token positions: drawn from
   48-96 px (the v2 weights) it learned colours but no places; at 64 px only, places and colours (v3);
   v4 continued it on 128-px canvases (``prompt_sides=(128,), place_side=128``), v5 on 192-px canvases
   (``prompt_sides=(192,), place_side=192``), and draws there (:data:`DRAW_SIZE`), where GRAT-X is clearly
   faster than dense on a CPU. v5 drew blobs; the shipped v11 continued it with the shape knobs of
   :func:`train_flux` (``object_weight``, ``shape_contrast``, ``logit_mean``) and draws rings, circles and
   crosses (docs/microworld.md).

10% of captions are dropped (empty prompt), so ``true_cfg_scale`` (classifier-free guidance, in
:data:`CALL_DEFAULTS`) works. The saved weights are exponential moving averages.

The result is a real ``FluxPipeline`` saved with ``save_pretrained`` (shipped under
``hasten/tiny/weights/flux``) and loaded with ``FluxPipeline.from_pretrained``::

    from hasten.tiny import trained
    pipe = trained.load("flux")
    image = pipe("a red circle at the top left and a small blue square at the bottom",
                 **CALL_DEFAULTS).images[0]

Always pass ``max_sequence_length=MAX_SEQUENCE_LENGTH`` (in :data:`CALL_DEFAULTS`): the text was
trained at that padded length, and FluxPipeline's default of 512 pads far more (its pad tokens
are not masked), which dilutes the conditioning.
"""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validation import check_number
from . import scenes
from .trained import load_checkpoint, run_phase, run_vae_phase, save_checkpoint, step_generator

__all__ = [
    "CALL_DEFAULTS",
    "DEFAULT_STEPS",
    "DRAW_SIZE",
    "GUIDANCE_SCALE",
    "LOOK_SEQUENCE_LENGTH",
    "MAX_SEQUENCE_LENGTH",
    "PROMPT_OBJECTS",
    "PLACE_SIDE",
    "PROMPT_SIDES",
    "PROMPT_STEPS",
    "SHAPE_MARGIN",
    "TRAIN_SIZE",
    "build_pipeline",
    "caption_encoder_config",
    "caption_tokenizer",
    "object_tokens",
    "packed_latents",
    "refine_decoder",
    "swap_shape_words",
    "train_flux",
    "validation_loss",
    "velocity",
]

MAX_SEQUENCE_LENGTH = 24
"""T5 tokens per prompt of the trained pipeline: what the prompt phase trained at (a two-object caption
with its background is <= 21 words)."""

LOOK_SEQUENCE_LENGTH = 48
"""T5 tokens per caption in the look phase (a 4-object caption with its background is <= 45 words)."""

TRAIN_SIZE = (64, 64)
"""The reference canvas ``(height, width)``: 16 x 16 = 256 image tokens."""

GUIDANCE_SCALE = 5.0
"""Classifier-free guidance of the trained pipeline (FluxPipeline's ``true_cfg_scale``, against the empty
prompt): without it the prompt barely changes the picture (docs/microworld.md)."""

DRAW_SIZE = (192, 192)
"""The canvas ``(height, width)`` the shipped weights draw on: their last prompt phases (v5, v11) named places on
192-px canvases (48 x 48 = 2304 image tokens)."""

CALL_DEFAULTS: dict[str, Any] = {
    "height": DRAW_SIZE[0],
    "width": DRAW_SIZE[1],
    "num_inference_steps": 20,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
    "true_cfg_scale": GUIDANCE_SCALE,
    "negative_prompt": "",
}
"""Keywords for ``pipe(prompt, **CALL_DEFAULTS)`` on the trained pipeline (one prompt; for a list of
prompts pass ``negative_prompt=[""] * len(prompts)``)."""

DEFAULT_STEPS = 2400
"""Default look-phase transformer steps of :func:`train_flux` (after 600 VAE steps, before 800 decoder
steps and the prompt phase): about 80 minutes on one thread of a busy 2-core CPU."""

PROMPT_STEPS = 1500
"""Default prompt-phase steps of :func:`train_flux` (see :data:`PROMPT_OBJECTS`)."""

PROMPT_OBJECTS = 1
"""Objects per scene in the prompt phase: few objects, so each caption word has a visible effect."""

PROMPT_SIDES: tuple[int, ...] = (64,)
"""Square canvas sides (pixels) of the prompt phase, one drawn per step. One size: a place word names a
cell of the 3 x 3 grid *relative to the canvas*, and the transformer knows only absolute token positions
(RoPE from the top-left corner), so on mixed sizes "centre" or "bottom right" name different tokens and
cannot be learned. (The v2 weights' prompt phase drew from 48-96 px and learned colour but not places.)"""

SHAPE_MARGIN = 0.25
"""How much larger (relative) the error near the objects must be with the shape words swapped than with the
true caption before ``train_flux(shape_contrast=...)`` stops pushing the two apart."""

PLACE_SIDE = 64
"""Default canvas side of :func:`train_flux`'s prompt phase whose captions name places (the cell of each
object); captions on other :data:`PROMPT_SIDES` name the objects only (see :data:`PROMPT_SIDES`)."""

# Canvas sides in pixels (multiples of 4: VAE factor 2 x Flux 2x2 packing), drawn per step.
_SIDES = (48, 56, 64, 72, 80, 96, 112, 128)
_SIDE_WEIGHTS = (3, 3, 6, 3, 2, 2, 1, 1)
_TOKENS_PER_BATCH = 2048
_VAE_BATCH = 16
_VAE_CROP = 32
_DECODER_BATCH = 8
_EMA = 0.998
# The prompt phase: twice the tokens per batch.
_PROMPT_TOKENS_PER_BATCH = 4096
_PROMPT_EMA = 0.995


def caption_tokenizer():
    """A word-level ``T5Tokenizer`` over :func:`hasten.tiny.scenes.vocabulary` (one token per word),
    with ``<pad>=0``, ``</s>=1``, ``<unk>=2`` and single characters as a fallback.

    Examples
    --------
    >>> tokenizer = caption_tokenizer()
    >>> ids = tokenizer("a red circle at the top left").input_ids
    >>> len(ids)  # seven words and </s>
    8
    """
    import string

    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    pieces += [("▁" + word, -1.0) for word in scenes.vocabulary()]
    seen = {piece for piece, _ in pieces}
    pieces += [
        (char, -20.0) for char in string.ascii_lowercase + string.digits + string.punctuation if char not in seen
    ]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def caption_encoder_config(config_class, tokenizer, **overrides: Any):
    """The micro-worlds' caption encoder: a 2-layer T5-family encoder (d 64, 4 heads of 16, gated GELU) over
    ``tokenizer`` (:func:`caption_tokenizer`); ``config_class`` is ``T5Config`` (FLUX's) or ``UMT5Config`` (Wan's).

    Examples
    --------
    >>> from transformers import T5Config
    >>> caption_encoder_config(T5Config, caption_tokenizer(), dropout_rate=0.0).num_layers
    2
    """
    return config_class(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_pipeline(seed: int = 0):
    """The untrained micro-world ``FluxPipeline``: seeded components of the trained shapes.

    Examples
    --------
    >>> pipe = build_pipeline()
    >>> type(pipe).__name__, pipe.vae_scale_factor
    ('FluxPipeline', 2)
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ._store import seeded
    from .tokenizers import clip_tokenizer

    clip, t5 = clip_tokenizer(), caption_tokenizer()
    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0,
            scaling_factor=1.0,
            mid_block_add_attention=False,
        )
    with seeded(seed + 1):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            guidance_embeds=False,
            axes_dims_rope=(8, 12, 12),
        )
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
                hidden_act="quick_gelu",
                bos_token_id=clip.bos_token_id,
                eos_token_id=clip.eos_token_id,
                pad_token_id=clip.pad_token_id,
            )
        )
    with seeded(seed + 3):
        text_encoder_2 = T5EncoderModel(caption_encoder_config(T5Config, t5))
    # FLUX.1's resolution-dependent shift, anchored at this micro-world's 256-token training size.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=clip,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=t5,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _canvas(generator: torch.Generator) -> tuple[int, int]:
    weights = torch.tensor(_SIDE_WEIGHTS, dtype=torch.float)
    side = _SIDES[int(torch.multinomial(weights, 1, generator=generator))]
    aspect = (1.0, 1.0, 0.75, 1.33)[int(torch.randint(4, (1,), generator=generator))]
    other = min(128, max(48, int(round(side * aspect / 4)) * 4))
    return (side, other) if torch.rand(1, generator=generator) < 0.5 else (other, side)


def _scene_batch(
    seed: int,
    step: int,
    size: tuple[int, int],
    count: int,
    max_objects: int = 4,
    with_background: float = 0.45,
    places: bool = True,
):
    """Training scenes and captions for ``(seed, step)``: ``with_background`` of the captions name the
    background, 10% are empty (for classifier-free guidance), the rest name the objects only; without
    ``places`` the captions name the objects but not their cells."""
    generator = step_generator(seed, step, stream=1)
    seeds = torch.randint(0, scenes.TRAIN_SEEDS.stop, (count,), generator=generator).tolist()
    out = scenes.batch(seeds, *size, max_objects=max_objects)
    keep = torch.rand(count, generator=generator)

    def caption(scene: scenes.Scene, u: float) -> str:
        text = scene.caption if places else " and ".join(obj.noun_phrase for obj in scene.objects)
        return f"{text} on a {scene.background} background" if u < with_background else (text if u < 0.9 else "")

    captions = [caption(scene, u) for scene, u in zip(out.scenes, keep.tolist())]
    return out.images * 2.0 - 1.0, captions, out.scenes


def packed_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images ``(B, 3, H, W)`` in [-1, 1] -> the packed latents FluxPipeline denoises (the posterior mean,
    shifted and scaled as the pipeline does; ``(B, tokens, 4 C)``) and the unpacked latent ``(height, width)``.

    Examples
    --------
    >>> x0, size = packed_latents(build_pipeline().vae, torch.zeros(1, 3, 32, 48))
    >>> tuple(x0.shape), size
    ((1, 96, 16), (16, 24))
    """
    from diffusers import FluxPipeline

    latents = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w), (h, w)


def velocity(pipe, latents: torch.Tensor, sigma: torch.Tensor, text: tuple, img_ids: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity (``noise - x0``) for packed ``latents`` at noise levels ``sigma`` ``(B,)``,
    given ``text = (T5 hidden states, CLIP pooled vectors)`` from the caption encoders and the latent image ids,
    called as FluxPipeline calls it (no guidance embedding, text tokens at position 0)."""
    hidden, pooled = text
    return pipe.transformer(
        hidden_states=latents,
        timestep=sigma,
        guidance=None,
        pooled_projections=pooled,
        encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3),
        img_ids=img_ids,
        return_dict=False,
    )[0]


def object_tokens(scene_list: list[scenes.Scene], tokens: tuple[int, int]) -> torch.Tensor:
    """Which packed Flux tokens lie on or next to an object: those whose pixels an object covers, and a
    one-token ring round them, where its outline is decided. ``(B, tokens[0] * tokens[1])`` bool, in the
    row-major order of ``_pack_latents``; ``tokens`` is the token grid ``(rows, columns)``.

    Examples
    --------
    >>> scene = scenes.scene_from_caption("a small red circle at the top left", 48, 48)
    >>> near = object_tokens([scene], (12, 12)).view(12, 12)
    >>> bool(near[1, 1]), bool(near[11, 11])
    (True, False)
    """
    masks = torch.stack([torch.from_numpy(scenes.coverage(scene)) for scene in scene_list])[:, None]
    height, width = masks.shape[-2:]
    if height % tokens[0] or width % tokens[1]:
        raise ValueError(f"`tokens` {tokens} must divide the canvas {height} x {width}")
    covered = F.adaptive_max_pool2d(masks, tokens) > 0
    return (F.max_pool2d(covered.float(), 3, stride=1, padding=1) > 0).flatten(1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _lr(step: int, base: float, half_life: int) -> float:
    """Warm-up over 100 steps, then halve every ``half_life`` steps (independent of the run length,
    so a run extended with ``resume`` equals one asked for the longer run from the start)."""
    return base * min(1.0, (step + 1) / 100) * 0.5 ** (step / half_life)


def _set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def _vae_step(vae, optimizer, seed: int, step: int) -> float:
    generator = step_generator(seed, step, stream=2)
    side = (48, 64, 80)[int(torch.randint(3, (1,), generator=generator))]
    images, _, _ = _scene_batch(seed, 10_000_000 + step, (side, side), _VAE_BATCH)
    # The VAE is convolutional: 32 x 32 crops teach it as well as whole canvases, at a quarter of the cost.
    y, x = (int(v) for v in torch.randint(0, side - _VAE_CROP + 1, (2,), generator=generator))
    images = images[:, :, y : y + _VAE_CROP, x : x + _VAE_CROP]
    posterior = vae.encode(images).latent_dist
    # Decoded from the posterior mean (what the pipeline's latents are): a deterministic autoencoder
    # whose latent scale the small KL term keeps in check; sampling the posterior while its variance
    # is still large blurs colours, and flat colours are exactly what the judge checks.
    reconstruction = vae.decode(posterior.mean).sample
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = F.mse_loss(reconstruction, images) + 0.5 * F.l1_loss(reconstruction, images) + 1e-4 * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _decoder_step(vae, optimizer, seed: int, step: int) -> float:
    """Decoder refinement: the encoder (and so the latent space the transformer learned) is frozen;
    the decoder sees whole canvases and object pixels weigh 9x, so shapes keep their exact colours."""
    generator = step_generator(seed, step, stream=4)
    side = (48, 64, 80)[int(torch.randint(3, (1,), generator=generator))]
    images, _, _ = _scene_batch(seed, 30_000_000 + step, (side, side), _DECODER_BATCH)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    reconstruction = vae.decode(latents).sample
    objects = ((images - images[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()
    weight = 1.0 + 8.0 * objects
    error = reconstruction - images
    loss = (weight * (error.pow(2) + 0.5 * error.abs())).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def refine_decoder(
    vae,
    seed: int,
    start: int,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    on_checkpoint=None,
) -> torch.optim.Optimizer:
    """Run decoder-refinement steps ``start .. steps - 1`` on ``vae`` (encoder frozen); returns the optimiser.

    ``on_checkpoint(step, optimizer)`` is called every 100 steps and at the end.
    """
    decoder_parameters = list(vae.decoder.parameters())
    optimizer = optimizer or torch.optim.AdamW(decoder_parameters, lr=1e-3, weight_decay=0.0)
    vae.requires_grad_(False)
    for parameter in decoder_parameters:
        parameter.requires_grad_(True)
    vae.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="decoder", disable=not progress)
    for step in bar:
        _set_lr(optimizer, _lr(step, 1e-3, 500))
        bar.set_postfix(loss=f"{_decoder_step(vae, optimizer, seed, step):.4f}")
        if on_checkpoint is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            on_checkpoint(step + 1, optimizer)
    vae.eval().requires_grad_(False)
    return optimizer


@torch.no_grad()
def _latent_statistics(vae, seed: int) -> tuple[float, float]:
    values = []
    for index in range(4):
        images, _, _ = _scene_batch(seed, 20_000_000 + index, TRAIN_SIZE, 32)
        values.append(vae.encode(images).latent_dist.mean.flatten())
    values = torch.cat(values)
    return float(values.mean()), float(1.0 / values.std())


def _encode_text(
    pipe, captions: list[str], max_length: int = MAX_SEQUENCE_LENGTH, train_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states (with gradients: the encoder trains) and CLIP pooled vectors (with gradients
    when ``train_clip``), as FluxPipeline computes them (ids padded to the max length, no attention mask)."""
    ids = pipe.tokenizer_2(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    hidden = pipe.text_encoder_2(ids, output_hidden_states=False)[0]
    clip_ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.set_grad_enabled(train_clip and torch.is_grad_enabled()):
        pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return hidden, pooled


def _flux_loss(
    pipe,
    seed: int,
    step: int,
    prompt_phase: bool = False,
    prompt_sides: tuple[int, ...] = PROMPT_SIDES,
    place_side: int = PLACE_SIDE,
    object_weight: float = 1.0,
    shape_contrast: float = 0.0,
    logit_mean: float = 0.0,
) -> torch.Tensor:
    """The rectified-flow loss of one training batch: the look phase (every scene kind, canvases of
    48-128 px and several aspect ratios) or the prompt phase (:data:`PROMPT_OBJECTS` objects, square
    canvases, CLIP trained too); with ``object_weight`` != 1, a weighted mean over the tokens
    (the tokens of :func:`object_tokens` weigh ``object_weight``); with ``shape_contrast`` > 0, plus that weight times a hinge on the tokens
    near the objects: the error with the true caption, raised by :data:`SHAPE_MARGIN`, must stay below the
    error with the shape words swapped (:func:`swap_shape_words`). Noise levels: logit-normal with mean
    ``logit_mean`` and deviation 1, then shifted by the pipeline's resolution-dependent ``mu``."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if prompt_phase:
        generator = step_generator(seed, 40_000_000 + step, stream=3)
        side = prompt_sides[int(torch.randint(len(prompt_sides), (1,), generator=generator))]
        height = width = side
        tokens = (side // 4) ** 2
        # Place words only at one size (see PROMPT_SIDES); other canvases teach the look of
        # one captioned object at that size, wherever it is.
        images, captions, batch_scenes = _scene_batch(
            seed,
            40_000_000 + step,
            (side, side),
            max(2, _PROMPT_TOKENS_PER_BATCH // tokens),
            PROMPT_OBJECTS,
            0.2,
            places=side == place_side,
        )
    else:
        generator = step_generator(seed, step, stream=3)
        height, width = _canvas(generator)
        tokens = (height // 4) * (width // 4)
        images, captions, batch_scenes = _scene_batch(seed, step, (height, width), max(2, _TOKENS_PER_BATCH // tokens))
    with torch.no_grad():
        x0, (h, w) = packed_latents(pipe.vae, images)
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    config = pipe.scheduler.config
    mu = calculate_shift(
        tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    t = compute_density_for_timestep_sampling(
        "logit_normal", b, logit_mean=logit_mean, logit_std=1.0, generator=generator
    )
    sigma = pipe.scheduler.time_shift(mu, 1.0, t)  # the pipeline's own resolution shift
    noisy = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    hidden, pooled = _encode_text(
        pipe, captions, MAX_SEQUENCE_LENGTH if prompt_phase else LOOK_SEQUENCE_LENGTH, train_clip=prompt_phase
    )
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)

    def predict(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return velocity(pipe, noisy, sigma, (hidden, pooled), img_ids)

    prediction, target = predict(hidden, pooled), noise - x0
    if object_weight == 1.0 and shape_contrast == 0.0:
        return F.mse_loss(prediction, target)
    near = object_tokens(batch_scenes, (h // 2, w // 2))
    weights = 1.0 + (object_weight - 1.0) * near[:, :, None].float()
    loss = ((prediction - target).pow(2) * weights).sum() / (weights.sum() * prediction.shape[-1])
    if shape_contrast == 0.0:
        return loss
    swapped = swap_shape_words(captions, batch_scenes, generator)
    named = torch.tensor([a != b for a, b in zip(captions, swapped)])  # empty captions name no shape
    if not named.any():
        return loss

    def object_error(prediction: torch.Tensor) -> torch.Tensor:
        error = (prediction - target).pow(2).mean(-1)
        return (error * near).sum(1) / near.sum(1).clamp(min=1)

    true_error = object_error(prediction)
    swapped_error = object_error(predict(*_encode_text(pipe, swapped, MAX_SEQUENCE_LENGTH, train_clip=True)))
    hinge = F.relu(true_error * (1.0 + SHAPE_MARGIN) - swapped_error)
    return loss + shape_contrast * hinge[named].mean()


def swap_shape_words(captions: list[str], scene_list: list[scenes.Scene], generator: torch.Generator) -> list[str]:
    """Each caption with every object's shape word replaced by another shape, drawn from ``generator``
    (the negatives of ``train_flux(shape_contrast=...)``); a caption that names no shape is kept.

    Examples
    --------
    >>> scene = scenes.scene_from_caption("a red circle at the top left", 64, 64)
    >>> swapped = swap_shape_words([scene.caption], [scene], torch.Generator().manual_seed(0))[0]
    >>> swapped != scene.caption and swapped.replace(swapped.split()[2], "circle") == scene.caption
    True
    """
    out = []
    for caption, scene in zip(captions, scene_list):
        for obj in scene.objects:
            others = [shape for shape in scenes.SHAPES if shape != obj.shape]
            other = others[int(torch.randint(len(others), (1,), generator=generator))]
            caption = re.sub(rf"\b{obj.shape}\b", other, caption)
        out.append(caption)
    return out


@torch.no_grad()
def validation_loss(
    pipe,
    seeds: list[int] | range,
    size: tuple[int, int] = TRAIN_SIZE,
    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75),
    num_objects: int | None = None,
    captions: list[str] | None = None,
    on_objects: bool = False,
) -> float:
    """The rectified-flow loss (velocity MSE, as in training) of ``pipe``'s transformer on the scenes
    of ``seeds`` (use :data:`hasten.tiny.scenes.HELD_OUT_SEEDS`), captioned, at fixed noise levels.

    ``num_objects`` fixes the scenes' object count (default: 1-4); ``captions`` replaces the scenes' own
    captions (e.g. shuffled ones, or one word swapped: how much lower the loss is with the true captions
    measures how much the model reads the prompt, or that word); ``on_objects`` averages over the tokens
    on and round the objects only (:func:`object_tokens`), where a word's effect is not diluted
    by the background.

    Examples
    --------
    >>> round(validation_loss(build_pipeline(), range(2), sigmas=(0.5,)), 1) > 0.5  # untrained
    True
    """
    from diffusers import FluxPipeline

    out = scenes.batch(list(seeds), *size, num_objects=num_objects)
    images, captions = out.images * 2.0 - 1.0, out.captions if captions is None else list(captions)
    if len(captions) != len(out.captions):
        raise ValueError(f"`captions` must give one caption per seed ({len(out.captions)}); got {len(captions)}")
    x0, (h, w) = packed_latents(pipe.vae, images)
    b = x0.shape[0]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    hidden, pooled = _encode_text(pipe, captions)
    near = object_tokens(out.scenes, (h // 2, w // 2)) if on_objects else None
    if on_objects and not near.any():
        raise ValueError("`on_objects` needs scenes with objects; these have none")
    losses = []
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        prediction = velocity(pipe, noisy, torch.full((b,), sigma), (hidden, pooled), img_ids)
        error = (prediction - (noise - x0)).pow(2).mean(-1)  # (B, tokens)
        losses.append(float(error[near].mean() if on_objects else error.mean()))
    return float(sum(losses) / len(losses))


def _average_into(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for averaged, current in zip(ema.parameters(), live.parameters()):
            averaged.lerp_(current, 1.0 - decay)


def train_flux(
    out: str | pathlib.Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    vae_steps: int | None = None,
    decoder_steps: int | None = None,
    prompt_steps: int | None = None,
    init: str | pathlib.Path | None = None,
    prompt_lr: float = 5e-4,
    prompt_sides: tuple[int, ...] = PROMPT_SIDES,
    place_side: int = PLACE_SIDE,
    object_weight: float = 1.0,
    shape_contrast: float = 0.0,
    logit_mean: float = 0.0,
) -> pathlib.Path:
    """Train the micro-world FluxPipeline; save it in ``out / "model"``.

    Four phases: the VAE; the *look* phase (transformer + T5 on every scene kind, the CLIP encoder
    frozen); the VAE decoder alone (encoder frozen); the *prompt* phase (transformer, T5 and CLIP on
    scenes of :data:`PROMPT_OBJECTS` objects at :data:`MAX_SEQUENCE_LENGTH` tokens, so each caption
    word changes what is drawn). Seeded and resumable (see :mod:`hasten.tiny.trained`): every step's
    scenes and noise come from ``(seed, phase, step)``, the learning rate does not depend on the run
    length, and ``out / "checkpoint.pt"`` (written every 100 steps and at each phase change) holds all
    weights, optimiser states, the EMAs and the steps.

    Parameters
    ----------
    out : path
        Run folder.
    steps : int, optional
        Look-phase transformer steps (default :data:`DEFAULT_STEPS`).
    seed : int, default 0
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
        Show tqdm bars.
    vae_steps : int, optional
        VAE steps before the transformer's (default ``min(600, max(1, steps // 2))``).
    decoder_steps : int, optional
        Decoder-refinement steps after the look phase (default ``min(800, max(1, steps // 2))``); they
        depend only on the VAE of the first phase.
    prompt_steps : int, optional
        Prompt-phase steps (default :data:`PROMPT_STEPS`).
    init : path, optional
        A saved micro-world pipeline (e.g. :func:`hasten.tiny.trained.path` ``("flux")``) to start the
        prompt phase from: the first three phases are taken as done by it and skipped.
    prompt_lr : float, default 5e-4
        Peak AdamW learning rate of the prompt phase (100 warm-up steps, then halved every 1500 steps).
    prompt_sides : tuple of int, default :data:`PROMPT_SIDES`
        Square canvas sides of the prompt phase (multiples of 4, at least 16).
    place_side : int, default :data:`PLACE_SIDE`
        The one side among ``prompt_sides`` whose captions name places; the pipeline then draws
        places on canvases of that side (the shipped v11 weights: 192).
    object_weight : float, default 1.0
        In the prompt phase, how much more the loss of the tokens on and around the objects weighs than
        the background's (the tokens of :func:`object_tokens`; a weighted mean). 1 is the plain mean: on a
        192-px canvas one object covers a few percent of the tokens, so the outline that tells a star
        from a circle is a small part of the plain loss.
    shape_contrast : float, default 0.0
        In the prompt phase, the weight of a contrastive term that makes the prediction depend on the
        shape word: on the tokens near the objects, the error with the true caption (raised by
        :data:`SHAPE_MARGIN`) must stay below the error with each shape word swapped for another
        (:func:`swap_shape_words`); a second transformer pass per step. 0 turns it off.
    logit_mean : float, default 0.0
        In the prompt phase, the mean of the logit-normal draw of the noise levels before the
        resolution shift (SD3's ``lognorm(m, 1)``, the ``--logit_mean`` of diffusers' training scripts;
        0 is their default and the look phase's). Above 0 it trains more at high noise, where a sample's
        layout and shapes are decided (``benchmarks/flux_words.py``): at 192 px, 0 puts 9% of the steps
        above sigma 0.9, 0.7 puts 26% there.

    Returns
    -------
    pathlib.Path
        ``out / "model"``, loadable with ``FluxPipeline.from_pretrained``.

    Examples
    --------
    >>> import tempfile
    >>> from diffusers import FluxPipeline
    >>> folder = train_flux(tempfile.mkdtemp(), steps=1, vae_steps=1, prompt_steps=1, progress=False)
    >>> type(FluxPipeline.from_pretrained(folder)).__name__
    'FluxPipeline'
    """
    from diffusers import FluxPipeline

    out = pathlib.Path(out)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    vae_steps = min(600, max(1, steps // 2)) if vae_steps is None else int(vae_steps)
    decoder_steps = min(800, max(1, steps // 2)) if decoder_steps is None else int(decoder_steps)
    prompt_steps = PROMPT_STEPS if prompt_steps is None else int(prompt_steps)
    prompt_sides = tuple(prompt_sides)
    if not prompt_sides or any(isinstance(v, bool) or not isinstance(v, int) or v < 16 or v % 4 for v in prompt_sides):
        raise ValueError(f"`prompt_sides` must be canvas sides that are multiples of 4 and >= 16; got {prompt_sides}")
    if place_side not in prompt_sides:
        raise ValueError(f"`place_side` must be one of `prompt_sides` {prompt_sides}; got {place_side!r}")
    if not prompt_lr > 0:
        raise ValueError(f"`prompt_lr` must be > 0; got {prompt_lr}")
    object_weight = check_number(object_weight, "object_weight", 1)
    shape_contrast = check_number(shape_contrast, "shape_contrast", 0)
    logit_mean = check_number(logit_mean, "logit_mean", -4, 4)
    if min(steps, vae_steps, decoder_steps, prompt_steps) < 1:
        raise ValueError(
            f"`steps`, `vae_steps`, `decoder_steps` and `prompt_steps` must be >= 1; got {steps}, "
            f"{vae_steps}, {decoder_steps} and {prompt_steps}"
        )
    pipe = build_pipeline(seed)
    done = {"vae": 0, "flux": 0, "decoder": 0, "prompt": 0}
    if init is not None:
        init = pathlib.Path(init)
        if not (init / "model_index.json").is_file():
            raise ValueError(f"`init` must be a saved micro-world FluxPipeline folder; {init} has no model_index.json")
        pipe = FluxPipeline.from_pretrained(init)
        done.update(vae=vae_steps, flux=steps, decoder=decoder_steps)
    vae, transformer, t5, clip = pipe.vae, pipe.transformer, pipe.text_encoder_2, pipe.text_encoder
    clip.requires_grad_(False)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    flux_parameters = list(transformer.parameters()) + list(t5.parameters())
    flux_optimizer = torch.optim.AdamW(flux_parameters, lr=1e-3, weight_decay=0.01)
    prompt_parameters = flux_parameters + list(clip.parameters())
    prompt_optimizer = torch.optim.AdamW(prompt_parameters, lr=prompt_lr, weight_decay=0.01)
    decoder_optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=1e-3, weight_decay=0.0)
    averaged = {
        "ema": (transformer, copy.deepcopy(transformer)),
        "ema_t5": (t5, copy.deepcopy(t5)),
        "ema_clip": (clip, copy.deepcopy(clip)),
    }
    for _, ema in averaged.values():
        ema.requires_grad_(False)
    modules = {
        "vae": vae,
        "transformer": transformer,
        "t5": t5,
        "clip": clip,
        **{name: ema for name, (_, ema) in averaged.items()},
    }
    optimizers = {
        "vae_optimizer": vae_optimizer,
        "flux_optimizer": flux_optimizer,
        "decoder_optimizer": decoder_optimizer,
        "prompt_optimizer": prompt_optimizer,
    }
    if resume and (state := load_checkpoint(out)) is not None:
        for name, module in modules.items():
            if name in state:  # checkpoints from before the prompt phase hold no CLIP
                module.load_state_dict(state[name])
        for name, optimizer in optimizers.items():
            if name in state:
                optimizer.load_state_dict(state[name])
        vae.register_to_config(shift_factor=state["shift_factor"], scaling_factor=state["scaling_factor"])
        done.update({phase: state.get(f"{phase}_step", 0) for phase in done})

    def checkpoint() -> None:
        save_checkpoint(
            out,
            {
                **{name: module.state_dict() for name, module in modules.items()},
                **{name: optimizer.state_dict() for name, optimizer in optimizers.items()},
                "shift_factor": vae.config.shift_factor,
                "scaling_factor": vae.config.scaling_factor,
                **{f"{phase}_step": value for phase, value in done.items()},
            },
        )

    def vae_step(step: int) -> float:
        _set_lr(vae_optimizer, _lr(step, 2e-3, 400))
        return _vae_step(vae, vae_optimizer, seed, step)

    def measure() -> None:
        shift, scale = _latent_statistics(vae, seed)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)

    run_vae_phase(out, done, vae_steps, vae, vae_step, measure, checkpoint, next_phase="flux", progress=progress)
    vae.eval().requires_grad_(False)

    def transformer_phase(
        phase: str,
        total: int,
        optimizer,
        parameters,
        decay: float,
        base_lr: float,
        half_life: int,
        trained: tuple[str, ...],
    ) -> None:
        transformer.train()
        t5.train()

        def train_step(step: int) -> float:
            _set_lr(optimizer, _lr(step, base_lr, half_life))
            # T5's dropout draws from torch's global RNG: seed it from (seed, step) too, so a resumed run
            # draws the same masks as an uninterrupted one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_generator(seed, step, stream=5 if phase == "flux" else 6).initial_seed())
                loss = _flux_loss(
                    pipe,
                    seed,
                    step,
                    prompt_phase=phase == "prompt",
                    prompt_sides=prompt_sides,
                    place_side=place_side,
                    object_weight=object_weight if phase == "prompt" else 1.0,
                    shape_contrast=shape_contrast if phase == "prompt" else 0.0,
                    logit_mean=logit_mean if phase == "prompt" else 0.0,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            for name in trained:
                live, ema = averaged[name]
                _average_into(ema, live, min(decay, (step + 1) / (step + 10)))
            return loss.item()

        run_phase(phase, done, total, train_step, checkpoint, progress=progress)

    if done["prompt"] and (done["flux"] < steps or done["decoder"] < decoder_steps):
        raise ValueError(
            f"the checkpoint in {out} has started the prompt phase; resume with steps <= {done['flux']} "
            f"and decoder_steps <= {done['decoder']}"
        )
    if done["flux"] < steps:
        transformer_phase("flux", steps, flux_optimizer, flux_parameters, _EMA, 1.5e-3, 1500, ("ema", "ema_t5"))
    if done["decoder"] < decoder_steps:

        def on_checkpoint(step: int, _optimizer) -> None:
            done["decoder"] = step
            checkpoint()

        refine_decoder(vae, seed, done["decoder"], decoder_steps, decoder_optimizer, progress, on_checkpoint)
    if done["prompt"] < prompt_steps:
        if done["prompt"] == 0:  # the prompt phase starts from the look phase's averaged weights
            for live, ema in averaged.values():
                live.load_state_dict(ema.state_dict())
        clip.requires_grad_(True).train()
        transformer_phase(
            "prompt",
            prompt_steps,
            prompt_optimizer,
            prompt_parameters,
            _PROMPT_EMA,
            prompt_lr,
            1500,
            ("ema", "ema_t5", "ema_clip"),
        )
    for live, ema in averaged.values():
        live.load_state_dict(ema.state_dict())
        live.eval().requires_grad_(False)
    pipe.save_pretrained(out / "model")
    return out / "model"
