"""Hugging Face checkpoint import/export (config.json + *.safetensors, sharded or not).

Import never initializes random weights: the model is built abstractly (nnx.eval_shape) and each
tensor is read from disk, checked, cast and placed directly on its sharding, so an 8B checkpoint
loads onto an FSDP mesh without a full host-side copy per device.
Export writes the same layout (merging LoRA adapters into the kernels), so transformers or vLLM
load a trained policy as they would the original.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from bpo_jax.io_utils import fsync_path, ordinary_permissions, temp_dir_beside, write_json
from bpo_jax.models.config import ModelConfig, resolve_dtype
from bpo_jax.models.llama import CausalLM, Linear
from bpo_jax.models.lora import lora_delta

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model its config describes."""


def hf_tensor_name(path: tuple) -> tuple[str, bool]:
    """Map an NNX parameter path to (Hugging Face tensor name, needs transpose)."""
    *module, leaf = (str(p) for p in path)
    prefix = [] if module[0] in ("lm_head", "score") else ["model"]
    name = ".".join(prefix + module + ["bias" if leaf == "bias" else "weight"])
    return name, leaf == "kernel"


def _open_checkpoint(directory: Path) -> tuple[Path, dict[str, Path]]:
    """(the file that lists the tensors: index or single file, tensor name -> file holding it)."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (field 'weight_map': {e})") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        absent = sorted({f.name for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index}: field 'weight_map' names missing file(s) {', '.join(absent)}")
        return index, files
    single = directory / SINGLE_FILE
    if single.exists():
        with _safetensors(single) as f:
            return single, {name: single for name in f.keys()}
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


@contextlib.contextmanager
def _safetensors(file: Path) -> Iterator[Any]:
    """safe_open, with errors that name the file (safetensors' own messages do not)."""
    try:
        handle = safe_open(file, framework="np")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        yield f


def load_hf_model(
    directory: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    shardings: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
) -> CausalLM:
    """Load a local Hugging Face model directory into a CausalLM.

    `shardings(path, shape)` may return where each parameter goes (see bpo_jax.sharding);
    by default everything lands on the default device.
    """
    directory = Path(directory)
    config = ModelConfig.from_file(directory, dtype=dtype, param_dtype=param_dtype, remat=remat)
    listing, tensor_files = _open_checkpoint(directory)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> np.ndarray:
            file = tensor_files[name]
            if file not in handles:
                handles[file] = stack.enter_context(_safetensors(file))
            try:
                return handles[file].get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: tensor {name!r}: unreadable safetensors data ({e})") from None

        return load_params(config, {n: str(f) for n, f in tensor_files.items()}, read, source=str(listing), shardings=shardings)


def load_params(
    config: ModelConfig,
    tensors: Mapping[str, str],
    read: Callable[[str], np.ndarray],
    *,
    source: str,
    shardings: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
) -> CausalLM:
    """Build `config`'s model from Hugging Face-named tensors, whatever file format holds them.

    `tensors` maps each available name to where it lives (named in errors); `read(name)` returns
    it in Hugging Face layout ([out, in] kernels). Missing, unexpected or misshapen tensors are
    errors. The model is built abstractly, so no random weights are ever materialized.
    """
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pdt = resolve_dtype(config.param_dtype)

    expected = {}
    for path, var in nnx.to_flat_state(state):
        name, transpose = hf_tensor_name(path)
        expected[name] = (path, var, transpose)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing tensor(s) {shown} for {config.architecture}")
    unexpected = [
        n
        for n in tensors
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unexpected:
        raise CheckpointError(
            f"{tensors[unexpected[0]]}: unexpected tensor {unexpected[0]!r} for {config.architecture}"
            f" ({len(unexpected)} unexpected in all)"
        )

    for name, (path, var, transpose) in expected.items():
        array = read(name)
        if transpose:
            array = array.T
        if array.shape != tuple(var.shape):
            want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
            got = tuple(reversed(array.shape)) if transpose else array.shape
            raise CheckpointError(f"{tensors[name]}: tensor {name!r} has shape {got}, expected {want}")
        value = jnp.asarray(np.ascontiguousarray(array), dtype=pdt)
        if shardings is not None:
            value = jax.device_put(value, shardings(path, value.shape))
        var.set_value(value)
    return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_tensors(model: CausalLM, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Hugging Face-named host arrays of the model, LoRA adapters merged into their kernels."""
    out_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tensors: dict[str, np.ndarray] = {}
    lora_deltas = {
        tuple(path) + ("kernel",): _to_host(lora_delta(module))
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear) and module.lora_a is not None
    }
    base_params = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
    for path, var in nnx.to_flat_state(nnx.state(model, base_params)):
        name, transpose = hf_tensor_name(path)
        array = _to_host(var[...])
        if tuple(path) in lora_deltas:
            array = (array.astype(np.float32) + lora_deltas[tuple(path)]).astype(array.dtype)
        if transpose:
            array = array.T
        if out_dtype is not None:
            array = array.astype(out_dtype)
        tensors[name] = np.ascontiguousarray(array)
    return tensors


def save_hf_model(
    model: CausalLM,
    directory: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`).

    The directory is assembled beside the target and renamed into place, so a crash never
    leaves a half-written checkpoint. `extra_files` (e.g. tokenizer files) are copied along.
    Only process 0 writes; other processes just take part in gathering sharded params.
    """
    directory = Path(directory)
    tensors = export_tensors(model, dtype)
    if jax.process_index() != 0:
        return directory
    tmp = temp_dir_beside(directory)  # files inside follow the umask too
    try:
        config = model.config.to_hf_dict()
        if dtype is not None:
            config["torch_dtype"] = dtype
        write_json(tmp / "config.json", config)
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, array in tensors.items():
            if shards[-1] and size + array.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = array
            size += array.nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(a.nbytes for a in tensors.values())
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        for written in tmp.iterdir():
            ordinary_permissions(written)
            fsync_path(written)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        fsync_path(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
