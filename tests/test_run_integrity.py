"""What a killed or damaged run leaves behind: checkpoint fallback, torn metrics lines, TensorBoard
steps after a resume, and model files that are readable by others, fsynced and named in errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.checkpointing import Checkpointer, CheckpointDamaged
from bpo_jax.metrics import MetricsLogger
from bpo_jax.models import hf
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.resumable import ResumeError


def saved_checkpoints(directory: Path, steps=(1, 2, 3)) -> None:
    c = Checkpointer(directory, keep=5)
    for s in steps:
        c.save(s, {"w": jnp.arange(4.0) * s}, {"position": s})
    c.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    saved_checkpoints(tmp_path)
    for step in (3, 2):  # the two newest are damaged; step 1 is intact
        data_files = sorted((tmp_path / str(step) / "state" / "d").iterdir())  # the array data
        for f in data_files:
            if damage == "truncate":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            else:
                f.unlink()
    c = Checkpointer(tmp_path)
    with pytest.warns(UserWarning, match=r"/3: checkpoint unreadable .*resuming from step 1") as caught:
        state, data = c.restore({"w": jnp.zeros(4)})
    assert any("/2: checkpoint unreadable" in str(w.message) for w in caught)
    np.testing.assert_array_equal(state["w"], np.arange(4.0) * 1)
    assert data == {"position": 1}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2.damaged", "3.damaged"]
    assert c.latest_step() == 1
    c.save(2, {"w": jnp.ones(4)}, {"position": 2})  # the damaged step can be saved again
    c.close()


def test_restore_with_no_intact_checkpoint_names_the_newest(tmp_path):
    saved_checkpoints(tmp_path, steps=(1,))
    (tmp_path / "1" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointDamaged, match=f"{tmp_path}/1: no checkpoint here reads back"):
        Checkpointer(tmp_path).restore({"w": jnp.zeros(4)})
    assert (tmp_path / "1").is_dir()  # nothing moved when there is nothing to fall back to


def test_metrics_file_with_a_torn_last_line_resumes(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"train_metrics.jsonl:4: dropping a torn last line"):
        logger = MetricsLogger(tmp_path, start_step=2, total_steps=5)
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_metrics_file_damaged_mid_file_names_the_line(tmp_path):
    (tmp_path / "train_metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ResumeError, match=r"train_metrics.jsonl:2: not a JSON metrics record"):
        MetricsLogger(tmp_path, start_step=1, total_steps=3)


def read_events(directory: Path) -> list:
    """Every event in a TensorBoard log directory (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(directory.rglob("events.out.tfevents.*")):
        data = f.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12: at + 12 + length])
            events.append(event)
            at += 12 + length + 4
    return events


def tensorboard_view(events: list, tag: str) -> dict[int, float]:
    """What TensorBoard shows: a SessionLog START at step s discards earlier-read events at steps >= s."""
    from tensorboardX.proto import event_pb2

    shown: list[tuple[int, float]] = []
    for e in events:
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            shown = [(s, v) for s, v in shown if s < e.step]
        for value in e.summary.value:
            if value.tag == tag:
                shown.append((e.step, value.simple_value))
    steps = [s for s, _ in shown]
    assert len(steps) == len(set(steps)), f"repeated steps {steps}"
    return dict(shown)


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    first = MetricsLogger(tmp_path, start_step=0, total_steps=5)
    for step in (1, 2, 3, 4):  # killed after logging step 4; its last checkpoint is step 2
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, start_step=2, total_steps=5)
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    view = tensorboard_view(read_events(tmp_path / "tensorboard"), "train/loss")
    assert view == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


def tiny_model():
    return init_model(ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    }), seed=0)


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_model_follows_the_umask_and_is_fsynced(tmp_path, monkeypatch, umask, dir_mode, file_mode):
    synced: list[str] = []
    real = hf.fsync_path
    monkeypatch.setattr(hf, "fsync_path", lambda p: (synced.append(Path(p).name), real(p)))
    old = os.umask(umask)
    try:
        out = hf.save_hf_model(tiny_model(), tmp_path / "policy")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == file_mode
        assert name in synced
    assert synced[-1] == tmp_path.name  # the directory entry of the rename, last


def test_damaged_safetensors_file_is_named_in_the_error(tmp_path):
    out = hf.save_hf_model(tiny_model(), tmp_path / "policy")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(hf.CheckpointError, match=f"{weights}: not a readable safetensors file"):
        hf.load_hf_model(out)


def test_fit_refuses_checkpoints_made_with_other_training_settings(tmp_path, capsys):
    import dataclasses

    from bpo_jax.config import OptimSection, TrainSection
    from bpo_jax.data.batching import PreferenceBatcher
    from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
    from bpo_jax.sharding import make_mesh, shard_model
    from bpo_jax.train import DPOTrainer, fit

    rng = np.random.default_rng(0)
    seqs = lambda: [rng.integers(2, 16, size=3).tolist() for _ in range(8)]  # noqa: E731
    data = TokenizedPairs(prompt=RaggedTokens.from_lists(seqs()), chosen=RaggedTokens.from_lists(seqs(), append=1),
                          rejected=RaggedTokens.from_lists(seqs(), append=1), ids=np.array([f"p{i}" for i in range(8)]),
                          source_index=np.arange(8), max_length=8, pad_id=0)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])  # one device: the quickest compile
    base = TrainSection(reference="frozen_copy", batch_size=8, seed=0, optim=OptimSection(learning_rate=1e-2))

    def run(cfg, steps):
        trainer = DPOTrainer(shard_model(tiny_model(), mesh), cfg, mesh, total_steps=4)
        return fit(trainer, PreferenceBatcher(data, 8, seed=0), run_dir=tmp_path, num_steps=steps)

    run(base, 2)
    with pytest.raises(ResumeError, match=r"checkpoints made with other training settings \(beta: 0.1 -> 0.5\)"):
        run(dataclasses.replace(base, beta=0.5), 4)
    capsys.readouterr()
    state = run(dataclasses.replace(base, checkpoint_every=1, log_every=2), 4)  # cadence may change on resume
    assert "resumed from the checkpoint at step 2 of 4" in capsys.readouterr().out and int(state.step) == 4
