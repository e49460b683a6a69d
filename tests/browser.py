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
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before anything imports gradio

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `apps` lives at the repository root, outside the installed package
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402

from apps.launcher import free_port, launch  # noqa: E402

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
