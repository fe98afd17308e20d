"""bpo_jax: JAX-native preference optimization (sweet-spot pairs, BPO balancing, sharded DPO).

The names below are the library's front door; each lives in the module of its concept.
"""

from bpo_jax import demo_task
from bpo_jax.config import RunConfig, load_config
from bpo_jax.losses import preference_loss, sequence_logps
from bpo_jax.models import CausalLM, ModelConfig, add_lora, init_model, load_hf_model, save_hf_model
from bpo_jax.pairs import build_pairs, representative_points, select_pair, select_pairs
from bpo_jax.pipeline import run_pipeline
from bpo_jax.sampling import SamplingConfig, generate
from bpo_jax.train import DPOTrainer, SFTTrainer, TrainState, fit

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "DPOTrainer", "ModelConfig", "RunConfig", "SFTTrainer", "SamplingConfig", "TrainState",
    "add_lora", "build_pairs", "demo_task", "fit", "generate", "init_model", "load_config", "load_hf_model",
    "preference_loss", "representative_points", "run_pipeline", "save_hf_model", "select_pair", "select_pairs",
    "sequence_logps",
]
