"""scripts/device_check.py at tiny sizes on the CPU: every part's row, the time limits, the
files, the traces; and the FLOPs it counts for the full-size nets."""

import json
import pathlib
import subprocess
import sys

import pytest
from helpers import ROOT, main_environment

sys.path.insert(0, str(ROOT / "scripts"))
import timing  # noqa: E402  (scripts/timing.py)

# --mode=summary's forward count for the tiny net (configs/smoke.py, 4 classes, 16 px),
# and XLA's, which skips the convolutions' zero padding.
TINY_FORWARD, TINY_XLA_FORWARD = 424_064, 384_926


def _python(*args, devices=1, timeout=300):
    """This Python on `args` from the project's root, with `devices` simulated devices."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=main_environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check(out, *flags, devices=1):
    return _python(
        "scripts/device_check.py", "--tiny", f"--out={out}", *flags, devices=devices, timeout=900
    )


def _assert_trace(row, prefix):
    assert row["trace"] == str(prefix) and row["trace_steps"] == 3
    files = [pathlib.Path(f"{prefix}.{kind}") for kind in ("xplane.pb", "trace.json.gz")]
    assert row["trace_files"] == [str(f) for f in files]
    assert sum(f.stat().st_size for f in files) == row["trace_bytes"] <= timing.TRACE_MAX_BYTES
    # The traced steps' time, per trace line: on this CPU the host thread that ran the step.
    lines = row["trace_ms_per_step"]
    assert any("PjitFunction(jit(train_step))" in line["top_ms"] for line in lines.values())
    assert all(line["ms"] > 0 for line in lines.values()) and row["traced_step_ms"] > 0


def test_every_part_measures_and_an_overrunning_part_is_cut_off(tmp_path):
    result = _check(tmp_path, "--notorch_compile", "--limits=input=1")
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "device_check.json").read_text())
    assert check["machine"]["platform"] == "cpu" and check["machine"]["devices"] == 1
    assert check["machine"]["peak_tflop_per_s"] == {"bfloat16": None, "float32": None}
    rows = {(row["part"], row.get("dtype")): row for row in check["rows"]}
    assert list(rows) == [
        ("step", "float32"),
        ("step", "bfloat16"),
        ("deterministic", "bfloat16"),
        ("resnet20", "float32"),
        ("resnet50", "bfloat16"),
        ("stream", None),
        ("input", None),
        ("main", "bfloat16"),
        ("torch", "bfloat16"),
    ]
    steps = [("step", "float32"), ("step", "bfloat16"), ("deterministic", "bfloat16")]
    for key in [*steps, ("resnet20", "float32"), ("resnet50", "bfloat16")]:
        row = rows[key]
        assert row["status"] == "ok" and row["batch_size"] == 8, row
        assert row["model"] == "resnet8" and row["image_size"] == 16  # --tiny: the tiny net.
        assert row["train_img_per_s"] > 0 and row["eval_img_per_s"] > 0 and row["compile_s"] > 0
        # TFLOP/s from the model's count, 3 x the forward's; XLA's own count, kept in the
        # JSON, is also about 3 x its forward on a CPU (where it sees every convolution).
        assert row["train_gflop_per_image"] * 1e9 == 3 * TINY_FORWARD
        assert row["flop_count"] == timing.FLOP_COUNT
        rate = row["train_img_per_s"]
        assert row["achieved_tflop_per_s"] == pytest.approx(3 * TINY_FORWARD * rate / 1e12)
        assert row["step_ms"] == pytest.approx(1e3 * 8 / rate)
        assert 8 * 3 * TINY_XLA_FORWARD < row["train_step_gflop"] * 1e9 < 8 * 3.3 * TINY_XLA_FORWARD
        assert row["fraction_of_peak"] is None and row["floor_ms"] is None  # A CPU.
    _assert_trace(rows[("step", "bfloat16")], tmp_path / "profile_resnet18")
    _assert_trace(rows[("resnet20", "float32")], tmp_path / "profile_resnet20")
    # Beside the JSON and the table (a lent machine returns files two folders down at most).
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "device_check.json",
        "device_check.md",
        "profile_resnet18.trace.json.gz",
        "profile_resnet18.xplane.pb",
        "profile_resnet20.trace.json.gz",
        "profile_resnet20.xplane.pb",
    ]
    # The streaming input on every host core (--tiny: two workers, 64 px), by input_benchmark,
    # against the resnet50 row's step.
    stream = rows[("stream", None)]
    assert stream["status"] == "ok", stream
    assert (stream["workers"], stream["image_size"], stream["decoder"]) == (2, 64, "opencv")
    assert stream["files"] == "143x107 JPEGs, 11 KB"
    assert stream["input_img_per_s"] > 0 and stream["input_img_per_cpu_s"] > 0
    resnet50 = rows[("resnet50", "bfloat16")]["train_img_per_s"]
    assert stream["feeds_resnet50"] == stream["input_img_per_s"] / resnet50
    # The input part cannot even start its interpreter in 1 s: killed, and the check went on.
    assert rows[("input", None)]["status"] == "timed out after 1 s"
    assert rows[("input", None)]["seconds"] < 5
    main = rows[("main", "bfloat16")]
    assert main["status"] == "ok", main
    assert 0 < main["first_step_s"] < main["seconds"]
    assert main["epoch_s"] == 64 / main["train_img_per_s"]
    assert main["cifar_epoch_s"] == 50_000 / main["train_img_per_s"]
    torch_row = rows[("torch", "bfloat16")]
    assert torch_row["status"] == "ok" and torch_row["train_img_per_s"] > 0
    assert torch_row["torch_device"] == "cpu"

    table = (tmp_path / "device_check.md").read_text()
    assert table == result.stdout
    assert table.startswith("Device check: 1 x cpu (cpu), ")
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(rows)
    assert "| input | - | 8 | - | - | - | - | - | - | - | - | - | timed out after 1 s |" in table
    assert "| resnet20 | resnet8 | 8 | 16 | float32 | " in table
    assert "| stream | - | 8 | 64 | - | " in table and "(2 workers, " in table
    assert f"the resnet50 step: {stream['feeds_resnet50']:.2f}x its images/s" in table
    assert f"FLOPs: {timing.FLOP_COUNT};" in table and "Peak: unknown for this device." in table
    assert "Traces, beside this table: profile_resnet18.* (3 steps of resnet8, " in table


@pytest.mark.parametrize(
    "net, batch, dtype, gflop",
    [
        # ResNet-18, CIFAR stem, 100 classes, 32 px: --mode=summary counts 1.111 GFLOP
        # forward (configs/resnet18.py), so a train step about 3.33 GFLOP per image.
        ("resnet18", 1024, "bfloat16", 3 * 1.111),
        # The paper's ResNet-20 (10 classes, 32 px): 40.6M multiply-adds forward.
        ("resnet20", 128, "float32", 3 * 0.0811),
        # ResNet-50 at 224 px, 1000 classes: 4.09 G multiply-adds forward (torchvision's
        # model card: 4.09 GFLOPS, which counts multiply-adds).
        ("resnet50", 256, "bfloat16", 3 * 2 * 4.09),
    ],
)
def test_the_check_counts_3x_the_summarys_forward_flops(net, batch, dtype, gflop):
    settings = {"tiny": False, "net": net, "batch_size": batch, "dtype": dtype}
    result = _python(
        "scripts/device_check.py", "--part=flops", f"--part_settings={json.dumps(settings)}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counted = json.loads(result.stdout.strip().splitlines()[-1])
    assert counted["model"] == net and counted["image_size"] == (224 if net == "resnet50" else 32)
    assert counted["train_gflop_per_image"] == pytest.approx(gflop, rel=0.02)
    assert counted["flop_count"] == timing.FLOP_COUNT


# Run in a fresh interpreter: a trace's xplane.pb holds the HLO of every program alive in
# the process (18 KB here alone, 952 KB once 40 small jitted functions are alive), so in a
# test worker that compiled many programs before, it outgrew TRACE_MAX_BYTES and was not kept.
TRACE_PROBE = """
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import timing

