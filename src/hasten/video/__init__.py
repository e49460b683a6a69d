"""Video I/O (OpenCV), optical flow (OpenCV DIS), occlusion masks and warping."""

from .flow import backward_warp, flow_pair, occlusion_mask, optical_flow, resize_flow, warp_error
from .io import Video, copy_audio, read_video, save_media, to_uint8, write_video

__all__ = ["Video", "backward_warp", "copy_audio", "flow_pair", "occlusion_mask", "optical_flow", "read_video",
           "resize_flow", "save_media", "to_uint8", "warp_error", "write_video"]
