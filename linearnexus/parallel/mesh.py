"""Device meshes from a spec string, validated before anything compiles.

A spec names sizes along four axes, e.g. ``"data=2,fsdp=4"``::

    data     replicas of the weights, each on its own slice of the batch
    fsdp     the batch split as for data, and the weights and optimizer state split too
             (all-gathered per layer when used: ZeRO-3 / fully sharded data parallel)
    context  the sequence split (context parallelism, see ``parallel.context``)
    tensor   heads and the MLP hidden width split (Megatron-style tensor parallelism)

Axes not named have size 1; ``"auto"`` puts every device on ``fsdp``; ``None`` / ``""`` /
``"none"`` is one device (the mesh still has the four axes, of size 1, so sharding rules
never need to ask whether an axis exists). The mesh's axis order puts ``tensor`` innermost,
where the devices are closest (NVLink / ICI neighbours), since it communicates every layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["AXES", "BATCH_AXES", "MeshError", "make_mesh", "parse_mesh_spec", "validate_model"]

AXES = ("data", "fsdp", "context", "tensor")  # mesh axis order, outermost first
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


class MeshError(ValueError):
    """A mesh spec that cannot work (names the axis)."""


def parse_mesh_spec(spec: str | Mapping[str, int] | None, n_devices: int | None) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "context": 1, "tensor": 1}``.

    Args:
        spec: the spec string, a mapping axis -> size, ``"auto"`` (all devices on fsdp) or
            None / ``""`` / ``"none"`` (one device).
        n_devices: devices the mesh must cover (the product of the sizes must equal it,
            except for the one-device spec); None: any count (the sizes as named; not for
            ``"auto"``, whose size is the device count).

    Raises:
        MeshError: an unknown axis, a size that is not a positive integer, an axis named
            twice, or sizes whose product is not ``n_devices``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return dict.fromkeys(AXES, 1)
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if n_devices is None:
            raise MeshError("mesh: 'auto' takes its size from the device count")
        return {**dict.fromkeys(AXES, 1), "fsdp": n_devices}
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, eq, size = part.strip().partition("=")
            if not eq:
                raise MeshError(f"mesh: expected AXIS=SIZE items separated by commas (axes "
                                f"{', '.join(AXES)}), got {part.strip()!r} in {spec!r}")
            items.append((name.strip(), size.strip()))
    else:
        raise MeshError(f"mesh: expected a spec string or a mapping, got {type(spec).__name__}")
    sizes = dict.fromkeys(AXES, 1)
    seen: set[str] = set()
    for name, size in items:
        if name not in AXES:
            raise MeshError(f"mesh: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in seen:
            raise MeshError(f"mesh: axis {name!r} named twice in {spec!r}")
        seen.add(name)
        try:
            value = int(size)
        except (TypeError, ValueError):
            value = 0
        if value < 1 or str(value) != str(size).strip():
            raise MeshError(f"mesh: axis {name!r} needs a positive integer size, got {size!r}")
        sizes[name] = value
    total = math.prod(sizes.values())
    if n_devices is not None and total != n_devices:
        named = " x ".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1) or "all 1"
        raise MeshError(f"mesh: axis sizes {named} multiply to {total}, but there are "
                        f"{n_devices} devices; the product must equal the device count")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes ``AXES`` sized by ``spec``.

    ``devices`` defaults to ``jax.devices()`` (all processes' devices on a multi-host run),
    or the first device alone for the one-device spec. Axis types are ``Auto``: ``jit``
    propagates shardings from the explicit ones given at its boundary.

    Raises:
        MeshError: see :func:`parse_mesh_spec`.
    """
    all_devices = list(devices) if devices is not None else jax.devices()
    one = spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none"))
    if one:
        all_devices = all_devices[:1]
    sizes = parse_mesh_spec(spec, len(all_devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=all_devices)


def _block_heads(config: Any) -> dict[str, int]:
    """``{"heads": H, ...}``: the head counts a block config splits over ``tensor``."""
    out = {}
    for attr in ("heads", "n_heads", "n_kv_heads"):
        try:
            value = getattr(config, attr, None)
        except Exception:  # noqa: BLE001 - a derived property that cannot resolve
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            out[attr] = value
    return out


def validate_model(mesh: Mesh, model_config: Any, *, batch_size: int | None = None,
                   seq_len: int | None = None) -> None:
    """Check that a model and batch shape fit ``mesh``, before anything is traced.

    ``tensor`` must divide every block's heads (query and key/value heads) and the MLP
    hidden width; ``data * fsdp`` must divide ``batch_size``; ``context`` must divide
    ``seq_len``.

    Raises:
        MeshError: naming the axis and the size that does not divide.
    """
    tensor = mesh.shape["tensor"]
    if tensor > 1:
        for name in dict.fromkeys(model_config.layer_types):
            for attr, heads in _block_heads(model_config.block_config(name)).items():
                if heads % tensor:
                    raise MeshError(f"mesh: axis 'tensor' of size {tensor} does not divide "
                                    f"block {name!r}'s {attr}={heads}")
        if model_config.mlp:
            hidden = _mlp_hidden(model_config)
            if hidden % tensor:
                raise MeshError(f"mesh: axis 'tensor' of size {tensor} does not divide the MLP "
                                f"hidden width {hidden}")
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size is not None and batch_size % batch_ways:
        raise MeshError(f"mesh: axes 'data' x 'fsdp' = {batch_ways} do not divide "
                        f"batch_size={batch_size}")
    context = mesh.shape["context"]
    if seq_len is not None and seq_len % context:
        raise MeshError(f"mesh: axis 'context' of size {context} does not divide "
                        f"seq_len={seq_len}")


def _mlp_hidden(model_config: Any) -> int:
    from linearnexus.modules.common import swiglu_hidden_size

    if model_config.mlp_hidden is not None:
        return model_config.mlp_hidden
    return swiglu_hidden_size(model_config.d_model, 64)
