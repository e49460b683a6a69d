"""Video I/O (OpenCV), optical flow (OpenCV DIS), occlusion masks and warping."""

from .flow import (
    backward_warp,
    flow_pair,
    leaves_frame,
    occlusion_mask,
    optical_flow,
    resize_flow,
    warp_error,
    warped_difference_mask,
)
from .io import Video, copy_audio, read_video, save_media, to_uint8, write_video

__all__ = [
    "Video",
    "backward_warp",
    "copy_audio",
    "flow_pair",
    "leaves_frame",
    "occlusion_mask",
    "optical_flow",
    "read_video",
    "resize_flow",
    "save_media",
    "to_uint8",
    "warp_error",
    "warped_difference_mask",
    "write_video",
]
