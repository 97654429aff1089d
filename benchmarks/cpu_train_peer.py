"""A plain PyTorch (eager) peer of the nanoGPT Shakespeare-char CPU recipe, for speed comparison.

    python benchmarks/cpu_train_peer.py [--max-steps 2000] [--threads N]

The same model as ``configs/models/gpt_nanogpt_cpu.yaml`` builds in LinearNexus (4 layers, 4
heads, width 128, pre-RMSNorm, RoPE (half-split) attention without biases, SwiGLU MLP of
width 384, tied embeddings, final RMSNorm; 861,440 parameters at vocab 65), trained with the
same recipe: batch 12, context 64, AdamW (betas 0.9 / 0.99, eps 1e-8, weight decay 0.1 on
weight matrices but not the embedding or norms), lr 1e-3 with 100 linear warmup steps from
0, cosine to 1e-4 at the last step, global-norm clip 1.0; evaluation every 250 steps on the
same 20 fixed validation windows; a checkpoint (``torch.save`` of model + optimizer) at every
evaluation. The batches are exactly LinearNexus' (``DataLoader``: window starts drawn by
``numpy.random.default_rng([seed, step])``), read from the token files
``benchmarks/cpu_recipe.py`` prepares: no JAX is imported here.

Written for this benchmark (not nanoGPT's code): nanoGPT's own model differs (LayerNorm,
learned positions, GELU MLP); this peer does the same math as ours, so tokens/s compare
frameworks, not architectures. Attention uses ``F.scaled_dot_product_attention(is_causal=
True)`` as nanoGPT does. ``torch.set_num_threads`` gets the cores this process may use (what
XLA's CPU client uses too) unless ``--threads`` says otherwise.

``--worker`` speaks the block protocol of ``cpu_train_compare.py`` on stdin / stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_recipe  # noqa: E402

EVAL_SEED = 0  # linearnexus.train.EVAL_SEED: the fixed validation windows


def batch_at(tokens: np.ndarray, batch: int, seq: int, seed: int, step: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """LinearNexus ``DataLoader.get_batch``: ``(inputs [B, T], targets [B, T])`` int64."""
    rng = np.random.default_rng([seed, step])
    span = seq + 1
    starts = rng.integers(0, len(tokens) - span + 1, size=batch)  # [B]
    windows = np.stack([tokens[s:s + span] for s in starts]).astype(np.int64)  # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def _linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.trunc_normal_(layer.weight, std=fan_in ** -0.5 / 0.8796, a=-2 * fan_in ** -0.5 / 0.8796,
                          b=2 * fan_in ** -0.5 / 0.8796)  # flax's lecun_normal
    return layer


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.q, self.k, self.v, self.o = (_linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = _linear(d, hidden), _linear(d, hidden), _linear(hidden, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)

        def heads(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, K]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        def rope(y: torch.Tensor) -> torch.Tensor:  # half-split rotation, [B, H, T, K]
            y1, y2 = y.chunk(2, dim=-1)
            return torch.cat([y1 * cos - y2 * sin, y2 * cos + y1 * sin], dim=-1)

        q, k, v = rope(heads(self.q(h))), rope(heads(self.k(h))), heads(self.v(h))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, K]
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))  # -> [B, T, D]
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int = 128, layers: int = 4, heads: int = 4,
                 hidden: int = 384, eps: float = 1e-5, rope_base: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads, hidden, eps) for _ in range(layers))
        self.norm = RMSNorm(d, eps)
        half = d // heads // 2
        self.inv_freq = 1.0 / rope_base ** (torch.arange(half, dtype=torch.float32) / half)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(idx.shape[1], dtype=torch.float32)[:, None] * self.inv_freq  # [T, K/2]
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T  # tied head, [B, T, V]


class PeerRun:
    """The recipe's training loop; :meth:`run` advances it ``n`` steps (evaluating and
    checkpointing at the recipe's steps), so a caller can interleave it with another run."""

    def __init__(self, max_steps: int, threads: int | None, out_dir: Path):
        _, cfg = cpu_recipe.recipe()
        self.cfg = {**cfg, "max_steps": max_steps}
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(cfg["seed"])
        self.train_tokens, val_tokens, vocab = cpu_recipe.token_arrays()
        self.model = GPT(vocab)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]},
             {"params": rest, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8)
        b, t = cfg["batch_size"], cfg["seq_len"]
        evals = [batch_at(val_tokens, b, t, EVAL_SEED, i) for i in range(cfg["eval_batches"])]
        self.eval_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in evals]
        self.out_dir = out_dir
        self.step = 0
        self.val_loss: float | None = None
        self.train_loss: float | None = None

    def lr_at(self, step: int) -> float:
        cfg, total = self.cfg, self.cfg["max_steps"]
        warmup = min(cfg["warmup_steps"], total)
        lr, min_lr = cfg["lr"], cfg["lr"] * cfg["min_lr_ratio"]
        if step < warmup:
            return lr * step / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
                  for x, y in self.eval_batches]
        self.model.train()
        return float(torch.stack(losses).mean())

    def checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "step": self.step}, self.out_dir / "ckpt.pt")

    def run(self, n: int) -> None:
        cfg = self.cfg
        if self.step == 0 and self.val_loss is None:
            self.val_loss = self.evaluate()
        pending = []
        for _ in range(min(n, cfg["max_steps"] - self.step)):
            x, y = batch_at(self.train_tokens, cfg["batch_size"], cfg["seq_len"], cfg["seed"],
                            self.step)
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step)
            logits = self.model(torch.from_numpy(x))
            loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
            self.opt.step()
            pending.append(loss.detach())
            self.step += 1
            last = self.step == cfg["max_steps"]
            if last or self.step % cfg["log_interval"] == 0:
                self.train_loss = float(torch.stack(pending).mean())
                pending.clear()
            if last or self.step % cfg["eval_interval"] == 0:
                self.val_loss = self.evaluate()
                self.checkpoint()


def worker(args: argparse.Namespace) -> None:
    """Block protocol: print ``ready``; on each ``go`` line run ``--block`` steps and print
    one JSON line ``{"step", "seconds", "val_loss", "train_loss", "done"}``."""
    with tempfile.TemporaryDirectory(prefix="ln-peer-") as tmp:
        run = PeerRun(args.max_steps, args.threads, Path(tmp))
        print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                          "torch": torch.__version__}), flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            start = time.perf_counter()
            run.run(args.block)
            seconds = time.perf_counter() - start
            done = run.step >= args.max_steps
            print(json.dumps({"step": run.step, "seconds": seconds, "val_loss": run.val_loss,
                              "train_loss": run.train_loss, "done": done}), flush=True)
            if done:
                break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--block", type=int, default=100, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="ln-peer-") as tmp:
        run = PeerRun(args.max_steps, args.threads, Path(tmp))
        start = time.perf_counter()
        run.run(args.max_steps)
        wall = time.perf_counter() - start
    tokens = args.max_steps * run.cfg["batch_size"] * run.cfg["seq_len"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {args.max_steps} steps "
          f"in {wall:.1f} s, {tokens / wall:,.0f} tok/s (evaluation and checkpoints included), "
          f"val loss {run.val_loss:.4f}")


if __name__ == "__main__":
    main()
