"""Video I/O (OpenCV)."""

from .io import save_media, to_uint8, write_video

__all__ = ["save_media", "to_uint8", "write_video"]
