"""The layer table of docs/architecture.md, checked against the package's imports.

Every import counts, also one nested in a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "capdpo"

# docs/architecture.md, lowest layer first: a module may import its own layer and lower ones
LAYERS: dict[str, int] = {
    "capdpo": 0, "capdpo.errors": 0, "capdpo.records": 0, "capdpo.hashing": 0, "capdpo.shards": 0,
    "capdpo.stats": 0, "capdpo.config": 0, "capdpo.devices": 0, "capdpo.prompts": 0, "capdpo.packaged": 0,
    "capdpo.rundir": 0, "capdpo.ids": 0,
    "capdpo.media": 1,
    "capdpo.llm": 2, "capdpo.policy": 2,
    "capdpo.models": 3, "capdpo.judge": 3, "capdpo.training": 3, "capdpo.ray_engine": 3,
    "capdpo.data": 4, "capdpo.frames": 4, "capdpo.qa": 4, "capdpo.sample": 4, "capdpo.judge.stage": 4,
    "capdpo.pairs": 4, "capdpo.reference": 4, "capdpo.sft": 4, "capdpo.train": 4, "capdpo.grpo": 4, "capdpo.evaluation.stage": 4, "capdpo.report": 4,
    # the evaluation package's analyses (suites, mc, compare, agreement); its stage is listed with the stages above
    "capdpo.evaluation": 4, "capdpo.oracle": 4, "capdpo.similarity": 4,
    "capdpo.formats": 4, "capdpo.losses": 4, "capdpo.grpo_loss": 4, "capdpo.rewards": 4, "capdpo.distill": 4, "capdpo.judge_study": 4,
    "capdpo.pipeline": 5, "capdpo.repro": 5,
    "capdpo.cli": 6,
    "capdpo.integrations": 7,  # plugins other tools load (lmms-eval's model): the top, so nothing in capdpo imports them
}
STAGES = {"capdpo.data", "capdpo.frames", "capdpo.qa", "capdpo.sample", "capdpo.judge.stage", "capdpo.pairs",
          "capdpo.reference", "capdpo.sft", "capdpo.train", "capdpo.grpo", "capdpo.evaluation.stage", "capdpo.report"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """capdpo modules ``path`` imports (a name imported from a package counts as its submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("capdpo."):
                found.add(t)
                break
    return found


def layer_of(module: str) -> tuple[str, int]:
    """The most specific entry of LAYERS that names ``module`` or a package above it."""
    name = module
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(module)
        name = name.rpartition(".")[0]
    return name, LAYERS[name]


def test_every_module_has_a_layer():
    unplaced = []
    for m in modules():
        try:
            layer_of(m)
        except KeyError:
            unplaced.append(m)
    assert not unplaced, f"add these modules to docs/architecture.md and LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_follow_the_layers(module):
    known = set(modules())
    entry, layer = layer_of(module)
    for imported in imports(modules()[module], known):
        if imported == module:
            continue
        imported_entry, imported_layer = layer_of(imported)
        assert imported_layer <= layer, f"{module} (layer {layer}) imports {imported} (layer {imported_layer})"
        if entry in STAGES and imported_entry in STAGES:
            assert imported_entry == entry, f"stage {entry} imports stage {imported_entry}"
