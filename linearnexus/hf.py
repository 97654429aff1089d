"""Hugging Face checkpoints in and out: Mamba, Mamba2 (transformers), GLA, Gated DeltaNet (FLA).

:func:`from_pretrained` reads a folder in the Hugging Face layout (``config.json`` plus
``*.safetensors``, sharded with ``model.safetensors.index.json`` or not) into an
:class:`~linearnexus.models.LMModel` that computes the same function as the original
model; :func:`save_pretrained` writes an ``LMModel`` back in that layout, loadable by
transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` or FLA's ``GLAForCausalLM`` /
``GatedDeltaNetForCausalLM``. Weights are read and written with ``safetensors``' numpy API,
so no PyTorch is needed. :func:`load_tokenizer` reads the checkpoint's ``tokenizer.json``
with HF ``tokenizers``.

Architectures and their layouts (``L`` = layer index)::

    MambaForCausalLM        backbone.embeddings, backbone.layers.L.{norm, mixer.*}, backbone.norm_f,
                            lm_head (tied by default); our blocks: "mamba", no MLP
    Mamba2ForCausalLM       same names, mixer.{in_proj, conv1d, A_log, dt_bias, D, norm, out_proj};
                            "mamba2", no MLP, head untied by default
    GLAForCausalLM          model.embeddings, model.layers.L.{attn_norm, attn.*, mlp_norm, mlp.*},
                            model.norm, lm_head; "gla" with the SwiGLU MLP
    GatedDeltaNetForCausalLM  as GLA; "gated_deltanet"

A config field whose value our blocks cannot reproduce exactly is refused with
:class:`UnsupportedCheckpointError` naming the field (``docs/hf.md`` lists them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "UnsupportedCheckpointError",
    "from_pretrained",
    "hf_config",
    "load_tokenizer",
    "model_config_from_hf",
    "pretrained_config",
    "resolve_path",
    "save_pretrained",
]

#: transformers / FLA class name -> (config.json ``model_type``, our block name)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "MambaForCausalLM": ("mamba", "mamba"),
    "Mamba2ForCausalLM": ("mamba2", "mamba2"),
    "GLAForCausalLM": ("gla", "gla"),
    "GatedDeltaNetForCausalLM": ("gated_deltanet", "gated_deltanet"),
}
_BY_MODEL_TYPE = {mt: arch for arch, (mt, _) in ARCHITECTURES.items()}
_BY_BLOCK = {block: arch for arch, (_, block) in ARCHITECTURES.items()}

# The config classes' defaults (transformers 5.x MambaConfig / Mamba2Config, FLA 0.6
# GLAConfig / GatedDeltaNetConfig), used for a field missing from a config.json.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba": dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32,
                  layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, use_bias=False,
                  use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
                  time_step_rank="auto", time_step_scale=1.0, time_step_min=0.001,
                  time_step_max=0.1, time_step_floor=1e-4, tie_word_embeddings=True),
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4,
                   n_groups=8, use_bias=False, use_conv_bias=True, hidden_act="silu",
                   residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1,
                   time_step_floor=1e-4, time_step_limit=(0.0, math.inf), tie_word_embeddings=False),
    "gla": dict(hidden_size=2048, expand_k=0.5, expand_v=1.0, hidden_ratio=4, intermediate_size=None,
                num_hidden_layers=24, num_heads=4, num_kv_heads=None, feature_map=None,
                use_short_conv=False, conv_size=4, use_output_gate=True, clamp_min=None,
                hidden_act="swish", max_position_embeddings=2048, elementwise_affine=True,
                norm_eps=1e-6, attn=None, tie_word_embeddings=False, vocab_size=32000,
                attnres_block_size=None, fuse_norm=True),
    "gated_deltanet": dict(hidden_size=2048, expand_v=2.0, use_gate=True, use_short_conv=True,
                           allow_neg_eigval=False, conv_size=4, head_dim=256, num_heads=6,
                           num_v_heads=None, max_position_embeddings=2048, hidden_ratio=4,
                           intermediate_size=None, hidden_act="swish", num_hidden_layers=21,
                           norm_eps=1e-6, attn=None, tie_word_embeddings=False, vocab_size=32000,
                           attnres_block_size=None, output_gate_activation="swish", fuse_norm=True),
}

#: context length given to imported Mamba / Mamba2 models (no positions: only the trainer's
#: ``--seq-len`` check and attention caches read it)
MAMBA_MAX_SEQ_LEN = 1 << 20


class UnsupportedCheckpointError(ValueError):
    """A checkpoint (or a model to save) with a setting LinearNexus cannot reproduce exactly."""


# ----------------------------------------------------------------------------- paths


def resolve_path(path: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub repo id downloaded with ``huggingface_hub``.

    Raises:
        FileNotFoundError: not a folder, and not fetchable as a hub id (``huggingface_hub``
            missing, offline, or no such repo); the message says which.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists():
        raise FileNotFoundError(f"path: {local} is a file; expected a checkpoint folder "
                                "(config.json + *.safetensors)")
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"path: no folder {local} (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"path: no folder {local}; to fetch {text!r} from the Hugging Face "
                                "hub install huggingface_hub, or download it and pass the folder") from None
    try:
        return Path(snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, gated, no such repo: hub errors have many types
        raise FileNotFoundError(f"path: no folder {local}, and the hub id {text!r} could not be "
                                f"fetched ({type(e).__name__}: {e}); offline, download it elsewhere "
                                "and pass the folder") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise FileNotFoundError(f"path: {folder} holds only PyTorch pickles (*.bin); save it as "
                                "safetensors first (transformers: save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"path: no *.safetensors in {folder}")


class _Weights:
    """Lazy, name-addressed view of a checkpoint's safetensors files (numpy)."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    self._where[name] = file
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        if name not in self._where:
            raise KeyError(f"checkpoint: no tensor named {name!r}")
        self.used.add(name)
        with safe_open(str(self._where[name]), framework="numpy") as f:
            return f.get_tensor(name)


