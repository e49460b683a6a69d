"""hasten installed from a wheel, not run from the source checkout: its commands, apps and weights.

The wheel is built from this checkout and installed, without dependencies, into a fresh virtual
environment whose only other path entry is this environment's site-packages (for torch,
diffusers, ...). This environment's own hasten is an editable install, a ``.pth`` file that a
plain path entry does not process, so the hasten imported there is the wheel's: any file the
package reads from outside itself (the repository's ``apps/`` once was) fails here.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # nothing from the checkout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with hasten's wheel installed; returns its ``bin`` folder."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    (wheel,) = (root / "dist").glob("hasten-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    # only now the dependencies (before, pip would take this environment's hasten for the wheel's)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin"


def _run(bin_dir: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_wheel_runs_its_commands_apps_and_weights_from_its_own_files(installed, tmp_path):
    where = _run(
        installed,
        "python",
        "-c",
        "import hasten, hasten.apps, hasten.tiny.trained as t; print(hasten.__file__); print(t.path('flux'))",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    package, weights = where.stdout.split()
    assert str(installed.parent) in package and str(REPO) not in package
    assert (Path(weights) / "model_index.json").exists()

    listed = _run(installed, "hasten", "app", "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {"edit", "edit3d", "grat", "sjd", "video", "vlm"}

    app_help = _run(installed, "hasten", "app", "grat", "--help", cwd=tmp_path)
    assert app_help.returncode == 0 and "--model" in app_help.stdout, app_help.stderr

    generate_help = _run(installed, "hasten", "generate", "--help", cwd=tmp_path)
    assert generate_help.returncode == 0 and "--compare" in generate_help.stdout, generate_help.stderr
