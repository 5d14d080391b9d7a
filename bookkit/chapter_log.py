"""Where a chapter's warnings and library log lines go: a file per chapter, not the notebook's stderr.

Whatever reaches a notebook's stderr becomes a stored output, and a line that appears only on some hosts, under load
or on a cold cache (a once-per-process warning, a library's log line) would fail nbval there.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from lib.artifacts import artifact_path


def chapter_log(chapter: str) -> Path:
    """Where a chapter's warnings and library log lines go (``log_to_file``)."""
    return artifact_path("logs", chapter, suffix=".log")


class ChapterLogHandler(logging.FileHandler):
    """The file handler ``log_to_file`` installs: a later call (the chapter re-run in the same kernel) replaces it."""


def log_to_file(path: str | Path) -> Path:
    """From now on in this process, send Python warnings and every library's log records to ``path``, started
    afresh, instead of stderr: every logger's stderr handler (torch's, and transformers' and huggingface_hub's, made
    here by importing them) gives way to one file handler, on the root logger and on those loggers that do not
    propagate. A chapter calls it first (``bookkit.parameters.check``), for the reason the module states. Nothing is
    lost: the runner names the file when not empty."""
    for module in ("huggingface_hub.utils.logging", "transformers.utils.logging"):
        importlib.import_module(module)  # each adds its own stderr handler when first imported: replace it now

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = ChapterLogHandler(path, delay=True, encoding="utf-8")  # created at the first record only
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for logger in [root] + [logger for logger in root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]:
        replaced = [h for h in logger.handlers if isinstance(h, ChapterLogHandler) or _writes_to_stderr(h)]
        for old in replaced:
            logger.removeHandler(old)
            old.close()
        if logger is root or (replaced and not logger.propagate):
            logger.addHandler(handler)
    path.unlink(missing_ok=True)
    logging.captureWarnings(True)
    return path


def _writes_to_stderr(handler: logging.Handler) -> bool:
    """A plain stream handler on this process's ``sys.stderr`` (in a kernel: the cell's stderr; the kernel's own log
    writes to ``sys.__stderr__`` and is left alone)."""
    return type(handler) is logging.StreamHandler and handler.stream is sys.stderr
