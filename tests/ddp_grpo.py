"""Run by ``torchrun --nproc_per_node 2`` in test_grpo.py: the GRPO stage through accelerate on the gloo backend (DDP).

Each process writes the question ids it sampled for and the metrics it logged to ``LOG_DIR/rank-<r>.json``,
so the test can check that the questions were sharded and the metrics gathered (a helper, not a test file).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_grpo.py QA VIDEOS POLICY OUT CACHE LOG_DIR
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from capdpo import grpo, training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.records import QAItem, RecordFile, Video

qa, videos, policy_dir, out, cache, log_dir = sys.argv[1:]
seen, logged = [], []
objective, gather = grpo.grpo_objective, training.gather_metrics


def recording_objective(scorer, policy, batch, *args, **kwargs):
    seen.extend(q.qa.id for q in batch)
    return objective(scorer, policy, batch, *args, **kwargs)


def recording_gather(accelerator, metrics):
    gathered = gather(accelerator, metrics)
    logged.append(gathered)
    return gathered


grpo.grpo_objective, training.gather_metrics = recording_objective, recording_gather
cfg = TrainConfig(algorithm="grpo", epochs=1, lr=1e-3, lora=False, save_every=0,
                  grpo={"num_generations": 2, "questions_per_step": 1, "max_completion_length": 4,
                        "rewards": [{"name": "exact_match"}, {"name": "numeric"}]})
policy = load_policy(policy_dir, cache, "cpu", "float32")
grpo.run_grpo(RecordFile(qa, QAItem), RecordFile(videos, Video), policy, cfg, FramesConfig(num_frames=4), Path(out))
rank = PartialState().process_index
(Path(log_dir) / f"rank-{rank}.json").write_text(json.dumps({"seen": seen, "logged": logged}))
PartialState().destroy_process_group()