# ----------------------------------------------------------------------------- configs


class _Fields:
    """config.json fields with the class defaults behind them; ``refuse`` names the field."""

    def __init__(self, raw: dict[str, Any], arch: str) -> None:
        self.raw, self.arch = raw, arch
        self.defaults = _DEFAULTS[ARCHITECTURES[arch][0]]

    def __getitem__(self, name: str) -> Any:
        return self.raw[name] if name in self.raw else self.defaults.get(name)

    def refuse(self, name: str, why: str) -> UnsupportedCheckpointError:
        return UnsupportedCheckpointError(
            f"config.json: {name}={self[name]!r} is not supported for {self.arch}: {why}")

    def require(self, name: str, allowed: Sequence[Any], why: str = "") -> None:
        if self[name] not in allowed:
            raise self.refuse(name, why or f"expected one of {list(allowed)}")


def _architecture(raw: dict[str, Any]) -> str:
    names = [a for a in raw.get("architectures") or [] if a in ARCHITECTURES]
    if names:
        return names[0]
    if raw.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[raw["model_type"]]
    raise UnsupportedCheckpointError(
        f"config.json: architectures={raw.get('architectures')!r} / model_type="
        f"{raw.get('model_type')!r} is not supported; supported: {sorted(ARCHITECTURES)}")


