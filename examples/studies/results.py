"""The results file of a study: JSON lines, one row per finished run, appended with one
write and fsynced; a torn last line (a crash mid-write) is ignored and cut off."""

import json
import os
import pathlib
import warnings

def read_rows(path):
    """The rows of a results file (JSON lines); a torn last line is ignored with a warning.

    Raises:
        ValueError: A line other than the last is not a JSON object (the file is
            damaged: it names the line).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == "")
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if last:
                warnings.warn(f"{path}: ignoring a torn last line ({len(line)} characters: "
                              f"{error}); the next run appended replaces it", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a results row ({error})") from None
        if last and not complete:
            warnings.warn(f"{path}: ignoring an unterminated last line (a torn write)",
                          stacklevel=2)
            continue
        rows.append(row)
    return rows


def append_row(path, row):
    """Appends `row` as one JSON line with a single `write`, then fsyncs.

    A torn last line left by a crash (no newline at the end of the file) is cut off
    first, so the new row starts on a line of its own.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, max(0, size - 65536), os.SEEK_SET)
            tail = os.read(fd, 65536)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (
                    0 if size <= 65536 else None)
                if keep is None:
                    raise ValueError(f"{path}: last line is longer than 64 KiB and torn")
                os.ftruncate(fd, keep)
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)

