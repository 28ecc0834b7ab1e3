"""Run by ``torchrun --nproc_per_node 2`` in test_train.py: the train stage on the gloo backend.

Each process writes the pair ids it trained on and the metrics it logged to ``LOG_DIR/rank-<r>.json``,
so the test can check that the data was sharded and the metrics gathered (a helper, not a test file).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py PAIRS VIDEOS POLICY OUT CACHE LOG_DIR
"""

import json
import sys
from pathlib import Path

import capdpo.train as train
import capdpo.training as training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.records import PreferencePair, RecordFile, Video

pairs, videos, policy_dir, out, cache, log_dir = sys.argv[1:]
seen, logged = [], []
step = train.dpo_step


def recording_step(scorer, batch, *args, **kwargs):
    seen.extend(t.pair.id for t in batch)
    return step(scorer, batch, *args, **kwargs)


gather = training.gather_metrics


def recording_gather(accelerator, metrics):
    out = gather(accelerator, metrics)
    logged.append(out)
    return out


train.dpo_step, training.gather_metrics = recording_step, recording_gather
cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, lora=False, save_every=0)
policy = load_policy(policy_dir, cache, "cpu", "float32")
train.run_train(RecordFile(pairs, PreferencePair), RecordFile(videos, Video), policy, cfg, FramesConfig(num_frames=4),
                Path(out), embed_cache=EmbeddingCache(Path(out) / "embeddings"))
from accelerate import PartialState  # noqa: E402

rank = PartialState().process_index
(Path(log_dir) / f"rank-{rank}.json").write_text(json.dumps({"seen": seen, "logged": logged}))
PartialState().destroy_process_group()
