"""Writing images and videos atomically: a crash never leaves a half-written output file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) float in [0, 1] -> (..., H, W, C) uint8 RGB."""
    array = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(array, -3, -1)


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write (F, C, H, W) frames in [0, 1] to an .mp4 (mp4v) or .avi (MJPG) file, atomically."""
    path = Path(path)
    if frames.dim() != 4:
        raise ValueError(f"`frames` must be (frames, channels, height, width), got {tuple(frames.shape)}")
    codec = {".mp4": "mp4v", ".avi": "MJPG"}.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"video `path` must end in .mp4 or .avi, got {path.name!r}")
    pixels = to_uint8(frames)
    tmp = _atomic_target(path)
    try:
        height, width = pixels.shape[1:3]
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV could not open a {codec} writer for {path}")
        for frame in pixels:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_media(sample: torch.Tensor, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Save one pipeline sample atomically: (C, H, W) in [0, 1] as an image (.png unless ``path`` ends
    in .jpg/.jpeg), (F, C, H, W) as a video (.mp4 unless ``path`` ends in .avi). Returns the path written."""
    path = Path(path)
    if sample.dim() == 4:
        return write_video(sample, path if path.suffix.lower() in (".mp4", ".avi") else path.with_suffix(".mp4"), fps)
    if sample.dim() != 3:
        raise ValueError(f"`sample` must be (C, H, W) or (F, C, H, W), got {tuple(sample.shape)}")
    target = path if path.suffix.lower() in (".png", ".jpg", ".jpeg") else path.with_suffix(".png")
    tmp = _atomic_target(target)
    try:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(to_uint8(sample), cv2.COLOR_RGB2BGR)):
            raise RuntimeError(f"OpenCV could not write {target}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
