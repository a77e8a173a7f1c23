"""How the command line words an error: its first non-empty line (a traceback's last word is for
``--traceback``; the user sees one line)."""
from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
