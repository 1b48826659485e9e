"""The catalogue's token cache: same tensors as tokenising, keyed by content, robust to bad files."""

import pytest
import torch

from cobra_scale.train import data
from cobra_scale.train.data import cached_tokenize, load_tokenizer, tokenize_texts

TEXTS = ["rose lip balm 12 ml", "argan oil shampoo", "[unused] 😀 emoji title", "", "matte foundation spf 15 " * 5]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COBRA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("COBRA_TOKEN_CACHE", raising=False)
    monkeypatch.setattr(data, "TOKEN_CACHE_MIN", 1)
    return tmp_path / "tokens"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_cache_returns_what_tokenising_returns_and_is_reused(cache, tokenizer, monkeypatch):
    want = tokenize_texts(TEXTS, tokenizer, 12)
    first = cached_tokenize(TEXTS, tokenizer, 12)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(data, "tokenize_texts", lambda *a, **k: calls.append(a) or want)
    second = cached_tokenize(TEXTS, tokenizer, 12)
    assert calls == []  # served from the file
    for got in (first, second):
        assert got[0].dtype == torch.long and got[1].dtype == torch.long
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_key_changes_with_texts_length_and_tokenizer(cache, tokenizer):
    key = data.token_cache_key(TEXTS, tokenizer, 12)
    assert data.token_cache_key(TEXTS, tokenizer, 12) == key
    assert data.token_cache_key(TEXTS, tokenizer, 16) != key
    assert data.token_cache_key(TEXTS[:-1] + ["other"], tokenizer, 12) != key
    assert data.token_cache_key(["a b", "c"], tokenizer, 12) != data.token_cache_key(["a", "b c"], tokenizer, 12)  # boundaries count
    grown = load_tokenizer()  # a tokenizer with one more token is a different tokenizer
    grown.add_tokens(["zzqxtoken"])
    assert data.token_cache_key(TEXTS, grown, 12) != key


def test_corrupt_cache_file_is_retokenised_and_rewritten(cache, tokenizer):
    want = tokenize_texts(TEXTS, tokenizer, 10)
    cached_tokenize(TEXTS, tokenizer, 10)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    got = cached_tokenize(TEXTS, tokenizer, 10)
    assert torch.equal(got[0], want[0])
    assert len(path.read_bytes()) > 100  # rewritten


def test_small_catalogues_and_disabled_cache_write_nothing(cache, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "TOKEN_CACHE_MIN", len(TEXTS) + 1)
    cached_tokenize(TEXTS, tokenizer, 12)
    assert not cache.exists()
    monkeypatch.setattr(data, "TOKEN_CACHE_MIN", 1)
    monkeypatch.setenv("COBRA_TOKEN_CACHE", "0")
    cached_tokenize(TEXTS, tokenizer, 12)
    assert not cache.exists()
