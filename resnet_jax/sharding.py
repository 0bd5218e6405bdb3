"""Where arrays live: one mesh over every device of every host, with a "data" axis.

The batch is split along "data"; the train state is replicated. XLA turns the batch
means of BatchNorm and the gradient averages into cross-device reductions, so a step on
N devices computes what one device would on the whole global batch.
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.config_checks import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def host_waits_for_each_step() -> bool:
    """Whether the host waits for each compiled step before it dispatches the next.

    Only on CPU devices, and only with more than one: XLA:CPU runs a multi-device
    program's collectives with one thread per device, and with many such programs queued
    on a loaded machine the threads of two programs can wait on each other until XLA
    aborts ("Termination timeout for all reduce"); waiting costs little on a CPU
    (docs/results.md, "The hang that remained"). Accelerators keep jax's asynchronous
    dispatch.
    """
    return jax.device_count() > 1 and jax.default_backend() == "cpu"


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
    """This process's share of a global batch; raises ConfigError if it does not divide."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        lower = global_batch_size - global_batch_size % num_devices
        raise ConfigError(
            f"{name}={global_batch_size} is not divisible by the {num_devices} devices "
            f"the batch is split over. Use a multiple of {num_devices}, for example "
            f"--config.{name}={max(lower, num_devices)} or {lower + num_devices}."
        )
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return global_batch_size // num_devices * local_devices


def process_rows(mesh: Mesh, per_process_batch_size: int) -> tuple[int, tuple[int, ...]]:
    """(global batch size, this process's rows of a global batch, in `global_batch`'s order).

    The rows of the devices of this process along "data", ascending: where
    `global_batch` puts the process's local rows, one after the other. With the devices
    of each process next to each other in the mesh (jax.devices()'s order), process p of
    P holds rows [p * B, (p + 1) * B) of a global batch of P * B.
    """
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    # per_process_batch_size gives each device the same share; below that, asserted.
    assert local and per_process_batch_size % local == 0, (per_process_batch_size, local)
    size = per_process_batch_size * mesh.devices.size // local
    spans = batch_sharding(mesh).addressable_devices_indices_map((size,)).values()
    starts = sorted({(span[0].start or 0, span[0].stop or size) for span in spans})
    rows = tuple(row for start, stop in starts for row in range(start, stop))
    assert len(rows) == per_process_batch_size, (rows, per_process_batch_size)
    return size, rows


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's part of the batch into global arrays sharded on "data"."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }
