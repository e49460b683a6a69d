"""Synthetic videos with a KNOWN optical flow, made by moving a camera over a real photo.

Offline test and benchmark data for optical flow, warping and video translation: scikit-image
ships real photographs; panning or zooming a crop over one gives frames whose true flow is
exact.

Examples
--------
>>> frames, flows = panned(frames=3, size=(32, 48), step=(2, 0))
>>> frames.shape, flows[0].shape, float(flows[0][0, 0, 0])
((3, 32, 48, 3), (32, 48, 2), 2.0)
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["PHOTOS", "panned", "photo", "zoomed"]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str = "astronaut") -> np.ndarray:
    """One of scikit-image's bundled photographs, ``(H, W, 3)`` uint8 RGB."""
    from skimage import data

    if name not in PHOTOS:
        raise ValueError(f"`name` must be one of {', '.join(PHOTOS)}, got {name!r}")
    return getattr(data, name)()


def panned(
    frames: int = 8, size: tuple[int, int] = (64, 96), step: tuple[float, float] = (2.0, 0.0), name: str = "astronaut"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A camera panning by ``step = (dx, dy)`` pixels per frame over a photo.

    Returns ``(T, H, W, 3)`` uint8 frames and, per frame ``t >= 1``, the true flow from frame ``t``
    to frame ``t - 1`` (``(+dx, +dy)`` everywhere: the content moves the other way).
    """
    image = photo(name)
    height, width = size
    dx, dy = step
    scale = max((height + abs(dy) * frames + 2) / image.shape[0], (width + abs(dx) * frames + 2) / image.shape[1], 0.25)
    if scale > 1:
        raise ValueError(f"a {frames}-frame pan of {size} by {step} does not fit in the {name} photo")
    x0 = (image.shape[1] - width - dx * (frames - 1)) / 2
    y0 = (image.shape[0] - height - dy * (frames - 1)) / 2
    out = []
    for t in range(frames):
        matrix = np.float32([[1, 0, -(x0 + dx * t)], [0, 1, -(y0 + dy * t)]])
        out.append(cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR))
    flow = np.zeros((height, width, 2), np.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    return np.stack(out), [flow.copy() for _ in range(frames - 1)]


def zoomed(
    frames: int = 8, size: tuple[int, int] = (64, 96), rate: float = 1.03, name: str = "astronaut"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A camera zooming in by ``rate`` per frame on the photo's centre; frames and true flows (t -> t-1)."""
    image = photo(name)
    height, width = size
    base = min(image.shape[0] / height, image.shape[1] / width) * 0.9  # photo pixels per frame pixel at t = 0
    centre = np.array([image.shape[1] / 2, image.shape[0] / 2])
    out_centre = np.array([(width - 1) / 2, (height - 1) / 2])
    out = []
    for t in range(frames):
        s = base / rate**t
        matrix = np.float32([[s, 0, centre[0] - s * out_centre[0]], [0, s, centre[1] - s * out_centre[1]]])
        out.append(cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    shrink = 1 / rate - 1  # frame t-1 shows the same point closer to the centre
    flow = np.stack([(xs - out_centre[0]) * shrink, (ys - out_centre[1]) * shrink], -1).astype(np.float32)
    return np.stack(out), [flow.copy() for _ in range(frames - 1)]
