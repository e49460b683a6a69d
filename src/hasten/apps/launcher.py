"""The small launcher every hasten Gradio app shares: common command-line flags and ``launch``.

An app file defines ``build_demo(model, device=None, dtype=None) -> gr.Blocks`` and a ``main``
that parses :func:`add_common_args` flags and calls :func:`launch`::

    def main(argv=None):
        parser = argparse.ArgumentParser(description="...")
        add_common_args(parser)
        args = parser.parse_args(argv)
        demo = build_demo(args.model, device=args.device, dtype=args.dtype)
        launch(demo, host=args.host, port=args.port, share=args.share)

Nothing here knows about any particular method; the apps do. :func:`to_image` turns a model
output into what ``gr.Image`` shows, :func:`whole_number` checks a ``gr.Number`` field,
:func:`size_text` writes a size the one way every app writes it (height x width) and
:func:`random_weights_notice` is the line an app shows when its model has random weights, and
:func:`connect_run` wires the Run button and the one-click examples to the app's function, and
:func:`prompt_accuracy` judges a micro-world picture against its prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local demo

import gradio as gr  # noqa: E402  (after the analytics switch)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hasten.loading import DTYPES, check_device  # noqa: E402
from hasten.video import to_uint8  # noqa: E402

__all__ = [
    "add_common_args",
    "connect_run",
    "free_port",
    "launch",
    "prompt_accuracy",
    "random_weights_notice",
    "size_text",
    "to_image",
    "whole_number",
]


def add_common_args(parser: argparse.ArgumentParser, *, default_model: str = "tiny-flux") -> argparse.ArgumentParser:
    """Add the flags every app takes: ``--model --host --port --share --device --dtype``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The app's parser; returned for chaining.
    default_model : str
        Default of ``--model`` (the embedded offline tiny model unless the app says otherwise).

    Examples
    --------
    >>> import argparse
    >>> args = add_common_args(argparse.ArgumentParser()).parse_args(["--port", "7861"])
    >>> args.model, args.host, args.port, args.share, args.device, args.dtype
    ('tiny-flux', '127.0.0.1', 7861, False, None, None)
    """
    parser.add_argument(
        "--model",
        default=default_model,
        help="a trained micro-world (micro-flux, micro-sd15, ...: real pictures), an embedded random-weight tiny "
        f"model (tiny-flux, ...) or a model id / local folder (default: {default_model})",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1; 0.0.0.0 to serve the local network)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port to serve on (default: the first free port from 7860)"
    )
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights dtype (default: float32 for tiny models and CPU, bfloat16 on CUDA)",
    )
    return parser


def _device(text: str) -> str:
    """``--device``: checked against this machine when parsed (``--device cuda`` without CUDA is an error)."""
    try:
        return check_device(text, argument="--device")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--device ")) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it).

    Examples
    --------
    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


GRADIO_SHARE_HINT = "set `share=True` in `launch()`"
SHARE_HINT = "run the app with --share (e.g. `hasten app NAME --share`; needs internet)"


class _ShareHintStream:
    """``sys.stdout`` with Gradio's "set `share=True` in `launch()`" hint replaced by the ``--share`` flag."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.replace(GRADIO_SHARE_HINT, SHARE_HINT))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def launch(
    demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs: Any
) -> Any:
    """Serve ``demo`` on ``host:port``; extra keywords go to :meth:`gradio.Blocks.launch`.

    Blocks until the server stops, unless ``prevent_thread_lock=True`` is passed (tests do that
    and call ``demo.close()`` themselves).

    Parameters
    ----------
    demo : gradio.Blocks
        The app, as built by its ``build_demo``.
    host : str
        Address to bind, default ``"127.0.0.1"`` (this machine only).
    port : int, optional
        Port to bind; ``None`` lets Gradio take the first free port from 7860.
    share : bool
        Also open a public ``gradio.live`` tunnel (needs the internet).

    Examples
    --------
    >>> import gradio as gr
    >>> with gr.Blocks() as demo:
    ...     _ = gr.Markdown("hello")
    >>> _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    >>> demo.local_url.startswith("http://127.0.0.1:")
    True
    >>> demo.close()  # doctest: +ELLIPSIS
    Closing server running on port: ...
    """
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"`port` must be in 1..65535 or None, got {port!r}")
    # Gradio tells a user to edit `launch()`; our users pass --share on the command line instead
    with contextlib.redirect_stdout(_ShareHintStream(sys.stdout)):
        return demo.launch(server_name=host, server_port=port, share=share, **kwargs)


