"""``capdpo``: run the whole pipeline, or any one stage on a run folder.

    capdpo run configs/demo.yaml                 # everything, resumable
    capdpo sample --run-dir runs/demo --set sample.n=8
    capdpo judge --run-dir runs/demo
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from capdpo.config import ConfigError, RunConfig, describe, load_config
from capdpo.errors import ITEM_ERRORS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align video LMMs with DPO from a caption-grounded LLM reward.")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the run folder's config.yaml).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="Run folder (default: run_dir of the config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config field, e.g. sample.n=8 (repeatable).")]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad item instead of skipping it.")]


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

    _setup_logging()
    return Run(_config(config, run_dir, overrides, fail_fast))


@app.command()
def run(config: Annotated[Path, typer.Argument(help="Run config YAML.")], run_dir: RunDirOpt = None,
        set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """Run every stage; re-running skips finished work and resumes an interrupted run."""
    _run(config, run_dir, set_, fail_fast).run_all()


@app.command()
def data(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Collect videos, captions and shipped QA into the run folder; split train/test by video."""
    _run(config, run_dir, set_, False).data()


@app.command()
def frames(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """Write paper-style JPEG frame folders (2 fps, width 336) for every video."""
    _run(config, run_dir, set_, fail_fast).frames()


@app.command()
def qa(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Question-answer pairs from captions (or the QA shipped with the videos)."""
    _run(config, run_dir, set_, False).qa()


@app.command()
def sample(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """N candidate answers per training question from the policy."""
    _run(config, run_dir, set_, fail_fast).sample()


@app.command()
def judge(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
          retry_failed: Annotated[bool, typer.Option(help="Judge again the answers whose judgment failed.")] = False) -> None:
    """Score every candidate with the caption-grounded LLM judge."""
    _run(config, run_dir, set_, False).judge_candidates(retry_failed=retry_failed)


@app.command()
def pairs(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Preference pairs (capdpo, TRL and paper formats) from the judged candidates."""
    _run(config, run_dir, set_, False).pairs()


@app.command()
def train(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False) -> None:
    """DPO of the policy on the run's preference pairs."""
    _run(config, run_dir, set_, fail_fast).train()


@app.command()
def evaluate(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, fail_fast: FailFastOpt = False,
             tag: Annotated[str, typer.Option(help="Name of this evaluation (before, after, ...).")] = "eval",
             model: Annotated[Optional[str], typer.Option(help="Checkpoint to evaluate (default: policy.model).")] = None) -> None:
    """Greedy answers on held-out questions, judged; prints accuracy and mean score."""
    overrides = list(set_ or []) + ([f"policy.model={model}"] if model else [])
    summary = _run(config, run_dir, overrides, fail_fast).evaluate(tag)
    typer.echo(summary.model_dump_json(indent=1))


@app.command()
def report(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Write the run's static HTML report."""
    typer.echo(_run(config, run_dir, set_, False).report())


@app.command()
def export(fmt: Annotated[str, typer.Argument(help="trl | paper-dpo | paper-qa | sharegpt-captions")],
           out: Annotated[Path, typer.Argument(help="Output JSONL file.")], run_dir: RunDirOpt = Path("runs/demo")) -> None:
    """Export the run's records in another tool's row format."""
    from capdpo import formats
    from capdpo.pipeline import RunPaths
    from capdpo.records import write_jsonl

    paths = RunPaths(run_dir)
    rows = {
        "trl": lambda: formats.trl_rows(paths.pairs.read()),
        "paper-dpo": lambda: formats.paper_dpo_rows(paths.pairs.read()),
        "paper-qa": lambda: formats.paper_qa_rows(paths.qa.read(), paths.videos.by_id()),
        "sharegpt-captions": lambda: formats.sharegpt_caption_rows(paths.videos.read()),
    }
    if fmt not in rows:
        raise typer.BadParameter(f"unknown format {fmt!r}; choose from {', '.join(rows)}")
    typer.echo(f"{write_jsonl(out, rows[fmt]())} rows -> {out}")


@app.command()
def models(cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder (default: env CAPDPO_CACHE or ~/.cache/capdpo).")] = None) -> None:
    """Build the built-in models once (SmolLM2 judge, DINOv2, the mini video LMM with its SFT)."""
    from capdpo.models.mini import mini_model_dir
    from capdpo.models.packaged import dinov2_small, smollm2_dir

    _setup_logging()
    cache = cache_dir or Path(RunConfig().cache_dir)
    for name, build in (("smollm2 (judge, LLM)", smollm2_dir), ("dinov2-small (vision)", dinov2_small),
                        ("mini video LMM (policy)", mini_model_dir)):
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
    except (ConfigError, ValueError, *ITEM_ERRORS) as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
