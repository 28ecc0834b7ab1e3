"""The ray engine: one data-side stage as one Ray Data job, for runs that outgrow one machine (docs/scale-out.md).

    job = Job("sample", rows, SampleWorker, (policy_settings, cache_dir, cfg, frames, dtype), wants_gpu=True)
    run_job(job, cfg.ray, errors, out, claims)

A stage hands over its work still to do as :class:`Row` s (each one batch of its local loop's,
with an id unique per row and a JSON payload: what its worker needs) and a worker class around
capdpo's own backend (the policy, the judge with its cache, retries and budget), the class whose
per-batch work the local loop runs too. The job reads the rows, sends them
``ray.batch_size`` at a time through a pool of ``ray.actors`` actors, each building one worker
(``worker(*args)``: a model loaded once per actor), and streams what the workers return back to
this process, the driver. The driver alone writes the stage's record file, batch by batch, through
:meth:`RecordFile.append <capdpo.records.RecordFile.append>` (locked, fsynced, each id once), so the
file is the one the local engine writes: a killed job run again does only what is missing, whichever
engine wrote what is on disk, and the stage's claims keep a concurrent local worker off its ids.

From Ray come what capdpo's processes cannot do alone: work spread over the nodes, dead actors
restarted and their tasks retried, backpressure, GPU placement (``num_gpus`` per actor). A Python
error raised inside a worker would fail the whole job (Ray retries only system failures), so a
worker returns an item's error as an :class:`Output`; a batch whose worker raised all the same
becomes one error per row. The driver records them as the local engine does (``ItemErrors``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from tqdm import tqdm

from capdpo.config import RayConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.records import QAItem, RecordFile, Video, WorkClaims

log = logging.getLogger("capdpo")
T = TypeVar("T")

BUDGET_REFUSED = "BudgetExceeded"  # Output.kind of an item a judge's budget did not let it send


class Row(NamedTuple):
    """One input row of a job: its id (unique among the job's rows) and what its worker needs, as
    JSON. A stage's row is one batch of the local engine's - one generate call's questions, one
    forward's pairs, one judge call's answers - so the actors compute what the local loop computes."""

    id: str
    payload: str


@dataclass(frozen=True)
class Output:
    """What a worker returns for an item: one record of the stage's file (its JSON line), or the
    item's error (``kind``: the exception's class name, so the driver can raise the same class)."""

    item: str
    record: str = ""
    error: str = ""
    kind: str = ""


@dataclass(frozen=True)
class Job:
    """A stage's work for the ray engine."""

    stage: str
    rows: Sequence[Row]
    worker: type  # built once per actor as worker(*args), then called with lists of rows -> list[Output]
    args: tuple = ()
    wants_gpu: bool = False  # the worker runs a model: a GPU per actor where the cluster has GPUs (ray.num_gpus)


@dataclass
class JobResult:
    written: int = 0  # records appended to the stage's file
    refused: list[tuple[str, str]] = field(default_factory=list)  # (item, why) of the items a judge budget kept back


class WorkerError(RuntimeError):
    """An error a worker caught that is not one of an item's (``ITEM_ERRORS``); the message is the worker's."""


class ActorErrors(ItemErrors):
    """A worker's ``ItemErrors``: logged in the actor and kept as outputs for the driver, which records
    them (and stops at the first with ``--fail-fast``)."""

    def __init__(self, stage: str):
        super().__init__(stage, fail_fast=False)
        self.outputs: list[Output] = []

    def record(self, item_id: str, error: Exception) -> None:
        super().record(item_id, error)
        self.outputs.append(Output(item_id, error=str(error), kind=type(error).__name__))


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into the local engine's batches: ``size`` at a time, in order."""
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


# -- the cluster -------------------------------------------------------------------------------------
def question_rows(mine: dict[str, list[QAItem]], videos: dict[str, Video], size: int) -> list[Row]:
    """The local loop's generate calls as rows: ``size`` questions a row in order, with each of
    their videos and the questions that video is planned for (all of ``mine[video id]``), so an
    actor plans and batches exactly as the local loop does."""
    rows = []
    for batch in batches([q for questions in mine.values() for q in questions], size):
        shown = dict.fromkeys(q.video_id for q in batch)
        payload = {"questions": [q.model_dump(mode="json") for q in batch],
                   "videos": {v: {"video": videos[v].model_dump(mode="json"), "plan": [q.model_dump(mode="json") for q in mine[v]]}
                              for v in shown}}
        rows.append(Row(batch[0].id, json.dumps(payload)))
    return rows


def row_videos(row: Row) -> Iterator[tuple[Video, list[QAItem], list[QAItem]]]:
    """A :func:`question_rows` row back: each video with its questions in the row and its plan."""
    payload = json.loads(row.payload)
    questions = [QAItem.model_validate(q) for q in payload["questions"]]
    for video_id, entry in payload["videos"].items():
        yield (Video.model_validate(entry["video"]), [q for q in questions if q.video_id == video_id],
               [QAItem.model_validate(q) for q in entry["plan"]])


