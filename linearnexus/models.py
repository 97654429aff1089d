"""Language models built from any registered blocks: GPT, pure SSM / linear, and hybrids.

One class covers them all. ``ModelConfig.block_pattern`` names blocks from
``LAYER_REGISTRY``; the pattern repeats to ``n_layers``. Each layer is pre-norm::

    x = x + mixer(norm1(x))          # attention, mamba, mla, ... (state in, state out)
    x = x + mlp(norm2(x))            # SwiGLU, when config.mlp (GPT-style stacks)

and the model is ``embed -> layers -> final norm -> head`` (head tied to the embedding
when ``tie_embeddings``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.core.config import ConfigBase, ConfigError, field
from linearnexus.core.mode import KernelMode
from linearnexus.core.padding import validate_mask
from linearnexus.core.types import FLOAT_DTYPES, Array
from linearnexus.modules.common import Embedding, RMSNorm, SwiGLU, norm_foldable
from linearnexus.registry import LAYER_REGISTRY, MODEL_REGISTRY

ModelState = tuple[Any, ...]  # one block state per layer


@dataclasses.dataclass
class ModelConfig(ConfigBase):
    """A language model: sizes, which blocks, and per-block options.

    Attributes:
        vocab_size: number of token ids (set from the tokenizer by the trainer).
        d_model: residual width D.
        n_layers: number of layers; ``block_pattern`` repeats (and is cut) to this length.
        block_pattern: block names from ``LAYER_REGISTRY``, e.g. ``("mamba", "mamba", "attention")``.
        block_options: per block name, overrides of that block's config
            (e.g. ``{"attention": {"n_heads": 4}}``); d_model, dtypes and max_seq_len come
            from this config.
        mlp: add a SwiGLU MLP after every mixer (GPT style). Mamba stacks use False: the
            Mamba mixer has its own expansion.
        mlp_hidden: MLP hidden width; None = 8/3 * D rounded up to a multiple of 64.
        tie_embeddings: reuse the embedding matrix as the output head.
        norm_eps: RMSNorm epsilon.
        max_seq_len: longest context (attention KV-cache slots).
        dtype / param_dtype: compute and parameter dtypes.
        residual_in_fp32: keep the residual stream (embedding output and every layer's
            sum) in float32 when the compute dtype is lower (Mamba's ``residual_in_fp32``);
            the blocks still compute in ``dtype``.
    """

    vocab_size: int = field(256, gt=0)
    d_model: int = field(128, gt=0)
    n_layers: int = field(4, gt=0)
    block_pattern: tuple[str, ...] = ("attention",)
    block_options: dict = field(default_factory=dict)
    mlp: bool = True
    mlp_hidden: int | None = field(None, gt=0)
    tie_embeddings: bool = True
    norm_eps: float = field(1e-5, gt=0)
    max_seq_len: int = field(1024, gt=0)
    dtype: str = field("float32", choices=FLOAT_DTYPES)
    param_dtype: str = field("float32", choices=FLOAT_DTYPES)
    residual_in_fp32: bool = False

    def validate(self) -> None:
        if not self.block_pattern:
            raise ConfigError("block_pattern: expected at least one block name, got ()")
        registered = sorted(LAYER_REGISTRY)
        for name in self.block_pattern:
            if name not in LAYER_REGISTRY:
                raise ConfigError(
                    f"block_pattern: block {name!r} is not available (registered blocks: "
                    f"{', '.join(registered)})")
        for name, options in self.block_options.items():
            if name not in LAYER_REGISTRY:
                raise ConfigError(f"block_options: no block named {name!r} (registered: {registered})")
            if not isinstance(options, dict):
                raise ConfigError(f"block_options.{name}: expected a mapping, got {options!r}")
        # build every block's config once, so a bad combination (e.g. n_heads not dividing
        # d_model) fails here, naming the field, instead of when the model is built
        for name in dict.fromkeys((*self.block_pattern, *self.block_options)):
            try:
                self.block_config(name)
            except ConfigError as e:
                raise ConfigError(f"block_options.{name}.{e}") from None

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The block name of every layer (the pattern repeated to n_layers)."""
        reps = -(-self.n_layers // len(self.block_pattern))
        return (tuple(self.block_pattern) * reps)[: self.n_layers]

    def block_config(self, name: str) -> Any:
        """The config of block ``name`` as this model builds it."""
        config_cls = LAYER_REGISTRY[name].config
        base: dict[str, Any] = {"d_model": self.d_model, "dtype": self.dtype,
                                "param_dtype": self.param_dtype}
        if "max_seq_len" in config_cls.field_names():
            base["max_seq_len"] = self.max_seq_len
        return config_cls.from_dict({**base, **self.block_options.get(name, {})})


@functools.cache
def _takes_input_norm_type(cls: type) -> bool:
    return "input_norm" in inspect.signature(cls.__call__).parameters


def _takes_input_norm(block: nnx.Module) -> bool:
    """Whether ``block`` takes ``input_norm=`` (an :class:`RMSNorm` it applies to its input
    first, folding it into its input projection where it can)."""
    return _takes_input_norm_type(type(block))


class Layer(nnx.Module):
    """Pre-norm residual layer around one mixer block and an optional MLP."""

    def __init__(self, config: ModelConfig, block_name: str, *, rngs: nnx.Rngs) -> None:
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        entry = LAYER_REGISTRY[block_name]
        self.norm1 = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype, param_dtype=pdtype)
        self.mixer = entry.block(config.block_config(block_name), rngs=rngs)
        if config.mlp:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype, param_dtype=pdtype)
            self.mlp = SwiGLU(config.d_model, config.mlp_hidden, dtype=dtype, param_dtype=pdtype,
                              rngs=rngs)
        else:
            self.norm2 = None
            self.mlp = None

    def __call__(self, x: Array, *, state: Any, mask: Array | None,
                 mode: KernelMode | str | None) -> tuple[Array, Any]:
        whole = getattr(self.mixer, "persistent_layer", None)
        if whole is not None and mask is None:
            # batch-1 decoding on a GPU with LINEARNEXUS_DECODE_PERSISTENT=1: the whole
            # layer in one persistent kernel (kernels/fused_decode/persistent.py) where the
            # block has one for this layer (DeltaNet family + MLP, Mamba2 without)
            done = whole(x, state, self.norm1, self.mlp, self.norm2)
            if done is not None:
                return done
        if (mask is None and x.ndim == 3 and x.shape[1] == 1 and _takes_input_norm(self.mixer)
                and norm_foldable(x, self.norm1, self.norm1.dtype or x.dtype)):
            # one-token decoding on a GPU (batch 1, or up to LINEARNEXUS_DECODE_ROWS): the
            # mixer folds the pre-norm into its input projection's kernel (one launch
            # instead of three)
            h, new_state = self.mixer(x, state=state, mask=mask, mode=mode, input_norm=self.norm1)
        else:
            h, new_state = self.mixer(self.norm1(x), state=state, mask=mask, mode=mode)
        if self.mlp is not None:  # (x + h) + mlp(norm2(x + h)); see SwiGLU.residual_step
            return self.mlp.residual_step(x, h, self.norm2), new_state
        return x + h, new_state


