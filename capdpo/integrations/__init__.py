"""capdpo inside other tools: plugins they load. Nothing in capdpo imports this package (the top
layer of docs/architecture.md), and it runs only where the other tool is installed.

- ``lmms_eval_model``: the ``capdpo`` model of lmms-eval 0.7.3 (``--model capdpo``), registered by
  capdpo's ``lmms_eval.models`` entry point, :func:`lmms_eval_manifests`; installed by
  ``make lmms-eval-venv`` into a venv of its own (docs/evaluation.md, "Hand-off to lmms-eval").
"""

from __future__ import annotations


def lmms_eval_manifests() -> list:
    """lmms-eval's registry entry for capdpo's model; lmms-eval imports the class only when a run
    asks for ``--model capdpo``, so its start costs nothing more."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="capdpo", simple_class_path="capdpo.integrations.lmms_eval_model.CapdpoVideoLMM")]
