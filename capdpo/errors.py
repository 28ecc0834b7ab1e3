"""The errors of one bad item (a video that cannot be read, a malformed row, an over-budget video), how a
stage treats them (record and go on, or stop at once with ``--fail-fast``), and the error that stops a
stage cleanly (an over-budget judge)."""

from __future__ import annotations

import logging

from capdpo.records import ForeignFolderError, RecordError

log = logging.getLogger("capdpo")


class FrameError(ValueError):
    """A video or frame folder that cannot be read; the message starts with its path."""


class OverBudgetError(ValueError):
    """A video + question that does not fit the policy's token budget; the message names the item."""


class UnsafePath(ValueError):
    """A name from an id or a tag that would make a path outside its folder; the message names both."""


class MissingInput(FileNotFoundError):
    """A stage's input file is absent or empty; the message names it and the stage that writes it."""


# Errors that concern one item (a corrupt video, a malformed row, an over-budget video, an id that cannot
# name its folder, a folder capdpo did not make in its place) and leave the others fine.
ITEM_ERRORS = (FrameError, RecordError, FileNotFoundError, OverBudgetError, UnsafePath, ForeignFolderError)


class BudgetExceeded(RuntimeError):
    """A judge ceiling (requests, tokens or cost) would be passed. Raised before the request
    that would pass it is sent; everything judged before is saved, so a later run resumes."""


class RewardsMissing(RuntimeError):
    """Online GRPO had nothing to learn from for ``grpo.max_failed_steps`` steps in a row (the judge
    scored none of their answers). A checkpoint is saved first, so a later run resumes there."""


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