class LMModel(nnx.Module):
    """``tokens [B, T] -> logits [B, T, V]`` with per-layer states in and out."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected ModelConfig, got {type(config).__name__}")
        self.config = config
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embed = Embedding(config.vocab_size, config.d_model, dtype=dtype, param_dtype=pdtype,
                               rngs=rngs)
        self.layers = nnx.List([Layer(config, name, rngs=rngs) for name in config.layer_types])
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype, param_dtype=pdtype)
        self.lm_head = (None if config.tie_embeddings else
                        nnx.Linear(config.d_model, config.vocab_size, use_bias=False, dtype=dtype,
                                   param_dtype=pdtype, rngs=rngs))

    def init_state(self, batch_size: int) -> ModelState:
        """Zero states of every layer's block (KV caches, conv caches, scan states)."""
        return tuple(layer.mixer.init_state(batch_size) for layer in self.layers)

    def __call__(
        self,
        tokens: Array,
        *,
        state: ModelState | None = None,
        mask: Array | None = None,
        mode: KernelMode | str | None = None,
    ) -> tuple[Array, ModelState]:
        """Run the model.

        Args:
            tokens: ``[B, T]`` integer ids in ``[0, vocab_size)``.
            state: from ``init_state`` or a previous call (one entry per layer); None = empty.
            mask: optional ``[B, T]`` padding mask (True = real token), e.g. left-padded prompts.
            mode: CHUNK / RECURRENT / None (each block picks by length).

        Returns:
            ``(logits [B, T, V] float32 (float64 for a float64 model), new_state)``.

        Raises:
            ValueError / TypeError: bad tokens, mask or state.
        """
        if not hasattr(tokens, "ndim") or tokens.ndim != 2:
            raise ValueError(f"tokens: expected rank 2 [B, T], got shape {getattr(tokens, 'shape', None)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: expected an integer dtype, got {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens: sequence length T must be >= 1, got shape {tokens.shape}")
        _check_token_range(tokens, self.config.vocab_size)
        if mask is not None:
            mask = validate_mask(mask, *tokens.shape, name="mask")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state: expected {len(self.layers)} layer states, got {len(state)}")
        x, new_state = self._trunk(tokens, state=state, mask=mask, mode=mode)
        if self.lm_head is None:  # the final norm runs in the tied head's kernel (decoding)
            logits = self.embed.attend(x, norm=self.norm)
            return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), new_state
        return self.logits(self.norm(x)), new_state

    def hidden_states(self, tokens: Array, *, state: ModelState | None = None,
                      mask: Array | None = None, mode: KernelMode | str | None = None
                      ) -> tuple[Array, ModelState]:
        """The trunk alone (embed -> layers -> final norm): ``(hidden [B, T, D], new_state)``.

        For heads other than the LM head (e.g. an RL value head); inputs are not checked
        here (``__call__`` checks them)."""
        x, new_state = self._trunk(tokens, state=state, mask=mask, mode=mode)
        return self.norm(x), new_state

    def _trunk(self, tokens: Array, *, state: ModelState | None, mask: Array | None,
               mode: KernelMode | str | None) -> tuple[Array, ModelState]:
        """Embed and layers, before the final norm: ``(x [B, T, D], new_state)``."""
        x = self.embed(tokens)  # [B, T, D]
        if self.config.residual_in_fp32:
            x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, state=None if state is None else state[i], mask=mask, mode=mode)
            new_states.append(s)
        return x, tuple(new_states)

    def logits(self, hidden: Array) -> Array:
        """The LM head: ``hidden [B, T, D] -> logits [B, T, V]`` (at least float32)."""
        logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def num_params(self) -> int:
        """Number of parameters (tied head counted once)."""
        params = nnx.state(self, nnx.Param)
        return sum(int(p.size) for p in jax.tree.leaves(params))


