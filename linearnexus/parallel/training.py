"""Placing a training state on a mesh and compiling its steps with explicit shardings.

``Placement`` is what the trainer holds when it runs on a mesh: the shardings of its state
(parameters by ``rules.RULES``, optimizer state like its parameters, the rest replicated)
and of its batches, and ``jit`` wrappers that pin them at the compiled program's boundary
and donate the old state. With a ``context`` axis, the wrapped functions trace the model
under :func:`linearnexus.parallel.context.context_parallel`, so the linear ops split the
sequence over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from linearnexus.parallel.mesh import make_mesh, validate_model
from linearnexus.parallel.rules import (
    batch_sharding,
    param_shardings,
    replicated,
    shardings_like,
)

__all__ = ["Placement", "state_shardings"]


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings for a trainer state with fields ``params``, ``rest``, ``opt_state``, ``rng``
    (a NamedTuple such as ``train.sft.TrainState``): the same structure of NamedShardings."""
    params = param_shardings(state.params, mesh)
    rep = replicated(mesh)
    return type(state)(
        params,
        jax.tree.map(lambda _: rep, state.rest),
        shardings_like(state.opt_state, state.params, params, mesh),
        rep)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (equal on every process) laid out as ``sharding``, as a new buffer."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding, may_alias=False)
    # many hosts: each process fills only its own devices' shards from its host copy
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass
class Placement:
    """A training state's layout on ``mesh``.

    Attributes:
        mesh: the device mesh.
        state: NamedShardings shaped like the trainer state.
        batch: sharding of ``[B, T]`` token batches. eval_batch: of ``[N, B, T]``.
    """

    mesh: Mesh
    state: Any
    batch: NamedSharding
    eval_batch: NamedSharding

    @classmethod
    def create(cls, spec: str | Mesh, state: Any, model_config: Any, *, batch_size: int,
               seq_len: int) -> Placement:
        """Build the mesh from ``spec`` (or take a Mesh), check the model and batch shape
        fit it (``mesh.validate_model``: before anything is traced) and derive shardings."""
        mesh = spec if isinstance(spec, Mesh) else make_mesh(spec)
        validate_model(mesh, model_config, batch_size=batch_size, seq_len=seq_len)
        return cls(mesh, state_shardings(state, mesh), batch_sharding(mesh),
                   batch_sharding(mesh, 3, leading=1))

    @property
    def context(self) -> int:
        return self.mesh.shape["context"]

    def place_state(self, state: Any) -> Any:
        """``state`` moved onto the mesh (a copy: the trainer's step donates it)."""
        return jax.tree.map(_put, state, self.state)

    def place_batch(self, *arrays: Any, eval: bool = False) -> tuple[Any, ...]:
        """Token batches (the same global ``[B, T]`` / ``[N, B, T]`` on every process) split
        over the mesh."""
        sharding = self.eval_batch if eval else self.batch
        return tuple(_put(a, sharding) for a in arrays)

    def _traced(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.context == 1:
            return fn
        from linearnexus.parallel.context import context_parallel

        @functools.wraps(fn)
        def wrapped(*args):
            with context_parallel(self.mesh):
                return fn(*args)
        return wrapped

    def jit_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``jit`` of ``fn(state, inputs, targets) -> (state, loss)``: state in and out with
        its shardings (the input donated), batches split, the loss replicated."""
        rep = replicated(self.mesh)
        return jax.jit(self._traced(fn), in_shardings=(self.state, self.batch, self.batch),
                       out_shardings=(self.state, rep), donate_argnums=(0,))

    def jit_eval(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``jit`` of ``fn(params, rest, inputs [N, B, T], targets) -> loss``."""
        return jax.jit(self._traced(fn),
                       in_shardings=(self.state.params, self.state.rest, self.eval_batch,
                                     self.eval_batch),
                       out_shardings=replicated(self.mesh))

