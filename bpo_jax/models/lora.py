"""LoRA adapters on the model's projections (Hu et al. 2021; init and scaling as PEFT does).

An adapter adds x A B * (alpha / rank) to a Linear's output. A is [in, rank] (uniform, like
PEFT's Kaiming init), B is [rank, out] zeros, so a fresh adapter leaves the model unchanged.
Adapters are `nnx.LoRAParam` variables: `nnx.split(model, nnx.LoRAParam, ...)` separates the
trainable adapters from the frozen base. `adapters_off_graphdef` gives the same model with
its adapters switched off (the `lora_off` reference): the base model, no adapter matmuls run.
Note for gradient features: with B = 0, dL/dA = 0, so per-sample gradients of a fresh adapter
carry information only in B until a short warm-up moves B.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from bpo_jax.models.config import resolve_dtype
from bpo_jax.models.llama import CausalLM, Linear

if TYPE_CHECKING:  # bpo_jax.config imports the models package: no runtime import back
    from bpo_jax.config import LoraSection


def _targeted_linears(model: CausalLM, targets: tuple[str, ...]) -> list[tuple[str, Linear]]:
    found = []
    for path, module in nnx.iter_modules(model):
        key = "/".join(str(p) for p in path)
        if isinstance(module, Linear) and key not in ("lm_head", "score") and any(re.search(t, key) for t in targets):
            found.append((key, module))
    return found


def add_lora(model: CausalLM, config: LoraSection, seed: int = 0) -> CausalLM:
    """Attach fresh adapters (in place) to every Linear whose path matches a target pattern."""
    if config.rank <= 0:
        return model
    linears = _targeted_linears(model, tuple(config.targets))
    if not linears:
        raise ValueError(f"LoRA targets {list(config.targets)} match no projection of the model")
    pdt = resolve_dtype(model.config.param_dtype)
    key = jax.random.key(seed)
    for i, (_, linear) in enumerate(linears):
        fan_in, fan_out = linear.kernel.shape
        bound = 1.0 / (fan_in**0.5)
        a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, config.rank), pdt, -bound, bound)
        linear.lora_a = nnx.LoRAParam(a)
        linear.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, fan_out), pdt))
        linear.lora_scale = config.alpha / config.rank
    return model


def lora_delta(linear: Linear) -> jax.Array:
    """The adapter's contribution to the kernel, A B * scale, in float32."""
    a = linear.lora_a[...].astype(jnp.float32)
    b = linear.lora_b[...].astype(jnp.float32)
    return (a @ b) * linear.lora_scale


def merge_lora(model: CausalLM) -> CausalLM:
    """Fold every adapter into its kernel (in place) and remove it: a plain model again."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            delta = lora_delta(module)
            module.kernel.set_value((module.kernel[...].astype(jnp.float32) + delta).astype(module.kernel.dtype))
            module.lora_a = None
            module.lora_b = None
            module.lora_scale = 0.0
    return model


def adapters_off_graphdef(model: CausalLM) -> nnx.GraphDef:
    """The graph of `model` with every adapter switched off (scale 0, so Linear skips its matmuls).

    Merged with the model's own states it is the base model, without a copy of any weight and
    without the cost of multiplying by zeroed adapters.
    """
    adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None]
    scales = [m.lora_scale for m in adapted]
    for m in adapted:
        m.lora_scale = 0.0
    try:
        return nnx.graphdef(model)
    finally:
        for m, scale in zip(adapted, scales):
            m.lora_scale = scale


def has_lora(model: CausalLM) -> bool:
    return any(isinstance(m, Linear) and m.lora_a is not None for _, m in nnx.iter_modules(model))
