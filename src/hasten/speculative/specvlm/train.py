"""Online-logit distillation of a SpecVLM draft from its target, on the fly (no corpus to prepare).

For each (image, prompt) pair the target writes a greedy continuation once; then, every step,
the target runs over prompt + continuation (teacher: last hidden states and logits) and the
draft predicts each next feature from the current one and the next token's embedding, over the
compressed image. Loss (SpecVLM): ``1.0 * SmoothL1(draft feature, target feature) + 0.1 *
CE(target probabilities, draft logits)`` on the text positions (the ones speculative decoding
drafts). With the "gate" compressor, the gate also learns (cross-entropy) to pick the primitive
whose draft loss is lowest on the pair.

Checkpoints (``out/checkpoint``: draft, optimiser, step, RNG states; written to a temporary
folder and renamed) every ``checkpoint_every`` steps; a run started on a folder with a
checkpoint resumes from it. With the same seed a run is deterministic, resumed or not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..._validation import check_positive_int
from .compressor import PRIMITIVES
from .decoding import _Capture, draft_inputs
from .draft import DraftModel

__all__ = ["load_pairs", "train_draft"]

CHECKPOINT = "checkpoint"


def load_pairs(data: str | os.PathLike) -> list[tuple[Any, str]]:
    """(image, prompt) pairs from a JSONL file (``{"image": path, "prompt": text}`` per line) or a
    folder of images with ``.txt`` prompts beside them (same stem)."""
    from PIL import Image

    data = Path(data)
    pairs = []
    if data.is_dir():
        for image in sorted(p for p in data.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
            text = image.with_suffix(".txt")
            pairs.append(
                (
                    Image.open(image).convert("RGB"),
                    text.read_text().strip() if text.exists() else "Describe the picture.",
                )
            )
    elif data.is_file():
        for number, line in enumerate(data.read_text().splitlines(), 1):
            if line.strip():
                entry = json.loads(line)
                if "image" not in entry or "prompt" not in entry:
                    raise ValueError(f'{data}:{number}: each line needs "image" and "prompt"')
                path = Path(entry["image"])
                pairs.append(
                    (Image.open(path if path.is_absolute() else data.parent / path).convert("RGB"), entry["prompt"])
                )
    else:
        raise FileNotFoundError(f"no training data at {data}")
    if not pairs:
        raise ValueError(f"{data} holds no (image, prompt) pair")
    return pairs


def _teacher(model: Any, processor: Any, image: Any, prompt: str, continuation: int) -> dict:
    from ...tiny.vlms import chat_prompt

    inputs = processor(images=[image], text=[chat_prompt(processor, prompt)], return_tensors="pt").to(model.device)
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=continuation, do_sample=False)
    full = dict(inputs)
    full["input_ids"] = sequence
    full["attention_mask"] = torch.ones_like(sequence)
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(sequence[:, inputs["input_ids"].shape[1] :])], 1
        )
    return {"inputs": full, "prompt_length": inputs["input_ids"].shape[1]}


def _loss(model: Any, draft: DraftModel, teacher: dict, mode: str | None) -> torch.Tensor:
    inputs = teacher["inputs"]
    capture = _Capture(draft._target["language_model"])
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        capture.remove()
    features, logits = out.hidden_states[-1], out.logits
    ids = inputs["input_ids"]
    old = draft.compressor.mode
    if mode is not None:
        draft.compressor.mode = mode
    try:
        # positions 0..T-2 predict 1..T-1; the last token's "next" is a dummy, dropped below
        f, e, _ = draft_inputs(model, draft, ids[:, :-1], features[:, :-1], capture.embeds[:, :-1], ids[0, -1])
    finally:
        draft.compressor.mode = old
    predicted = draft(f, None, None, start=0, next_embeds=e)
    # the continuation's features f_P .. f_{T-1} (P = prompt length) are predicted at the last T - P positions
    text = max(1, ids.shape[1] - teacher["prompt_length"])
    target_features = features[:, -text:]
    target_probs = torch.softmax(logits[:, -text:].float(), -1)  # what the target predicts from those features
    pred = predicted[:, -text:]
    feature_loss = torch.nn.functional.smooth_l1_loss(pred.float(), target_features.float())
    draft_logits = draft.logits(pred).float()
    ce = -(target_probs * torch.log_softmax(draft_logits, -1)).sum(-1).mean()
    return feature_loss + 0.1 * ce


def train_draft(
    model: Any,
    processor: Any,
    pairs: Sequence[tuple[Any, str]],
    draft: DraftModel,
    steps: int = 1000,
    out: str | os.PathLike | None = None,
    lr: float = 1e-3,
    continuation: int = 16,
    seed: int = 0,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> list[float]:
    """Distil ``draft`` from ``model`` on ``pairs`` for ``steps`` (see the module docstring); losses per step.

    Resumes from ``out/checkpoint`` when it exists; saves the final draft to ``out``.
    """
    check_positive_int(steps, "steps")
    from ...token_pruning.adapters import adapter_for

    draft.bind(model)
    draft._target["language_model"] = adapter_for(model).language_model(model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    draft.train()
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    torch.manual_seed(seed)
    order = random.Random(seed)
    start, losses = 0, []
    folder = Path(out) if out is not None else None
    if folder is not None and (folder / CHECKPOINT / "state.pt").exists():
        state = torch.load(folder / CHECKPOINT / "state.pt", weights_only=False)
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        order.setstate(state["order_rng"])
    teachers: dict[int, dict] = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="draft", disable=not progress)
    for step in bar:
        index = order.randrange(len(pairs))
        if index not in teachers:
            teachers[index] = _teacher(model, processor, *pairs[index], continuation)
        teacher = teachers[index]
        loss = _loss(model, draft, teacher, None)
        if draft.compressor.mode == "gate":  # teach the gate the primitive with the lowest loss here
            with torch.no_grad():
                per_primitive = torch.stack([_loss(model, draft, teacher, p) for p in PRIMITIVES[1:]])
            with torch.no_grad():
                capture_features = model(**teacher["inputs"], output_hidden_states=True).hidden_states[-1][0]
            scores = draft.compressor.gate(capture_features.float().mean(0).to(draft.compressor.gate.weight.dtype))
            loss = loss + torch.nn.functional.cross_entropy(scores[None].float(), per_primitive.argmin()[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if folder is not None and (step + 1) % checkpoint_every == 0:
            _checkpoint(folder, draft, optimizer, step + 1, losses, order)
    draft.eval()
    if folder is not None:
        draft.save_pretrained(folder)
        _checkpoint(folder, draft, optimizer, steps, losses, order)
    return losses


def _checkpoint(
    folder: Path, draft: DraftModel, optimizer, step: int, losses: list[float], order: random.Random
) -> None:
    """Write the resumable state atomically (a temporary folder, then a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {
            "draft": draft.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "losses": losses,
            "torch_rng": torch.get_rng_state(),
            "order_rng": order.getstate(),
        },
        tmp / "state.pt",
    )
    final = folder / CHECKPOINT
    old = folder / f".{CHECKPOINT}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
