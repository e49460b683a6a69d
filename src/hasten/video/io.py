"""Reading videos, and writing images and videos atomically: a crash never leaves a half-written output file.

- :func:`read_video`: every frame (RGB uint8) and the frame rate, with a clear error for a file
  OpenCV cannot decode.
- :func:`write_video` / :func:`save_media`: write to a temporary file beside the target, then
  rename (atomic on one filesystem).
- :func:`copy_audio`: put a source video's audio track on a written video when an ``ffmpeg``
  executable is available (on ``PATH`` or from the ``imageio-ffmpeg`` wheel); otherwise one
  notice and the video stays silent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch


@dataclass
class Video:
    """Decoded frames ``(frames, height, width, 3)`` uint8 RGB and the frame rate."""

    frames: np.ndarray
    fps: float

    def __len__(self) -> int:
        return len(self.frames)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Video:
    """Every frame of the video at ``path`` (or the first ``max_frames``), RGB, with its fps.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one OpenCV cannot
    decode (not a video, truncated, corrupt), naming the file.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = write_video(torch.rand(3, 3, 16, 24), tempfile.mkdtemp() + "/clip.avi", fps=12)
    >>> video = read_video(path)
    >>> video.frames.shape, video.fps
    ((3, 16, 24, 3), 12.0)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        if not capture.isOpened():
            raise ValueError(f"OpenCV cannot open {path.name!r} as a video (unreadable or corrupt)")
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or 0.0
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"{path.name!r} has no decodable frame (unreadable or corrupt video)")
    if not fps > 0:
        raise ValueError(f"{path.name!r} reports no frame rate (corrupt container)")
    return Video(np.stack(frames), fps)


def ffmpeg_executable() -> str | None:
    """An ffmpeg binary: ``imageio-ffmpeg``'s if that wheel is installed, else one on ``PATH``."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - not installed, or its binary is missing
        return shutil.which("ffmpeg")


_AUDIO_NOTICE = False


def copy_audio(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Mux ``source``'s audio (if any) into the video ``target``, atomically. True if it did.

    Without an ffmpeg executable this prints one notice per process and returns False.
    """
    global _AUDIO_NOTICE
    ffmpeg = ffmpeg_executable()
    if ffmpeg is None:
        if not _AUDIO_NOTICE:
            warnings.warn(
                "no ffmpeg found (pip install imageio-ffmpeg): translated videos are written without audio",
                stacklevel=2,
            )
            _AUDIO_NOTICE = True
        return False
    target = Path(target)
    tmp = _atomic_target(target)
    try:
        result = subprocess.run(
            [
                ffmpeg,
                "-y",
                "-loglevel",
                "error",
                "-i",
                str(target),
                "-i",
                str(source),
                "-map",
                "0:v:0",
                "-map",
                "1:a:0?",
                "-c:v",
                "copy",
                "-c:a",
                "aac",
                "-shortest",
                str(tmp),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            return False
        os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) float in [0, 1] -> (..., H, W, C) uint8 RGB."""
    array = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(array, -3, -1)


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_video(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write frames to an .mp4 (mp4v), .avi (MJPG) or .webm (VP9, plays in browsers) file, atomically.

    ``frames``: a (F, C, H, W) tensor in [0, 1], or a (F, H, W, 3) uint8 RGB array.
    """
    path = Path(path)
    if frames.ndim != 4:
        raise ValueError(f"`frames` must be (frames, channels, height, width), got {tuple(frames.shape)}")
    codec = {".mp4": "mp4v", ".avi": "MJPG", ".webm": "VP90"}.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"video `path` must end in .mp4, .avi or .webm, got {path.name!r}")
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.shape[-1] != 3:
            raise ValueError(f"array `frames` must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        pixels = frames
    else:
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
