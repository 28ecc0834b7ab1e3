"""A run folder that cannot be written (read-only, immutable, full) stops a command with one line
naming the path - before any model loads where that can be checked first - never a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from capdpo.cli import main
from capdpo.records import PreferencePair, RecordFile, WriteError, atomic_dir, write_jsonl


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``capdpo ARGS`` as the console script runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["capdpo", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture
def read_only():
    """Makes a folder truly unwritable for this process: ``chmod`` for a user, the immutable
    attribute for root (whom file modes do not stop); undone after the test."""
    frozen = []

    def freeze(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root without `chattr +i`: no way to make a folder read-only")
        frozen.append(folder)
        return folder
    yield freeze
    for folder in frozen:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_run_folder_stops_a_stage_before_its_model_loads(tmp_path, read_only, monkeypatch, capsys):
    from capdpo.pipeline import Run
    from capdpo.records import Video

    run = tmp_path / "run"
    RecordFile(run / "videos.jsonl", Video).write([Video(id="v", video="v.mp4", caption="a red circle")])
    read_only(run)

    def never(*_):
        raise AssertionError("the policy was loaded")
    monkeypatch.setattr(Run, "policy", property(never))
    code, err = run_cli(["sample", "--run-dir", str(run)], monkeypatch, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and f"{run}: cannot write" in err, err
    assert "Traceback" not in err


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    pair = PreferencePair(id="v_0", qa_id="v_0", video_id="v", video="v.mp4", prompt="What colour?", answer="red",
                          chosen="Red.", rejected="Blue.", chosen_score=5, rejected_score=1, chosen_id="v_0#0",
                          rejected_id="v_0#1")
    RecordFile(run / "pairs.jsonl", PreferencePair).write([pair])
    before = (run / "pairs.jsonl").read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "exported" / "trl.jsonl"
    code, err = run_cli(["export", "trl", str(out), "--run-dir", str(run)], monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{out}: cannot write: no space left on the disk" in err
    assert not out.exists() and not list(out.parent.iterdir())  # no half-written file, no temp file left

    with pytest.raises(WriteError, match=f"{run / 'pairs.jsonl'}: cannot write: no space left"):
        RecordFile(run / "pairs.jsonl", PreferencePair).append(pair.model_copy(update={"id": "v_1"}))
    with pytest.raises(WriteError, match="rows.jsonl: cannot write: no space left"):
        write_jsonl(tmp_path / "rows.jsonl", [{"id": 1}])
    monkeypatch.undo()
    assert (run / "pairs.jsonl").read_bytes().startswith(before)
    frames = tmp_path / "frames" / "v"
    with pytest.raises(WriteError, match=f"{frames}: cannot write: no space left"), atomic_dir(frames):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a JPEG writer in the folder would
    assert not frames.exists() and not list(frames.parent.iterdir())


def test_a_reply_cache_in_a_read_only_folder_names_the_file(tmp_path, read_only):
    from capdpo.llm.cache import CacheEntry, LLMCache

    folder = tmp_path / "run"
    cache = LLMCache(folder / "llm_cache.sqlite")
    cache.put({"a": CacheEntry("chat", "hf", "m", "Score: 3")})
    cache.close()
    read_only(folder)
    for path in (folder / "llm_cache.sqlite", folder / "new.sqlite"):  # sqlite3.OperationalError underneath
        with pytest.raises(WriteError, match=f"{path}: cannot write"):
            LLMCache(path).put({"b": CacheEntry("chat", "hf", "m", "Score: 4")})
