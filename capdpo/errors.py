"""The errors of one bad item (a video that cannot be read, a malformed row, an over-budget video), how a
stage treats them (record and go on, or stop at once with ``--fail-fast``), and the error that stops a
stage cleanly (an over-budget judge)."""

from __future__ import annotations

import logging

from capdpo.records import RecordError

log = logging.getLogger("capdpo")


class FrameError(ValueError):
    """A video or frame folder that cannot be read; the message starts with its path."""


class OverBudgetError(ValueError):
    """A video + question that does not fit the policy's token budget; the message names the item."""


class MissingInput(FileNotFoundError):
    """A stage's input file is absent or empty; the message names it and the stage that writes it."""


# Errors that concern one item (a corrupt video, a malformed row, an over-budget video) and leave the others fine.
ITEM_ERRORS = (FrameError, RecordError, FileNotFoundError, OverBudgetError)


class BudgetExceeded(RuntimeError):
    """A judge ceiling (requests, tokens or cost) would be passed. Raised before the request
    that would pass it is sent; everything judged before is saved, so a later run resumes."""


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