square = jax.jit(lambda x: x @ x)
x = jnp.ones((64, 64))
calls = []

def run(count):
    calls.append(count)
    for _ in range(count):
        jax.block_until_ready(square(x))

def broken(count):
    raise RuntimeError("no CUPTI")

out = sys.argv[1]
kept = timing.trace_steps(run, 3, out + "/kept")
removed = timing.trace_steps(run, 3, out + "/removed", max_bytes=100)
failed = timing.trace_steps(broken, 3, out + "/failed")
print(json.dumps({"kept": kept, "removed": removed, "failed": failed, "calls": calls}))
"""


def test_a_trace_over_its_limit_is_retaken_with_one_step_then_dropped(tmp_path):
    probe = _python("-c", TRACE_PROBE, str(tmp_path))
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    kept, removed, failed = result["kept"], result["removed"], result["failed"]
    assert kept.get("trace_steps") == 3, kept
    assert 0 < kept["trace_bytes"] <= timing.TRACE_MAX_BYTES
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "kept.trace.json.gz",
        "kept.xplane.pb",
    ]
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) == kept["trace_bytes"]
    # Over the limit with 3 steps, then with 1: nothing kept, and a note says why.
    assert result["calls"] == [3, 3, 1]
    assert set(removed) == {"trace_note"} and "over 100: not kept" in removed["trace_note"]
    assert failed == {"trace_note": "jax.profiler failed: RuntimeError: no CUPTI"}


def test_parts_past_the_budget_are_skipped_and_recorded(tmp_path):
    result = _check(tmp_path, "--budget_s=1", "--parts=step,main")
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "device_check.json").read_text())
    assert [(row["part"], row["status"]) for row in check["rows"]] == [
        ("step", "skipped: the budget is spent"),
        ("step", "skipped: the budget is spent"),
        ("main", "skipped: the budget is spent"),
    ]
    bad = _check(tmp_path, "--parts=step,warp")
    assert bad.returncode == 1 and "--parts: no part ['warp']" in bad.stderr
