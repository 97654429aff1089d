"""Text data for language-model training: tokenizers, TinyShakespeare, token files, loaders.

The pipeline, nanoGPT style::

    path = resolve_shakespeare(args.data, download=args.download_shakespeare)
    prepared = prepare_dataset(path, "out/shakespeare_char", tokenizer="char")
    loader = DataLoader(prepared.train_dataset(), batch_size=B, seq_len=T, seed=0)
    inputs, targets = next(loader)                 # [B, T] int32 each
    for inputs, targets in sequential_batches(prepared.val_dataset(), B, T): ...

``prepare_dataset`` tokenizes once and writes ``train.bin`` / ``val.bin`` (flat token ids,
uint16 when the vocabulary fits, else uint32), ``meta.json`` and ``tokenizer.json`` into
its output folder; later calls with the same source and settings reuse them. Batches are
random windows drawn from a memory-mapped token file, and batch ``i`` depends only on
``(seed, i)``, so a loader resumes exactly from ``{"seed", "step"}``.

Two tokenizers share one small interface (:class:`Tokenizer`): a character-level one and
a byte-level BPE trained locally with HF ``tokenizers`` (imported lazily, on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from linearnexus.core.fileio import (
    atomic_write,
    atomic_write_bytes,
    build_manifest,
    sha256_file,
    verify_manifest,
)

if TYPE_CHECKING:  # only for annotations: importing `tokenizers` at runtime is deferred
    from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "SHAKESPEARE_URL",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_NUM_CHARS",
    "EOS_TOKEN",
    "TOKENIZER_FILE",
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "PretrainedTokenizer",
    "load_tokenizer",
    "resolve_shakespeare",
    "BUNDLED_SHAKESPEARE",
    "download_shakespeare",
    "token_dtype",
    "PreparedData",
    "prepare_dataset",
    "TextDataset",
    "DataLoader",
    "sequential_batches",
]

PathLike = str | os.PathLike

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NUM_CHARS = 1_115_394  # all ASCII, so also the number of bytes
#: the copy shipped inside the package (public-domain text): the default data, so training
#: works offline with nothing set; its SHA-256 is checked on use
BUNDLED_SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # both tokenizers save under this name in a data folder
DEFAULT_BPE_VOCAB = 4096
_META_VERSION = 3  # bump when the on-disk layout changes, so old folders are rebuilt


# ----------------------------------------------------------------------------- file helpers


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _atomic_write_tokens(path: Path, ids: np.ndarray, dtype: np.dtype) -> None:
    """Write ``ids`` (``[n]``, n > 0) as a flat ``dtype`` array."""
    atomic_write(path, lambda fh: ids.astype(dtype).tofile(fh))


def _tokenizer_file(path: PathLike) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a folder."""
    path = Path(path).expanduser()
    return path / TOKENIZER_FILE if path.is_dir() else path


# ----------------------------------------------------------------------------- tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What training and sampling need from a tokenizer."""

    kind: str  # "char" or "bpe"; recorded in meta.json

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def save(self, path: PathLike) -> Path: ...


