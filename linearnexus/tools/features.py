"""The README's mechanism table, generated from the registries.

    python -m linearnexus.tools.features            # rewrite the table in README.md
    python -m linearnexus.tools.features --check    # exit 1 when README.md is stale

One row per mechanism and backend (``KERNEL_REGISTRY``), then one per block that runs no
registered op (attention, MLA). Every cell is read from the code, not written by hand:

* modes: the backend's ``modes`` attribute when it has one (the one-token kernels),
  else the kernel-protocol methods it implements (``forward_chunk`` -> chunk,
  ``forward_recurrent`` -> recurrent);
* automatic on: the platforms where automatic dispatch picks this backend first (its
  ``supports`` in the op's ``BACKEND_ORDER``), for float32 inputs;
* dtypes: what ``supports`` accepts on the backend's own platform (``by_name_dtypes`` for
  a backend used by name only);
* a backend's ``status`` attribute, when it has one, follows its name (e.g. how far it is
  verified);
* varlen: whether the op's api takes ``cu_seqlens``;
* decode: the registered blocks built on the op (their ``op`` attribute) and how their
  decoding state grows, measured on ``init_state`` of their ``tiny()`` config at two
  ``max_seq_len`` values.

The table sits between ``<!-- features:start -->`` and ``<!-- features:end -->``;
``tests/test_toolbox.py`` fails when it is stale.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from linearnexus.registry import KERNEL_REGISTRY, LAYER_REGISTRY, OP_REGISTRY, kernels_for

START, END = "<!-- features:start -->", "<!-- features:end -->"
README = Path(__file__).resolve().parents[2] / "README.md"
PLATFORMS = ("cpu", "gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _backend_order(op: str) -> tuple[str, ...]:
    """The op's automatic preference order (ops re-using another op's backends use its order)."""
    module = sys.modules[OP_REGISTRY[op].__module__]
    order = getattr(module, "BACKEND_ORDER", None)
    if order is not None:
        return tuple(order)
    for other in OP_REGISTRY:
        other_module = sys.modules[OP_REGISTRY[other].__module__]
        if (getattr(other_module, "BACKENDS", None) is getattr(module, "BACKENDS", 0)
                and hasattr(other_module, "BACKEND_ORDER")):
            return tuple(other_module.BACKEND_ORDER)
    raise LookupError(f"op {op!r}: no BACKEND_ORDER in {module.__name__} or an op sharing its backends")


def _auto_platforms(op: str, backend: str) -> list[str]:
    """Platforms where dispatch picks ``backend`` by itself, each followed by the dtypes it
    is picked for when that is fewer than the backend supports there (e.g. mosaic takes
    bfloat16 on a GPU while float32 stays with pallas)."""
    backends = kernels_for(op)
    order = _backend_order(op)
    picked = []
    for platform in PLATFORMS:
        chosen = []
        for dtype in DTYPES:
            for name in order:  # dispatch's rule: the first that supports the call, the last always
                if name == order[-1] or backends[name].supports(platform=platform, dtype=dtype):
                    if name == backend:
                        chosen.append(jnp.dtype(dtype).name)
                    break
        if not chosen:
            continue
        own = [jnp.dtype(d).name for d in DTYPES
               if backends[backend].supports(platform=platform, dtype=d)]
        picked.append(platform if chosen == own or not own else
                      f"{platform} ({', '.join(chosen)})")
    return picked


def _dtypes(kernel: Any) -> list[str]:
    named = getattr(kernel, "by_name_dtypes", None)  # a backend picked by name only
    if named:
        return [jnp.dtype(d).name for d in named]
    # the first platform it runs anything on (mosaic takes no float32, so not float32's)
    native = next((p for p in PLATFORMS if any(kernel.supports(platform=p, dtype=d)
                                               for d in DTYPES)), "cpu")
    return [jnp.dtype(d).name for d in DTYPES if kernel.supports(platform=native, dtype=d)]


def _state_growth(name: str) -> str:
    """How a block's decoding state grows with the context it can hold."""
    import jax

    layer_cls, config_cls = LAYER_REGISTRY[name]

    def state_size(**overrides: Any) -> int:
        from flax import nnx

        block = layer_cls(config_cls.tiny(**overrides), rngs=nnx.Rngs(0))
        shapes = jax.eval_shape(lambda: block.init_state(1))
        return sum(int(leaf.size) for leaf in jax.tree.leaves(shapes))

    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "max_seq_len" not in fields:
        return "fixed-size state"
    base = config_cls.tiny().max_seq_len
    return ("fixed-size state" if state_size(max_seq_len=base) == state_size(max_seq_len=2 * base)
            else "cache grows with max_seq_len")


def _blocks_by_op() -> dict[Any, list[str]]:
    found: dict[Any, list[str]] = {}
    for name, (layer_cls, _) in LAYER_REGISTRY.items():
        op = getattr(layer_cls, "op", None)
        found.setdefault(op, []).append(name)
    return found


def feature_table() -> str:
    """The markdown table (no markers)."""
    by_op = _blocks_by_op()
    growth = {name: _state_growth(name) for name in LAYER_REGISTRY}
    lines = ["| mechanism | backend | modes | automatic on | dtypes | varlen (`cu_seqlens`) | "
             "decode: blocks (state) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for op in sorted(OP_REGISTRY):
        fn = OP_REGISTRY[op]
        varlen = "yes" if "cu_seqlens" in inspect.signature(fn).parameters else "no"
        blocks = by_op.get(fn, [])
        decode = ", ".join(f"`{b}` ({growth[b]})" for b in blocks) or "op only (no block)"
        reference = KERNEL_REGISTRY[f"{op}:reference"]
        for backend, kernel in sorted(kernels_for(op).items()):
            modes = list(getattr(kernel, "modes", ())) or [
                m for m, meth in (("chunk", "forward_chunk"), ("recurrent", "forward_recurrent"))
                if callable(getattr(kernel, meth, None))]
            label = f"`{backend}`" + (" (reference)" if kernel is reference else "")
            status = getattr(kernel, "status", None)
            if status:
                label += f" ({status})"
            auto = ", ".join(_auto_platforms(op, backend)) or "by name only"
            lines.append(f"| `{op}` | {label} | {', '.join(modes)} | {auto} | "
                         f"{', '.join(_dtypes(kernel))} | {varlen} | {decode} |")
    for name in by_op.get(None, []):
        layer_cls = LAYER_REGISTRY[name].block
        call = inspect.signature(layer_cls.__call__).parameters
        varlen = "yes" if "cu_seqlens" in call else "no"
        lines.append(f"| `{name}` block | in the block (JAX) | one form (`mode` accepted) | all | "
                     f"any float | {varlen} | `{name}` ({growth[name]}) |")
    return "\n".join(lines)


def render(text: str, table: str) -> str:
    """``text`` with the table between the markers replaced.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"README: expected the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearnexus.tools.features",
                                     description="Write the README's mechanism table from the registries.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README is stale")
    parser.add_argument("--readme", type=Path, default=README, help="the file to update")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = render(text, feature_table())
    if args.check:
        if new != text:
            print(f"{args.readme}: the feature table is stale; run python -m linearnexus.tools.features")
            return 1
        print(f"{args.readme}: the feature table is up to date")
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"{args.readme}: feature table updated")
    else:
        print(f"{args.readme}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