def _number(value: Any) -> float:
    """A config.json float; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _fla_mlp_hidden(f: _Fields) -> int:
    """FLA ``GatedMLP``'s width: ``intermediate_size``, else 2/3 * ratio * D up to a multiple of 256."""
    if f["intermediate_size"] is not None:
        return int(f["intermediate_size"])
    ratio = 4 if f["hidden_ratio"] is None else f["hidden_ratio"]
    hidden = int(f["hidden_size"] * ratio * 2 / 3)
    return 256 * ((hidden + 255) // 256)


def _fla_common(f: _Fields) -> None:
    for name in ("attn", "attnres_block_size"):
        if f[name] is not None:
            raise f.refuse(name, "hybrid attention layers / attention residuals are not mapped")
    f.require("hidden_act", ("swish", "silu"), "the MLP is SwiGLU (silu)")


def model_config_from_hf(raw: dict[str, Any], *, shapes: dict[str, tuple[int, ...]] | None = None,
                         dtype: str = "float32") -> Any:
    """The :class:`~linearnexus.models.ModelConfig` of a Hugging Face ``config.json`` dict.

    Args:
        raw: the parsed ``config.json``.
        shapes: tensor name -> shape of the checkpoint (fills settings FLA's configs do not
            record: GLA's gate rank; Mamba2's per-channel ``D``); None = the layer defaults.
        dtype: compute dtype; parameters are float32 (float64 for a float64 model).

    Raises:
        UnsupportedCheckpointError: an architecture or a field value that cannot be mapped
            exactly (the message names the field).
    """
    from linearnexus.models import ModelConfig

    shapes = shapes or {}
    arch = _architecture(raw)
    f = _Fields(raw, arch)
    pdtype = "float64" if dtype == "float64" else "float32"
    d, n_layers = int(f["hidden_size"]), int(f["num_hidden_layers"])
    common = dict(vocab_size=int(f["vocab_size"]), d_model=d, n_layers=n_layers, dtype=dtype,
                  param_dtype=pdtype, tie_embeddings=bool(f["tie_word_embeddings"]))
    if arch == "MambaForCausalLM":
        f.require("hidden_act", ("silu",), "the Mamba block's conv and gate use silu")
        inner = f["intermediate_size"]
        if inner is not None and int(inner) != int(f["expand"]) * d:
            raise f.refuse("intermediate_size", f"must be expand * hidden_size = {int(f['expand']) * d}")
        rank = f["time_step_rank"]
        block = dict(d_state=int(f["state_size"]), d_conv=int(f["conv_kernel"]), expand=int(f["expand"]),
                     dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
                     dt_min=f["time_step_min"], dt_max=f["time_step_max"],
                     dt_init_floor=f["time_step_floor"], dt_scale=f["time_step_scale"],
                     conv_bias=bool(f["use_conv_bias"]), bias=bool(f["use_bias"]))
        return ModelConfig.from_dict(dict(
            common, block_pattern=("mamba",), block_options={"mamba": block}, mlp=False,
            norm_eps=float(f["layer_norm_epsilon"]), max_seq_len=MAMBA_MAX_SEQ_LEN,
            residual_in_fp32=bool(f["residual_in_fp32"])))
    if arch == "Mamba2ForCausalLM":
        f.require("hidden_act", ("silu",), "the Mamba2 block's conv uses silu")
        heads, headdim, expand = int(f["num_heads"]), int(f["head_dim"]), int(f["expand"])
        if heads * headdim != expand * d:
            raise f.refuse("num_heads",
                           f"num_heads * head_dim must equal expand * hidden_size = {expand * d}")
        lo, hi = (_number(v) for v in f["time_step_limit"])
        d_shape = shapes.get("backbone.layers.0.mixer.D")
        eps = float(f["layer_norm_epsilon"])
        block = dict(d_state=int(f["state_size"]), d_conv=int(f["conv_kernel"]), expand=expand,
                     headdim=headdim, ngroups=int(f["n_groups"]), dt_min=f["time_step_min"],
                     dt_max=f["time_step_max"], dt_init_floor=f["time_step_floor"],
                     conv_bias=bool(f["use_conv_bias"]), bias=bool(f["use_bias"]), rmsnorm=True,
                     norm_eps=eps, D_has_hdim=d_shape is not None and d_shape != (heads,),
                     dt_limit=None if (lo, hi) == (0.0, math.inf) else (lo, hi))
        return ModelConfig.from_dict(dict(
            common, block_pattern=("mamba2",), block_options={"mamba2": block}, mlp=False,
            norm_eps=eps, max_seq_len=MAMBA_MAX_SEQ_LEN, residual_in_fp32=bool(f["residual_in_fp32"])))
    _fla_common(f)
    eps = float(f["norm_eps"])
    if f["elementwise_affine"] is not None and f["elementwise_affine"] is not True:
        raise f.refuse("elementwise_affine", "the output norm always has a learned scale")
    fla = dict(common, mlp=True, mlp_hidden=_fla_mlp_hidden(f), norm_eps=eps,
               max_seq_len=int(f["max_position_embeddings"]))
    if arch == "GLAForCausalLM":
        if f["feature_map"] is not None:
            raise f.refuse("feature_map", "q / k feature maps are not mapped")
        if f["num_kv_heads"] not in (None, f["num_heads"]):
            raise f.refuse("num_kv_heads", "grouped key / value heads are not mapped")
        f.require("use_output_gate", (True,), "the GLA block always has its output gate")
        clamp = f["clamp_min"]
        if clamp is not None and not clamp < 0:
            raise f.refuse("clamp_min", "a log-gate clamp must be negative")
        rank = shapes.get("model.layers.0.attn.gk_proj.0.weight", (16,))[0]
        block = dict(num_heads=int(f["num_heads"]), expand_k=float(f["expand_k"]),
                     expand_v=float(f["expand_v"]), use_short_conv=bool(f["use_short_conv"]),
                     conv_size=int(f["conv_size"]), conv_bias=False, norm_eps=eps,
                     gate_low_rank_dim=int(rank), gate_logit_normalizer=16.0, gate_min=clamp)
        return ModelConfig.from_dict(dict(fla, block_pattern=("gla",), block_options={"gla": block}))
    # GatedDeltaNetForCausalLM
    if f["num_v_heads"] not in (None, f["num_heads"]):
        raise f.refuse("num_v_heads", "grouped value heads (GVA) are not mapped")
    if f["use_gate"]:
        f.require("output_gate_activation", ("swish", "silu"), "the output gate is silu")
    block = dict(num_heads=int(f["num_heads"]), head_dim=int(f["head_dim"]),
                 expand_v=float(f["expand_v"]), use_short_conv=bool(f["use_short_conv"]),
                 conv_size=int(f["conv_size"]), conv_bias=False, use_output_gate=bool(f["use_gate"]),
                 allow_neg_eigval=bool(f["allow_neg_eigval"]), norm_eps=eps)
    return ModelConfig.from_dict(dict(fla, block_pattern=("gated_deltanet",),
                                      block_options={"gated_deltanet": block}))


def _save_architecture(config: Any) -> str:
    names = set(config.layer_types)
    if len(names) != 1 or next(iter(names)) not in _BY_BLOCK:
        raise UnsupportedCheckpointError(
            f"block_pattern: {tuple(config.block_pattern)} has no Hugging Face architecture; "
            f"savable: one block type of {sorted(_BY_BLOCK)}")
    return _BY_BLOCK[next(iter(names))]


def hf_config(model: Any) -> dict[str, Any]:
    """The ``config.json`` dict that describes ``model`` (an :class:`LMModel`) for
    transformers / FLA.

    Raises:
        UnsupportedCheckpointError: a setting the target architecture cannot express (named).
    """
    cfg = model.config
    arch = _save_architecture(cfg)
    model_type, block_name = ARCHITECTURES[arch]
    b = cfg.block_config(block_name)

    def refuse(name: str, value: Any, why: str) -> UnsupportedCheckpointError:
        return UnsupportedCheckpointError(f"{name}={value!r} cannot be saved as {arch}: {why}")

    out: dict[str, Any] = dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
                               hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                               tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    if arch in ("MambaForCausalLM", "Mamba2ForCausalLM"):
        if cfg.mlp:
            raise refuse("mlp", True, "Mamba layers have no MLP")
        common = dict(expand=b.expand, state_size=b.d_state, conv_kernel=b.d_conv,
                      use_bias=b.bias, use_conv_bias=b.conv_bias, hidden_act="silu",
                      layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
                      time_step_min=b.dt_min, time_step_max=b.dt_max, time_step_floor=b.dt_init_floor)
        if arch == "MambaForCausalLM":
            return dict(out, **common, intermediate_size=b.d_inner, time_step_rank=b.resolved_dt_rank,
                        time_step_scale=b.dt_scale)
        if not b.rmsnorm:
            raise refuse("block_options.mamba2.rmsnorm", False, "transformers' Mamba2 always has the norm")
        if b.D_has_hdim:
            raise refuse("block_options.mamba2.D_has_hdim", True, "transformers' Mamba2 has D per head")
        if b.norm_eps != cfg.norm_eps:
            raise refuse("block_options.mamba2.norm_eps", b.norm_eps,
                         f"one layer_norm_epsilon serves both norms; the model's norm_eps is {cfg.norm_eps}")
        limit = [0.0, math.inf] if b.dt_limit is None else list(b.dt_limit)
        return dict(out, **common, num_heads=b.n_heads, head_dim=b.headdim, n_groups=b.ngroups,
                    time_step_limit=limit, chunk_size=b.chunk_size)
    if not cfg.mlp:
        raise refuse("mlp", False, "FLA's layers always have the MLP")
    if cfg.residual_in_fp32:
        raise refuse("residual_in_fp32", True, "FLA's models keep the residual in the compute dtype")
    if b.norm_eps != cfg.norm_eps:
        raise refuse(f"block_options.{block_name}.norm_eps", b.norm_eps,
                     f"one norm_eps serves every norm; the model's norm_eps is {cfg.norm_eps}")
    if b.conv_bias:
        raise refuse(f"block_options.{block_name}.conv_bias", True,
                     "FLA's models build the conv without bias")
    out.update(intermediate_size=model.layers[0].mlp.hidden, hidden_act="swish", norm_eps=cfg.norm_eps,
               max_position_embeddings=cfg.max_seq_len, use_short_conv=b.use_short_conv,
               conv_size=b.conv_size, num_heads=b.heads, fuse_norm=True)
    if arch == "GLAForCausalLM":
        if b.gate_low_rank_dim != 16:
            raise refuse("block_options.gla.gate_low_rank_dim", b.gate_low_rank_dim,
                         "FLA's GLA model uses 16")
        if b.gate_logit_normalizer != 16:
            raise refuse("block_options.gla.gate_logit_normalizer", b.gate_logit_normalizer,
                         "FLA's GLA model uses 16")
        return dict(out, expand_k=b.expand_k, expand_v=b.expand_v, use_output_gate=True,
                    clamp_min=b.gate_min)
    return dict(out, head_dim=b.head_dim, expand_v=b.expand_v, use_gate=b.use_output_gate,
                allow_neg_eigval=b.allow_neg_eigval)


# ----------------------------------------------------------------------------- parameter maps


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One of our parameters (dotted path) <-> one or more HF tensors."""

    ours: str
    hf: tuple[str, ...]
    kind: str  # "copy" | "linear" (transpose) | "conv" (depthwise [C, 1, W] <-> [W, C])


def _to_ours(rule: _Rule, tensors: list[np.ndarray]) -> np.ndarray:
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "linear":
        return tensors[0].T  # torch [out, in] -> [in, out]
    # each [C_i, 1, W] -> [W, C_i], concatenated over channels (q | k | v)
    return np.concatenate([t.reshape(t.shape[0], t.shape[-1]).T for t in tensors], axis=1)


def _to_hf(rule: _Rule, value: np.ndarray, widths: Sequence[int]) -> list[np.ndarray]:
    if rule.kind == "copy":
        return [value]
    if rule.kind == "linear":
        return [np.ascontiguousarray(value.T)]
    cuts = np.cumsum(widths)[:-1]
    # [W, C] -> per part [C_i, 1, W]
    return [np.ascontiguousarray(part.T[:, None, :]) for part in np.split(value, cuts, axis=1)]


def _rules(config: Any, arch: str, present: Callable[[str], bool] | None = None) -> list[_Rule]:
    """Every parameter of an ``LMModel`` with ``config`` and its HF tensor name(s).

    ``present(name)`` says whether the checkpoint holds a tensor (picks among naming
    variants: FLA's unfused ``g_norm``, an old ``backbone.embedding``); None when saving.
    """
    b = config.block_config(ARCHITECTURES[arch][1])
    has = present or (lambda name: False)
    rules: list[_Rule] = []
    mamba = arch in ("MambaForCausalLM", "Mamba2ForCausalLM")
    root = "backbone" if mamba else "model"
    emb = f"{root}.embeddings.weight"
    if mamba and not has(emb) and has(f"{root}.embedding.weight"):
        emb = f"{root}.embedding.weight"
    rules.append(_Rule("embed.embedding", (emb,), "copy"))
    rules.append(_Rule("norm.scale", (f"{root}.norm_f.weight" if mamba else f"{root}.norm.weight",), "copy"))
    if not config.tie_embeddings:
        rules.append(_Rule("lm_head.kernel", ("lm_head.weight",), "linear"))
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}", f"{root}.layers.{i}"

        def add(o: str, h: str | tuple[str, ...], kind: str = "copy", ours=ours, hf=hf) -> None:
            names = (h,) if isinstance(h, str) else h
            rules.append(_Rule(f"{ours}.{o}", tuple(f"{hf}.{n}" for n in names), kind))

        if mamba:
            add("norm1.scale", "norm.weight")
            m = "mixer"
            add("mixer.in_proj.kernel", f"{m}.in_proj.weight", "linear")
            add("mixer.out_proj.kernel", f"{m}.out_proj.weight", "linear")
            if b.bias:
                add("mixer.in_proj.bias", f"{m}.in_proj.bias")
                add("mixer.out_proj.bias", f"{m}.out_proj.bias")
            add("mixer.A_log", f"{m}.A_log")
            add("mixer.D", f"{m}.D")
            conv = "mixer.conv_" if arch == "MambaForCausalLM" else "mixer.conv.conv_"
            add(conv + "weight", f"{m}.conv1d.weight", "conv")
            if b.conv_bias:
                add(conv + "bias", f"{m}.conv1d.bias")
            if arch == "MambaForCausalLM":
                add("mixer.x_proj.kernel", f"{m}.x_proj.weight", "linear")
                add("mixer.dt_proj.kernel", f"{m}.dt_proj.weight", "linear")
                add("mixer.dt_proj.bias", f"{m}.dt_proj.bias")
            else:
                add("mixer.dt_bias", f"{m}.dt_bias")
                add("mixer.norm.scale", f"{m}.norm.weight")
            continue
        add("norm1.scale", "attn_norm.weight")
        add("norm2.scale", "mlp_norm.weight")
        for ours_name, hf_name in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            add(f"mlp.{ours_name}.kernel", f"mlp.{hf_name}.weight", "linear")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(f"mixer.{p}.kernel", f"attn.{p}.weight", "linear")
        if b.use_short_conv:
            add("mixer.conv.conv_weight", tuple(f"attn.{c}_conv1d.weight" for c in "qkv"), "conv")
        if arch == "GLAForCausalLM":
            add("mixer.g_proj.kernel", "attn.g_proj.weight", "linear")
            add("mixer.gate_down", "attn.gk_proj.0.weight", "linear")
            add("mixer.gate_up", "attn.gk_proj.1.weight", "linear")
            add("mixer.gate_bias", "attn.gk_proj.1.bias")
            fused = not has(f"{hf}.attn.g_norm.weight")
            add("mixer.norm.scale", "attn.g_norm_swish_gate.weight" if fused else "attn.g_norm.weight")
        else:
            if b.use_output_gate:
                add("mixer.g_proj.kernel", "attn.g_proj.weight", "linear")
            for p in ("a_proj", "b_proj"):
                add(f"mixer.{p}.kernel", f"attn.{p}.weight", "linear")
            add("mixer.A_log", "attn.A_log")
            add("mixer.dt_bias", "attn.dt_bias")
            add("mixer.norm.scale", "attn.o_norm.weight")
    return rules


def _conv_widths(config: Any, arch: str) -> list[int]:
    """Channel widths of the HF convs folded into one of ours (q, k, v for FLA)."""
    b = config.block_config(ARCHITECTURES[arch][1])
    if arch in ("GLAForCausalLM", "GatedDeltaNetForCausalLM"):
        return [b.key_dim, b.key_dim, b.value_dim]
    return [b.d_inner if arch == "MambaForCausalLM" else b.conv_dim]


def _flat_params(model: Any) -> tuple[Any, dict[str, Any]]:
    """``(state, dotted path -> nnx.Param)`` of every parameter of ``model``."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    return state, {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------- load / save


def _open(path: str | os.PathLike, dtype: str) -> tuple[Any, dict[str, Any], _Weights]:
    from linearnexus.core.types import FLOAT_DTYPES

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype!r}")
    folder = resolve_path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"path: no config.json in {folder}")
    raw = json.loads(config_file.read_text())
    weights = _Weights(_weight_files(folder))  # reads the headers only
    return model_config_from_hf(raw, shapes=weights.shapes, dtype=dtype), raw, weights


