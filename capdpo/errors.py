"""How a stage treats one bad item: record it and go on, or stop at once (``--fail-fast``)."""

from __future__ import annotations

import logging

from capdpo.frames import FrameError
from capdpo.records import RecordError

log = logging.getLogger("capdpo")

# Errors that concern one item (a corrupt video, a malformed row) and leave the others fine.
ITEM_ERRORS = (FrameError, RecordError, FileNotFoundError)


class ItemErrors:
    """Collects per-item errors of a stage; re-raises immediately when ``fail_fast``."""

    def __init__(self, stage: str, fail_fast: bool):
        self.stage, self.fail_fast, self.errors = stage, fail_fast, []

    def record(self, item_id: str, error: Exception) -> None:
        if self.fail_fast:
            raise error
        self.errors.append((item_id, str(error)))
        log.error("%s: skipped %s: %s", self.stage, item_id, error)

    def summary(self) -> str:
        return f"{len(self.errors)} item(s) skipped" if self.errors else ""
