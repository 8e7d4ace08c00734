"""Fault injection for the failure paths of issue 18: each test injects the fault for real (a
U+2028 response, a torn write, a chmod-000 adapter, a deleted registry.json, a truncated index,
CR/LF in a header value, deeply nested JSON, over-limit requests) and asserts that nothing was
lost and the service answered."""

from __future__ import annotations

import json

from specialize.jsonl import append_jsonl, read_jsonl, resume_jsonl

# --- 1. JSONL: rows are never dropped by a line separator or a torn tail ----------------------


def test_jsonl_keeps_rows_after_a_unicode_line_separator(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [{"id": 0, "response": "a\u2028b"}, {"id": 1, "response": "c\u2029d\x85e"},
            {"id": 2, "response": "after"}]
    append_jsonl(path, rows)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as json.dumps does
    assert read_jsonl(path) == rows
    assert resume_jsonl(path) == rows
    assert read_jsonl(path) == rows  # resume did not rewrite the file without them


def test_jsonl_torn_inside_a_multibyte_character_resumes(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [{"id": 0, "response": "ok"}, {"id": 1, "response": "é\u2028"}]
    append_jsonl(path, rows)
    whole = json.dumps({"id": 2, "response": "日本語"}, ensure_ascii=False).encode()
    cut = whole.index("本".encode()) + 1  # the kill lands inside a 3-byte character
    with open(path, "ab") as f:
        f.write(whole[:cut])
    assert read_jsonl(path) == rows
    assert resume_jsonl(path) == rows
    assert path.read_bytes().endswith(b"\n")  # the torn tail is cut: appends start clean
    append_jsonl(path, [{"id": 2, "response": "again"}])
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]


def test_jsonl_tail_of_any_bytes_is_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"id": 0}])
    for tail in (b"\xff\xfe", b"\x00\x00\x00", b'{"id": 1', b"\xe6\x97", b"\r", b"[1, 2]"):
        path.write_bytes(b'{"id": 0}\n' + tail)
        assert read_jsonl(path) == [{"id": 0}], tail
        assert resume_jsonl(path) == [{"id": 0}] and path.read_bytes() == b'{"id": 0}\n'


def test_jsonl_row_cut_just_before_its_newline_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}')
    assert resume_jsonl(path) == [{"id": 0}, {"id": 1}]
    assert path.read_bytes() == b'{"id": 0}\n{"id": 1}\n'
