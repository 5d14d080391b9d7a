"""Progress bars over lib's long loops, silent when ``REFUSAL_BOOK_PROGRESS=0`` (the runner and nbval set it, so
that no bar becomes a stored output)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm


T = TypeVar("T")

PROGRESS_ENV = "REFUSAL_BOOK_PROGRESS"


def progress_enabled() -> bool:
    """Progress bars are on unless ``REFUSAL_BOOK_PROGRESS=0`` (the book runner and nbval set it)."""
    return os.environ.get(PROGRESS_ENV, "1") != "0"


def progress(iterable: Iterable[T], desc: str, total: int | None = None, show: bool | None = None) -> Iterator[T]:
    """A tqdm bar over ``iterable`` that stays silent when progress is disabled."""
    enabled = progress_enabled() if show is None else show
    return iter(tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False))
