"""Shared test setup: offline, deterministic, tiny models built once per session."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Everything the session writes to temporary files (the doctests' training runs, app outputs,
# pytest's tmp_path, subprocesses through TMPDIR) goes under one folder, removed at exit: each
# suite run used to leave about 50 MB in /tmp.
_SESSION_TMP = tempfile.mkdtemp(prefix="hasten-tests-")
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
tempfile.tempdir = os.environ["TMPDIR"] = _SESSION_TMP

# Tiny models are built once per test session into a private HASTEN_HOME (never the user's cache).
os.environ.setdefault("HASTEN_HOME", tempfile.mkdtemp(prefix="hasten-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (training tests: their results do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Without a GPU, Triton kernels run in the interpreter (set before anything imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