def to_image(output: torch.Tensor, min_side: int = 1) -> np.ndarray:
    """One image of a pipeline output in [0, 1], shape (1, C, H, W) or (C, H, W), as uint8 (H, W, C).

    Images whose short side is under ``min_side`` are enlarged by a whole factor, nearest-neighbour
    (every generated pixel becomes a k x k square), so tiny-model outputs are visible on screen.

    Examples
    --------
    >>> to_image(torch.ones(1, 3, 2, 4)).shape, to_image(torch.ones(3, 2, 4)).max()
    ((2, 4, 3), np.uint8(255))
    >>> to_image(torch.rand(1, 3, 2, 4), min_side=5).shape
    (6, 12, 3)
    """
    if output.ndim == 4:
        if output.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {output.shape[0]}")
        output = output[0]
    if output.ndim != 3:
        raise ValueError(
            f"the app shows images (C, H, W); got an output of shape {tuple(output.shape)} "
            "(for video models use `hasten generate --compare`)"
        )
    pixels = to_uint8(output)
    scale = -(-min_side // min(pixels.shape[:2]))  # ceil
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels


RANDOM_WEIGHTS_PREFIX = "tiny-"
"""hasten's embedded random-weight models are all named ``tiny-*`` (tiny-flux, tiny-janus, tiny-trellis, ...)."""


def random_weights_notice(model: str) -> str:
    """The one line an app shows under its title when ``model`` has random weights; ``""`` otherwise.

    Examples
    --------
    >>> random_weights_notice("tiny-flux")[:40]
    '**Random weights:** `tiny-flux` is one o'
    >>> random_weights_notice("micro-flux"), random_weights_notice("trained-janus")
    ('', '')
    """
    if not model.startswith(RANDOM_WEIGHTS_PREFIX):
        return ""
    return (
        f"**Random weights:** `{model}` is one of hasten's untrained mechanism models: the pictures are noise; "
        "the timings, passes and masks are real."
    )


def size_text(height: int, width: int) -> str:
    """A size as every app writes it: height x width.

    Examples
    --------
    >>> size_text(36, 52)
    '36 x 52'
    """
    return f"{height} x {width}"


def whole_number(name: str, value: float | None, minimum: int | None = 1, maximum: int | None = None) -> int:
    """The value of the ``gr.Number`` field ``name`` as an int in ``[minimum, maximum]``, or a ``gr.Error`` naming it.

    Examples
    --------
    >>> whole_number("steps", 4.0)
    4
    >>> whole_number("seed", -3, minimum=None)
    -3
    >>> whole_number("steps", 0)
    Traceback (most recent call last):
    ...
    gradio.exceptions.Error: '`steps` must be a whole number of at least 1, got 0'
    """
    if value is None or isinstance(value, bool) or value != int(value):
        raise gr.Error(f"`{name}` must be a whole number, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        bounds = (
            f"from {minimum} to {maximum}"
            if minimum is not None and maximum is not None
            else f"of at least {minimum}"
            if minimum is not None
            else f"of at most {maximum}"
        )
        raise gr.Error(f"`{name}` must be a whole number {bounds}, got {value!r}")
    return number


RUN_QUEUE = "run"
"""The Run button and the examples share this queue, one run at a time: an app has one model, and some
methods install themselves on it for the length of a run."""


def connect_run(
    button: gr.Button, fn: Any, inputs: list, outputs: list, examples: list[list], label: str
) -> gr.Examples:
    """Wire ``button`` to ``fn`` (API name ``run``) and add ``gr.Examples`` rows that, clicked, fill ``inputs``
    and run ``fn`` at once: one click shows the method's point. Returns the examples (``elem_id="examples"``).

    Examples
    --------
    >>> with gr.Blocks() as demo:
    ...     number, text = gr.Number(), gr.Markdown()
    ...     _ = connect_run(gr.Button(), lambda n: f"{n:g}", [number], [text], [[3]], "Example")
    >>> demo(2, api_name="run")
    '2'
    """
    button.click(fn, inputs, outputs, api_name="run", concurrency_id=RUN_QUEUE, concurrency_limit=1)
    example_rows = gr.Examples(examples, inputs, label=label, elem_id="examples")
    example_rows.load_input_event.then(
        fn,
        inputs,
        outputs,
        concurrency_id=RUN_QUEUE,
        concurrency_limit=1,
        api_name="run_example",
        api_visibility="undocumented",
    )
    return example_rows


def prompt_accuracy(image: torch.Tensor, prompt: str) -> float | None:
    """Share of the objects ``prompt`` asks for that the shipped attribute classifier finds in ``image``
    ((3, H, W) or (1, 3, H, W) in [0, 1]); ``None`` when the prompt is outside the micro-world's captions.

    Examples
    --------
    >>> from hasten.tiny import scenes
    >>> scene = scenes.scene_from_caption("a red circle at the top left", 64, 64)
    >>> picture = torch.from_numpy(scene.render()).permute(2, 0, 1) / 255
    >>> prompt_accuracy(picture, "a red circle at the top left"), prompt_accuracy(picture, "a lighthouse")
    (1.0, None)
    """
    from hasten.tiny import scenes
    from hasten.tiny.classifier import prompt_accuracy as classifier_accuracy

    image = image if image.ndim == 4 else image[None]
    try:
        scene = scenes.scene_from_caption(prompt, image.shape[-2], image.shape[-1])
    except ValueError:
        return None
    return classifier_accuracy(image[:1], [scene])
