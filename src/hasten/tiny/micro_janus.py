"""A tiny Janus trained on :mod:`hasten.tiny.scenes`: the trained autoregressive image micro-model.

Random weights give near-uniform next-token distributions, so Speculative Jacobi Decoding's
acceptance rate means nothing on them. This module trains the real transformers
``JanusForConditionalGeneration`` at a tiny size on captioned scenes, in two seeded, resumable
stages, one CPU thread each:

1. ``janus-vq`` (:func:`train_vq`): the VQ tokenizer (``JanusVQVAE``): 32 x 32 RGB scenes to an
   8 x 8 grid of codes from a 256-entry codebook, and back. Codes are compared by cosine
   similarity (unit-norm latents and codebook, as Janus's decoder L2-normalises codebook entries
   in ``get_codebook_entry``); the saved codebook is unit-norm, so ``JanusVQVAE.encode``'s
   Euclidean nearest neighbour picks the same codes. Unused codes are restarted from encoder
   outputs.
2. ``janus`` (:func:`train_janus`): the language model with Janus's generation embeddings,
   aligner and generation head, trained with cross-entropy on the 64 image tokens of each scene
   after its caption (``"<s>{caption}<begin_of_image>"``, what ``JanusProcessor`` builds in image
   mode). 10% of captions are replaced by the unconditional prompt (every token but BOS and BOI
   set to the pad token, as Janus's generate() and :class:`hasten.pipelines.SJDPipeline` build
   it), so classifier-free guidance works.

The understanding path (SigLIP vision model, aligner, text ``lm_head``) keeps its seeded random
weights: it is part of the class but unused by image generation.

Scenes: :func:`hasten.tiny.scenes.sample_scene` at 32 x 32 with 1-2 objects (``max_objects=2``),
both sizes, flat backgrounds, training seeds only. The finished model is saved with
``save_pretrained`` (and its ``JanusProcessor``) in ``hasten/tiny/weights/janus`` and loaded with
``from_pretrained`` by :func:`load`.

Commands (each resumes from its last checkpoint under ``$HASTEN_HOME/train/<name>``)::

    hasten tiny train janus-vq
    hasten tiny train janus

Examples
--------
>>> model, processor = load()                                   # doctest: +SKIP
>>> from hasten.pipelines import SJDConfig, SJDPipeline
>>> out = SJDPipeline(model, processor)("a red circle in the centre", sjd=SJDConfig(), seed=0)  # doctest: +SKIP
>>> out.images.shape                                            # doctest: +SKIP
torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validation import check_positive_int
from . import scenes
from ._store import seeded

__all__ = [
    "AR_SCHEDULE_STEPS",
    "CODEBOOK",
    "GRID",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "VQ_SCHEDULE_STEPS",
    "janus_micro_config",
    "load",
    "load_vq",
    "scene_images",
    "train_janus",
    "train_vq",
]

IMAGE_SIZE = 32
"""Side of the generated images in pixels."""
GRID = 8
"""Side of the image-token grid (``GRID * GRID`` tokens per image; 4 x 4 pixels per token)."""
CODEBOOK = 256
"""Entries in the VQ codebook (the image vocabulary the generation head predicts)."""
MAX_OBJECTS = 2
"""Objects per training scene: 1 or 2."""

_WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights"
_SEED = 0


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def _tokenizer():
    from .ar_image import _JANUS_SPECIALS
    from .ar_image import _tokenizer as ar_tokenizer

    return ar_tokenizer(_JANUS_SPECIALS)


def janus_micro_config(tokenizer=None):
    """The micro Janus's ``JanusConfig``: a 4-layer, 128-wide Llama; 8 x 8 codes of 256 entries.

    Examples
    --------
    >>> config = janus_micro_config()
    >>> config.vq_config.num_patches, config.vq_config.num_embeddings, config.text_config.num_hidden_layers
    (8, 256, 4)
    """
    from transformers import JanusConfig

    from .ar_image import _JANUS_SPECIALS

    tokenizer = tokenizer or _tokenizer()
    hidden = 128
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_SIZE // GRID,
        projection_dim=hidden,
        depth=1,
        num_image_tokens=GRID * GRID,
        mlp_ratio=2.0,
    )
    # Three VQ levels (two 2x downsamplings): 32 x 32 pixels <-> 8 x 8 codes. JanusConfig sets the VQ grid
    # (num_patches) to image_size // patch_size of the vision config.
    vq = dict(
        embed_dim=8,
        num_embeddings=CODEBOOK,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1],
        num_res_blocks=1,
        num_patches=GRID,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=1,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(_JANUS_SPECIALS["image_token"]),
    )


def scene_images(seeds, **kwargs) -> tuple[torch.Tensor, list[scenes.Scene]]:
    """Scenes of ``seeds`` as the micro Janus sees them: ``(B, 3, 32, 32)`` in [-1, 1] and the scenes.

    Examples
    --------
    >>> pixels, drawn = scene_images([1, 2])
    >>> pixels.shape, float(pixels.min()) >= -1.0, len(drawn)
    (torch.Size([2, 3, 32, 32]), True, 2)
    """
    out = scenes.batch(list(seeds), IMAGE_SIZE, IMAGE_SIZE, max_objects=MAX_OBJECTS, **kwargs)
    return out.images * 2 - 1, out.scenes


def _seeds(seed: int, step: int, count: int) -> list[int]:
    """The training-scene seeds of one step: a function of (seed, step) only, so resuming is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, scenes.TRAIN_SEEDS.stop, (count,), generator=g).tolist()


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _check_steps(steps: int) -> None:
    check_positive_int(steps, "steps")


