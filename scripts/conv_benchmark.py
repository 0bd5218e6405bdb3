"""Where a CPU train step's time goes: ResNet-18's 3x3 convolutions, pass by pass, beside PyTorch.

    python scripts/conv_benchmark.py [--batch 128] [--repeats 5]

For each stage of ResNet-18 on 32x32 inputs (32x32x64, 16x16x128, 8x8x256, 4x4x512; a
3x3 stride-1 convolution, batch 128) it times, in GFLOP/s (2 x multiply-adds / median
time): XLA's forward, input gradient and weight gradient, compiled with each
`cpu_convolutions` setting (resnet_jax/compile_options.py: "eigen", the default, and
"xla_default"); and, when PyTorch is importable, PyTorch's forward and backward (input
and weight gradients together), NCHW and channels_last, on the same number of threads.
Prints a table; the last line is JSON.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement; the median is used.")

STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))


def _median_seconds(call) -> float:
    call()
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_rates(size: int, channels: int) -> dict[str, float]:
    import jax
    import numpy as np
    from jax import lax

    from resnet_jax import compile_options

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    passes = {
        "forward": lambda x, w, g: conv(x, w),
        "input_grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
        "weight_grad": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
    }
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch, size, size, channels)
    x = jax.numpy.asarray(rng.normal(size=shape).astype(np.float32))
    w = jax.numpy.asarray(rng.normal(size=(3, 3, channels, channels)).astype(np.float32))
    g = jax.numpy.asarray(rng.normal(size=shape).astype(np.float32))
    flops = 2 * FLAGS.batch * size * size * channels * channels * 9
    rates = {}
    for setting in compile_options.CPU_CONVOLUTIONS:
        options = compile_options.cpu_options(setting)
        for name, fn in passes.items():
            fn = jax.jit(fn, compiler_options=options)
            seconds = _median_seconds(lambda fn=fn: jax.block_until_ready(fn(x, w, g)))
            rates[f"{setting}_{name}"] = flops / seconds / 1e9
    return rates


def torch_rates(size: int, channels: int) -> dict[str, float]:
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    flops = 2 * FLAGS.batch * size * size * channels * channels * 9
    rates = {}
    for layout in ("nchw", "channels_last"):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        x = torch.randn(FLAGS.batch, channels, size, size, requires_grad=True)
        if layout == "channels_last":
            conv = conv.to(memory_format=torch.channels_last)
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        out = conv(x)
        grad = torch.randn_like(out)

        def forward(conv=conv, x=x):
            with torch.no_grad():
                conv(x)

        def backward(conv=conv, x=x, grad=grad):
            conv(x).backward(grad)

        rates[f"torch_{layout}_forward"] = flops / _median_seconds(forward) / 1e9
        # The backward computes both gradients: 2 x the forward's FLOPs, plus the forward.
        rates[f"torch_{layout}_backward"] = (
            2 * flops / (_median_seconds(backward) - _median_seconds(forward)) / 1e9
        )
    return rates


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for size, channels in STAGES:
        rates = {"layer": f"{size}x{size}, {channels} ch", **jax_rates(size, channels)}
        rates.update(torch_rates(size, channels))
        rows.append(rates)
    keys = [k for k in rows[0] if k != "layer"]
    print(f"GFLOP/s, batch {FLAGS.batch}, 3x3 conv, {len(os.sched_getaffinity(0))} cores")
    print("| layer | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(
            f"| {row['layer']} | "
            + " | ".join(f"{row.get(k, float('nan')):.0f}" for k in keys)
            + " |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
