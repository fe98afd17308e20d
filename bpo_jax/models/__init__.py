"""Flax NNX Llama-family causal LM, Hugging Face checkpoint import/export, LoRA."""

from bpo_jax.models.config import ModelConfig, ModelConfigError
from bpo_jax.models.hf import load_hf_model, save_hf_model
from bpo_jax.models.llama import CausalLM, init_model
from bpo_jax.models.lora import add_lora, merge_lora

__all__ = ["CausalLM", "ModelConfig", "ModelConfigError", "add_lora", "init_model", "load_hf_model", "merge_lora", "save_hf_model"]
