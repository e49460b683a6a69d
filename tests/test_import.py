"""``import hasten`` is light, and ``pipe.enable_grat()`` still works whatever the import order."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "triton")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_import_hasten_imports_no_heavy_library():
    loaded = _run(f"import sys, hasten; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert loaded == "[]"


def test_enable_grat_is_added_whether_diffusers_comes_first_or_later():
    after = _run(
        "import hasten\nfrom diffusers import FluxPipeline\n"
        "print(FluxPipeline.enable_grat is hasten.enable_grat, FluxPipeline.disable_grat is hasten.disable_grat)"
    )
    before = _run(
        "from diffusers import DiffusionPipeline\nimport hasten\n"
        "print(DiffusionPipeline.enable_grat is hasten.enable_grat)"
    )
    assert after == "True True" and before == "True"
    assert _run("import hasten; print(hasten.GratConfig().pattern)") == "cross"


def test_the_front_door_is_light_until_a_method_is_applied():
    """``hasten.apply`` / ``hasten.remove`` / ``hasten.Handle`` and the method table import nothing heavy."""
    code = (
        f"import sys, hasten, hasten.methods\n"
        f"from hasten import apply, remove\n"
        f"assert apply is hasten.methods.apply and remove is hasten.methods.remove\n"
        f"assert hasten.Handle is hasten.methods.Handle and hasten.applied is hasten.methods.applied\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert _run(code) == "[]"


def test_package_namespaces_load_their_methods_on_first_use():
    """``import hasten.token_pruning`` / ``hasten.pipelines`` / ``hasten.apps`` import nothing heavy; a
    pruner imports torch but neither transformers nor triton unless it needs them (ZipVL's cache does)."""
    code = (
        f"import sys, hasten.token_pruning, hasten.pipelines, hasten.apps\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
        f"from hasten.token_pruning import HiRED\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
        f"import hasten.token_pruning as tp\n"
        f"assert sorted(tp.__all__) == sorted(n for n in tp.__all__ if getattr(tp, n) is not None)"
    )
    assert _run(code).splitlines() == ["[]", "['torch']"]
