"""nanoGPT's Shakespeare-char CPU recipe as the CPU speed benchmarks build it.

One place for the data (TinyShakespeare, character level, nanoGPT's 90/10 split, prepared
once under ``runs/bench_cpu/data``), the recipe's settings (``configs/models/
gpt_nanogpt_cpu.yaml``) and a trainer for any preset with them: shared by
``cpu_train_profile.py``, ``cpu_train_compare.py`` and ``cpu_train_peer.py`` (which reads
only the token files and the settings, never JAX).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "models" / "gpt_nanogpt_cpu.yaml"
DATA_DIR = ROOT / "runs" / "bench_cpu" / "data"


def recipe() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_section, train_section)`` of the recipe file."""
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    return dict(data["model"]), dict(data["train"])


def prepare(data_dir: Path = DATA_DIR) -> Path:
    """Tokenize TinyShakespeare into ``data_dir`` (reused when already there); returns it."""
    from linearnexus.data import prepare_dataset, resolve_shakespeare

    _, train = recipe()
    prepare_dataset(resolve_shakespeare(None), data_dir, tokenizer="char",
                    val_fraction=train["val_fraction"])
    return data_dir


def token_arrays(data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train tokens [n], val tokens [m], vocab size)`` of a prepared folder (no JAX)."""
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    train = np.fromfile(data_dir / "train.bin", dtype=dtype)
    val = np.fromfile(data_dir / "val.bin", dtype=dtype)
    return train, val, int(meta["vocab_size"])


def make_trainer(preset: str, out_dir: Path, *, data_dir: Path = DATA_DIR,
                 model_overrides: dict[str, Any] | None = None, **train_overrides: Any) -> Any:
    """An :class:`~linearnexus.train.SFTTrainer` for ``preset`` with the recipe's training
    settings (``gpt-small`` takes the recipe file's model, others their preset), with
    ``model_overrides`` (ModelConfig fields, e.g. ``dtype``) and ``train_overrides``."""
    from linearnexus.data import DataLoader, PreparedData
    from linearnexus.models import create_model
    from linearnexus.train import SFTTrainer, TrainConfig, clear_run, resolve_model_config

    model_section, train_section = recipe()
    prepared = PreparedData.load(data_dir)
    model_config = resolve_model_config(model_section if preset == "gpt-small" else {"preset": preset})
    model_config = model_config.replace(vocab_size=prepared.vocab_size, **(model_overrides or {}))
    train = TrainConfig.from_dict({**train_section, "out_dir": str(out_dir), "progress": False,
                                   **train_overrides})
    clear_run(out_dir)
    loader = DataLoader(prepared.train_dataset(), train.batch_size, train.seq_len, seed=train.seed)
    return SFTTrainer(create_model(model_config, seed=train.seed), None, loader,
                      prepared.val_dataset(), train, model_config,
                      tokenizer=prepared.load_tokenizer(), log=lambda line: None)
