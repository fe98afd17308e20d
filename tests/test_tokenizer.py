"""Tokenizer loading from a local Hugging Face directory: special tokens, BOS handling, chat templates."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from bpo_jax.tokenizer import Tokenizer, TokenizerError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a preference pair has a chosen and a rejected response",
    "naïve café déjà vu — unicode survives byte level BPE",
] * 20
SPECIALS = ["<pad>", "<s>", "</s>"]


def _bpe(with_bos_post_processor: bool = True) -> HFTokenizer:
    """A byte-level BPE trained on a few sentences; BOS is added by the post-processor."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False))
    if with_bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def _save(tmp_path: Path, tok: HFTokenizer, config: dict, special_map: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return tmp_path


def test_load_special_tokens_and_bos_from_post_processor(tmp_path):
    hf = _bpe()
    tok = Tokenizer.from_pretrained(_save(tmp_path, hf, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>"), hf.token_to_id("<pad>"))
    text = "the lazy fox has a chosen response"
    plain = tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == [tok.bos_id] + plain
    assert tok.adds_bos
    assert tok.decode(plain) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    texts = [text, SENTENCES[2], "déjà"]
    assert tok.encode_batch(texts, add_special_tokens=False) == [tok.encode(t, add_special_tokens=False) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts, add_special_tokens=False)) == texts


def test_no_post_processor_means_no_bos(tmp_path):
    tok = Tokenizer.from_pretrained(_save(tmp_path, _bpe(False), {"bos_token": "<s>", "eos_token": "</s>"}))
    assert not tok.adds_bos
    assert tok.encode("the dog") == tok.encode("the dog", add_special_tokens=False)


def test_pad_falls_back_to_eos_and_added_token_dicts(tmp_path):
    config = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": {"content": "</s>"}}
    tok = Tokenizer.from_pretrained(_save(tmp_path, _bpe(), config))
    assert tok.pad_token == "</s>" and tok.pad_id == tok.eos_id
    assert tok.bos_token == "<s>"


def test_special_tokens_map_overrides_config(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    tok = Tokenizer.from_pretrained(_save(tmp_path, _bpe(), config, special_map={"eos_token": "<pad>", "pad_token": "<s>"}))
    assert tok.eos_token == "<pad>" and tok.pad_token == "<s>" and tok.bos_token == "<s>"


def test_chat_template_renders_like_transformers(tmp_path):
    # Block tags on their own, indented lines: with trim_blocks + lstrip_blocks they leave no
    # whitespace behind, which is what transformers' renderer does.
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "[U]{{ m['content'] }}\n"
        "    {% else %}\n"
        "[A]{{ m['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "[A]\n"
        "{% endif %}"
    )
    tok = Tokenizer.from_pretrained(
        _save(tmp_path, _bpe(), {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"}]
    assert tok.apply_chat_template(msgs) == "<s>\n[U]hi\n[A]yo</s>\n[U]ok?\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == "<s>\n[U]hi\n[A]yo</s>\n[U]ok?\n[A]\n"


def test_chat_template_helpers_and_sandbox(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
        "{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.content }}{% endfor %}"
    )
    d = _save(tmp_path, _bpe(), {"eos_token": "</s>", "chat_template": template})
    tok = Tokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "x"}]
    assert tok.apply_chat_template(msgs) == json.dumps(msgs, ensure_ascii=False) + "|é"
    with pytest.raises(TokenizerError, match="chat_template.*first message must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    sandboxed = Tokenizer.from_tokenizers(_bpe(), eos="</s>", chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError, match="chat_template"):
        sandboxed.apply_chat_template(msgs)


def test_named_template_list_and_jinja_file(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    tok = Tokenizer.from_pretrained(_save(tmp_path / "a", _bpe(), {"eos_token": "</s>", "chat_template": named}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    d = _save(tmp_path / "b", _bpe(), {"eos_token": "</s>"})
    (d / "chat_template.jinja").write_text("J{{ add_generation_prompt }}")
    assert Tokenizer.from_pretrained(d).apply_chat_template([], add_generation_prompt=True) == "JTrue"


def test_from_tokenizers():
    hf = _bpe()
    tok = Tokenizer.from_tokenizers(hf, bos="<s>", eos="</s>")
    assert tok.pad_id == hf.token_to_id("</s>") and tok.bos_id == hf.token_to_id("<s>")
    with pytest.raises(TokenizerError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in the vocabulary"):
        Tokenizer.from_tokenizers(hf, eos="<nope>")


@pytest.mark.parametrize(
    "setup, match",
    [
        ("no_tokenizer_json", r"tokenizer\.json: file not found"),
        ("corrupt_tokenizer_json", r"tokenizer\.json: not a valid tokenizers file"),
        ("config_not_json", r"tokenizer_config\.json: not valid JSON"),
        ("no_eos", r"tokenizer_config\.json: field 'eos_token' missing"),
        ("eos_not_in_vocab", r"tokenizer_config\.json: field 'eos_token': token '<eot>' is not in tokenizer\.json"),
        ("bad_token_type", r"tokenizer_config\.json: field 'bos_token': expected a string"),
        ("template_syntax", r"field 'chat_template': syntax error on line 1"),
        ("template_type", r"tokenizer_config\.json: field 'chat_template': expected a string"),
    ],
)
def test_bad_tokenizer_directory_errors(tmp_path, setup, match):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if setup == "no_eos":
        config = {"bos_token": "<s>"}
    elif setup == "eos_not_in_vocab":
        config["eos_token"] = "<eot>"
    elif setup == "bad_token_type":
        config["bos_token"] = 5
    elif setup == "template_syntax":
        config["chat_template"] = "{% for m in messages %}"
    elif setup == "template_type":
        config["chat_template"] = {"x": 1}
    _save(tmp_path, _bpe(), config)
    if setup == "no_tokenizer_json":
        (tmp_path / "tokenizer.json").unlink()
    elif setup == "corrupt_tokenizer_json":
        (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    elif setup == "config_not_json":
        (tmp_path / "tokenizer_config.json").write_text("{eos_token: </s>")
    with pytest.raises(TokenizerError, match=match) as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
