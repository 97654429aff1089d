"""Train a tiny Mamba language model on TinyShakespeare (CPU, under a minute) and sample.

    python examples/train_mamba_tiny.py --config configs/models/mamba_tiny.yaml

The same as ``train_lm.py --config configs/models/mamba_tiny.yaml``, written out with the
library calls so it can be read top to bottom: config file -> data -> model -> trainer ->
sample. Every run starts fresh in the config's ``out_dir`` (``--out`` to change it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from linearnexus.data import DataLoader, prepare_dataset, resolve_shakespeare
from linearnexus.generate import SamplingConfig, generate_text
from linearnexus.models import create_model
from linearnexus.train import SFTTrainer, clear_run, load_run_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/models/mamba_tiny.yaml",
                   help="YAML with model: and train: sections")
    p.add_argument("--data", default=None,
                   help="text file (default: TinyShakespeare: $LINEARNEXUS_SHAKESPEARE, the cache, "
                        "else the copy shipped with the package)")
    p.add_argument("--download-shakespeare", action="store_true")
    p.add_argument("--out", default=None, help="run folder (default: the config's out_dir)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps: must be >= 1, got {args.max_steps}")

    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("out_dir", args.out))
                 if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    model_config, train = load_run_config(args.config, **overrides)

    # data: tokenize once into <out>/data (reused by later runs)
    try:
        text = resolve_shakespeare(args.data or train.data, download=args.download_shakespeare)
    except FileNotFoundError as e:
        p.error(str(e))
    prepared = prepare_dataset(text, Path(train.out_dir) / "data", tokenizer=train.tokenizer,
                               val_fraction=train.val_fraction, vocab_size=train.bpe_vocab_size)
    tokenizer = prepared.load_tokenizer()
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)

    model = create_model(model_config, seed=train.seed)
    print(f"{model.num_params():,} parameters: {model_config.n_layers} x {model_config.block_pattern}, "
          f"d_model {model_config.d_model}")
    clear_run(train.out_dir)  # a fresh run each time (train_lm.py offers --resume)
    trainer = SFTTrainer(
        model, None,  # None: the optimizer named in the config, with its lr schedule
        DataLoader(prepared.train_dataset(), train.batch_size, train.seq_len, seed=train.seed),
        prepared.val_dataset(), train, model_config, tokenizer=tokenizer)
    result = trainer.train()
    print(f"step {result.step}: val loss {result.val_loss:.4f}, {result.elapsed_s:.1f}s, "
          f"checkpoint {result.checkpoint}")

    cfg = SamplingConfig(temperature=0.8, top_k=50, max_new_tokens=args.sample_tokens, seed=0)
    print(generate_text(trainer.model, tokenizer, "ROMEO:", cfg)[0])


if __name__ == "__main__":
    main()
