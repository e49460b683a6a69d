"""benchmarks/gpu_suite.py: its --smoke run on the CPU, and its section isolation (budgets, failures)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

SECTION_NAMES = [name for name, _, _ in gpu_suite.SECTIONS]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite sets it itself
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, seconds


def test_smoke_every_section_has_a_table_or_a_skip_line(smoke):
    out, stdout, _ = smoke
    report = (out / "suite.md").read_text()
    for name in SECTION_NAMES:
        text = (out / f"{name}.txt").read_text()
        assert text.startswith(f"# {name} ("), text[:200]
        assert f"# {name} (" in report
        body = text.split("\n", 1)[1]
        has_table = any(line.strip() and not line.startswith("SKIPPED") for line in body.splitlines())
        has_skip = f"SKIPPED {name}: " in body
        assert has_table or has_skip, f"{name} produced neither a table nor a skip line:\n{text}"
        # A smoke run exists to catch rot: a section may run out of its budget on a loaded
        # machine, but it must not fail.
        assert f"SKIPPED {name}: error" not in body, text


def test_smoke_json_lines_parse_and_name_their_section(smoke):
    out, _, _ = smoke
    lines = (out / "suite.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows
    assert {row["section"] for row in rows} <= set(SECTION_NAMES)
    measured = {row["section"] for row in rows if "skipped" not in row}
    skipped = {row["section"] for row in rows if "skipped" in row}
    assert measured | skipped == set(SECTION_NAMES)
    for name in SECTION_NAMES:  # a section's rows are in the JSON lines exactly when its .txt has a table
        text = (out / f"{name}.txt").read_text()
        assert (name in measured) == any(
            line.strip() and not line.startswith("SKIPPED") for line in text.split("\n", 1)[1].splitlines()
        ), text
    attention = [row for row in rows if row["section"] == "grat_attention" and "skipped" not in row]
    assert {row["backend"] for row in attention} <= {"triton", "reference"}
    assert all(row["grat_ms"] > 0 and row["bound"] > 0 for row in attention)
    info = json.loads((out / "machine.json").read_text())
    assert info["smoke"] is True and info["torch"] and "triton" in info and info["date"]


def test_smoke_runtime(smoke):
    _, _, seconds = smoke
    # Section budgets add up to SMOKE_BUDGET_S; the rest is imports and the machine line.
    assert seconds < gpu_suite.SMOKE_BUDGET_S + 40, seconds


def test_a_failing_section_is_skipped_with_its_reason_and_keeps_its_rows():
    def fails(section):
        section.add([dict(a=1)], section="x")
        section.table("| partial |")
        raise RuntimeError("no such model")

    section = gpu_suite.run_section("x", 5.0, fails)
    assert section.skipped.startswith("error: RuntimeError: no such model")
    assert section.rows == [dict(section="x", a=1)] and section.text == ["| partial |"]


def test_a_section_past_its_budget_is_interrupted():
    def slow(section):
        section.add([dict(step=0)])
        time.sleep(5)
        section.add([dict(step=1)])

    start = time.perf_counter()
    section = gpu_suite.run_section("slow", 0.3, slow)
    assert time.perf_counter() - start < 2
    assert section.skipped.startswith("budget: ran past its budget")
    assert section.rows == [dict(step=0)]
    assert gpu_suite.run_section("none", 0.0, slow).skipped == "budget: no time left in the suite's total budget"


def test_a_timeout_wrapped_by_library_code_still_counts_as_the_budget():
    def wraps(section):
        try:
            time.sleep(5)
        except gpu_suite.SectionTimeout as error:  # as the Triton interpreter does
            raise RuntimeError(f"wrapped: {error!r}") from None

    section = gpu_suite.run_section("wrapped", 0.3, wraps)
    assert section.skipped == "budget: ran past its budget of 0 s (RuntimeError)"


def test_write_section_records_the_skip(tmp_path):
    section = gpu_suite.Section("grat_attention", 10.0, text=["| a |"], skipped="budget: ran past its budget of 10 s")
    text = gpu_suite.write_section(tmp_path, section)
    assert text == (tmp_path / "grat_attention.txt").read_text()
    assert "| a |" in text and text.rstrip().endswith("SKIPPED grat_attention: budget: ran past its budget of 10 s")
