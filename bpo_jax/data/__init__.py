"""Preference data: schema, readers (JSONL, Parquet, TFDS), tokenization, DPO batching, statistics.

The TFDS names are imported lazily: `tensorflow_datasets` is only loaded when they are used.
"""

from bpo_jax.data.batching import (
    PreferenceBatcher,
    collate_pairs,
    length_buckets,
    pad_and_stack,
    pick_bucket,
    to_global_batch,
)
from bpo_jax.data.readers import ReadReport, iter_records, read_records, write_records
from bpo_jax.data.schema import (
    DataError,
    PreferencePair,
    PromptRecord,
    ScoredGroup,
    derive_id,
    parse_record,
    prompt_key,
    split_implicit_prompt,
)
from bpo_jax.data.stats import dataset_stats, format_stats, write_stats
from bpo_jax.data.tokenize import (
    RaggedTokens,
    TokenizedPairs,
    TokenizeReport,
    encode_prompts,
    render_prompt,
    response_text,
    tokenize_pairs,
)

_TFDS_NAMES = ("BpoPreferences", "BpoPreferencesConfig", "build_tfds_dataset", "read_tfds")


def __getattr__(name: str):
    if name in _TFDS_NAMES:
        from bpo_jax.data import tfds_builder

        return getattr(tfds_builder, name)
    raise AttributeError(f"module 'bpo_jax.data' has no attribute {name!r}")


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
