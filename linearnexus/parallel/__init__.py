"""Training past one device: meshes, sharding rules, context parallelism (``docs/distributed.md``).

* :mod:`~linearnexus.parallel.mesh`: ``make_mesh("data=2,fsdp=4")`` with axes ``data``,
  ``fsdp``, ``context``, ``tensor``; specs validated before anything compiles.
* :mod:`~linearnexus.parallel.rules`: logical axes of every parameter, per kind of weight.
* :mod:`~linearnexus.parallel.training`: ``Placement``: a trainer state's shardings and
  its jitted steps with explicit in / out shardings and donation.
* :mod:`~linearnexus.parallel.context`: the linear ops with the sequence split over
  ``context`` (``shard_map`` + an exchange of per-device state summaries).
"""

from linearnexus.parallel.mesh import AXES, MeshError, make_mesh, parse_mesh_spec, validate_model
from linearnexus.parallel.rules import (
    RULES,
    ShardingRuleError,
    batch_sharding,
    logical_axes,
    param_shardings,
)
from linearnexus.parallel.training import Placement, state_shardings

__all__ = ["AXES", "RULES", "MeshError", "Placement", "ShardingRuleError", "batch_sharding",
           "logical_axes", "make_mesh", "param_shardings", "parse_mesh_spec", "state_shardings",
           "validate_model"]