def _check_token_range(tokens: Array, vocab_size: int) -> None:
    """Raise for ids outside ``[0, vocab_size)``; only possible outside ``jit`` (concrete ids)."""
    try:
        ids = np.asarray(tokens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"tokens: ids must be in [0, {vocab_size}), got min {lo}, max {hi}")


def create_model(config: ModelConfig | str, *, seed: int = 0, rngs: nnx.Rngs | None = None,
                 **overrides: Any) -> LMModel:
    """Build an :class:`LMModel` from a config or a preset name (with field overrides)."""
    if isinstance(config, str):
        config = get_preset(config)
    if overrides:
        config = config.replace(**overrides)
    return LMModel(config, rngs=rngs if rngs is not None else nnx.Rngs(seed))


# ---- presets -----------------------------------------------------------------------------

_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's Shakespeare-char CPU recipe size: 4 layers, 4 heads, 128 wide
    "gpt-small": dict(d_model=128, n_layers=4, block_pattern=("attention",),
                      block_options={"attention": {"n_heads": 4}}),
    # no MLP in Mamba stacks, so twice the layers for a similar parameter count
    "mamba-small": dict(d_model=128, n_layers=8, block_pattern=("mamba",), mlp=False),
    # gpt-small's layout (4 layers with a SwiGLU MLP) with Mamba2 mixers of expand 1 (E = 128,
    # 2 heads of P = 64, N = 64): 868,120 parameters against gpt-small's 861,440. On the
    # nanoGPT recipe it reached validation loss 1.592 (gpt-small 1.646; the earlier 8 MLP-less
    # layers of expand 2 trained 1.9x slower, docs/benchmarks.md "CPU training speed, round 4")
    "mamba2-small": dict(d_model=128, n_layers=4, block_pattern=("mamba2",),
                         block_options={"mamba2": {"expand": 1}}),
    "gla-small": dict(d_model=128, n_layers=4, block_pattern=("gla",)),
    "deltanet-small": dict(d_model=128, n_layers=4, block_pattern=("deltanet",)),
    # gpt-small's layout with the attention swapped for Gated DeltaNet, at its parameter count
    # (869,904 vs 861,440 with the 65-character vocabulary): values as wide as keys and no
    # output gate. On the nanoGPT recipe it reached validation loss 1.606 (gpt-small 1.646,
    # the block's defaults 1.13M parameters) at 1.5x the defaults' speed (docs/benchmarks.md)
    "gated-deltanet-small": dict(d_model=128, n_layers=4, block_pattern=("gated_deltanet",),
                                 block_options={"gated_deltanet": {"expand_v": 1.0,
                                                                   "use_output_gate": False}}),
    "retnet-small": dict(d_model=128, n_layers=4, block_pattern=("retnet",)),
    "mla-small": dict(d_model=128, n_layers=4, block_pattern=("mla",),
                      block_options={"mla": {"n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
                                             "qk_rope_head_dim": 16, "v_head_dim": 32}}),
    # two Mamba layers per attention layer
    "hybrid-small": dict(d_model=128, n_layers=6, block_pattern=("mamba", "mamba", "attention"),
                         block_options={"attention": {"n_heads": 4}}),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` as a :class:`ModelConfig` (with overrides applied).

    Overrides replace the preset's fields, except ``block_options``, which merge per block:
    ``get_preset("mamba2-small", block_options={"mamba2": {"headdim": 32}})`` keeps the
    preset's ``expand=1``. (``ModelConfig.replace`` replaces ``block_options`` whole.)

    Raises:
        KeyError: unknown preset name (lists the known ones).
        ConfigError: a bad override, e.g. a ``block_pattern`` naming an unregistered block.
    """
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**overrides)


def list_presets() -> list[str]:
    return sorted(MODEL_REGISTRY)


def preset_factory(name: str):
    """The config factory of preset ``name`` (what ``MODEL_REGISTRY[name]`` holds)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(_PRESETS)}")

    def make(**overrides: Any) -> ModelConfig:
        fields = {**_PRESETS[name], **overrides}
        # block_options merge per block over the preset's: overriding one option of a block
        # keeps the preset's others (mamba2-small's expand=1 with a headdim override)
        own, asked = _PRESETS[name].get("block_options"), overrides.get("block_options")
        if own and isinstance(asked, dict):
            fields["block_options"] = {block: {**own.get(block, {}), **dict(asked.get(block, {}))}
                                       for block in {**own, **asked}}
        # ModelConfig's validation names any block_pattern entry that is not registered
        return ModelConfig.from_dict(fields)

    return make


# Preset constants: ``create_model(GPT_SMALL)``, one per preset (``GPT_SMALL``,
# ``MAMBA_SMALL``, ``MAMBA2_SMALL``, ``GLA_SMALL``, ``DELTANET_SMALL``,
# ``GATED_DELTANET_SMALL``, ``RETNET_SMALL``, ``MLA_SMALL``, ``HYBRID_SMALL``). Built on first
# access, not at import: a ModelConfig validates its blocks through the registry, which would
# import every block and kernel module with ``linearnexus.models``. Each is one shared
# ModelConfig: treat it as read-only and derive variants with ``.replace(...)``.
_PRESET_CONSTANTS: dict[str, ModelConfig] = {}


def __getattr__(name: str) -> ModelConfig:
    preset = name.lower().replace("_", "-")
    if not name.isupper() or preset not in _PRESETS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _PRESET_CONSTANTS:
        _PRESET_CONSTANTS[name] = preset_factory(preset)()
    return _PRESET_CONSTANTS[name]


def preset_constant_name(preset: str) -> str:
    """``"gated-deltanet-small"`` -> ``"GATED_DELTANET_SMALL"``, the constant's name here."""
    return preset.upper().replace("-", "_")
