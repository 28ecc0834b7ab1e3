"""An on-disk cache of encoded videos: the vision tower runs once per video, ever.

With the vision tower and projector frozen (the paper's DPO), a video's embeddings are the same
for its chosen and rejected rows, for the reference pass, for every epoch and for every later run
on the same checkpoint. ``EmbeddingCache`` stores each ``EncodedVideo`` as one safetensors file;
the stages reach it through ``capdpo.policy.video.VideoEncoder``, which plans the layout first:

    cache = EmbeddingCache(Path(cache_dir) / "embeddings")
    encoded = cache.get(policy, video_record, layout)        # None on a miss
    cache.put(policy, video_record, encoded)

An entry's key is the sha256 of everything that decides the embeddings:

* the video's content (a file's bytes; a frame folder's frame names and bytes), memoised per
  ``(path, size, mtime_ns)`` so one process hashes a large file once;
* the planned ``VideoLayout`` (frames sampled, frame size, pixel cap, frame times): it holds every
  frame setting that reaches the pixels, including a reduction of ``frames.on_over_budget=reduce``;
* the encoder fingerprint: adapter and model class, preprocessing (vision spec, which processor),
  dtype, and a hash of the vision tower's and projector's weights, memoised per model object
  (so weights changed in place after the first call are not seen: frozen parts never change).

The LLM's weights are not part of the key: a DPO-trained checkpoint reuses its base's entries.
Families whose projector is the encoder's last step (``VideoPolicy.splits_projector``) also keep
each video's *tower features* (the projector's input) under a key with the vision tower's weights
only: a training run whose projector learns reads them instead of running the tower every step, and
its trained checkpoint, whose projector changed, encodes from them with the projector alone.
The layout is planned (frames decoded) before every lookup, hit or miss, so the key is exact for
the prompts and budget at hand; a hit skips preprocessing, vision tower and projector.

Entries are written to a temp file and renamed, so a killed process never leaves half an entry; an
entry that still fails to load (disk trouble, a foreign file) is logged with its path and encoded
again. Shards on several machines may share one cache folder: two writers of one key write the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from capdpo.hashing import file_hash, sha256_json
from capdpo.media.frames import list_frame_files
from capdpo.policy.base import EncodedVideo, TowerFeatures, VideoLayout, VideoPolicy, read_processor_config, spec_from_dict
from capdpo.records import ClipWindow, Video, atomic_path

log = logging.getLogger("capdpo")

ENTRY_FORMAT = "1"  # bump when the entry layout changes: old entries then simply miss

_weight_hashes: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, ...] | None, str]] = weakref.WeakKeyDictionary()


def content_hash(video_path: str | os.PathLike) -> str:
    """sha256 of a video's content: a file's bytes, or a frame folder's frame names and bytes in
    frame order (the frames ``sample_frames`` reads; other files in the folder do not count)."""
    path = Path(video_path)
    if path.is_dir():
        return sha256_json([[f.name, file_hash(f)] for f in list_frame_files(path)])
    return file_hash(path)


def weights_hash(policy: VideoPolicy, parts: tuple[str, ...] | None = None) -> str:
    """sha256 over name, shape, dtype and bytes of the model's weights (parameters and persistent
    buffers) in ``parts`` ("vision", "projector", "llm"; all weights when None). Memoised per model
    object and ``parts``."""
    model = policy.model
    memo = _weight_hashes.setdefault(model, {})
    if parts not in memo:
        h = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            if parts is not None and policy.parts.part_of(name) not in parts:
                continue
            tensor = tensor.detach().cpu().contiguous()
            h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\n".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
        memo[parts] = h.hexdigest()
    return memo[parts]


def encoder_fingerprint(policy: VideoPolicy, stage: str = "embeddings") -> str:
    """What turns sampled frames into embeddings: adapter, model class, preprocessing, dtype and
    the vision tower's and projector's weights (not the LLM's). ``stage="tower"``: into tower
    features, the vision tower's weights only."""
    hf_processor = policy.hf_video_processor() is not None
    return sha256_json({
        "adapter": type(policy).__name__,
        "model_class": type(policy.model).__name__,
        "spec": asdict(policy.spec),
        "processor": read_processor_config(policy.path) if hf_processor else "capdpo",
        "dtype": str(policy.model.dtype),
        "weights": weights_hash(policy, ("vision", "projector") if stage == "embeddings" else ("vision",)),
    } | ({} if stage == "embeddings" else {"stage": stage}))


def entry_key(policy: VideoPolicy, video_path: str | os.PathLike, layout: VideoLayout, stage: str = "embeddings",
              window: ClipWindow | None = None) -> str:
    """The cache key of one video (or the part ``window`` names) encoded with ``layout`` by
    ``policy``'s encoder (``stage`` "embeddings"), or by its vision tower only ("tower")."""
    part = {} if window is None else {"window": window.model_dump()}  # a whole clip keeps the key it always had
    return sha256_json({"format": ENTRY_FORMAT, "content": content_hash(video_path), "layout": asdict(layout),
                        "encoder": encoder_fingerprint(policy, stage)} | part)


class EmbeddingCache:
    """Encoded videos on disk under ``root``, one ``<key[:2]>/<key>.safetensors`` file each.

    ``hits`` and ``misses`` count the lookups of this object."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, policy: VideoPolicy, video: Video, layout: VideoLayout) -> EncodedVideo | None:
        """``video`` as ``policy``'s encoder encodes it with ``layout``, on the policy's device and
        dtype, or None when the cache lacks it (an unreadable entry is logged and counts as missing)."""
        return self._lookup(policy, video, layout, "embeddings")

    def put(self, policy: VideoPolicy, video: Video, encoded: EncodedVideo) -> None:
        """Store ``video`` as ``policy``'s encoder encoded it (with ``encoded.layout``)."""
        self._write(self.path(entry_key(policy, video.video, encoded.layout, window=video.window)), encoded, video)

    def get_tower(self, policy: VideoPolicy, video: Video, layout: VideoLayout) -> TowerFeatures | None:
        """``video``'s tower features (``VideoPolicy.tower_features``) with ``layout``, or None."""
        stored = self._lookup(policy, video, layout, "tower")
        return None if stored is None else TowerFeatures(layout, stored.embeds)

    def put_tower(self, policy: VideoPolicy, video: Video, features: TowerFeatures) -> None:
        """Store ``video``'s tower features (with ``features.layout``)."""
        self._write(self.path(entry_key(policy, video.video, features.layout, "tower", video.window)),
                    EncodedVideo(features.layout, features.features), video)

    def _lookup(self, policy: VideoPolicy, video: Video, layout: VideoLayout, stage: str) -> EncodedVideo | None:
        """The ``stage`` entry of ``video`` on the policy's device and dtype, or None (counted)."""
        path = self.path(entry_key(policy, video.video, layout, stage, video.window))
        if path.exists():
            try:
                stored = self._read(path, layout)
            except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
                log.warning("embedding cache: unreadable entry %s (%s); encoding the video again", path, e)
            else:
                self.hits += 1
                return EncodedVideo(layout, stored.embeds.to(policy.device, policy.model.dtype),
                                    tuple(d.to(policy.device, policy.model.dtype) for d in stored.deepstack))
        self.misses += 1
        return None

    @staticmethod
    def _read(path: Path, layout: VideoLayout) -> EncodedVideo:
        """One entry, checked against the layout it was looked up with (ValueError if it differs)."""
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        stored = spec_from_dict(VideoLayout, json.loads(metadata["layout"]))
        if stored != layout:
            raise ValueError(f"entry holds layout {stored}, expected {layout}")
        deepstack = tuple(tensors[f"deepstack.{i}"] for i in range(int(metadata["deepstack"])))
        return EncodedVideo(layout, tensors["embeds"], deepstack)

    @staticmethod
    def _write(path: Path, encoded: EncodedVideo, video: Video) -> None:
        """Write an entry atomically."""
        tensors = {"embeds": encoded.embeds.detach().cpu().contiguous()}
        tensors |= {f"deepstack.{i}": d.detach().cpu().contiguous() for i, d in enumerate(encoded.deepstack)}
        metadata = {"format": ENTRY_FORMAT, "layout": json.dumps(asdict(encoded.layout)),
                    "deepstack": str(len(encoded.deepstack)), "video": video.video}
        with atomic_path(path) as tmp:
            tmp.write_bytes(save(tensors, metadata))
