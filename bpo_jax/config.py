"""Typed run configuration: one dataclass per section, loaded from YAML.

Every option the pipeline reads is declared here with its default and a one-line comment, so the
configuration reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


@dataclasses.dataclass
class ModelSection:
    path: str | None = None  # local Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    gguf: str | None = None  # a GGUF file instead of `path`
    init: dict | None = None  # a Hugging Face config dict: build a randomly initialized model instead
    tokenizer: str | None = None  # tokenizer directory when it differs from `path`
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: bool = False  # rematerialize each decoder layer in the backward pass


@dataclasses.dataclass
class MeshSection:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class DistributedSection:
    enabled: bool = False  # call jax.distributed.initialize() (multi-host)
    coordinator_address: str | None = None  # host:port of process 0; None: auto-detect (TPU, SLURM)
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class DataSection:
    prompts: str | None = None  # prompts JSONL/Parquet {id?, prompt}
    scored: str | None = None  # scored groups {prompt, responses, rewards}: enter at the pairs stage
    pairs: str | None = None  # preference pairs {prompt, chosen, rejected}: enter at the train stage
    eval_prompts: str | None = None  # held-out prompts for eval
    eval_pairs: str | None = None  # held-out pairs for preference accuracy
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int = 256  # prompts longer than this keep their end
    length_buckets: tuple[int, ...] = ()  # padded lengths; empty: multiples of 64 up to max_length
    skip_bad_rows: bool = False  # skip and count bad rows instead of stopping with an error


@dataclasses.dataclass
class LoraSection:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class OptimSection:
    learning_rate: float = 5e-6
    schedule: str = "cosine"  # cosine | linear | constant (after linear warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables


@dataclasses.dataclass
class TrainSection:
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0  # simpo margin
    reference: str = "precomputed"  # precomputed | frozen_copy | lora_off | none
    batch_size: int = 8  # global batch (pairs per optimizer step)
    grad_accum_steps: int = 1  # micro-batches per step
    num_epochs: int = 1
    max_steps: int = 0  # 0: num_epochs over the data
    vocab_chunk: int = 0  # >0: log-probs over vocabulary chunks of this size (lean memory)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0


@dataclasses.dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
