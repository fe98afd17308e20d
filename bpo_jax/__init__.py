"""bpo_jax: JAX-native preference optimization (sweet-spot pairs, BPO balancing, sharded DPO).

The names below are the library's front door; each lives in the module of its concept.
"""

import importlib
from typing import Any

# Imported on first use, so that `python -m bpo_jax.main --help` answers without loading JAX.
_EXPORTS = {
    "bpo_jax.config": ("RunConfig", "load_config"),
    "bpo_jax.losses": ("preference_loss", "sequence_logps"),
    "bpo_jax.models": ("CausalLM", "ModelConfig", "add_lora", "init_model", "load_hf_model", "save_hf_model"),
    "bpo_jax.pairs": ("build_pairs", "representative_points", "select_pair", "select_pairs"),
    "bpo_jax.pipeline": ("run_pipeline",),
    "bpo_jax.sampling": ("SamplingConfig", "generate"),
    "bpo_jax.train": ("DPOTrainer", "SFTTrainer", "TrainState", "fit"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "demo_task":
        return importlib.import_module("bpo_jax.demo_task")
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'bpo_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value

__all__ = [
    "CausalLM", "DPOTrainer", "ModelConfig", "RunConfig", "SFTTrainer", "SamplingConfig", "TrainState",
    "add_lora", "build_pairs", "demo_task", "fit", "generate", "init_model", "load_config", "load_hf_model",
    "preference_loss", "representative_points", "run_pipeline", "save_hf_model", "select_pair", "select_pairs",
    "sequence_logps",
]
