"""The support-matrix writer: a run updates its device's cells of the families it reached."""

from __future__ import annotations

from pathlib import Path

from tests.conformance.support_matrix import read_column_notes, read_table, write_matrix


def test_a_partial_run_keeps_the_other_rows_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "matrix.md"
    write_matrix(
        str(path),
        "cpu",
        {("attention", "float32"): [("passed", "")] * 3, ("write_kv", "float32"): [("passed", "")]},
    )
    write_matrix(str(path), "cuda", {("attention", "float32"): [("failed", "")]})
    text = path.read_text().replace("- `cuda`:", "- `cuda`: on an H100,")
    path.write_text(text)
    write_matrix(str(path), "cpu", {("write_kv", "float32"): [("skipped", "no: reason")]})
    devices, rows = read_table(path)
    assert devices == ["cpu", "cuda"]
    assert rows["attention / float32"] == {"cpu": "pass (3)", "cuda": "FAIL (1 of 1)"}
    assert rows["write_kv / float32"] == {"cpu": "skipped (1): no: reason", "cuda": "not run"}
    assert read_column_notes(path)["cuda"].startswith("- `cuda`: on an H100,")
