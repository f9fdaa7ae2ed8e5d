"""What the ``scenario`` commands raise for the user: one line, no traceback."""

from __future__ import annotations

from pathlib import Path


class CommandError(RuntimeError):
    """A job could not be done; the message is the reason shown to the user."""


def require_folders(paths: list[str]) -> None:
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise CommandError(f"no such results folder: {missing[0]}")
