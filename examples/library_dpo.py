"""bpo_jax as a library: a DPO loss on your own log-probs, then a few sharded DPO train steps.

Runs on CPU in seconds: python examples/library_dpo.py
"""

import jax.numpy as jnp

import bpo_jax
from bpo_jax.config import TrainSection, OptimSection
from bpo_jax.data import PreferencePair, PreferenceBatcher, tokenize_pairs
from bpo_jax.models import ModelConfig, init_model
from bpo_jax.sharding import make_mesh
from bpo_jax.tokenizer import Tokenizer
from bpo_jax.train import DPOTrainer

# 1. The loss alone, on sequence log-probs you computed yourself (TRL's formulas and names).
losses, chosen_rewards, rejected_rewards = bpo_jax.preference_loss(
    jnp.array([-4.0, -6.0]), jnp.array([-7.0, -5.0]),  # policy: log p(chosen), log p(rejected)
    jnp.array([-5.0, -5.5]), jnp.array([-6.0, -5.5]),  # reference
    loss_type="sigmoid", beta=0.1,
)
print("per-pair DPO loss", losses)

# 2. The jitted, sharded train step on a tiny model (the demo task's tokenizer ships with bpo_jax).
tokenizer = Tokenizer.from_pretrained(bpo_jax.demo_task.ASSETS)
model = init_model(ModelConfig.from_hf_dict({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 15, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2,
}), seed=0)
pairs = [PreferencePair(id=str(i), prompt=f"sort {a} {b} =", chosen=f"{min(a, b)} {max(a, b)}", rejected=f"{max(a, b)} {min(a, b)}")
         for i, (a, b) in enumerate([(3, 1), (9, 4), (2, 7), (8, 5)] * 4) if a != b]
data, report = tokenize_pairs(pairs, tokenizer, max_length=16)
batches = PreferenceBatcher(data, global_batch_size=8, seed=0)
mesh = make_mesh((-1, 1, 1))  # every local device on the data axis
trainer = DPOTrainer(model, TrainSection(beta=0.1, reference="frozen_copy", optim=OptimSection(learning_rate=1e-2)), mesh, total_steps=20)
state = trainer.init_state()
for _ in range(20):
    state, metrics = trainer.train_step(state, next(batches))
print("after 20 steps:", {k: round(float(v), 3) for k, v in metrics.items() if k in ("loss", "rewards/accuracies", "rewards/margins")})
trained = trainer.model_at(state)  # a CausalLM again: sample from it, or save_hf_model(trained, "out/")
