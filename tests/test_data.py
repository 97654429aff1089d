"""Tests for linearnexus.data: tokenizers, TinyShakespeare resolution, token files, loaders.

No network: downloads are served from local bytes through a monkeypatched
``urllib.request.urlopen``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from linearnexus import data as D
from tests.helpers.text import synthetic_text

# ----------------------------------------------------------------------------- fixtures


def _real_shakespeare() -> Path | None:
    candidates = [D.BUNDLED_SHAKESPEARE,
                  Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"]
    if os.environ.get("LINEARNEXUS_SHAKESPEARE"):
        candidates.append(Path(os.environ["LINEARNEXUS_SHAKESPEARE"]))
    for path in candidates:
        if path.is_file():
            return path
    return None


def _synthetic_text(n_chars: int = 120_000) -> str:
    return synthetic_text(n_chars, max_words=12, truncate=True)


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real TinyShakespeare file if present, else a synthetic stand-in."""
    real = _real_shakespeare()
    if real is not None:
        return real
    path = tmp_path_factory.mktemp("synthetic") / "input.txt"
    path.write_text(_synthetic_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_text(shakespeare: Path) -> str:
    return shakespeare.read_text(encoding="utf-8")[:50_000]


@pytest.fixture(scope="session")
def bpe(small_text: str, tmp_path_factory: pytest.TempPathFactory) -> D.BPETokenizer:
    return D.BPETokenizer.train(
        small_text, vocab_size=300, save_dir=tmp_path_factory.mktemp("bpe")
    )


@pytest.fixture
def token_file(tmp_path: Path) -> D.TextDataset:
    """A dataset whose token at position i is i % 1000 (so windows are checkable)."""
    path = tmp_path / "tokens.bin"
    (np.arange(5_000) % 1000).astype(np.uint16).tofile(path)
    return D.TextDataset(path, np.uint16)


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LINEARNEXUS_SHAKESPEARE, and a private empty cache root; returns that root."""
    cache = tmp_path / "cache"
    monkeypatch.delenv("LINEARNEXUS_SHAKESPEARE", raising=False)
    monkeypatch.setenv("LINEARNEXUS_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- char tokenizer


def test_char_round_trip_and_vocab(small_text: str, tmp_path: Path):
    tok = D.CharTokenizer.from_text(small_text)
    assert tok.chars == sorted(set(small_text))
    assert tok.vocab_size == len(set(small_text))
    assert tok.eos_id is None
    ids = tok.encode(small_text)
    assert len(ids) == len(small_text)
    assert ids[:3] == [tok.chars.index(c) for c in small_text[:3]]
    assert tok.decode(ids) == small_text
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == small_text
    assert isinstance(tok, D.Tokenizer)

    saved = tok.save(tmp_path)
    assert saved == tmp_path / D.TOKENIZER_FILE
    again = D.load_tokenizer(tmp_path)
    assert isinstance(again, D.CharTokenizer) and again.chars == tok.chars


def test_char_non_ascii_and_errors():
    text = "héllo — ñ 😀"
    tok = D.CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == [] and tok.decode([]) == ""
    with pytest.raises(ValueError, match=r"'\?' \(U\+003F\) at position 2"):
        tok.encode("hé?")
    with pytest.raises(ValueError, match="ids: token id 99"):
        tok.decode([0, 99])
    with pytest.raises(ValueError, match="text: empty"):
        D.CharTokenizer.from_text("")


# ----------------------------------------------------------------------------- BPE tokenizer


def test_bpe_round_trip(bpe: D.BPETokenizer, small_text: str):
    assert 257 <= bpe.vocab_size <= 300
    assert bpe.eos_id == 0
    assert isinstance(bpe, D.Tokenizer)
    ids = bpe.encode(small_text)
    assert len(ids) < len(small_text)  # merges happened
    assert max(ids) < bpe.vocab_size
    assert bpe.decode(ids) == small_text
    for s in ["héllo — ñ", "日本語 😀\t\n\n  x", f"a {D.EOS_TOKEN} b", ""]:
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.encode(D.EOS_TOKEN) == [bpe.eos_id]
    with pytest.raises(ValueError, match="ids: token id"):
        bpe.decode([bpe.vocab_size])


def test_bpe_save_load(bpe: D.BPETokenizer, tmp_path: Path):
    path = bpe.save(tmp_path / "tok.json")
    for loaded in (D.BPETokenizer.load(path), D.load_tokenizer(path)):
        assert isinstance(loaded, D.BPETokenizer)
        assert loaded.vocab_size == bpe.vocab_size
        assert loaded.encode("To be, or not to be") == bpe.encode("To be, or not to be")


def test_bpe_train_from_files_and_errors(small_text: str, tmp_path: Path):
    src = tmp_path / "a.txt"
    src.write_text(small_text[:5_000], encoding="utf-8")
    tok = D.BPETokenizer.train([src], vocab_size=270, save_dir=tmp_path / "out")
    assert (tmp_path / "out" / D.TOKENIZER_FILE).is_file()
    assert tok.decode(tok.encode(small_text[:500])) == small_text[:500]
    with pytest.raises(ValueError, match="vocab_size"):
        D.BPETokenizer.train("abc", vocab_size=256)
    with pytest.raises(FileNotFoundError, match="text_or_files"):
        D.BPETokenizer.train([tmp_path / "missing.txt"], vocab_size=300)


def test_load_tokenizer_rejects_unknown(tmp_path: Path):
    (tmp_path / "x.json").write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="neither"):
        D.load_tokenizer(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        D.load_tokenizer(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- prepare_dataset


def test_prepare_char_writes_and_reuses(shakespeare: Path, tmp_path: Path):
    out = tmp_path / "char"
    prep = D.prepare_dataset(shakespeare, out, tokenizer="char")
    text = shakespeare.read_text(encoding="utf-8")
    assert not prep.reused
    for p in (prep.train_path, prep.val_path, prep.meta_path, prep.tokenizer_path):
        assert p.is_file()
    assert sorted(q.name for q in out.iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin"
    ]  # no temp files left behind
    n = len(text)
    assert prep.train_tokens == int(n * 0.9) and prep.val_tokens == n - int(n * 0.9)
    assert prep.dtype == np.uint16
    meta = json.loads(prep.meta_path.read_text())
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == len(set(text))
    assert meta["source_sha256"] == hashlib.sha256(shakespeare.read_bytes()).hexdigest()

    tok = prep.load_tokenizer()
    train, val = prep.train_dataset(), prep.val_dataset()
    assert len(train) == prep.train_tokens and len(val) == prep.val_tokens
    assert tok.decode(train.tokens) + tok.decode(val.tokens) == text  # first 90% / last 10%

    mtime = prep.train_path.stat().st_mtime_ns
    again = D.prepare_dataset(shakespeare, out, tokenizer="char")
    assert again.reused and prep.train_path.stat().st_mtime_ns == mtime
    assert again == D.PreparedData.load(out)
    assert (again.train_tokens, again.val_tokens) == (prep.train_tokens, prep.val_tokens)

    # other settings or another source: rebuilt
    other = D.prepare_dataset(shakespeare, out, tokenizer="char", val_fraction=0.2)
    assert not other.reused and other.val_tokens == n - int(n * 0.8)
    src2 = tmp_path / "other.txt"
    src2.write_text(text[:10_000], encoding="utf-8")
    assert not D.prepare_dataset(src2, out, tokenizer="char").reused
    # a truncated, a bit-flipped or a missing cache file is named and rebuilt from the text
    good = D.prepare_dataset(src2, out, tokenizer="char")
    assert good.reused
    expected = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}
    for name, damage, reason in (("train.bin", "truncate", "bytes, expected"),
                                 ("val.bin", "flip", "SHA-256"),
                                 ("tokenizer.json", "delete", "missing")):
        path = out / name
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(100)
        elif damage == "flip":
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        else:
            path.unlink()
        with pytest.warns(UserWarning, match=f"{name}: .*{reason}.*rebuilding"):
            rebuilt = D.prepare_dataset(src2, out, tokenizer="char")
        assert not rebuilt.reused
        assert {n: (out / n).read_bytes() for n in expected} == expected


def test_prepare_bpe(small_text: str, tmp_path: Path):
    src = tmp_path / "small.txt"
    src.write_text(small_text, encoding="utf-8")
    prep = D.prepare_dataset(src, tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    assert prep.tokenizer_kind == "bpe" and prep.vocab_size <= 300
    tok = prep.load_tokenizer()
    assert isinstance(tok, D.BPETokenizer)
    ids = np.concatenate([prep.train_dataset().tokens, prep.val_dataset().tokens])
    assert tok.decode(ids) == small_text
    assert D.prepare_dataset(src, tmp_path / "bpe", tokenizer="bpe", vocab_size=300).reused
    assert not D.prepare_dataset(src, tmp_path / "bpe", tokenizer="bpe", vocab_size=280).reused


def test_prepare_errors_and_dtype(tmp_path: Path):
    src = tmp_path / "t.txt"
    src.write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer"):
        D.prepare_dataset(src, tmp_path / "o", tokenizer="word")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        D.prepare_dataset(src, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        D.prepare_dataset(src, tmp_path / "o", tokenizer="bpe", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="text_path"):
        D.prepare_dataset(tmp_path / "missing.txt", tmp_path / "o")
    src.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="non-empty"):
        D.prepare_dataset(src, tmp_path / "o", val_fraction=0.1)
    assert D.token_dtype(65_536) == np.uint16
    assert D.token_dtype(65_537) == np.uint32


# ----------------------------------------------------------------------------- dataset / loader


def test_text_dataset(token_file: D.TextDataset, tmp_path: Path):
    ds = token_file
    assert len(ds) == 5_000
    np.testing.assert_array_equal(ds.window(998, 4), [998, 999, 0, 1])
    with pytest.raises(ValueError):
        ds.tokens[0] = 1  # read-only map
    with pytest.raises(IndexError):
        ds.window(4_998, 3)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="multiple"):
        D.TextDataset(tmp_path / "odd.bin", np.uint16)
    with pytest.raises(ValueError, match="dtype"):
        D.TextDataset(tmp_path / "odd.bin")


def test_loader_batches_are_shifted_windows(token_file: D.TextDataset):
    loader = D.DataLoader(token_file, batch_size=8, seq_len=33, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (8, 33)
    assert x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        # token i is i % 1000: each row is consecutive tokens of the file
        start = int(np.flatnonzero((np.arange(5_000) % 1000) == row_x[0])[0])
        window = token_file.window(start, 34)
        np.testing.assert_array_equal(row_x, window[:-1])
        np.testing.assert_array_equal(row_y, window[1:])


def test_loader_determinism_and_resume(token_file: D.TextDataset):
    a = D.DataLoader(token_file, batch_size=4, seq_len=16, seed=7)
    b = D.DataLoader(token_file, batch_size=4, seq_len=16, seed=7)
    c = D.DataLoader(token_file, batch_size=4, seq_len=16, seed=8)
    batches_a = [next(a) for _ in range(5)]
    batches_b = [next(b) for _ in range(5)]
    batches_c = [next(c) for _ in range(5)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c,
                                                                     strict=True))
    assert not np.array_equal(batches_a[0][0], batches_a[1][0])  # batches differ by step
    np.testing.assert_array_equal(a.get_batch(3)[0], batches_a[3][0])

    # resume: a fresh loader restored from the state after k batches continues identically
    state = a.state_dict()
    assert state == {"seed": 7, "step": 5}
    expected = [next(a) for _ in range(3)]
    resumed = D.DataLoader(token_file, batch_size=4, seq_len=16, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for (xe, ye), (xr, yr) in zip(expected, (next(resumed) for _ in range(3)), strict=True):
        np.testing.assert_array_equal(xe, xr)
        np.testing.assert_array_equal(ye, yr)
    assert iter(resumed) is resumed


def test_loader_argument_errors(token_file: D.TextDataset):
    with pytest.raises(ValueError, match="batch_size"):
        D.DataLoader(token_file, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        D.DataLoader(token_file, batch_size=2, seq_len=-1)
    with pytest.raises(ValueError, match="seed"):
        D.DataLoader(token_file, batch_size=2, seq_len=8, seed=-3)
    with pytest.raises(ValueError, match="dataset: has 5000 tokens"):
        D.DataLoader(token_file, batch_size=2, seq_len=5_000)
    D.DataLoader(token_file, batch_size=2, seq_len=4_999)  # exactly seq_len + 1 tokens is enough
    loader = D.DataLoader(token_file, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="step"):
        loader.get_batch(-1)
    with pytest.raises(ValueError, match="missing keys"):
        loader.load_state_dict({"step": 3})


def test_sequential_batches(token_file: D.TextDataset):
    batches = list(D.sequential_batches(token_file, batch_size=16, seq_len=100))
    n_windows = (5_000 - 1) // 100  # 49
    assert [x.shape[0] for x, _ in batches] == [16, 16, 16, 1]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (n_windows, 100) and x.dtype == np.int32
    expected = np.arange(5_000) % 1000
    np.testing.assert_array_equal(x.reshape(-1), expected[: n_windows * 100])
    np.testing.assert_array_equal(y.reshape(-1), expected[1 : n_windows * 100 + 1])

    assert len(list(D.sequential_batches(token_file, 16, 100, max_batches=2))) == 2
    assert len(list(D.sequential_batches(token_file, 16, 100, drop_last=True))) == 3
    again = list(D.sequential_batches(token_file, 16, 100))
    np.testing.assert_array_equal(again[2][0], batches[2][0])
    with pytest.raises(ValueError, match="max_batches"):
        D.sequential_batches(token_file, 16, 100, max_batches=0)
    with pytest.raises(ValueError, match="seq_len"):
        D.sequential_batches(token_file, 16, 5_000)


# ----------------------------------------------------------------------------- TinyShakespeare


def test_sha256_constant_matches_local_copy():
    real = _real_shakespeare()
    if real is None:
        pytest.skip("no local TinyShakespeare copy to check the constant against")
    raw = real.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == D.SHAKESPEARE_SHA256
    assert len(raw.decode("utf-8")) == D.SHAKESPEARE_NUM_CHARS


def test_bundled_copy_is_checked(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    crlf = tmp_path / "crlf.txt"  # what a checkout that rewrote line ends would hold
    crlf.write_bytes(D.BUNDLED_SHAKESPEARE.read_bytes()[:1000].replace(b"\n", b"\r\n"))
    monkeypatch.setattr(D, "BUNDLED_SHAKESPEARE", crlf)
    with pytest.raises(ValueError, match="SHA-256"):
        D.resolve_shakespeare()


def test_resolve_order(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    explicit = tmp_path / "explicit.txt"
    explicit.write_text("x")
    from_env = tmp_path / "env.txt"
    from_env.write_text("y")
    cached = isolated_env / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("z")

    assert D.resolve_shakespeare() == cached
    other_cache = tmp_path / "other_cache"
    # explicit cache_dir beats the env; an empty cache falls back to the shipped copy
    assert D.resolve_shakespeare(cache_dir=other_cache) == D.BUNDLED_SHAKESPEARE
    monkeypatch.setenv("LINEARNEXUS_SHAKESPEARE", str(from_env))
    assert D.resolve_shakespeare() == from_env
    assert D.resolve_shakespeare(str(explicit)) == explicit
    with pytest.raises(FileNotFoundError, match="data: no such file"):
        D.resolve_shakespeare(tmp_path / "nope.txt")
    monkeypatch.setenv("LINEARNEXUS_SHAKESPEARE", str(tmp_path / "gone.txt"))
    with pytest.raises(FileNotFoundError, match="LINEARNEXUS_SHAKESPEARE"):
        D.resolve_shakespeare()


def test_missing_file_message(isolated_env: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not touch the network without download=True")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert D.resolve_shakespeare() == D.BUNDLED_SHAKESPEARE  # offline default, no download
    monkeypatch.setattr(D, "BUNDLED_SHAKESPEARE", isolated_env / "not-installed.txt")
    with pytest.raises(FileNotFoundError) as info:
        D.resolve_shakespeare()
    msg = str(info.value)
    assert "\n" not in msg
    for hint in ("--data PATH", "LINEARNEXUS_SHAKESPEARE", "--download-shakespeare"):
        assert hint in msg
    assert str(isolated_env / "tinyshakespeare" / "input.txt") in msg


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes | Exception) -> list[str]:
    """Route urllib.request.urlopen to local bytes (or an error); returns requested URLs."""
    seen: list[str] = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        if isinstance(payload, Exception):
            raise payload
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return seen


@pytest.fixture
def canonical_bytes(shakespeare: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Bytes the downloader accepts: the real file, or the stand-in with patched constants."""
    raw = shakespeare.read_bytes()
    if _real_shakespeare() is None:
        monkeypatch.setattr(D, "SHAKESPEARE_SHA256", hashlib.sha256(raw).hexdigest())
        monkeypatch.setattr(D, "SHAKESPEARE_NUM_CHARS", len(raw.decode("utf-8")))
    return raw


def test_download_good(isolated_env: Path, monkeypatch: pytest.MonkeyPatch,
                       canonical_bytes: bytes):
    seen = _serve(monkeypatch, canonical_bytes)
    path = D.resolve_shakespeare(download=True)
    assert seen == [D.SHAKESPEARE_URL]
    assert path == isolated_env / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == canonical_bytes
    assert os.listdir(path.parent) == ["input.txt"]
    # cached now: a second call does not download
    assert D.resolve_shakespeare(download=True) == path and len(seen) == 1


@pytest.mark.parametrize("corruption", ["flip", "truncate"])
def test_download_corrupted_is_not_kept(isolated_env: Path, monkeypatch: pytest.MonkeyPatch,
                                        canonical_bytes: bytes, corruption: str):
    if corruption == "flip":  # same length, wrong checksum
        bad = canonical_bytes[:1000] + b"X" + canonical_bytes[1001:]
        match = "SHA-256"
    else:
        bad = canonical_bytes[: len(canonical_bytes) // 2]
        match = "characters"
    _serve(monkeypatch, bad)
    with pytest.raises(ValueError, match=match):
        D.resolve_shakespeare(download=True)
    folder = isolated_env / "tinyshakespeare"
    assert not (folder / "input.txt").exists()
    assert list(folder.iterdir()) == []  # no temp file left either


def test_download_network_failure(isolated_env: Path, monkeypatch: pytest.MonkeyPatch):
    _serve(monkeypatch, urllib.error.URLError("no route to host"))
    with pytest.raises(FileNotFoundError, match="--download-shakespeare") as info:
        D.resolve_shakespeare(download=True)
    assert "no route to host" in str(info.value) and "\n" not in str(info.value)
    assert list((isolated_env / "tinyshakespeare").iterdir()) == []
