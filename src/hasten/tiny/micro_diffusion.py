"""The diffusion micro-world: a small FLUX pipeline trained on :mod:`hasten.tiny.scenes`.

``hasten tiny train flux`` (:func:`train_flux`) trains, on one seeded, resumable run:

1. a small ``AutoencoderKL`` (2 levels: 2x down-sampling, 4 latent channels, like FLUX.1's VAE
   without quant convs; no mid-block attention, so it is purely convolutional: trained on 32 x 32
   crops, it decodes any canvas size the same way, and its cost stays linear in the pixels) on
   rendered scenes, reconstruction from the posterior mean (L2 + L1) + a small KL term; then its latent
   ``shift_factor`` / ``scaling_factor`` are measured on training scenes, as FLUX.1 ships them;
2. a ``FluxTransformer2DModel`` (2 double-stream + 2 single-stream blocks, 4 heads of 32, RoPE
   axes 8/12/12) with rectified flow (``x_t = (1 - s) x_0 + s noise``, target ``noise - x_0``, the
   convention of diffusers' ``FlowMatchEulerDiscreteScheduler``), sigmas logit-normal and shifted
   by the same resolution-dependent ``mu`` the pipeline uses at inference, on canvases from 48 to
   128 pixels (12 to 32 tokens a side, several aspect ratios, a constant token budget per batch)
   so the model learns object placement relative to the canvas and generalises to larger grids
   through RoPE; jointly with a tiny T5 encoder over a word-level tokenizer of the caption
   vocabulary (the transformer's text tokens carry no positions, so the encoder must bind each
   colour to its shape and place). The CLIP encoder (pooled vector) stays frozen and random.
   10% of captions are dropped (empty prompt), so ``true_cfg_scale`` works; half mention the
   background. The saved transformer is an exponential moving average of the weights.

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
import math
import pathlib
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import scenes
from .trained import load_checkpoint, save_checkpoint, step_generator

__all__ = ["CALL_DEFAULTS", "DEFAULT_STEPS", "MAX_SEQUENCE_LENGTH", "TRAIN_SIZE", "build_pipeline", "caption_tokenizer",
           "refine_decoder", "train_flux", "validation_loss"]

MAX_SEQUENCE_LENGTH = 48
"""T5 tokens per prompt during training (a 4-object caption with its background is <= 45 words)."""

TRAIN_SIZE = (64, 64)
"""The reference canvas ``(height, width)``: 16 x 16 = 256 image tokens."""

CALL_DEFAULTS: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": 20,
                                 "max_sequence_length": MAX_SEQUENCE_LENGTH}
"""Keywords for ``pipe(prompt, **CALL_DEFAULTS)`` on the trained pipeline."""

DEFAULT_STEPS = 2400
"""Default transformer steps of :func:`train_flux` (after 600 VAE steps, before 800 decoder steps): the
shipped weights, about 80 minutes on one thread of a busy 2-core CPU."""

# Canvas sides in pixels (multiples of 4: VAE factor 2 x Flux 2x2 packing), drawn per step.
_SIDES = (48, 56, 64, 72, 80, 96, 112, 128)
_SIDE_WEIGHTS = (3, 3, 6, 3, 2, 2, 1, 1)
_TOKENS_PER_BATCH = 2048
_VAE_BATCH = 16
_VAE_CROP = 32
_DECODER_BATCH = 8
_EMA = 0.998


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
    pieces += [(char, -20.0) for char in string.ascii_lowercase + string.digits + string.punctuation if char not in seen]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


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
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0, scaling_factor=1.0, mid_block_add_attention=False)
    with seeded(seed + 1):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(8, 12, 12))
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=clip.bos_token_id,
            eos_token_id=clip.eos_token_id, pad_token_id=clip.pad_token_id))
    with seeded(seed + 3):
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=0, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=64, feed_forward_proj="gated-gelu",
            pad_token_id=t5.pad_token_id, eos_token_id=t5.eos_token_id, decoder_start_token_id=t5.pad_token_id))
    # FLUX.1's resolution-dependent shift, anchored at this micro-world's 256-token training size.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer,
                        image_encoder=None, feature_extractor=None)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _canvas(generator: torch.Generator) -> tuple[int, int]:
    weights = torch.tensor(_SIDE_WEIGHTS, dtype=torch.float)
    side = _SIDES[int(torch.multinomial(weights, 1, generator=generator))]
    aspect = (1.0, 1.0, 0.75, 1.33)[int(torch.randint(4, (1,), generator=generator))]
    other = min(128, max(48, int(round(side * aspect / 4)) * 4))
    return (side, other) if torch.rand(1, generator=generator) < 0.5 else (other, side)


def _scene_batch(seed: int, step: int, size: tuple[int, int], count: int):
    generator = step_generator(seed, step, stream=1)
    seeds = torch.randint(0, scenes.TRAIN_SEEDS.stop, (count,), generator=generator).tolist()
    out = scenes.batch(seeds, *size)
    keep = torch.rand(count, generator=generator)
    captions = [scene.caption_with_background if u < 0.45 else (scene.caption if u < 0.9 else "")
                for scene, u in zip(out.scenes, keep.tolist())]
    return out.images * 2.0 - 1.0, captions


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
    images, _ = _scene_batch(seed, 10_000_000 + step, (side, side), _VAE_BATCH)
    # The VAE is convolutional: 32 x 32 crops teach it as well as whole canvases, at a quarter of the cost.
    y, x = (int(v) for v in torch.randint(0, side - _VAE_CROP + 1, (2,), generator=generator))
    images = images[:, :, y:y + _VAE_CROP, x:x + _VAE_CROP]
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
    images, _ = _scene_batch(seed, 30_000_000 + step, (side, side), _DECODER_BATCH)
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


def refine_decoder(vae, seed: int, start: int, steps: int, optimizer: torch.optim.Optimizer | None = None,
                   progress: bool = True, on_checkpoint=None) -> torch.optim.Optimizer:
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
        images, _ = _scene_batch(seed, 20_000_000 + index, TRAIN_SIZE, 32)
        values.append(vae.encode(images).latent_dist.mean.flatten())
    values = torch.cat(values)
    return float(values.mean()), float(1.0 / values.std())


def _encode_text(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states (with gradients: the encoder trains) and CLIP pooled vectors, as FluxPipeline
    computes them (ids padded to the max length, no attention mask)."""
    ids = pipe.tokenizer_2(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
    hidden = pipe.text_encoder_2(ids, output_hidden_states=False)[0]
    with torch.no_grad():
        clip_ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return hidden, pooled


def _flux_loss(pipe, seed: int, step: int) -> torch.Tensor:
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    generator = step_generator(seed, step, stream=3)
    height, width = _canvas(generator)
    tokens = (height // 4) * (width // 4)
    count = max(2, _TOKENS_PER_BATCH // tokens)
    images, captions = _scene_batch(seed, step, (height, width), count)
    vae = pipe.vae
    with torch.no_grad():
        latents = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    x0 = FluxPipeline._pack_latents(latents, b, c, h, w)
    noise = torch.randn(x0.shape, generator=generator)
    config = pipe.scheduler.config
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    t = torch.sigmoid(torch.randn(b, generator=generator))
    sigma = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    noisy = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    hidden, pooled = _encode_text(pipe, captions)
    prediction = pipe.transformer(
        hidden_states=noisy, timestep=sigma, guidance=None, pooled_projections=pooled,
        encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False)[0]
    return F.mse_loss(prediction, noise - x0)


@torch.no_grad()
def validation_loss(pipe, seeds: list[int] | range, size: tuple[int, int] = TRAIN_SIZE,
                    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)) -> float:
    """The rectified-flow loss (velocity MSE, as in training) of ``pipe``'s transformer on the scenes
    of ``seeds`` (use :data:`hasten.tiny.scenes.HELD_OUT_SEEDS`), captioned, at fixed noise levels.

    Examples
    --------
    >>> round(validation_loss(build_pipeline(), range(2), sigmas=(0.5,)), 1) > 0.5  # untrained
    True
    """
    from diffusers import FluxPipeline

    out = scenes.batch(list(seeds), *size)
    images, captions = out.images * 2.0 - 1.0, out.captions
    vae = pipe.vae
    latents = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    x0 = FluxPipeline._pack_latents(latents, b, c, h, w)
    generator = torch.Generator().manual_seed(0)
    hidden, pooled = _encode_text(pipe, captions)
    losses = []
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        prediction = pipe.transformer(
            hidden_states=noisy, timestep=torch.full((b,), sigma), guidance=None, pooled_projections=pooled,
            encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False)[0]
        losses.append(F.mse_loss(prediction, noise - x0).item())
    return float(sum(losses) / len(losses))


def train_flux(out: str | pathlib.Path, *, steps: int | None = None, seed: int = 0, resume: bool = False,
               progress: bool = True, vae_steps: int | None = None, decoder_steps: int | None = None) -> pathlib.Path:
    """Train the micro-world FluxPipeline (VAE, then transformer + T5, then the VAE decoder alone);
    save it in ``out / "model"``.

    Seeded and resumable (see :mod:`hasten.tiny.trained`): every step's scenes and noise come from
    ``(seed, step)``, the learning rate does not depend on the run length, and
    ``out / "checkpoint.pt"`` (written every 100 steps, at the phase change and at the end) holds
    all weights, optimiser states, the EMA and the step.

    Parameters
    ----------
    out : path
        Run folder.
    steps : int, optional
        Transformer steps (default :data:`DEFAULT_STEPS`).
    seed : int, default 0
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
        Show tqdm bars.
    vae_steps : int, optional
        VAE steps before the transformer's (default ``min(600, max(1, steps // 2))``).
    decoder_steps : int, optional
        Decoder-refinement steps after the transformer's, encoder frozen so the latent space does
        not move (default ``min(800, max(1, steps // 2))``); they depend only on the VAE of the
        first phase, so they may also run beside the transformer's and be resumed from.

    Returns
    -------
    pathlib.Path
        ``out / "model"``, loadable with ``FluxPipeline.from_pretrained``.

    Examples
    --------
    >>> import tempfile
    >>> from diffusers import FluxPipeline
    >>> folder = train_flux(tempfile.mkdtemp(), steps=1, vae_steps=1, progress=False)
    >>> type(FluxPipeline.from_pretrained(folder)).__name__
    'FluxPipeline'
    """
    out = pathlib.Path(out)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    vae_steps = min(600, max(1, steps // 2)) if vae_steps is None else int(vae_steps)
    decoder_steps = min(800, max(1, steps // 2)) if decoder_steps is None else int(decoder_steps)
    if steps < 1 or vae_steps < 1 or decoder_steps < 1:
        raise ValueError(f"`steps`, `vae_steps` and `decoder_steps` must be >= 1; got {steps}, {vae_steps} and "
                         f"{decoder_steps}")
    pipe = build_pipeline(seed)
    vae, transformer, t5 = pipe.vae, pipe.transformer, pipe.text_encoder_2
    pipe.text_encoder.requires_grad_(False)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    flux_parameters = list(transformer.parameters()) + list(t5.parameters())
    flux_optimizer = torch.optim.AdamW(flux_parameters, lr=1e-3, weight_decay=0.01)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    ema_t5 = copy.deepcopy(t5).requires_grad_(False)
    vae_done = flux_done = decoder_done = 0
    decoder_optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=1e-3, weight_decay=0.0)
    if resume and (state := load_checkpoint(out)) is not None:
        vae.load_state_dict(state["vae"])
        vae_optimizer.load_state_dict(state["vae_optimizer"])
        transformer.load_state_dict(state["transformer"])
        t5.load_state_dict(state["t5"])
        ema.load_state_dict(state["ema"])
        ema_t5.load_state_dict(state["ema_t5"])
        flux_optimizer.load_state_dict(state["flux_optimizer"])
        vae.register_to_config(shift_factor=state["shift_factor"], scaling_factor=state["scaling_factor"])
        vae_done, flux_done = state["vae_step"], state["flux_step"]
        decoder_done = state.get("decoder_step", 0)
        if "decoder_optimizer" in state:
            decoder_optimizer.load_state_dict(state["decoder_optimizer"])

    def checkpoint() -> None:
        save_checkpoint(out, {
            "vae": vae.state_dict(), "vae_optimizer": vae_optimizer.state_dict(),
            "transformer": transformer.state_dict(), "t5": t5.state_dict(), "ema": ema.state_dict(),
            "ema_t5": ema_t5.state_dict(), "flux_optimizer": flux_optimizer.state_dict(),
            "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor,
            "vae_step": vae_done, "flux_step": flux_done, "decoder_step": decoder_done,
            "decoder_optimizer": decoder_optimizer.state_dict()})

    if vae_done < vae_steps:
        if flux_done:
            raise ValueError(f"the checkpoint in {out} finished its VAE at step {vae_done}; resume with vae_steps "
                             f"<= {vae_done}")
        vae.train()
        bar = tqdm(range(vae_done, vae_steps), initial=vae_done, total=vae_steps, desc="vae", disable=not progress)
        for step in bar:
            _set_lr(vae_optimizer, _lr(step, 2e-3, 400))
            bar.set_postfix(loss=f"{_vae_step(vae, vae_optimizer, seed, step):.4f}")
            vae_done = step + 1
            if vae_done % 100 == 0 and vae_done < vae_steps:
                checkpoint()
        vae.eval()
        shift, scale = _latent_statistics(vae, seed)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        checkpoint()
    vae.eval().requires_grad_(False)
    transformer.train()
    t5.train()
    bar = tqdm(range(flux_done, steps), initial=flux_done, total=steps, desc="flux", disable=not progress)
    for step in bar:
        _set_lr(flux_optimizer, _lr(step, 1.5e-3, 1500))
        # T5's dropout draws from torch's global RNG: seed it from (seed, step) too, so a resumed run
        # draws the same masks as an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_generator(seed, step, stream=5).initial_seed())
            loss = _flux_loss(pipe, seed, step)
            flux_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(flux_parameters, 1.0)
        flux_optimizer.step()
        decay = min(_EMA, (step + 1) / (step + 10))
        with torch.no_grad():
            for target, source in ((ema, transformer), (ema_t5, t5)):
                for averaged, live in zip(target.parameters(), source.parameters()):
                    averaged.lerp_(live, 1.0 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        flux_done = step + 1
        if flux_done % 100 == 0 or flux_done == steps:
            checkpoint()
    if decoder_done < decoder_steps:
        def on_checkpoint(step: int, _optimizer) -> None:
            nonlocal decoder_done
            decoder_done = step
            checkpoint()

        refine_decoder(vae, seed, decoder_done, decoder_steps, decoder_optimizer, progress, on_checkpoint)
    transformer.load_state_dict(ema.state_dict())
    t5.load_state_dict(ema_t5.state_dict())
    transformer.eval()
    t5.eval()
    pipe.save_pretrained(out / "model")
    return out / "model"
