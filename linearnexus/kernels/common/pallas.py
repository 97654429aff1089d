"""What every Pallas (Triton-lowered) kernel of the library shares.

* :class:`TritonConfig`: the launch knobs of one kernel (block sizes, warps, stages), typed
  and validated, with ``None`` meaning "the kernel's heuristic decides".
* :func:`interpret_mode`: kernels run compiled through Triton on an NVIDIA GPU and in
  Pallas interpret mode everywhere else (the CPU in CI), so the same kernel code is what the
  tests check.
* :func:`compiler_params`: ``num_warps`` / ``num_stages`` in the form the installed JAX
  takes (the class moved between JAX versions; the library supports JAX 0.10 and 0.11).
* :func:`named_pallas_call`: ``pl.pallas_call`` with operands bound to the kernel's
  ``<name>_ref`` parameters by name (optional operands are None), not unpacked by position.
* :func:`with_reference_vjp`: a forward-only kernel made differentiable through its plain-JAX
  reference's backward pass.

Pallas's Triton lowering wants power-of-two block shapes, ``jnp.dot`` operands of at least
16 x 16, and no dynamic indexing of values (only of refs, with ``pl.ds``); kernels pad
inputs to whole blocks in their JAX glue instead of masking inside.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from linearnexus.kernels.base import current_platform

#: set to "1" to force interpret mode (e.g. to debug a kernel on a GPU machine), "0" to
#: force compilation
INTERPRET_ENV = "LINEARNEXUS_PALLAS_INTERPRET"


def interpret_mode() -> bool:
    """True unless running on a GPU (or ``LINEARNEXUS_PALLAS_INTERPRET=0``)."""
    forced = os.environ.get(INTERPRET_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return current_platform() != "gpu"


def binary_switch(name: str) -> bool:
    """An opt-in switch read from the environment variable ``name`` (at trace time where a
    kernel's caller reads it): "1" on, "0" or unset off.

    Raises:
        ValueError: any other value, naming the variable.
    """
    raw = os.environ.get(name, "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{name}: expected '0' or '1', got {raw!r}")
    return raw == "1"


def compiler_params(num_warps: int | None, num_stages: int | None) -> Any:
    """Triton compiler parameters for ``pl.pallas_call(compiler_params=...)``."""
    from jax.experimental.pallas import triton as pl_triton

    cls = getattr(pl_triton, "CompilerParams", None) or pl_triton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch knobs of one Pallas kernel. ``None`` fields are filled by the kernel's heuristic.

    Attributes:
        chunk: tokens per chunk (L), a power of two >= 16 (chunked ops) or tokens per tile
            (the selective scan).
        block_k: key-dimension columns per program (power of two >= 16).
        block_v: value-dimension columns per program (power of two >= 16).
        num_warps: Triton warps per program (1, 2, 4, 8 or 16).
        num_stages: software-pipelining depth of the kernels' loops (>= 1).
        par_block_k: key-dimension columns per program of the chunked core's parallel
            kernels (``fwd_o``, ``bwd_dv``, ``bwd_dqk``: simple_gla and the delta rules; power
            of two >= 16). Other kernels take none and reject it.
    """

    chunk: int | None = None
    block_k: int | None = None
    block_v: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    par_block_k: int | None = None

    def __post_init__(self) -> None:
        for name in ("chunk", "block_k", "block_v", "par_block_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not _is_pow2(value) or value < 16):
                raise ValueError(f"{name}: expected a power of two >= 16 or None, got {value!r}")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16 or None, got {self.num_warps!r}")
        if self.num_stages is not None and (not isinstance(self.num_stages, int)
                                            or self.num_stages < 1):
            raise ValueError(f"num_stages: expected a positive int or None, got {self.num_stages!r}")

    def merged(self, default: TritonConfig) -> TritonConfig:
        """This config with its ``None`` fields taken from ``default``."""
        return TritonConfig(**{f.name: (getattr(self, f.name) if getattr(self, f.name) is not None
                                        else getattr(default, f.name))
                               for f in dataclasses.fields(self)})


def pad_axis(x: Any, axis: int, size: int) -> Any:
    """``x`` zero-padded at the end of ``axis`` to ``size`` (None and right-sized arrays pass
    through: no copy)."""
    if x is None or x.shape[axis] == size:
        return x
    import jax.numpy as jnp

    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def next_pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def named_pallas_call(kernel: Callable[..., None], *, inputs: Mapping[str, Any],
                      outputs: Mapping[str, Any], in_specs: Mapping[str, Any] | None = None,
                      out_specs: Mapping[str, Any] | None = None,
                      aliases: Mapping[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``pl.pallas_call`` whose operands are bound to the kernel by name, not by position.

    The kernel is called with one keyword argument ``<name>_ref`` per entry of ``inputs``
    and ``outputs``; an entry whose value is None is an operand this launch does not have,
    and its ``<name>_ref`` is None. So a kernel declares every operand it may take in its
    signature, and adding an operand to a launch cannot shift the others.

    Args:
        kernel: the kernel body, e.g. ``functools.partial(_fwd_kernel, st=st)``; its name
            (or ``kwargs["name"]``) names the launch.
        inputs: name -> array (or None), in the order the launch passes them.
        outputs: name -> ``jax.ShapeDtypeStruct`` (or None).
        in_specs / out_specs: name -> ``BlockSpec`` for every present operand, or None for
            whole-array blocks.
        aliases: input name -> output name whose buffer it becomes.
        kwargs: passed to ``pl.pallas_call`` (grid, interpret, compiler_params, ...).

    Returns:
        output name -> array (None for the absent ones).
    """
    from jax.experimental import pallas as pl

    clash = set(inputs) & set(outputs)
    if clash:
        raise ValueError(f"named_pallas_call: names {sorted(clash)} are both inputs and outputs")
    in_names = [n for n, a in inputs.items() if a is not None]
    out_names = [n for n, s in outputs.items() if s is not None]
    absent = {f"{n}_ref": None for n, a in (*inputs.items(), *outputs.items()) if a is None}
    bound = [f"{n}_ref" for n in (*in_names, *out_names)]

    def body(*refs: Any) -> None:
        kernel(**dict(zip(bound, refs, strict=True)), **absent)

    if in_specs is not None:
        kwargs["in_specs"] = [in_specs[n] for n in in_names]
    if out_specs is not None:
        kwargs["out_specs"] = [out_specs[n] for n in out_names]
    if aliases:
        kwargs["input_output_aliases"] = {in_names.index(i): out_names.index(o)
                                          for i, o in aliases.items()}
    kwargs.setdefault("name", getattr(kernel, "func", kernel).__name__)
    results = pl.pallas_call(body, out_shape=[outputs[n] for n in out_names], **kwargs)(
        *(inputs[n] for n in in_names))
    named = dict(zip(out_names, results, strict=True))
    return {n: named.get(n) for n in outputs}


def with_reference_vjp(kernel: Callable[..., Any], reference: Callable[..., Any],
                       *args: Any) -> Any:
    """``kernel(*args)``, differentiated as ``reference(*args)`` is.

    For the one-token kernels (decode steps), which have no backward pass of their own:
    ``reference`` takes the same arguments and returns the same outputs (pytrees; None
    leaves allowed), and the backward pass is ``jax.vjp`` of it at the saved arguments.
    """
    import jax  # here: importing this module must not start JAX's backend

    @jax.custom_vjp
    def run(*args):
        return kernel(*args)

    def run_fwd(*args):
        return kernel(*args), args

    def run_bwd(res, ct):
        return jax.vjp(reference, *res)[1](ct)

    run.defvjp(run_fwd, run_bwd)
    return run(*args)