def pretrained_config(path: str | os.PathLike, *, dtype: str = "float32") -> Any:
    """The :class:`~linearnexus.models.ModelConfig` :func:`from_pretrained` would build
    (reads ``config.json`` and the safetensors headers, no weights).

    Raises:
        As :func:`from_pretrained`.
    """
    return _open(path, dtype)[0]


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32") -> Any:
    """Load a Hugging Face checkpoint as an :class:`~linearnexus.models.LMModel`.

    Args:
        path: a folder with ``config.json`` and ``*.safetensors`` (sharded or not), or a hub
            repo id (``owner/name``) when ``huggingface_hub`` is installed and online.
        dtype: compute dtype ("float32", "bfloat16", "float16", "float64"); parameters are
            kept in float32 (float64 for a float64 model) whatever the file's dtype.

    Returns:
        The model; ``model.config`` is its :class:`~linearnexus.models.ModelConfig`.

    Raises:
        FileNotFoundError: no such folder / files (or the hub id cannot be fetched).
        UnsupportedCheckpointError: an unknown architecture, a config field that cannot be
            mapped exactly, or tensors missing, unexpected or of the wrong shape (named).
    """
    import jax.numpy as jnp
    from flax import nnx

    from linearnexus.models import LMModel

    config, raw, weights = _open(path, dtype)
    arch = _architecture(raw)
    model = nnx.eval_shape(lambda: LMModel(config, rngs=nnx.Rngs(0)))  # shapes only, no init compute
    state, params = _flat_params(model)
    missing = []
    for rule in _rules(config, arch, present=weights.__contains__):
        absent = [n for n in rule.hf if n not in weights]
        if absent:
            missing.extend(absent)
            continue
        value = _to_ours(rule, [weights.get(n) for n in rule.hf])
        var = params.pop(rule.ours)
        if tuple(value.shape) != tuple(var.shape):
            raise UnsupportedCheckpointError(
                f"checkpoint: {', '.join(rule.hf)} gives shape {tuple(value.shape)} for {rule.ours}, "
                f"expected {tuple(var.shape)} from config.json")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    if missing:
        raise UnsupportedCheckpointError(f"checkpoint: missing tensors {missing[:8]}"
                                         f"{' ...' if len(missing) > 8 else ''}")
    if params:  # a parameter of ours no rule covers: a bug in the map, never silently random
        raise UnsupportedCheckpointError(f"checkpoint: no tensor mapped to {sorted(params)[:8]}")
    unused = sorted(set(weights.shapes) - weights.used
                    - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if unused:
        raise UnsupportedCheckpointError(
            f"checkpoint: tensors this architecture does not use: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''} (a config.json field may not match the weights)")
    nnx.update(model, state)
    return model


def save_pretrained(model: Any, path: str | os.PathLike, *, tokenizer: Any = None,
                    max_shard_size: int = 5 * 1024**3) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (``config.json`` + safetensors).

    Loadable with transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` or FLA's
    ``GLAForCausalLM`` / ``GatedDeltaNetForCausalLM`` (and :func:`from_pretrained`).
    Tensors are written in float32 (float64 for a float64 model is cast to float32).
    Files are written under temporary names and renamed, ``config.json`` last, so a
    failed save leaves no half-written checkpoint under the final names.

    Args:
        model: an :class:`~linearnexus.models.LMModel` of one block type (mamba, mamba2,
            gla or gated_deltanet).
        path: output folder (created).
        tokenizer: optional; an HF-``tokenizers``-based tokenizer (``BPETokenizer``,
            ``PretrainedTokenizer``) also written as ``tokenizer.json``.
        max_shard_size: largest shard in bytes; more than that is split into
            ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``.

    Returns:
        The folder.

    Raises:
        UnsupportedCheckpointError: the model cannot be expressed in the target format (names
            the setting). ValueError: ``max_shard_size < 1``.
    """
    from safetensors.numpy import save_file

    if max_shard_size < 1:
        raise ValueError(f"max_shard_size: must be >= 1, got {max_shard_size}")
    from linearnexus.data import PretrainedTokenizer  # BPETokenizer is one too

    if tokenizer is not None and not isinstance(tokenizer, PretrainedTokenizer):
        raise ValueError(f"tokenizer: expected a BPETokenizer or PretrainedTokenizer (HF's "
                         f"tokenizer.json format), got {type(tokenizer).__name__}")
    config_dict = hf_config(model)  # refuses before anything is written
    cfg = model.config
    arch = config_dict["architectures"][0]
    _, params = _flat_params(model)
    tensors: dict[str, np.ndarray] = {}
    for rule in _rules(cfg, arch):
        value = np.asarray(params[rule.ours][...], dtype=np.float32)
        for name, part in zip(rule.hf, _to_hf(rule, value, _conv_widths(cfg, arch)), strict=True):
            tensors[name] = np.ascontiguousarray(part)
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for old in folder.glob("model*.safetensors*"):  # stale shards of an earlier save
        if old.name not in names:
            old.unlink()
    for name, shard in zip(names, shards, strict=True):
        tmp = folder / f".{name}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": {n: names[i] for i, s in enumerate(shards) for n in s}}
        _write_json(folder / "model.safetensors.index.json", index)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
    _write_json(folder / "config.json", config_dict)
    return folder


def _write_json(path: Path, obj: Any) -> None:
    from linearnexus.core.fileio import atomic_write_text

    # allow_nan: transformers reads a plain JSON ``Infinity`` (Mamba2's time_step_limit)
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's ``tokenizer.json`` as a :class:`~linearnexus.data.PretrainedTokenizer`.

    The end-of-text id comes from ``config.json``'s ``eos_token_id`` when set, else from
    the tokenizer's special tokens.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in the folder (or the hub id cannot be fetched).
    """
    from linearnexus.data import PretrainedTokenizer

    folder = resolve_path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"path: no tokenizer.json in {folder} (the tokenizer must be in "
                                "HF tokenizers' JSON format)")
    eos = None
    if (folder / "config.json").is_file():
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
    return PretrainedTokenizer.load(file, eos_id=eos)