class CharTokenizer:
    """Character-level tokenizer: the sorted unique characters of a text, id = rank.

    Has no end-of-text token (``eos_id`` is None), like nanoGPT's shakespeare_char.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("chars: need at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars: every entry must be a single character")
        if chars != sorted(set(chars)):
            raise ValueError("chars: must be sorted and unique")
        self.chars: list[str] = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        # code points in id order; sorted, so encoding is one vectorised searchsorted
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is every distinct character of ``text``."""
        if not text:
            raise ValueError("text: empty, cannot build a character vocabulary")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eos_id(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids, one per character (``len(text)`` of them).

        Raises:
            ValueError: a character of ``text`` is not in the vocabulary (it is named).
        """
        if not text:
            return []
        # one code point per character; surrogatepass keeps lone surrogates encodable
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        cps = cps.astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self.chars) - 1)
        bad = self._codepoints[ids] != cps
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(
                f"text: character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} "
                f"is not in the vocabulary of this CharTokenizer"
            )
        return ids.tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids (any 1-D int sequence) -> text.

        Raises:
            ValueError: an id outside ``[0, vocab_size)``.
        """
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= i < len(self.chars):
                raise ValueError(f"ids: token id {i} is outside [0, {len(self.chars)})")
            out.append(self.chars[i])
        return "".join(out)

    def save(self, path: PathLike) -> Path:
        """Write the vocabulary as JSON to ``path`` (a folder gets ``tokenizer.json``)."""
        path = _tokenizer_file(path)
        _atomic_write_json(path, {"kind": self.kind, "chars": self.chars})
        return path

    @classmethod
    def load(cls, path: PathLike) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save` (a file, or a folder holding one)."""
        path = _tokenizer_file(path)
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("kind") != cls.kind:
            raise ValueError(f"{path}: not a character tokenizer file (kind={obj.get('kind')!r})")
        return cls(obj["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


#: special tokens taken as end-of-text, in this order, when a pretrained tokenizer's
#: checkpoint does not name its eos id
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class PretrainedTokenizer:
    """Any HF ``tokenizers`` ``tokenizer.json`` (a pretrained checkpoint's), used as is.

    ``encode`` adds what the tokenizer's post-processor adds (e.g. a BOS token); ``decode``
    keeps special tokens, as :class:`BPETokenizer` does.
    """

    kind = "pretrained"

    def __init__(self, tokenizer: HFTokenizer, eos_id: int | None = None):
        self._tok = tokenizer
        if eos_id is None:
            for name in _EOS_NAMES:
                if tokenizer.token_to_id(name) is not None:
                    eos_id = tokenizer.token_to_id(name)
                    break
        if eos_id is not None and not 0 <= int(eos_id) < self.vocab_size:
            raise ValueError(f"eos_id: must be in [0, {self.vocab_size}), got {eos_id}")
        self._eos_id = None if eos_id is None else int(eos_id)

    @classmethod
    def load(cls, path: PathLike, eos_id: int | None = None) -> PretrainedTokenizer:
        """Read a ``tokenizer.json`` (a file, or a folder holding one)."""
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_file(str(_tokenizer_file(path))), eos_id)

    @property
    def vocab_size(self) -> int:
        """Ids in ``[0, vocab_size)`` (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"ids: token id {int(ids[np.argmax(bad)])} is outside [0, {self.vocab_size})")
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def save(self, path: PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a folder gets ``tokenizer.json``)."""
        path = _tokenizer_file(path)
        atomic_write_bytes(path, self._tok.to_str(pretty=True).encode())
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class BPETokenizer(PretrainedTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization) trained locally with HF ``tokenizers``.

    Every byte is in the base alphabet, so any text round-trips:
    ``decode(encode(s)) == s``. ``<|endoftext|>`` is the one special token (``eos_id``); a
    literal ``<|endoftext|>`` in the text encodes to it.
    """

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer, eos_id: int | None = None):
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer: has no {EOS_TOKEN!r} special token")
        if eos_id is not None and eos_id != eos:
            raise ValueError(f"eos_id: the {EOS_TOKEN!r} token is {eos}, got {eos_id}")
        super().__init__(tokenizer, int(eos))

    @classmethod
    def train(
        cls,
        text_or_files: str | PathLike | Sequence[PathLike],
        vocab_size: int = DEFAULT_BPE_VOCAB,
        *,
        save_dir: PathLike | None = None,
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Train a byte-level BPE vocabulary.

        Args:
            text_or_files: a ``str`` is the training text itself; a ``Path`` (or any
                ``os.PathLike``) or a list/tuple of paths names text files to train on.
            vocab_size: target size including the 256 byte tokens and ``<|endoftext|>``
                (must be >= 257); a small corpus may stop short of it.
            save_dir: if given, the trained tokenizer is written to
                ``save_dir/tokenizer.json``.
            min_frequency: pairs seen fewer times than this are not merged.

        Raises:
            ValueError: ``vocab_size`` < 257, or no training text.
        """
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(
                f"vocab_size: must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}"
            )
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
            show_progress=False,
        )
        if isinstance(text_or_files, str):
            if not text_or_files:
                raise ValueError("text_or_files: empty training text")
            tok.train_from_iterator([text_or_files], trainer=trainer)
        else:
            if isinstance(text_or_files, os.PathLike):
                files = [Path(text_or_files)]
            else:
                files = [Path(p) for p in text_or_files]
            if not files:
                raise ValueError("text_or_files: empty list of files")
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"text_or_files: no such file {f}")
            tok.train([str(f) for f in files], trainer=trainer)
        out = cls(tok)
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            out.save(Path(save_dir) / TOKENIZER_FILE)
        return out


def load_tokenizer(path: PathLike) -> CharTokenizer | BPETokenizer | PretrainedTokenizer:
    """Load a saved tokenizer (char, BPE, or a pretrained HF one) from its file or folder.

    Raises:
        FileNotFoundError: no such file. ValueError: a JSON file of neither kind.
    """
    file = _tokenizer_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"path: no tokenizer file at {file}")
    obj = json.loads(file.read_text(encoding="utf-8"))
    if obj.get("kind") == CharTokenizer.kind:
        return CharTokenizer.load(file)
    if isinstance(obj.get("model"), dict) and obj["model"].get("type") == "BPE" and any(
            t.get("content") == EOS_TOKEN for t in obj.get("added_tokens") or []):
        return BPETokenizer.load(file)
    if isinstance(obj.get("model"), dict):  # a pretrained checkpoint's tokenizer
        return PretrainedTokenizer.load(file)
    raise ValueError(f"{file}: neither a CharTokenizer nor a HF tokenizer.json")


# ----------------------------------------------------------------------------- TinyShakespeare


def _cache_root(cache_dir: PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LINEARNEXUS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "linearnexus"


def _missing_message(cache_file: Path) -> str:
    return (
        "TinyShakespeare not found: pass --data PATH, set LINEARNEXUS_SHAKESPEARE=PATH, "
        f"or use --download-shakespeare (downloads it to {cache_file})"
    )


def download_shakespeare(
    dest: PathLike, *, url: str = SHAKESPEARE_URL, timeout: float = 60.0
) -> Path:
    """Download TinyShakespeare to ``dest`` and check its SHA-256 and length.

    The bytes go to a temporary file next to ``dest`` and are renamed onto ``dest`` only
    once verified, so a failed or corrupted download never leaves a partial file.

    Raises:
        OSError (``urllib.error.URLError`` included): the download failed.
        ValueError: the downloaded file has the wrong length or checksum (it is deleted).
    """
    import urllib.request  # deferred: pulls in http/ssl/email

    dest = Path(dest).expanduser()

    def fetch_checked(fh: Any) -> None:  # raising here leaves dest untouched
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
        try:
            n_chars = len(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"download from {url}: not UTF-8 text ({err})") from err
        if n_chars != SHAKESPEARE_NUM_CHARS:
            raise ValueError(
                f"download from {url}: expected {SHAKESPEARE_NUM_CHARS} characters, "
                f"got {n_chars}; not kept"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise ValueError(
                f"download from {url}: SHA-256 {digest} does not match the "
                f"expected {SHAKESPEARE_SHA256}; not kept"
            )
        fh.write(data)

    atomic_write(dest, fetch_checked)
    return dest


def resolve_shakespeare(
    data: PathLike | None = None, *, download: bool = False, cache_dir: PathLike | None = None
) -> Path:
    """Find the TinyShakespeare text file.

    Looks, in order, at: ``data`` (an explicit path, e.g. ``--data``); the environment
    variable ``LINEARNEXUS_SHAKESPEARE``; the cache file
    ``<cache>/tinyshakespeare/input.txt`` where ``<cache>`` is ``cache_dir``, else
    ``$LINEARNEXUS_CACHE``, else ``~/.cache/linearnexus``. If the cache has no copy and
    ``download`` is True, downloads the canonical file into the cache (checked with
    :data:`SHAKESPEARE_SHA256`: the way to refresh it); otherwise the copy shipped in the
    package (:data:`BUNDLED_SHAKESPEARE`, checked against the same SHA-256). A file found
    at ``data``, in the environment or in the cache is not re-hashed (any text file may be
    passed as ``data``).

    Raises:
        FileNotFoundError: ``data`` or ``$LINEARNEXUS_SHAKESPEARE`` names a missing file;
            or the download failed; or nothing was found and the bundled copy is missing.
            The message says what to do.
        ValueError: the download arrived corrupted (nothing is kept), or the bundled copy
            does not match its SHA-256.
    """
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data: no such file {path}")
        return path
    env = os.environ.get("LINEARNEXUS_SHAKESPEARE")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LINEARNEXUS_SHAKESPEARE={env}: no such file")
        return path
    cache_file = _cache_root(cache_dir) / "tinyshakespeare" / "input.txt"
    if cache_file.is_file():
        return cache_file
    if not download:
        return _bundled_shakespeare(cache_file)
    try:
        return download_shakespeare(cache_file)
    except OSError as err:  # network failures (URLError is an OSError); ValueError passes
        raise FileNotFoundError(
            f"{_missing_message(cache_file)}; the download from {SHAKESPEARE_URL} failed: {err}"
        ) from err


def _bundled_shakespeare(cache_file: Path) -> Path:
    """The shipped copy, after checking it is the canonical text (a checkout with CRLF line
    ends or an LFS pointer in its place would otherwise train on something else)."""
    if not BUNDLED_SHAKESPEARE.is_file():
        raise FileNotFoundError(f"{_missing_message(cache_file)} (the bundled copy "
                                f"{BUNDLED_SHAKESPEARE} is missing from this install)")
    digest = hashlib.sha256(BUNDLED_SHAKESPEARE.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{BUNDLED_SHAKESPEARE}: SHA-256 {digest} does not match the expected "
                         f"{SHAKESPEARE_SHA256}; pass --data PATH or use --download-shakespeare")
    return BUNDLED_SHAKESPEARE


# ----------------------------------------------------------------------------- token files


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids in ``[0, vocab_size)``: uint16 or uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class PreparedData:
    """A folder written by :func:`prepare_dataset`.

    Attributes:
        out_dir: the folder holding ``train.bin``, ``val.bin``, ``meta.json``,
            ``tokenizer.json``.
        tokenizer_kind: ``"char"``, ``"bpe"`` or ``"pretrained"`` (a given tokenizer).
        vocab_size: size of the trained vocabulary (ids are in ``[0, vocab_size)``).
        dtype: dtype of the ``.bin`` files (uint16 or uint32).
        train_tokens, val_tokens: number of tokens in each file.
        source_sha256: SHA-256 of the source text file.
        reused: True when the files were already up to date and nothing was written.
    """

    out_dir: Path
    tokenizer_kind: str
    vocab_size: int
    dtype: np.dtype
    train_tokens: int
    val_tokens: int
    source_sha256: str
    reused: bool = False

    @property
    def train_path(self) -> Path:
        return self.out_dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.out_dir / "val.bin"

    @property
    def meta_path(self) -> Path:
        return self.out_dir / "meta.json"

    @property
    def tokenizer_path(self) -> Path:
        return self.out_dir / TOKENIZER_FILE

    def load_tokenizer(self) -> CharTokenizer | BPETokenizer | PretrainedTokenizer:
        return load_tokenizer(self.tokenizer_path)

    def train_dataset(self) -> TextDataset:
        return TextDataset(self.train_path, self.dtype)

    def val_dataset(self) -> TextDataset:
        return TextDataset(self.val_path, self.dtype)

    @classmethod
    def load(cls, out_dir: PathLike) -> PreparedData:
        """Read the ``meta.json`` of a prepared folder.

        Raises:
            FileNotFoundError: no ``meta.json`` in ``out_dir``.
        """
        out_dir = Path(out_dir).expanduser()
        meta_path = out_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"out_dir: no meta.json in {out_dir}; run prepare_dataset")
        return cls._from_meta(out_dir, json.loads(meta_path.read_text(encoding="utf-8")))

    @classmethod
    def _from_meta(cls, out_dir: Path, meta: dict[str, Any], reused: bool = True) -> PreparedData:
        return cls(
            out_dir=out_dir,
            tokenizer_kind=meta["tokenizer"],
            vocab_size=int(meta["vocab_size"]),
            dtype=np.dtype(meta["dtype"]),
            train_tokens=int(meta["train_tokens"]),
            val_tokens=int(meta["val_tokens"]),
            source_sha256=meta["source_sha256"],
            reused=reused,
        )


def _up_to_date(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing meta.json if it matches ``settings`` and its files match the sizes and
    SHA-256 digests it recorded; a damaged cache is named in a warning (then rebuilt)."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in settings.items()):
            return None
        problem = verify_manifest(out_dir, meta["files"], "full")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"meta.json: unreadable ({e})"
    if problem is not None:
        warnings.warn(f"data cache {out_dir}: {problem}; rebuilding it from the text",
                      stacklevel=3)
        return None
    return meta


def prepare_dataset(
    text_path: PathLike,
    out_dir: PathLike,
    tokenizer: Literal["char", "bpe"] | Tokenizer = "char",
    val_fraction: float = 0.1,
    vocab_size: int | None = None,
) -> PreparedData:
    """Tokenize a text file once into ``train.bin`` / ``val.bin`` plus metadata.

    The first ``int(n * (1 - val_fraction))`` tokens go to ``train.bin``, the rest to
    ``val.bin`` (nanoGPT's split). Writes, atomically, into ``out_dir``: the two flat token
    files (``[n]`` of :func:`token_dtype`), ``tokenizer.json``, and ``meta.json``
    (tokenizer kind, vocab size, dtype, token counts, source SHA-256, and the size and
    SHA-256 of each file written), which is written last. If ``out_dir`` already holds
    files for the same source hash and settings, and they still match their recorded
    sizes and digests, nothing is recomputed and the result has ``reused=True``; files
    that do not match are named in a warning and rebuilt from the text.

    Args:
        text_path: UTF-8 text file.
        out_dir: output folder (created).
        tokenizer: ``"char"`` (vocabulary = the characters of the text), ``"bpe"``
            (byte-level BPE trained on the whole text), or a ready tokenizer object (a
            pretrained checkpoint's, e.g. :func:`linearnexus.hf.load_tokenizer`), used as is;
            its saved JSON's hash joins the settings that decide reuse.
        val_fraction: share of tokens held out, in ``(0, 1)``.
        vocab_size: BPE vocabulary size (default 4096); ignored for ``"char"``.

    Raises:
        FileNotFoundError: ``text_path`` missing. ValueError: bad ``tokenizer``,
            ``val_fraction`` or ``vocab_size``, or a text too short to split.
    """
    text_path = Path(text_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    given = None if isinstance(tokenizer, str) else tokenizer
    if given is not None:
        if not isinstance(given, Tokenizer):
            raise TypeError(f"tokenizer: expected 'char', 'bpe' or a tokenizer object, got {tokenizer!r}")
        with tempfile.TemporaryDirectory() as tmp:
            given_sha = sha256_file(given.save(Path(tmp) / TOKENIZER_FILE))
        tokenizer = "pretrained"
    elif tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer: expected 'char' or 'bpe', got {tokenizer!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    if tokenizer == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else int(vocab_size)
        if vocab_size < 257:
            raise ValueError(f"vocab_size: must be >= 257 for BPE, got {vocab_size}")
    else:
        vocab_size = None
    if not text_path.is_file():
        raise FileNotFoundError(f"text_path: no such file {text_path}")

    source_sha = sha256_file(text_path)
    settings = {
        "format_version": _META_VERSION,
        "tokenizer": tokenizer,
        "requested_vocab_size": vocab_size,
        "val_fraction": float(val_fraction),
        "source_sha256": source_sha,
    }
    if given is not None:
        settings["tokenizer_sha256"] = given_sha
    meta = _up_to_date(out_dir, settings)
    if meta is not None:
        return PreparedData._from_meta(out_dir, meta, reused=True)

    text = text_path.read_text(encoding="utf-8")
    tok: Tokenizer
    if given is not None:
        tok = given
    elif tokenizer == "char":
        tok = CharTokenizer.from_text(text)
    else:
        # learn merges from the training part only, so validation text does not shape the
        # tokenizer (byte-level BPE still encodes any text). The char vocabulary above is
        # taken from the whole text, as nanoGPT does: a character unseen in training would
        # otherwise be unencodable, and a set of characters carries no frequency statistics.
        train_chars = text[: max(1, int(len(text) * (1.0 - val_fraction)))]
        tok = BPETokenizer.train(train_chars, vocab_size=vocab_size)
    ids = np.asarray(tok.encode(text), dtype=np.int64)  # [n]
    n = ids.shape[0]
    n_train = int(n * (1.0 - val_fraction))
    if n_train < 1 or n - n_train < 1:
        raise ValueError(
            f"text_path: {n} tokens cannot be split with val_fraction={val_fraction} "
            "into non-empty train and val sets"
        )
    dtype = token_dtype(tok.vocab_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json marks a finished folder: drop it first so a crash midway forces a rebuild
    (out_dir / "meta.json").unlink(missing_ok=True)
    _atomic_write_tokens(out_dir / "train.bin", ids[:n_train], dtype)
    _atomic_write_tokens(out_dir / "val.bin", ids[n_train:], dtype)
    tok.save(out_dir / TOKENIZER_FILE)
    meta = {
        **settings,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": n - n_train,
        "source_path": str(text_path.resolve()),
        # checked on reuse: a truncated or bit-flipped cache is rebuilt, not trained on
        "files": build_manifest(out_dir, ["train.bin", "val.bin", TOKENIZER_FILE]),
    }
    _atomic_write_json(out_dir / "meta.json", meta)
    return PreparedData._from_meta(out_dir, meta, reused=False)


# ----------------------------------------------------------------------------- datasets


class TextDataset:
    """A flat token file, memory-mapped read-only.

    Attributes:
        tokens: ``[n]`` ``np.memmap`` of ``dtype`` (read-only).
    """

    def __init__(self, path: PathLike, dtype: npt.DTypeLike | None = None):
        """Map ``path``; ``dtype=None`` reads it from a ``meta.json`` in the same folder.

        Raises:
            FileNotFoundError: ``path`` missing. ValueError: no dtype given or found, a
                file size that is not a multiple of the dtype size, or an empty file.
        """
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"path: no such file {self.path}")
        if dtype is None:
            meta_path = self.path.parent / "meta.json"
            if not meta_path.is_file():
                raise ValueError(f"dtype: not given and no meta.json next to {self.path}")
            dtype = json.loads(meta_path.read_text(encoding="utf-8"))["dtype"]
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size == 0 or size % self.dtype.itemsize:
            raise ValueError(
                f"path: {self.path} has {size} bytes, not a positive multiple of "
                f"{self.dtype.name} ({self.dtype.itemsize} bytes)"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a ``[length]`` int64 array (a copy).

        Raises:
            IndexError: the window does not lie inside the file.
        """
        if length < 0 or start < 0 or start + length > len(self):
            raise IndexError(f"window(start={start}, length={length}) is outside [0, {len(self)})")
        return np.asarray(self.tokens[start : start + length], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TextDataset({str(self.path)!r}, dtype={self.dtype.name}, len={len(self)})"


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _check_length(dataset: TextDataset, seq_len: int) -> None:
    if len(dataset) < seq_len + 1:
        raise ValueError(
            f"dataset: has {len(dataset)} tokens; seq_len={seq_len} needs at least "
            f"seq_len + 1 = {seq_len + 1}"
        )


class DataLoader:
    """Random training windows; batch ``i`` depends only on ``(seed, i)``.

    Each batch is ``(inputs, targets)``, both ``[B, T]`` int32 with
    ``targets[:, t] == inputs[:, t + 1]`` inside a window of ``T + 1`` consecutive tokens
    whose start is uniform in ``[0, len(dataset) - T - 1]``. Iterating never ends;
    ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(self, dataset: TextDataset, batch_size: int, seq_len: int, seed: int = 0):
        """Check the arguments; the iterator starts at step 0.

        Raises:
            ValueError: ``batch_size`` or ``seq_len`` not positive, ``seed`` negative, or a
                dataset shorter than ``seq_len + 1`` tokens.
        """
        self.dataset = dataset
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seq_len = _check_positive("seq_len", seq_len)
        self.seed = self._check_seed(seed)
        _check_length(dataset, self.seq_len)
        self.step = 0

    @staticmethod
    def _check_seed(seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        return int(seed)

    def get_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch at ``step`` (does not move the iterator).

        Returns:
            ``(inputs [B, T] int32, targets [B, T] int32)``.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step: must be a non-negative integer, got {step!r}")
        rng = np.random.default_rng([self.seed, int(step)])
        span = self.seq_len + 1
        starts = rng.integers(0, len(self.dataset) - span + 1, size=self.batch_size)  # [B]
        windows = np.stack([self.dataset.window(int(s), span) for s in starts])  # [B, T+1]
        windows = windows.astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"seed": seed, "step": index of the next batch}``."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`: the next batch is ``get_batch(state["step"])``."""
        missing = {"seed", "step"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state['step']: must be a non-negative integer, got {step!r}")
        self.seed = self._check_seed(state["seed"])
        self.step = int(step)

    def __repr__(self) -> str:
        return (
            f"DataLoader(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"seed={self.seed}, step={self.step})"
        )


def sequential_batches(
    dataset: TextDataset,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Walk ``dataset`` front to back in non-overlapping windows, for evaluation.

    Window ``k`` holds tokens ``[k T, k T + T + 1)``, so every token but the first is a
    target exactly once (up to the ``(n - 1) % T`` tokens at the end that fill no window).
    Windows are grouped ``batch_size`` at a time; the last batch may be smaller unless
    ``drop_last``.

    Yields:
        ``(inputs [b, T] int32, targets [b, T] int32)`` with ``b <= batch_size``; at most
        ``max_batches`` of them.

    Raises:
        ValueError: bad ``batch_size`` / ``seq_len`` / ``max_batches``, or a dataset shorter
            than ``seq_len + 1`` tokens.
    """
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    if max_batches is not None:
        max_batches = _check_positive("max_batches", max_batches)
    _check_length(dataset, seq_len)
    return _sequential(dataset, batch_size, seq_len, max_batches, drop_last)


def _sequential(
    dataset: TextDataset, batch_size: int, seq_len: int, max_batches: int | None, drop_last: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # a generator of its own, so argument errors surface at the call, not at first next()
    n_windows = (len(dataset) - 1) // seq_len
    starts = range(0, n_windows * seq_len, seq_len)
    for count, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        chunk = starts[first : first + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        windows = np.stack([dataset.window(s, seq_len + 1) for s in chunk])  # [b, T+1]
        windows = windows.astype(np.int32)
        yield windows[:, :-1], windows[:, 1:]
