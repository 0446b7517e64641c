"""The device mesh, parameter shardings from logical-axis rules, and host batches as global arrays.

One mesh with axes ``('data', 'fsdp')`` serves every scale: on one CPU it is 1 x 1; on a pod the batch is
split over both axes (FSDP is data parallelism whose parameters are also split) and every parameter
dimension whose logical name a rule maps to ``'fsdp'`` is split over that axis. The same jitted step runs
unchanged on 1 device, 8 local devices or many hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = MESH_AXES  # the batch dimension is split over every device


def make_mesh(*, data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``data x fsdp`` mesh over all (global) devices; ``data = -1`` takes the devices ``fsdp`` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f'mesh.fsdp = {fsdp} does not divide the {len(devices)} devices.')
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f'mesh.data x mesh.fsdp = {data} x {fsdp} must equal the number of devices ({len(devices)}).')
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _spec_for(names: P | None, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[tuple[str, str]]) -> P:
  """Logical names -> mesh axes; a dimension the mesh axis does not divide stays replicated."""
  if names is None or not len(names):
    return P()
  mesh_axes = nn.logical_to_mesh_axes(tuple(names), tuple(map(tuple, rules)))
  spec = []
  for size, axis in zip(shape, mesh_axes):
    divides = axis is not None and size % int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)])) == 0
    spec.append(axis if divides else None)
  return P(*spec)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
  """NamedShardings for the unboxed tree of ``abstract_boxed`` (e.g. ``jax.eval_shape`` of a state init).

  Args:
    abstract_boxed: a pytree whose ``nn.LogicallyPartitioned`` leaves carry logical names (parameters as
      returned by a Linen ``init``, and optimizer moments built from them); other leaves are replicated.
    mesh: the mesh from :func:`make_mesh`.
    rules: ``(logical_name, mesh_axis)`` pairs, e.g. ``(('embed', 'fsdp'),)``; unnamed dimensions and names
      without a rule are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _spec_for(spec, x.shape, mesh, rules)), specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This process's rows of the batch -> global arrays sharded over the batch axes (every process calls it)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


COMPILE_BARRIER_TIMEOUT_S = 3600


def compile_on_all_processes(jitted: Any, *args: Any, name: str) -> Any:
  """``jitted`` compiled for ``args`` (arrays or ``ShapeDtypeStruct``s), returned once every process has compiled it.

  The first run of a program sets up the communicators of its cross-process collectives, and on CPU (gloo)
  that set-up waits only 30 s for the other processes, while compile times of the same program differ by more
  than that between busy hosts. So every process waits here, at a coordination-service barrier (not a
  collective), until all have compiled, and the first run starts together. ``name`` must be unique per run.
  """
  compiled = jitted.lower(*args).compile()
  if jax.process_count() > 1:
    multihost.sync_global_processes(f'diffax_compiled_{name}', timeout=COMPILE_BARRIER_TIMEOUT_S,
                                    processes=set(range(jax.process_count())))
  return compiled
