"""Preference data: schema, readers (JSONL, Parquet, TFDS), tokenization, DPO batching, statistics.

Every name is imported on first use (as in `bpo_jax`), so that reading a config (which needs the
schema and the readers) does not load JAX through the batching module; `tensorflow_datasets` is only
loaded when the TFDS names are used.
"""

import importlib
from typing import Any

_EXPORTS = {
    "bpo_jax.data.batching": ("PreferenceBatcher", "collate_pairs", "length_buckets", "pad_and_stack", "pick_bucket",
                              "to_global_batch"),
    "bpo_jax.data.readers": ("ReadReport", "iter_records", "read_records", "write_records"),
    "bpo_jax.data.schema": ("DataError", "PreferencePair", "PromptRecord", "ScoredGroup", "derive_id", "parse_record",
                            "prompt_key", "split_implicit_prompt"),
    "bpo_jax.data.stats": ("dataset_stats", "format_stats", "write_stats"),
    "bpo_jax.data.tokenize": ("RaggedTokens", "TokenizedPairs", "TokenizeReport", "encode_prompts", "render_prompt",
                              "response_text", "tokenize_pairs"),
    "bpo_jax.data.tfds_builder": ("BpoPreferences", "BpoPreferencesConfig", "build_tfds_dataset", "read_tfds"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
_TFDS_NAMES = _EXPORTS["bpo_jax.data.tfds_builder"]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'bpo_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


__all__ = [
    "DataError",
    "PreferenceBatcher",
    "PreferencePair",
    "PromptRecord",
    "RaggedTokens",
    "ReadReport",
    "ScoredGroup",
    "TokenizeReport",
    "TokenizedPairs",
    "collate_pairs",
    "dataset_stats",
    "derive_id",
    "encode_prompts",
    "format_stats",
    "iter_records",
    "length_buckets",
    "pad_and_stack",
    "parse_record",
    "pick_bucket",
    "prompt_key",
    "read_records",
    "render_prompt",
    "response_text",
    "split_implicit_prompt",
    "to_global_batch",
    "tokenize_pairs",
    "write_records",
    "write_stats",
    *_TFDS_NAMES,
]
