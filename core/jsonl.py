"""Append-only JSONL files that survive a crash: flushed and fsynced per batch, a torn last
line (power cut, SIGKILL mid-write) is ignored on read.

Lines are split on b"\\n" only, on bytes: `str.splitlines()` also splits on U+2028, U+2029 and
U+0085, which `json.dumps(ensure_ascii=False)` writes unescaped, so one generated answer holding
U+2028 used to end the file there. A torn tail may stop inside a multi-byte UTF-8 character, so
each line is decoded on its own and a tail that does not decode or parse is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def _parse(path: Path) -> tuple[list[dict], bool]:
    """(rows, clean): clean is False when a torn tail or a corrupt line was left out."""
    if not path.exists():
        return [], True
    data = path.read_bytes()
    *whole, tail = data.split(b"\n")  # tail: the bytes after the last newline (b"" if none)
    rows, clean = [], True
    for i, line in enumerate(whole):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            # Only the last line can be torn (every append is fsynced whole), so a bad line in the
            # middle is damage from elsewhere: skip it, keep the rows after it.
            log.warning("%s line %d is not JSON: left out", path, i + 1)
            clean = False
    if tail:  # not ended by a newline: a torn write, cut off by resume_jsonl
        try:
            row = json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):  # cut just before its newline: the row itself is whole
            rows.append(row)
        clean = False
    return rows, clean


def read_jsonl(path: Path) -> list[dict]:
    return _parse(path)[0]


def _line(row) -> str:
    """One row as a line; the separators other tools split lines on are escaped too (only a
    JSON string can hold them, where an escape means the same)."""
    text = json.dumps(row, ensure_ascii=False)
    for ch in ("\u2028", "\u2029", "\x85"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text + "\n"


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(_line(r) for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(path: Path, text: str) -> None:
    """Write beside, fsync, then rename: readers see the old or the new file, never a torn one.
    The temp name is unique per process, so two writers never write into one temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a power cut only once its folder is


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file another library wrote (FAISS, shutil) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root`) to disk: what a publish names in
    the registry must not come back empty after a power cut."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    _replace(path, "".join(_line(r) for r in rows))


def write_json(path: Path, obj) -> None:
    _replace(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def resume_jsonl(path: Path) -> list[dict]:
    """Rows of an interrupted append-only file, with a torn last line cut off so that new
    appends start on a clean line."""
    rows, clean = _parse(path)
    if not clean:
        write_jsonl(path, rows)
    return rows
