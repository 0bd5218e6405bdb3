"""Where a train step's time goes, by compiled operation, from a jax.profiler trace.

    python scripts/step_profile.py [--config configs/resnet18.py] [--steps 3]

Compiles the config's train step (as scripts/benchmark.py does), runs it twice, then
traces --steps steps with `jax.profiler` and adds up the time of each compiled operation
(XLA's fusions and library calls, by their HLO names) over the traced steps, a stretch
where several run at once shared out among them (`operation_times`). Prints
the step time, the time by kind of operation and the largest operations, per step; the
last line is JSON. On CPU it turns on XLA:CPU's per-operation trace events
(`--xla_cpu_enable_xprof_traceme`); operations that emit no event of their own (some
library calls) are counted as "not attributed".
"""

import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT)]
# Before jax is imported: XLA reads its flags once.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import timing  # noqa: E402  (scripts/timing.py, beside this file)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import cli  # noqa: E402  (cli first: TensorFlow's logging)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(_CHECKOUT / "configs" / "resnet18.py"), "Config file.", lock_config=False
)
flags.DEFINE_integer("steps", 3, "Traced steps.")
flags.DEFINE_integer("top", 15, "Largest operations listed.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")

# Kinds of operation, by HLO name (the first match wins).
KINDS = (
    ("transpose/copy", r"transpose|copy"),
    ("convolution", r"conv"),
    ("ynnpack", r"ynn_fusion"),
    ("dot", r"dot"),
    ("other fusion", r"fusion"),
)
# Compiled operations are named as HLO instructions ("transpose_copy_fusion.29"); the
# runtime's own spans (CamelCase) and Python frames ("$file.py:...") are not.
_OPERATION = re.compile(r"^[a-z][a-z0-9_\-]*(\.[0-9]+)?$")


def operation_times(trace_dir: str) -> dict[str, float]:
    """Seconds of the traced time that each compiled operation accounts for.

    XLA:CPU runs an operation's parts on several threads at once, and sometimes
    independent operations side by side: summing their events' durations counted such
    time twice or more (the shares could add up to more than the step). Here each stretch
    of time is shared out evenly among the events running during it, so the operations'
    seconds add up to the time during which any of them ran, never more.
    """
    traces = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
    edges = []  # (time in us, +1 start / -1 end, operation)
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and _OPERATION.match(name) and event["dur"] > 0:
            edges += [(event["ts"], 1, name), (event["ts"] + event["dur"], -1, name)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # At a tie, ends before starts.
    seconds: dict[str, float] = collections.defaultdict(float)
    running: collections.Counter[str] = collections.Counter()
    last = None
    for time_us, change, name in edges:
        count = sum(running.values())
        if count and time_us > last:
            share = (time_us - last) / 1e6 / count
            for running_name, instances in running.items():
                seconds[running_name] += share * instances
        running[name] += change
        if not running[name]:
            del running[name]
        last = time_us
    return dict(seconds)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def main(argv: list[str]) -> None:
    cli.reject_arguments(argv)
    cli.quiet_libraries()
    import jax
    import numpy as np

    from resnet_jax import config_checks, sharding

    config = FLAGS.config
    config_checks.validate(config)
    mesh = sharding.make_mesh()
    num_classes = config.model.num_classes or 100
    state, metrics, step, _ = timing.train_setup(config, mesh, num_classes)
    local = sharding.per_process_batch_size(config.batch_size, mesh)
    batch = timing.random_batch(
        np.random.default_rng(0), local, config.image_size, num_classes, mesh
    )
    for _ in range(timing.WARMUP_STEPS):
        state, metrics = step(state, metrics, batch)
    jax.block_until_ready(state.params)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                state, metrics = step(state, metrics, batch)
            jax.block_until_ready(state.params)
            step_s = (time.perf_counter() - start) / FLAGS.steps
        per_step = {k: v / FLAGS.steps for k, v in operation_times(trace_dir).items()}
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, seconds in per_step.items():
        by_kind[kind_of(name)] += seconds
    by_kind["not attributed"] = max(0.0, step_s - sum(per_step.values()))
    print(
        f"{config.model.name}, batch {config.batch_size}, {config.image_size} px, "
        f"{mesh.devices.size} x {jax.devices()[0].device_kind}: {step_s * 1e3:,.0f} ms "
        "per train step"
    )
    print("| kind | ms per step | share |\n|---|---:|---:|")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds * 1e3:,.1f} | {seconds / step_s:.0%} |")
    print("| operation | ms per step |\n|---|---:|")
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[: FLAGS.top]
    for name, seconds in top:
        print(f"| {name} | {seconds * 1e3:,.1f} |")
    result = {
        "model": config.model.name,
        "batch_size": config.batch_size,
        "cpu_convolutions": config.cpu_convolutions,
        "step_ms": step_s * 1e3,
        "ms_by_kind": {k: v * 1e3 for k, v in by_kind.items()},
        "top_ms": {k: v * 1e3 for k, v in top},
    }
    timing.print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
