"""Collects conformance outcomes by case family and writes docs/support-matrix.md.

Each run fills (or replaces) the column of the device it ran on and keeps the other columns, so
the matrix is built up by running the suite on each kind of hardware.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

Results = dict[tuple[str, str], list[tuple[str, str]]]  # (family, dtype) -> [(outcome, reason)]

HEADER = """# Support matrix

Written by the conformance suite: `pytest tests/conformance --device DEVICE --support-matrix
docs/support-matrix.md` fills the cells of DEVICE for every family the run reached and keeps the
others (a run of one test file updates its own rows). A cell says how many cases of that family
passed, failed (FAIL), or were skipped with the backend's own reason.
"""


def family_of(item: pytest.Item) -> tuple[str, str] | None:
    params: dict[str, Any] = getattr(getattr(item, "callspec", None), "params", {})
    if "attention_case" in params:
        case = params["attention_case"]
        return f"attention {case.batch}", case.dtype
    if "fp8_attention_case" in params:
        case = params["fp8_attention_case"]
        return f"attention {case.batch}, fp8 KV cache", case.dtype
    if "fp8_cache_case" in params:
        op = item.name.split("[")[0].removeprefix("test_").removesuffix("_fp8")
        return f"{op}, fp8 KV cache", params["fp8_cache_case"][0]
    if "cache_case" in params:
        return item.name.split("[")[0].removeprefix("test_"), params["cache_case"][0]
    if "arch" in params and item.name.startswith("test_quantized_kv_cache"):
        kv = params["kv_cache_dtype"]
        return f"end-to-end greedy, {kv} KV cache = reference ({params['arch']})", "float32"
    if "bf16_kv_case" in params:
        op = item.name.split("[")[0].removeprefix("test_").removesuffix("_bf16_kv")
        return f"{op}, bfloat16 KV cache", "float32"
    if "arch" in params:
        return f"end-to-end greedy = transformers ({params['arch']})", "float32"
    if "quant_case" in params:
        return f"quantized linear {params['quant_case'].method}", "float32"
    if "prequant_case" in params:
        return f"pre-quantized linear {params['prequant_case'].kind}", "float32"
    if "norm_dtype" in params:
        return item.name.split("[")[0].removeprefix("test_"), params["norm_dtype"]
    return None


FAMILY = "hwlm_family"  # the user property that carries a report's family (to xdist's controller)


def tag(item: pytest.Item, report: pytest.TestReport) -> None:
    key = family_of(item)
    if key is not None:
        report.user_properties.append((FAMILY, key))


def record(results: Results, report: pytest.TestReport) -> None:
    found = [value for name, value in report.user_properties if name == FAMILY]
    if not found or not (report.when == "call" or report.outcome != "passed"):
        return
    key = (str(found[0][0]), str(found[0][1]))
    reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    results[key].append((report.outcome, reason))


def cell(outcomes: list[tuple[str, str]]) -> str:
    passed = sum(1 for o, _ in outcomes if o == "passed")
    failed = sum(1 for o, _ in outcomes if o == "failed")
    skipped = [r for o, r in outcomes if o == "skipped"]
    parts = []
    if failed:
        parts.append(f"FAIL ({failed} of {len(outcomes)})")
    if passed:
        parts.append(f"pass ({passed})")
    if skipped:
        reasons = sorted(set(skipped))
        parts.append(
            f"skipped ({len(skipped)}): " + " / ".join(r.replace("|", "/") for r in reasons[:2])
        )
    return ", ".join(parts)


def read_table(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    devices: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    if not path.exists():
        return devices, rows
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return devices, rows
    devices = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(devices, cells[1:], strict=False))
    return devices, rows


def read_column_notes(path: Path) -> dict[str, str]:
    """Each device's line under "Columns" (``- `device`: when and how it was written``)."""
    notes: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("- `") and "`:" in line:
                notes[line[3 : line.index("`:")]] = line
    return notes


def write_matrix(path_name: str, device: str, results: Results) -> None:
    """Writes ``device``'s cells of the families this run reached (a run of one test file
    updates its rows only), keeps every other cell, and dates the device's line under
    "Columns"."""
    path = Path(path_name)
    devices, rows = read_table(path)
    notes = read_column_notes(path)
    if device not in devices:
        devices.append(device)
    for (family, dtype), outcomes in results.items():
        rows.setdefault(f"{family} / {dtype}", {})[device] = cell(outcomes)
    notes[device] = f"- `{device}`: {datetime.date.today().isoformat()}"
    lines = [HEADER, "Columns, as last written:", ""]
    lines += [notes[d] for d in devices if d in notes]
    lines.append("")
    lines.append("| case family / dtype | " + " | ".join(devices) + " |")
    lines.append("|---" * (len(devices) + 1) + "|")
    for name in sorted(rows):
        lines.append(
            f"| {name} | " + " | ".join(rows[name].get(d, "not run") for d in devices) + " |"
        )
    path.write_text("\n".join(lines) + "\n")
