"""The repository speaks of the project, not of the work on it: no tracked file, nor its
name, refers to work periods or numbered tickets (git keeps the history). The word "issue"
in its ordinary sense is fine; a number or '#' after it is not."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# assembled from parts so that this file does not match itself
FORBIDDEN = re.compile("|".join(["sess" + "ion", "iss" + r"ue\s*[0-9#]"]), re.IGNORECASE)


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree: the tracked files are unknown")
    return [ROOT / p for p in out.decode().split("\0") if p]


def offending_lines(paths, root=ROOT):
    """(path, line number, line) of every match; line 0 is the file's own name."""
    found = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if FORBIDDEN.search(rel):
            found.append((rel, 0, rel))
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue        # binary, or deleted in the work tree but not yet in the index
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append((rel, number, line.strip()[:120]))
    return found


def test_no_tracked_file_names_work_periods_or_tickets():
    found = offending_lines(tracked_files())
    assert not found, "\n".join(f"{p}:{n}: {line}" for p, n, line in found)


def test_the_check_finds_what_it_looks_for(tmp_path):
    bad = {"a.py": "# see Iss" "ue #6\n", "b.md": "fine\nin the third sess" "ion\n",
           "note-sess" "ion.txt": "fine\n", "c.py": "an issue with the layout\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    found = offending_lines(sorted(tmp_path.iterdir()), tmp_path)
    assert {(p, n) for p, n, _ in found} == {("a.py", 1), ("b.md", 2),
                                            ("note-sess" "ion.txt", 0)}
