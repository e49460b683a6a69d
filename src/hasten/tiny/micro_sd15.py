"""The Stable Diffusion 1.5 micro-world: a small ``StableDiffusionPipeline`` trained on :mod:`hasten.tiny.scenes`.

It is the model ``hasten app video`` opens on (also ``hasten translate --model micro-sd15`` and
``benchmarks/latentwarp.py --microworld N``), so a LatentWarp translation shows real content: an object
recoloured by the prompt, the background kept. It draws colours, not shapes or places: a recoloured
object comes out as a blob where the source had it (measurements: docs/microworld.md).

``hasten tiny train sd15`` (:func:`train_sd15`) trains, on one seeded, resumable run, a
``UNet2DConditionModel`` (SD 1.5's block layout at a small width: 32/64/64 channels, cross-attention in
the two lower levels, 1 layer a block) jointly with a 2-layer ``CLIPTextModel`` (d 64) over
:func:`hasten.tiny.tokenizers.clip_tokenizer`, with SD 1.5's own objective: epsilon prediction on its
DDPM noise schedule (1000 steps, scaled-linear betas 0.00085-0.012), uniform timesteps. The VAE is not
retrained: it is micro-flux's (:mod:`hasten.tiny.micro_diffusion`, 2x spatial, 4 latent channels,
purely convolutional), copied into this pipeline, with its ``shift_factor`` dropped because
Stable Diffusion pipelines scale latents without shifting them.

Data: the *look* phase draws scenes of 1-4 objects on square canvases of 48-96 px (:data:`TRAIN_SIDES`, a
constant pixel budget per batch), the *prompt* phase one-object scenes at :data:`DRAW_SIZE`; a quarter lie
on photo textures. Captions: 45% the scene caption with places, 35% the
objects without places (``"a red circle and a small blue square"``: what a video translation asks for,
since objects move between cells), 10% naming the background too, 10% empty (so classifier-free guidance
works). The saved weights are exponential moving averages, stored in float16 (the package's weight budget:
4.1 MB); ``from_pretrained`` loads them in float32 (the text encoder's config names float32 for that).

    from hasten.tiny import trained
    from hasten.tiny.micro_sd15 import CALL_DEFAULTS
    pipe = trained.load("sd15")
    image = pipe("a red circle at the top left", **CALL_DEFAULTS).images[0]

The shipped weights (``hasten/tiny/weights/sd15``) are ``train_sd15(out)`` with the defaults (800 look +
1500 prompt steps, about 70 minutes on one CPU thread; ``hasten tiny train sd15 --threads 1``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_int, check_number
from . import scenes
from .diffusion import SD15_NOISE_SCHEDULE
from .micro_diffusion import _average_into, _lr, _set_lr
from .trained import load_checkpoint, run_phase, save_checkpoint, step_generator

__all__ = [
    "CALL_DEFAULTS",
    "DEFAULT_STEPS",
    "DRAW_SIZE",
    "PROMPT_STEPS",
    "TRAIN_SIDES",
    "build_pipeline",
    "train_sd15",
    "validation_loss",
]

DEFAULT_STEPS = 800
"""Look-phase steps of :func:`train_sd15` (scenes of 1-4 objects)."""

PROMPT_STEPS = 1500
"""Prompt-phase steps of :func:`train_sd15` (one-object scenes)."""

TRAIN_SIDES: tuple[int, ...] = (48, 64, 64, 80, 96)
"""Square canvas sides drawn per training step (64 twice as often)."""

DRAW_SIZE = (64, 64)
"""The canvas :data:`CALL_DEFAULTS` draws at."""

CALL_DEFAULTS: dict[str, Any] = {
    "height": DRAW_SIZE[0],
    "width": DRAW_SIZE[1],
    "num_inference_steps": 20,
    "guidance_scale": 5.0,
}
"""Keyword arguments for a micro-world ``StableDiffusionPipeline`` call."""

_PIXELS_PER_BATCH = 16 * 64 * 64
_EMA = 0.999


def build_pipeline(seed: int = 0, vae_folder: str | pathlib.Path | None = None):
    """The untrained micro-world ``StableDiffusionPipeline``: a seeded UNet and CLIP text encoder, micro-flux's
    trained VAE (from ``vae_folder``, default the shipped ``hasten/tiny/weights/flux/vae``) and SD 1.5's DDIM
    scheduler configuration.

    Examples
    --------
    >>> pipe = build_pipeline()
    >>> type(pipe).__name__, pipe.vae_scale_factor, pipe.vae.config.shift_factor
    ('StableDiffusionPipeline', 2, None)
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ._store import seeded
    from .tokenizers import clip_tokenizer
    from .trained import path

    folder = pathlib.Path(vae_folder) if vae_folder is not None else path("flux") / "vae"
    if not (folder / "config.json").is_file():
        raise ValueError(f"`vae_folder` must hold a trained micro-flux AutoencoderKL; {folder} has no config.json")
    vae = AutoencoderKL.from_pretrained(folder)
    vae.register_to_config(shift_factor=None)
    tokenizer = clip_tokenizer()
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    with seeded(seed + 1):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                projection_dim=64,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # stable-diffusion-v1-5's noise schedule, with DDIM (LatentWarp's sampler).
    scheduler = DDIMScheduler(**SD15_NOISE_SCHEDULE, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae.eval().requires_grad_(False),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _captions(batch: scenes.SceneBatch, draws: list[float]) -> list[str]:
    def caption(scene: scenes.Scene, u: float) -> str:
        if u < 0.45:
            return scene.caption
        if u < 0.80:
            return " and ".join(obj.noun_phrase for obj in scene.objects)
        if u < 0.90:
            return f"{scene.caption} on a {scene.background} background"
        return ""

    return [caption(scene, u) for scene, u in zip(batch.scenes, draws)]


def _training_batch(
    seed: int, step: int, prompt_phase: bool = False
) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """One step's scenes, captions and noise generator: the look phase draws 1-4 objects on a
    :data:`TRAIN_SIDES` canvas, the prompt phase one object on a :data:`DRAW_SIZE` canvas."""
    if prompt_phase:
        generator = step_generator(seed, 50_000_000 + step, stream=8)
        side, objects = DRAW_SIZE[0], {"num_objects": 1}
    else:
        generator = step_generator(seed, step, stream=7)
        side, objects = TRAIN_SIDES[int(torch.randint(len(TRAIN_SIDES), (1,), generator=generator))], {}
    count = max(2, _PIXELS_PER_BATCH // (side * side))
    seeds = torch.randint(0, scenes.TRAIN_SEEDS.stop, (count,), generator=generator).tolist()
    batch = scenes.batch(seeds, side, side, textures=True, **objects)
    captions = _captions(batch, torch.rand(count, generator=generator).tolist())
    return batch.images * 2.0 - 1.0, captions, generator


def _encode_text(pipe, captions: list[str]) -> torch.Tensor:
    """CLIP's last hidden states as ``StableDiffusionPipeline.encode_prompt`` computes them
    (ids padded to the tokenizer's 77, no attention mask)."""
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids)[0]


def _epsilon_loss(pipe, images: torch.Tensor, captions: list[str], generator: torch.Generator, timesteps=None):
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(
            0, pipe.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=_encode_text(pipe, captions)).sample
    return F.mse_loss(prediction, noise)


@torch.no_grad()
def validation_loss(
    pipe,
    seeds: list[int] | range,
    size: tuple[int, int] = DRAW_SIZE,
    timesteps: tuple[int, ...] = (250, 500, 750),
    captions: list[str] | None = None,
    num_objects: int | None = None,
) -> float:
    """The epsilon-prediction loss (as in training) of ``pipe`` on the scenes of ``seeds`` (use
    :data:`hasten.tiny.scenes.HELD_OUT_SEEDS`) at fixed timesteps and noise; ``captions`` replaces the scenes'
    own (e.g. shuffled ones: how much lower the loss is with the true captions measures how much the model
    reads the prompt); ``num_objects`` fixes the scenes' object count (default: 1-4).

    Examples
    --------
    >>> validation_loss(build_pipeline(), range(2), timesteps=(500,)) > 0.5  # untrained
    True
    """
    batch = scenes.batch(list(seeds), *size, num_objects=num_objects)
    captions = batch.captions if captions is None else list(captions)
    if len(captions) != len(batch.captions):
        raise ValueError(f"`captions` must give one caption per seed ({len(batch.captions)}); got {len(captions)}")
    generator = torch.Generator().manual_seed(0)
    losses = [
        _epsilon_loss(pipe, batch.images * 2.0 - 1.0, captions, generator, torch.full((len(captions),), t)).item()
        for t in timesteps
    ]
    return float(sum(losses) / len(losses))


def train_sd15(
    out: str | pathlib.Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    lr: float = 1e-3,
    prompt_steps: int | None = None,
    prompt_lr: float = 5e-4,
    vae_folder: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Train the micro-world ``StableDiffusionPipeline``; save it in ``out / "model"``.

    Two phases, UNet and CLIP text encoder together, epsilon prediction on SD 1.5's noise schedule (see the
    module docstring): the *look* phase on scenes of 1-4 objects on :data:`TRAIN_SIDES` canvases, then the
    *prompt* phase on one-object scenes at :data:`DRAW_SIZE`, where a caption's words decide most of the
    picture (after the look phase the loss hardly depends on the caption). AdamW with 100 warm-up steps and
    the rate halved every 1500 steps; EMA 0.999 (the prompt phase starts from the look phase's averages).
    Seeded and resumable (see :mod:`hasten.tiny.trained`): every step's scenes, timesteps and noise come
    from ``(seed, phase, step)``, the learning rate does not depend on the run length, and
    ``out / "checkpoint.pt"`` (every 100 steps and at each phase's end) holds the weights, the optimisers,
    the EMAs and the steps.

    Parameters
    ----------
    out : path
        Run folder.
    steps : int, optional
        Look-phase steps (default :data:`DEFAULT_STEPS`).
    seed : int, default 0
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
        Show tqdm bars.
    lr : float, default 1e-3
        Peak AdamW learning rate of the look phase.
    prompt_steps : int, optional
        Prompt-phase steps (default :data:`PROMPT_STEPS`).
    prompt_lr : float, default 5e-4
        Peak AdamW learning rate of the prompt phase.
    vae_folder : path, optional
        The trained micro-flux VAE to use (default the shipped one).

    Returns
    -------
    pathlib.Path
        ``out / "model"``, loadable with ``StableDiffusionPipeline.from_pretrained``.

    Examples
    --------
    >>> import tempfile
    >>> from diffusers import StableDiffusionPipeline
    >>> folder = train_sd15(tempfile.mkdtemp(), steps=1, prompt_steps=1, progress=False)
    >>> type(StableDiffusionPipeline.from_pretrained(folder)).__name__
    'StableDiffusionPipeline'
    """
    out = pathlib.Path(out)
    steps = check_int(DEFAULT_STEPS if steps is None else steps, "steps")
    prompt_steps = check_int(PROMPT_STEPS if prompt_steps is None else prompt_steps, "prompt_steps")
    check_int(seed, "seed", minimum=0)
    for name, value in (("lr", lr), ("prompt_lr", prompt_lr)):
        check_number(value, name, 0, open_low=True)
    pipe = build_pipeline(seed, vae_folder)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizers = {
        "optimizer": torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01),
        "prompt_optimizer": torch.optim.AdamW(parameters, lr=prompt_lr, weight_decay=0.01),
    }
    averaged = {"ema_unet": (unet, copy.deepcopy(unet)), "ema_text": (text_encoder, copy.deepcopy(text_encoder))}
    for _, ema in averaged.values():
        ema.requires_grad_(False)
    modules = {"unet": unet, "text_encoder": text_encoder, **{name: ema for name, (_, ema) in averaged.items()}}
    done = {"look": 0, "prompt": 0}
    if resume and (state := load_checkpoint(out)) is not None:
        for name, module in modules.items():
            module.load_state_dict(state[name])
        for name, optimizer in optimizers.items():
            if name in state:  # a checkpoint of the look phase holds no prompt optimiser
                optimizer.load_state_dict(state[name])
        done.update(look=state["step"], prompt=state.get("prompt_step", 0))
    if done["prompt"] and done["look"] < steps:
        raise ValueError(f"the checkpoint in {out} has started the prompt phase; resume with steps <= {done['look']}")

    def checkpoint() -> None:
        state = {name: module.state_dict() for name, module in modules.items()}
        state.update({name: optimizer.state_dict() for name, optimizer in optimizers.items()})
        save_checkpoint(out, {**state, "step": done["look"], "prompt_step": done["prompt"]})

    def phase(name: str, total: int, optimizer, base_lr: float) -> None:
        unet.train()
        text_encoder.train()

        def train_step(step: int) -> float:
            _set_lr(optimizer, _lr(step, base_lr, 1500))
            images, captions, generator = _training_batch(seed, step, prompt_phase=name == "prompt")
            loss = _epsilon_loss(pipe, images, captions, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            for live, ema in averaged.values():
                _average_into(ema, live, min(_EMA, (step + 1) / (step + 10)))
            return loss.item()

        run_phase(name, done, total, train_step, checkpoint, progress=progress)

    if done["look"] < steps:
        phase("look", steps, optimizers["optimizer"], lr)
    if done["prompt"] < prompt_steps:
        if done["prompt"] == 0:  # the prompt phase starts from the look phase's averaged weights
            for live, ema in averaged.values():
                live.load_state_dict(ema.state_dict())
        phase("prompt", prompt_steps, optimizers["prompt_optimizer"], prompt_lr)
    for live, ema in averaged.values():
        live.load_state_dict(ema.state_dict())
        live.eval().requires_grad_(False)
    components = (pipe.unet, pipe.text_encoder, pipe.vae)
    for module in components:  # shipped in float16: the package's weight budget (loaded back in float32)
        module.half()
    pipe.save_pretrained(out / "model", safe_serialization=True)
    for module in components:
        module.float()
    # transformers loads a model in the dtype its config names: float32, like the diffusers components
    config_file = out / "model" / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float32"}, indent=2) + "\n")
    return out / "model"


# ---------------------------------------------------------------------------------------------
# Video translation on the micro-world: recolour one object of a panning scene
# ---------------------------------------------------------------------------------------------

_FAR_COLOURS = 180.0
"""Smallest RGB distance between an object's colour and the colour a recolour asks for."""


@dataclasses.dataclass(frozen=True)
class RecolourClip:
    """A panning one-object scene and the prompt that recolours its object.

    Attributes
    ----------
    video : hasten.tiny.scenes.SceneVideo
        The source clip (flat background, the camera panning).
    source, target : str
        The object's colour and the colour the prompt asks for (members of :data:`hasten.tiny.scenes.COLOURS`,
        at least 180 apart in RGB).
    prompt : str
        The object without its place, in the target colour (``"a blue circle"``): the object moves
        between grid cells as the camera pans, so a place word would be wrong in some frames.
    """

    video: scenes.SceneVideo
    source: str
    target: str
    prompt: str


def recolour_clip(seed: int, height: int = 64, width: int = 64, frames: int = 8) -> RecolourClip:
    """The recolour task for ``seed`` (use :data:`hasten.tiny.scenes.HELD_OUT_SEEDS`): a one-object scene
    panned over ``frames`` frames, and a prompt naming the same object in a far colour drawn from ``seed``.

    Examples
    --------
    >>> clip = recolour_clip(scenes.HELD_OUT_SEEDS[0], frames=4)
    >>> clip.video.frames.shape, clip.source != clip.target, clip.prompt.endswith(clip.video.scene.objects[0].shape)
    ((4, 64, 64, 3), True, True)
    """
    video = scenes.sample_video(seed, height, width, frames, motion="pan", num_objects=1)
    obj = video.scene.objects[0]
    far = [
        name
        for name, rgb in scenes.COLOURS.items()
        if float(np.linalg.norm(np.subtract(rgb, obj.rgb, dtype=float))) >= _FAR_COLOURS
    ]
    target = far[int(torch.randint(len(far), (1,), generator=torch.Generator().manual_seed(seed)))]
    prompt = dataclasses.replace(obj, colour=target).noun_phrase
    return RecolourClip(video, obj.colour, target, prompt)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(scenes.COLOURS)
    distances = np.linalg.norm(np.asarray(list(scenes.COLOURS.values()), float) - rgb, axis=1)
    return names[int(distances.argmin())]


def recolour_scores(frames: np.ndarray, clip: RecolourClip) -> dict[str, float]:
    """How a translation ``frames`` (``(T, H, W, 3)`` uint8, e.g. ``LatentWarpOutput.frames``) did on ``clip``.

    The object's pixels in each source frame are the ones of exactly its colour (its anti-aliased rim is left
    out); in the translated frame their mean colour is named by the nearest palette colour.

    Returns
    -------
    dict
        ``recoloured``: share of frames (those showing at least 8 object pixels) whose object reads as the
        target colour; ``kept_colour``: share where it still reads as the source colour; ``all_frames``: 1.0
        if every such frame is recoloured, else 0.0; ``background_psnr``: PSNR (dB) of the translated frames
        against the source away from the object (its pixels dilated by 2).

    Examples
    --------
    >>> clip = recolour_clip(scenes.HELD_OUT_SEEDS[0], frames=3)
    >>> recolour_scores(clip.video.frames, clip)["kept_colour"]  # the source itself
    1.0
    """
    import cv2

    from ..measure import psnr

    source = clip.video.frames
    frames = np.asarray(frames)
    if frames.shape != source.shape or frames.dtype != np.uint8:
        raise ValueError(
            f"`frames` must be uint8 of the clip's shape {source.shape}; got {frames.dtype} {frames.shape}"
        )
    rgb = np.asarray(scenes.COLOURS[clip.source])
    names, away = [], []
    for before, after in zip(source, frames):
        mask = (before == rgb).all(-1)
        if mask.sum() >= 8:
            names.append(_nearest_colour(after[mask].astype(float).mean(0)))
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        away.append(~grown)
    keep = np.stack(away)
    background = psnr(torch.from_numpy(frames[keep]).float() / 255.0, torch.from_numpy(source[keep]).float() / 255.0)
    counted = max(len(names), 1)
    recoloured = sum(name == clip.target for name in names)
    return {
        "recoloured": recoloured / counted,
        "kept_colour": sum(name == clip.source for name in names) / counted,
        "all_frames": float(bool(names) and recoloured == len(names)),
        "background_psnr": background,
    }
