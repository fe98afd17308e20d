"""The benchmark harness's own logic (bench/): FLOP counts, allocator variants, sizes and the report.

No benchmark runs here (CI must stay fast): these check the arithmetic and plumbing the published
numbers rest on, against hand counts and published model sizes.
"""

import argparse

import jax
import pytest
from flax import nnx

from bench import common, run_all
from bench.bench_dpo import model_config
from bench.common import SMOLLM2
from bench.flops import attention_forward_flops, dpo_step_flops, einsum_flops, matmul_params, step_matmuls
from bpo_jax import host_memory
from bpo_jax.config import LoraSection
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora

# vocab 10, hidden 4, intermediate 6, 2 layers, 2 heads of 2, 1 KV head.
TINY = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=2)
SMOLLM2_PUBLISHED_PARAMS = 134_515_008  # HuggingFaceTB/SmolLM2-135M, tied embeddings


# -- FLOPs ------------------------------------------------------------------------------------------
def test_flops_match_a_hand_count():
    # per layer q 4x4 + k 4x2 + v 4x2 + o 4x4 + MLP 3 x 4x6 = 16+8+8+16+72 = 120; 2 layers + head 10x4
    assert matmul_params(TINY) == 280
    # 2 (QK^T, PV) x 2 FLOPs x 2 layers x seq 3 x (2 heads x 2) / 2 (causal)
    assert attention_forward_flops(TINY, 3) == 48
    # 6 tokens of length 3; forward per token 2N + A = 560 + 48 = 608
    assert dpo_step_flops(TINY, 6, 3) == 6 * (3 * 608 + 608)  # policy fwd+bwd, reference forward
    assert dpo_step_flops(TINY, 6, 3, reference_forward=False) == 6 * 3 * 608
    # LoRA with 20 adapter params: forward 608, backward through activations 560 + 96, adapters 6 x 20
    assert dpo_step_flops(TINY, 6, 3, lora_params=20) == 6 * (608 + 656 + 120 + 608)


def test_step_matmuls_execute_the_model_flops():
    assert einsum_flops("mi,io->mo", (6, 4), (4, 5)) == 2 * 6 * 4 * 5
    assert einsum_flops("bkmd,bksd->bkms", (2, 1, 6, 2), (2, 1, 3, 2)) == 2 * 2 * 1 * 6 * 2 * 3
    matmuls = step_matmuls(TINY, rows=2, seq_len=3)
    executed = {"weights": 0, "attention": 0}
    for name, count, spec, lhs, rhs in matmuls:
        executed["attention" if name.startswith("attention") else "weights"] += count * einsum_flops(spec, lhs, rhs)
    tokens = 2 * 3
    # forward, input gradient and weight gradient of every weight: 3 x 2N per token (hand count N = 280)
    assert executed["weights"] == tokens * 6 * 280
    # attention: 7 dots over the full square (causal model FLOPs count half of 3: 3A) -> 7A per token, A = 48
    assert executed["attention"] == tokens * 7 * 48
    assert sum(count for _, count, *_ in matmuls) == 2 * (7 * 3 + 7) + 3  # per layer: 7 projections x 3, 7 dots


def test_flops_agree_with_the_model_config_and_smollm2s_size():
    config = model_config(SMOLLM2)
    assert config.num_params() == SMOLLM2_PUBLISHED_PARAMS
    norms = config.num_hidden_layers * 2 * config.hidden_size + config.hidden_size
    assert matmul_params(config) == SMOLLM2_PUBLISHED_PARAMS - norms  # tied head counted once, as a matmul
    # ModelConfig.flops_per_token counts the norm weights in 6N too; otherwise the same training FLOPs.
    seq = 256
    assert config.flops_per_token(seq) - dpo_step_flops(config, 1, seq, reference_forward=False) == 6 * norms


def test_smollm2_lora_r8_fits_the_gradient_peers_projection():
    from bench.bench_gradients import PEER_PROJECTION_LIMIT, SETTINGS

    s = SETTINGS["smollm2"]
    def one_layer():
        model = init_model(ModelConfig(**{**s["model"], "num_hidden_layers": 1, "vocab_size": 16}), seed=0)
        add_lora(model, LoraSection(rank=s["lora_rank"]), seed=0)
        return model

    per_layer = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(one_layer), nnx.LoRAParam)))
    # r x (in + out): q, o 576+576; k, v 576+192; gate, up, down 576+1536
    assert per_layer == 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert 4 * 30 * per_layer * s["proj_dim"] <= PEER_PROJECTION_LIMIT