def connect(settings: RayConfig):
    """The ``ray`` module, initialised once per process: joined to ``ray.address`` when set, else a
    Ray on this machine with :func:`local_cpus` logical CPUs. A Ray the caller started is used as it is."""
    try:
        import ray
    except ImportError:
        raise ImportError("engine=ray needs Ray Data: pip install 'capdpo[ray]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports unless the user asked for them
        local = settings.address is None
        ray.init(address=settings.address, num_cpus=local_cpus(settings) if local else None,
                 include_dashboard=False if local else None, logging_level=logging.WARNING)
    return ray


def local_cpus(settings: RayConfig) -> int:
    """Logical CPUs of a Ray on this machine: ``ray.local_cpus``, else the machine's, and never fewer
    than the actors hold plus one for reading the rows: a job whose read cannot be scheduled waits
    without a word (Ray Data 2.60)."""
    return settings.local_cpus or max(os.cpu_count() or 1, math.ceil(settings.actors * settings.num_cpus) + 1)


def actor_gpus(settings: RayConfig, wants_gpu: bool) -> float:
    """GPUs per actor: ``ray.num_gpus`` when set, else 1 for a model where the cluster has GPUs."""
    if settings.num_gpus is not None:
        return settings.num_gpus
    return 1.0 if wants_gpu and connect(settings).cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_task(settings: RayConfig, fn, *args, wants_gpu: bool = False) -> Any:
    """``fn(*args)`` once, on the cluster with an actor's resources (what the driver must know
    before a job and would otherwise load a model for: a judge's identity, a reference model's
    fingerprint). An exception raised by ``fn`` is raised here as itself."""
    ray = connect(settings)
    task = ray.remote(num_cpus=settings.num_cpus, num_gpus=actor_gpus(settings, wants_gpu), max_retries=0)(fn)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


class Shared:
    """One object for every actor of a job (a judge budget's pooled spend): ``cls(*args)`` lives in
    a Ray actor of its own; its methods are called through this proxy, which travels to the workers."""

    def __init__(self, settings: RayConfig, cls: type, *args):
        self.handle = connect(settings).remote(num_cpus=0)(cls).remote(*args)

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "handle":  # pickle's and copy's look-ups, and a half-unpickled proxy
            raise AttributeError(name)
        import ray

        return lambda *args: ray.get(getattr(self.handle, name).remote(*args))


# -- the job ---------------------------------------------------------------------------------------------
class _Actor:
    """A Ray Data actor around a stage's worker: numpy batches of rows in, columns of outputs out."""

    def __init__(self, worker: type, args: tuple):
        self.worker = worker(*args)

    def __call__(self, batch: dict) -> dict[str, list[str]]:
        rows = [Row(str(i), str(p)) for i, p in zip(batch["id"], batch["payload"])]
        try:
            outputs = self.worker(rows)
        except Exception as e:  # noqa: BLE001 - one batch's failure is its items' error, never the job's
            log.exception("worker %s failed on a batch of %d rows", type(self.worker).__name__, len(rows))
            outputs = [Output(r.id, error=str(e), kind=type(e).__name__) for r in rows]
        return {"item": [o.item for o in outputs], "record": [o.record for o in outputs],
                "error": [o.error for o in outputs], "kind": [o.kind for o in outputs]}


def run_job(job: Job, settings: RayConfig, errors: ItemErrors, out: RecordFile | None = None,
            claims: WorkClaims | None = None) -> JobResult:
    """Run ``job`` on Ray; append the records its workers return to ``out`` (each id once: ids in
    ``claims.done_ids()`` - or ``out`` - are not written again) and record their errors in ``errors``."""
    result = JobResult()
    if not job.rows:
        return result
    ray = connect(settings)
    blocks = math.ceil(len(job.rows) / settings.batch_size)  # one block per actor call: results stream back call by call
    dataset = ray.data.from_items([{"id": r.id, "payload": r.payload} for r in job.rows], override_num_blocks=blocks)
    actors, gpus = min(settings.actors, blocks), actor_gpus(settings, job.wants_gpu)
    if gpus:  # a pool waits for all its actors: no more than the cluster's GPUs can hold
        actors = max(1, min(actors, int(ray.cluster_resources().get("GPU", 0) // gpus)))
    dataset = dataset.map_batches(_Actor, fn_constructor_args=(job.worker, tuple(job.args)), batch_size=settings.batch_size,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_cpus=settings.num_cpus, num_gpus=gpus)
    log.info("%s (ray): %d row(s) on %d actor(s), %g CPU and %g GPU each", job.stage, len(job.rows), actors,
             settings.num_cpus, gpus)
    reported: set[tuple[str, str]] = set()
    # closed on the way out, however it ends (an error, --fail-fast): Ray Data then stops the job and
    # frees its actors at once, not when the garbage collector gets to the iterator
    with tqdm(desc=f"{job.stage} (ray)", unit="record") as bar, \
            contextlib.closing(iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))) as streamed:
        for batch in streamed:
            if "item" not in batch:  # a block of no outputs
                continue
            outputs = [Output(*map(str, fields)) for fields in zip(batch["item"], batch["record"], batch["error"], batch["kind"])]
            if out is not None:
                result.written += _append(out, claims, [o.record for o in outputs if o.record])
                bar.update(len([o for o in outputs if o.record]))
            for o in outputs:
                if o.kind == BUDGET_REFUSED:
                    result.refused.append((o.item, o.error))
                elif o.error and (o.item, o.error) not in reported:  # a video in two rows fails in both
                    reported.add((o.item, o.error))
                    errors.record(o.item, _as_exception(o))
    return result


def _append(out: RecordFile, claims: WorkClaims | None, lines: list[str]) -> int:
    """Append the records of ``lines`` that are not on disk yet; returns how many."""
    done = claims.done_ids() if claims is not None else out.ids()
    fresh: dict[str, Any] = {}
    for line in lines:
        record = out.kind.model_validate_json(line)
        if record.id not in done:
            fresh.setdefault(record.id, record)
    out.append(list(fresh.values()))
    return len(fresh)


def _as_exception(output: Output) -> Exception:
    """A worker's error as the exception class it was (an item's), else a WorkerError naming it."""
    kind = next((cls for cls in ITEM_ERRORS if cls.__name__ == output.kind), None)
    return kind(output.error) if kind is not None else WorkerError(f"{output.kind}: {output.error}")
