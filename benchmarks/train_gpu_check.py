"""The real train stage on one GPU: ``run_train`` (accelerate, bf16 autocast over fp32 weights, the
fast path: embedding cache, precomputed reference, shared prefix) for a few steps on synthetic clips,
with a random model of ``dpo_step.py``'s presets. Prints each step's metrics and a summary line.

    python benchmarks/train_gpu_check.py --preset 1b --model-dir DIR_WITH_CONFIG_AND_TOKENIZER
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dpo_step import build_policy  # noqa: E402

from capdpo.config import FramesConfig, TrainConfig  # noqa: E402
from capdpo.media.synthetic import make_synthetic_dataset  # noqa: E402
from capdpo.policy.embed_cache import EmbeddingCache  # noqa: E402
from capdpo.records import PreferencePair, RecordFile, Video  # noqa: E402
from capdpo.train import run_train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="/tmp/capdpo-train-check")
    args = ap.parse_args()
    build_args = argparse.Namespace(model_dir=args.model_dir, preset=args.preset, dtype="float32", init="random",
                                    device=args.device, frames=8)
    policy = build_policy(build_args)
    out = Path(args.out)
    clips = make_synthetic_dataset(out / "clips", args.clips, seed=5)
    videos = RecordFile(out / "videos.jsonl", Video)
    videos.write(c.video for c in clips)
    pairs = []
    for i, c in enumerate(clips):  # chosen: the clip's own reference answer; rejected: the next clip's
        (question, answer, _), (_, other, _) = c.qa[0], clips[(i + 1) % len(clips)].qa[0]
        pairs.append(PreferencePair(id=f"{c.video.id}_0", qa_id=f"{c.video.id}_0", video_id=c.video.id, video=c.video.video,
                                    prompt=question, answer=answer, chosen=answer, rejected=other, chosen_score=5,
                                    rejected_score=1, chosen_id="a", rejected_id="b"))
    pair_file = RecordFile(out / "pairs.jsonl", PreferencePair)
    pair_file.write(pairs)
    cfg = TrainConfig(lora=False, lr=1e-5, mixed_precision="bf16", batch_size=args.batch_size, epochs=100,
                      max_steps=args.steps, save_every=0)
    start = time.perf_counter()
    run_train(pair_file, videos, policy, cfg, FramesConfig(num_frames=8), out / "train",
              embed_cache=EmbeddingCache(out / "embeddings"))
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    later = rows[1:] or rows
    print(f"train stage: {len(rows)} steps in {time.perf_counter() - start:.1f} s (videos, reference pass and save "
          f"included); step {sum(r['step_time_s'] for r in later) / len(later):.3f} s, "
          f"{sum(r['tokens_per_s'] for r in later) / len(later):.0f} tokens/s, peak {max(r['peak_memory_mb'] for r in rows):.0f} MiB, "
          f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