def _resume_state(out: pathlib.Path, resume: bool) -> dict | None:
    from . import trained

    if not resume:
        return None
    state = trained.load_checkpoint(out)
    if state is None:
        raise ValueError(f"`resume`: no checkpoint ({trained.CHECKPOINT}) in {out}")
    return state


# ---------------------------------------------------------------------------------------------
# Stage 1: the VQ tokenizer
# ---------------------------------------------------------------------------------------------


def _vq_codes(vq, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm latents ``(B, D, g, g)``, their nearest unit-norm codes (same shape) and indices ``(B, g*g)``."""
    latents = F.normalize(vq.quant_conv(vq.encoder(pixels)), dim=1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    index = (flat @ codebook.T).argmax(-1)
    codes = codebook[index].view(latents.shape[0], latents.shape[2], latents.shape[3], -1).permute(0, 3, 1, 2)
    return latents, codes, index.view(latents.shape[0], -1)


VQ_SCHEDULE_STEPS = 1000
"""Horizon of the VQ stage's cosine learning-rate schedule and of its dead-code restarts (the first
80%), fixed whatever ``steps`` is, so a run resumed to more steps equals an uninterrupted one."""

FOREGROUND_WEIGHT = 10.0
"""Weight of object pixels in the VQ reconstruction loss (background pixels weigh 1)."""


def _foreground_weight(pixels: torch.Tensor, drawn: list[scenes.Scene]) -> torch.Tensor:
    """``(B, 1, H, W)``: :data:`FOREGROUND_WEIGHT` where a pixel differs from its scene's flat
    background colour, else 1. Objects cover a few percent of a scene; unweighted, the tokenizer
    learns the background first and codes objects as smudges."""
    background = torch.tensor([scenes.BACKGROUNDS[scene.background] for scene in drawn], dtype=pixels.dtype)
    background = (background / 255.0 * 2 - 1)[:, :, None, None]
    foreground = (pixels - background).abs().amax(1, keepdim=True) > 0.02
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * foreground.to(pixels.dtype)


def train_vq(
    out: str | pathlib.Path,
    *,
    steps: int | None = None,
    seed: int = _SEED,
    resume: bool = False,
    progress: bool = True,
    batch_size: int = 16,
    checkpoint_every: int = 100,
) -> pathlib.Path:
    """Train the micro Janus's VQ tokenizer on scenes (``hasten tiny train janus-vq``).

    Parameters
    ----------
    out : path
        Run folder: the checkpoint (every ``checkpoint_every`` steps) and, at the end, the
        ``JanusVQVAE`` saved with ``save_pretrained`` in ``out / "model"``.
    steps : int, optional
        AdamW steps (default 1000; learning rate 2e-3, 50 warm-up steps, cosine decay to 10% over
        :data:`VQ_SCHEDULE_STEPS`). The
        loss: reconstruction (squared + 0.5 absolute error, object pixels weighted
        :data:`FOREGROUND_WEIGHT` times), codebook and 0.25 x commitment terms.
    seed : int, default 0
        Seeds the initial weights and the scene seeds of every step (a function of seed and step).
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
    batch_size : int, default 16
    checkpoint_every : int, default 100

    Returns
    -------
    pathlib.Path
        ``out / "model"``.

    Examples
    --------
    >>> import tempfile
    >>> model = train_vq(tempfile.mkdtemp(), steps=2, batch_size=2, progress=False)
    >>> sorted(p.name for p in model.iterdir())
    ['config.json', 'model.safetensors']
    """
    from transformers.models.janus.modeling_janus import JanusVQVAE

    from . import trained

    steps = 1000 if steps is None else steps
    _check_steps(steps)
    out = pathlib.Path(out)
    config = janus_micro_config().vq_config
    with seeded(seed):
        vq = JanusVQVAE(config)
    vq.train()
    optimizer = torch.optim.AdamW(vq.parameters(), lr=2e-3, weight_decay=0.0)
    state = _resume_state(out, resume)
    start, log = 0, []
    if state is not None:
        vq.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    usage = torch.zeros(CODEBOOK)  # code use since the last restart check
    restart = torch.Generator().manual_seed(seed + 1)
    if state is not None:
        restart.set_state(state["restart_rng"])
        usage = state["usage"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="janus-vq", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, VQ_SCHEDULE_STEPS, 2e-3, 50)
        pixels, drawn = scene_images(_seeds(seed, step, batch_size))
        latents, codes, index = _vq_codes(vq, pixels)
        usage += torch.bincount(index.flatten(), minlength=CODEBOOK)
        straight = latents + (codes - latents).detach()
        recon = vq.decoder(vq.post_quant_conv(straight))
        weight = _foreground_weight(pixels, drawn)
        error = (recon - pixels).pow(2) + 0.5 * (recon - pixels).abs()
        rec_loss = (weight * error).sum() / (weight.sum() * pixels.shape[1])
        vq_loss = F.mse_loss(codes, latents.detach()) + 0.25 * F.mse_loss(latents, codes.detach())
        loss = rec_loss + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 and step + 1 < 0.8 * VQ_SCHEDULE_STEPS:  # restart dead codes from encoder outputs
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
                pick = torch.randint(len(flat), (len(dead),), generator=restart)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = flat[pick]
            usage.zero_()
        log.append((step, rec_loss.item(), vq_loss.item()))
        bar.set_postfix(rec=f"{log[-1][1]:.4f}", vq=f"{log[-1][2]:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            trained.save_checkpoint(
                out,
                dict(
                    model=vq.state_dict(),
                    optimizer=optimizer.state_dict(),
                    step=step + 1,
                    log=log,
                    restart_rng=restart.get_state(),
                    usage=usage.clone(),
                ),
            )
    bar.close()
    with torch.no_grad():  # unit-norm codebook: JanusVQVAE.encode's Euclidean argmin == cosine argmax
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    vq.eval().save_pretrained(out / "model")
    return out / "model"


def load_vq(folder: str | pathlib.Path | None = None):
    """The trained VQ tokenizer (``JanusVQVAE``), loaded with ``from_pretrained``.

    Examples
    --------
    >>> vq = load_vq()                                              # doctest: +SKIP
    >>> vq.encode(scene_images([1])[0]).image_tokens.shape          # doctest: +SKIP
    torch.Size([64])
    """
    from transformers.models.janus.modeling_janus import JanusVQVAE

    folder = pathlib.Path(folder) if folder is not None else _WEIGHTS / "janus-vq"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no trained VQ model in {folder}; run `hasten tiny train janus-vq`")
    return JanusVQVAE.from_pretrained(folder).eval()


# ---------------------------------------------------------------------------------------------
# Stage 2: the autoregressive model
# ---------------------------------------------------------------------------------------------


def _processor(tokenizer):
    from transformers import JanusImageProcessorPil, JanusProcessor

    return JanusProcessor(
        JanusImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer,
        num_image_tokens=GRID * GRID,
    )


def _prompt_ids(processor, captions: list[str], uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(B, S)`` ids of ``"<s>{caption}<begin_of_image>"`` and their attention mask.

    Rows where ``uncond`` is set become the unconditional prompt: every token but BOS and BOI set
    to the pad token (attention kept), as :class:`hasten.pipelines.sjd_adapters.JanusAdapter` builds it.
    """
    tokenizer = processor.tokenizer
    rows = [processor(text=[c], generation_mode="image", return_tensors="pt")["input_ids"][0] for c in captions]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    for i, row in enumerate(rows):
        if uncond[i]:
            row = torch.where((row == tokenizer.bos_token_id) | (row == boi), row, tokenizer.pad_token_id)
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def _ar_loss(model, prompt_ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the generation head on the image tokens that follow each prompt."""
    text = model.get_input_embeddings()(prompt_ids)
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1])
    embeds = torch.cat([text, image], 1)
    full_mask = torch.cat([mask, mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions
    ).last_hidden_state
    logits = model.model.generation_head(hidden[:, prompt_ids.shape[1] - 1 :])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


def _tokenised_dataset(vq, count: int, seed: int, folder: pathlib.Path, progress: bool):
    """``count`` training scenes as VQ codes ``(count, 64)`` and captions (cached in ``folder``)."""
    file = folder / f"dataset-{count}-{seed}.pt"
    if file.is_file():
        data = torch.load(file, weights_only=False)
        return data["tokens"], data["captions"]
    g = torch.Generator().manual_seed(seed * 7 + 3)
    seeds = torch.randint(0, scenes.TRAIN_SEEDS.stop, (count,), generator=g).tolist()
    tokens, captions = [], []
    with torch.no_grad():
        for start in tqdm(range(0, count, 256), desc="tokenising scenes", disable=not progress):
            pixels, drawn = scene_images(seeds[start : start + 256])
            tokens.append(_vq_codes(vq, pixels)[2])
            captions += [scene.caption for scene in drawn]
    tokens = torch.cat(tokens)
    tmp = file.with_suffix(".tmp")
    torch.save(dict(tokens=tokens, captions=captions), tmp)
    tmp.replace(file)
    return tokens, captions


def _save_model(model, processor, folder: pathlib.Path) -> None:
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(tokenizer.boi_token)}
    model.generation_config._from_model_config = False
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)


AR_SCHEDULE_STEPS = 2500
"""Horizon of the AR stage's cosine learning-rate schedule, fixed whatever ``steps`` is: a run of
``steps`` steps is the first ``steps`` steps of one schedule, so it resumes and stops anywhere."""


def train_janus(
    out: str | pathlib.Path,
    *,
    steps: int | None = None,
    seed: int = _SEED,
    resume: bool = False,
    progress: bool = True,
    batch_size: int = 32,
    dataset_size: int = 40_000,
    uncond_rate: float = 0.1,
    vq_folder: str | pathlib.Path | None = None,
    checkpoint_every: int = 100,
) -> pathlib.Path:
    """Train the micro Janus's language model and generation head (``hasten tiny train janus``).

    Parameters
    ----------
    out : path
        Run folder: the tokenised dataset, the checkpoint and, at the end, the whole
        ``JanusForConditionalGeneration`` with its ``JanusProcessor`` in ``out / "model"``.
    steps : int, optional
        AdamW steps (default 1500; learning rate 2e-3, 100 warm-up steps, then cosine decay towards
        10% over :data:`AR_SCHEDULE_STEPS`, weight decay 0.01, gradient norm clipped at 1).
    seed : int, default 0
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
    batch_size : int, default 32
    dataset_size : int, default 40000
        Training scenes, tokenised once by the VQ model (cached in ``out``).
    uncond_rate : float, default 0.1
        Fraction of captions replaced by the unconditional prompt (for classifier-free guidance).
    vq_folder : path, optional
        The trained VQ tokenizer (default: the shipped ``weights/janus-vq``).
    checkpoint_every : int, default 100

    Returns
    -------
    pathlib.Path
        ``out / "model"``.

    Examples
    --------
    >>> import tempfile
    >>> model = train_janus(tempfile.mkdtemp(), steps=1, batch_size=2, dataset_size=4, progress=False)
    >>> (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    True
    """
    from transformers import JanusForConditionalGeneration

    from . import trained

    steps = 1500 if steps is None else steps
    _check_steps(steps)
    if not 0.0 <= uncond_rate < 1.0:
        raise ValueError(f"`uncond_rate` must be in [0, 1), got {uncond_rate!r}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    processor = _processor(tokenizer)
    with seeded(seed):
        model = JanusForConditionalGeneration(janus_micro_config(tokenizer))
    vq = load_vq(vq_folder)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    tokens, captions = _tokenised_dataset(vq, dataset_size, seed, out, progress)
    params = [
        p for name, p in model.named_parameters() if name.startswith(("model.language_model", "model.generation_"))
    ]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    model.train()
    state = _resume_state(out, resume)
    start, log = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="janus", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, AR_SCHEDULE_STEPS, 2e-3, 100)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(tokens), (batch_size,), generator=g)
        uncond = torch.rand(batch_size, generator=g) < uncond_rate
        ids, mask = _prompt_ids(processor, [captions[i] for i in rows.tolist()], uncond)
        loss = _ar_loss(model, ids, mask, tokens[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append((step, loss.item()))
        bar.set_postfix(loss=f"{log[-1][1]:.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            trained.save_checkpoint(
                out, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step + 1, log=log)
            )
    bar.close()
    _save_model(model, processor, out / "model")
    return out / "model"


def load(folder: str | pathlib.Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The trained micro Janus and its processor, loaded with ``from_pretrained``.

    Parameters
    ----------
    folder : path, optional
        Default: the shipped weights (``hasten/tiny/weights/janus``).
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    (JanusForConditionalGeneration, JanusProcessor)
        On the CPU, in eval mode; it generates 8 x 8 tokens = 32 x 32 pixel images.

    Examples
    --------
    >>> model, processor = load()
    >>> model.config.vq_config.num_embeddings, model.config.vision_config.num_image_tokens
    (256, 64)
    """
    from transformers import AutoProcessor, JanusForConditionalGeneration

    folder = pathlib.Path(folder) if folder is not None else _WEIGHTS / "janus"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained micro Janus in {folder}; run `hasten tiny train janus-vq` then `hasten tiny train janus`"
        )
    model = JanusForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(folder)
