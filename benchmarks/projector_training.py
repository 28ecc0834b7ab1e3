"""DPO with the projector training (the miniature's recipe: LoRA + projector), with and without the
frozen vision tower's cached features.

With the projector training, a video's embeddings change every step, so they cannot be cached;
before, every step (and the reference pass) ran the video's frames through the vision tower again.
Now families whose projector is the encoder's last step (LLaVA-NeXT-Video, Video-LLaVA, the
built-in mini model) keep the tower's output (``VideoEncoder.tower``, in the embedding cache) and a
step runs the projector alone. The trained checkpoint's evaluation reads the same features. Both
variants train on the same pairs in one process, one after the other; the losses must agree:

    python benchmarks/projector_training.py            # builtin:mini, 24 clips x 2 pairs, batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from capdpo.config import FramesConfig, TrainConfig
from capdpo.media.answers import answer_variants
from capdpo.media.synthetic import make_synthetic_dataset, scene_questions
from capdpo.models.load import load_policy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, Video, write_jsonl
from capdpo.train import run_train


def pairs_of(clips, questions: int, rng: random.Random) -> list[PreferencePair]:
    """The reference answer over a swapped-fact answer, for ``questions`` questions a clip."""
    out = []
    for clip in clips:
        for k, q in enumerate(scene_questions(clip.scene)[:questions]):
            wrong = [a for a in answer_variants(q, 4, rng) if a != q.answer][-1]
            qa_id = f"{clip.video.id}_{k}"
            out.append(PreferencePair(id=qa_id, qa_id=qa_id, video_id=clip.video.id, video=clip.video.video, prompt=q.question,
                                      answer=q.answer, chosen=q.answer, rejected=wrong, chosen_score=5, rejected_score=1,
                                      chosen_id=f"{qa_id}-c", rejected_id=f"{qa_id}-r"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:mini")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--questions", type=int, default=2, help="pairs a clip")
    args = ap.parse_args()
    frames = FramesConfig()
    cfg = TrainConfig(lora=True, freeze_projector=False, lr=5e-4, rpo_alpha=1.0, batch_size=4, epochs=1, save_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = make_synthetic_dataset(tmp / "clips", args.clips, seed=11)
        write_jsonl(tmp / "videos.jsonl", (c.video.model_dump() for c in clips))
        write_jsonl(tmp / "pairs.jsonl", (p.model_dump() for p in pairs_of(clips, args.questions, random.Random(0))))
        videos, pairs = RecordFile(tmp / "videos.jsonl", Video), RecordFile(tmp / "pairs.jsonl", PreferencePair)
        results = {}
        for name in ("pixels every step (before)", "tower features cached (capdpo)"):
            policy = load_policy(args.model, args.cache_dir, "cpu", "float32")
            features = name.startswith("tower")
            type(policy).splits_projector = features  # the switch between the two paths, for this process only
            cache = EmbeddingCache(tmp / "embeddings") if features else None
            t0 = time.perf_counter()
            out = run_train(pairs, videos, policy, cfg, frames, tmp / name.split()[0], embed_cache=cache)
            train_s = time.perf_counter() - t0
            trained = load_policy(str(out), args.cache_dir, "cpu", "float32")
            t0 = time.perf_counter()
            encoder = VideoEncoder(trained, frames, cache)
            for clip in clips:  # what evaluating the trained checkpoint encodes
                encoder.encode(clip.video)
            encode_s = time.perf_counter() - t0
            rows = [json.loads(line) for line in (tmp / name.split()[0] / "metrics.jsonl").read_text().splitlines()]
            results[name] = {"train_s": train_s, "steps": len(rows), "encode_s": encode_s, "losses": [r["loss"] for r in rows]}
        (before, now) = results.values()
        for name, r in results.items():
            print(f"{name:32s} training {r['train_s']:6.1f} s ({r['steps']} steps, reference pass included)   "
                  f"trained checkpoint encodes {args.clips} clips in {r['encode_s']:5.2f} s")
        print(f"training {before['train_s'] / now['train_s']:.2f}x faster, the trained checkpoint's encoding "
              f"{before['encode_s'] / now['encode_s']:.1f}x faster; largest loss difference "
              f"{max(abs(a - b) for a, b in zip(before['losses'], now['losses'])):.1e}")


if __name__ == "__main__":
    main()
