"""Browser-test harness for the Gradio apps (helpers, not tests): serve an app, drive Chromium.

Apps are served in the test process on 127.0.0.1 and opened in Debian's Chromium through
Playwright (no browser download; ``/usr/bin/chromium``, installed by ``make test``). The page
may only reach 127.0.0.1: every other request is aborted, so a test never depends on the
internet. A test file uses them like this::

    from browser import chromium_page, running_app

    @pytest.mark.browser
    def test_app():
        with running_app(build_demo, model="tiny-flux") as app, chromium_page() as page:
            page.goto(app.url)
            ...
            assert_no_errors(page)

What the user sees is read from the DOM: :func:`shown_image` (size and pixel spread of an
``<img>``, so a blank result fails), :func:`playing_video` (a ``<video>`` the browser decoded),
:func:`assert_no_errors` (no error toast, no uncaught page error). :func:`screenshot` saves the
page under ``$HASTEN_APP_SCREENSHOTS`` when set (``HASTEN_APP_SCREENSHOTS=docs/apps`` refreshes
the README's pictures), else in the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before anything imports gradio

import gradio as gr  # noqa: E402
import pytest  # noqa: E402

from hasten.apps.launcher import free_port, launch  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
LOCAL_HOSTS = ("127.0.0.1", "localhost")
ERROR_TOAST = '[data-testid="toast-body"].error'  # Gradio's red toast (gr.Error, "Video not playable", ...)
SCREENSHOTS_ENV = "HASTEN_APP_SCREENSHOTS"
TIMEOUT_MS = 120_000

# Pixel statistics of a loaded <img>, drawn on a canvas (same origin: the app serves the file).
_IMAGE_STATS = """img => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, squares = 0, count = 0;
    for (let i = 0; i < data.length; i += 4) {
        for (let c = 0; c < 3; c++) { sum += data[i + c]; squares += data[i + c] * data[i + c]; count += 1; }
    }
    const mean = sum / count;
    return {width: img.naturalWidth, height: img.naturalHeight, mean: mean,
            std: Math.sqrt(Math.max(0, squares / count - mean * mean))};
}"""


@dataclass(frozen=True)
class RunningApp:
    """A Gradio app served by :func:`running_app`: its ``url`` and the ``demo`` itself."""

    url: str
    demo: gr.Blocks


@contextlib.contextmanager
def running_app(build_demo: Callable[..., gr.Blocks], **kwargs: Any) -> Iterator[RunningApp]:
    """Serve ``build_demo(**kwargs)`` on 127.0.0.1 at a free port in this process; close it afterwards.

    Examples
    --------
    >>> import gradio as gr, urllib.request
    >>> def hello() -> gr.Blocks:
    ...     with gr.Blocks() as demo:
    ...         gr.Markdown("hello")
    ...     return demo
    >>> with running_app(hello) as app:  # doctest: +ELLIPSIS
    ...     urllib.request.urlopen(app.url).status
    200
    Closing server running on port: ...
    """
    demo = build_demo(**kwargs)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield RunningApp(f"http://127.0.0.1:{port}/", demo)
    finally:
        demo.close()


@contextlib.contextmanager
def chromium_page(viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """A Playwright page in headless Debian Chromium that can reach 127.0.0.1 only.

    Skips the calling test when ``/usr/bin/chromium`` is missing. Uncaught page errors are
    collected in ``page.errors`` (a list of str) for the test to assert on.

    Examples
    --------
    >>> with chromium_page() as page:  # doctest: +SKIP
    ...     page.goto("http://127.0.0.1:7860/")
    """
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
            page.route(lambda url: urlsplit(url).hostname not in LOCAL_HOSTS, lambda route: route.abort())
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            yield page
        finally:
            browser.close()


def shown_image(page: Any, elem_id: str, timeout: float = TIMEOUT_MS) -> dict[str, float]:
    """Wait for the ``<img>`` of component ``#elem_id`` to load; its ``width``, ``height`` and pixel ``mean``
    and ``std`` (0-255, over R, G, B): a blank (one-colour) image has ``std`` 0."""
    image = page.locator(f"#{elem_id} img").first
    image.wait_for(timeout=timeout)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=timeout)
    return image.evaluate(_IMAGE_STATS)


def playing_video(page: Any, elem_id: str, timeout: float = TIMEOUT_MS) -> tuple[int, int]:
    """Wait until the browser has decoded a frame of the ``<video>`` in ``#elem_id``; its (width, height).

    Fails (times out) when the browser cannot decode the video, as with an mp4v upload shown as is.
    """
    video = page.locator(f"#{elem_id} video").first
    video.wait_for(timeout=timeout)
    page.wait_for_function(
        "v => v.error === null && v.readyState >= 2 && v.videoWidth > 0", arg=video.element_handle(), timeout=timeout
    )
    return tuple(video.evaluate("v => [v.videoWidth, v.videoHeight]"))


def click_example(page: Any, elem_id: str = "examples", row: int = 0) -> None:
    """Click row ``row`` of the ``gr.Examples`` ``#elem_id`` (a table, or buttons for one input); the apps'
    examples (:func:`hasten.apps.launcher.connect_run`) then also run."""
    page.locator(f"#{elem_id} tbody tr, #{elem_id} button.gallery-item").nth(row).click()


def assert_no_errors(page: Any) -> None:
    """No Gradio error toast on the page and no uncaught page error (``page.errors``)."""
    toasts = page.locator(ERROR_TOAST).all_inner_texts()
    assert toasts == [], f"error toast(s) on the page: {toasts}"
    assert page.errors == [], page.errors


def screenshot(page: Any, name: str, fallback: Path) -> Path:
    """Save the whole page as ``NAME.png`` in ``$HASTEN_APP_SCREENSHOTS`` if set, else in ``fallback``."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
