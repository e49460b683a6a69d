"""Video I/O (OpenCV)."""

from .io import save_media, write_video

__all__ = ["save_media", "write_video"]