# -- allocator settings -----------------------------------------------------------------------------
def tunables(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(":"))


@pytest.fixture
def cpu_host(monkeypatch):
    if not host_memory.tuning_wanted({"JAX_PLATFORMS": "cpu"}):
        pytest.skip("bpo_jax tunes malloc only on Linux with glibc")
    for name in ("GLIBC_TUNABLES", common.UNTUNED_ENV, host_memory.OPT_OUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(common.JEMALLOC_ENV, "/nonexistent/libjemalloc.so")
    return monkeypatch


def test_the_peer_is_also_measured_with_bpo_jaxs_malloc_settings(cpu_host):
    variants = common.peer_variants()
    assert list(variants) == ["glibc malloc", "glibc tuned (as bpo_jax)"]
    assert variants["glibc malloc"] == {"GLIBC_TUNABLES": None}  # unset, as the user had it
    assert tunables(variants["glibc tuned (as bpo_jax)"]["GLIBC_TUNABLES"]) == host_memory.TUNABLES
    assert common.ours_environment() == variants["glibc tuned (as bpo_jax)"]


def test_after_the_driver_reexecutes_tuned_the_untuned_peer_is_still_untuned(cpu_host):
    user = "glibc.malloc.arena_max=4"
    cpu_host.setenv(common.UNTUNED_ENV, user)  # what tune_this_process saved before re-executing
    cpu_host.setenv("GLIBC_TUNABLES", host_memory.tuned_environment({"GLIBC_TUNABLES": user})["GLIBC_TUNABLES"])
    variants = common.peer_variants()
    assert variants["glibc malloc"] == {"GLIBC_TUNABLES": user}
    tuned = tunables(variants["glibc tuned (as bpo_jax)"]["GLIBC_TUNABLES"])
    assert tuned == {**host_memory.TUNABLES, "glibc.malloc.arena_max": "4"}  # the user's setting wins


def test_no_tuned_variant_when_bpo_jax_would_not_tune(cpu_host):
    cpu_host.setenv(host_memory.OPT_OUT_ENV, "system")
    assert list(common.peer_variants()) == ["glibc malloc"]
    assert common.ours_environment() == {"GLIBC_TUNABLES": None}


# -- sizes and the report ---------------------------------------------------------------------------
def test_sizes_parse_as_a_list_and_unknown_ones_fail():
    assert run_all.parse_sizes("cpu, smollm2") == ["cpu", "smollm2"]
    with pytest.raises(argparse.ArgumentTypeError, match="tpu"):
        run_all.parse_sizes("cpu,tpu")


def test_module_sizes():
    class Settings:
        SETTINGS = {"cpu": {}, "smollm2": {}}

    class Declared(Settings):
        SIZES = ("gpu",)

    assert run_all.module_sizes(Settings) == ("cpu", "smollm2")
    assert run_all.module_sizes(Declared) == ("gpu",)
    assert run_all.module_sizes(object()) == common.SIZES


GENERATED = "DPO training step vs TRL DPOTrainer"
HAND = "## Persistent compilation cache (CLI)\n\nMeasured on its own.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_report_keeps_other_sizes_and_hand_sections_and_drops_the_old_layout():
    old_layout = (f"# Benchmarks\n\nold preamble\n\n## Machine\n\n- cpu: x\n\n## {GENERATED}\n\n| old |\n\n{HAND}")
    first = run_all.merge_report(old_layout, {"smollm2": "## Size smollm2\n\nsmollm2 rows\n"}, {GENERATED})
    assert first.startswith(run_all.PREAMBLE.strip())
    assert "old preamble" not in first and "| old |" not in first and "## Machine" not in first
    assert first.index("## Size smollm2") < first.index(HAND.splitlines()[0])
    second = run_all.merge_report(first, {"cpu": "## Size cpu\n\ncpu rows\n"}, {GENERATED})
    assert [line for line in second.splitlines() if line.startswith("## ")] == [
        "## Size cpu", "## Size smollm2", "## Persistent compilation cache (CLI)"]
    assert "smollm2 rows" in second and HAND.strip() in second
    third = run_all.merge_report(second, {"cpu": "## Size cpu\n\nnew cpu rows\n"}, {GENERATED})
    assert "new cpu rows" in third and "\ncpu rows" not in third
    assert third.count(HAND.strip()) == 1
