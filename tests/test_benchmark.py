"""scripts/benchmark.py end to end on a tiny model: the table, and the JSON's contract."""

import gzip
import json
import subprocess
import sys

import pytest
from helpers import ROOT, main_environment

KEYS = (
    "train_img_per_s",
    "loop_img_per_s",
    "input_img_per_s",
    "input_img_per_cpu_s",
    "eval_img_per_s",
    "compile_s",
    "torch_train_img_per_s",
    "ratio_vs_torch",
    "loop_vs_step",
    "input_vs_step",
    "train_step_gflop",
    "train_step_memory_bytes_per_device",
)


def test_benchmark_prints_a_table_and_json(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/benchmark.py",
            "--config",
            "configs/smoke.py",
            "--config.batch_size=16",
            "--steps=2",
            "--repeats=2",
            "--loop_window=2",
            "--input_batches=3",
            f"--json_out={out}",
        ],
        cwd=ROOT,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "resnet8, batch 16, 16 px, float32, 4 x cpu, eigen convolutions"
    assert any(line.split()[:2] == ["ours", "/"] for line in lines)
    data = json.loads(lines[-1])
    assert json.loads(out.read_text()) == data
    assert all(key in data for key in KEYS)
    assert all(data[key] > 0 for key in KEYS)
    assert data["devices"] == 4 and data["torch_device"] == "cpu"
    assert data["cpu_convolutions"] == "eigen"
    assert data["ratio_vs_torch"] == data["train_img_per_s"] / data["torch_train_img_per_s"]
    # --repeats=2: one round of each before the training loop, one after.
    for key in ("train_img_per_s", "torch_train_img_per_s"):
        rounds = data[f"{key}_rounds"]
        assert len(rounds) == 2 and data[key] == sum(rounds) / 2
    assert data["loop_vs_step"] == data["loop_img_per_s"] / data["train_img_per_s"]
    # XLA's FLOP count of the whole step (all devices): forward and backward are about
    # 3 x the forward, which XLA counts as 384,926 FLOPs per image (4 classes; the
    # summary's jaxpr count, which the TFLOP/s columns use, is 424,064).
    assert 16 * 3 * 384_926 < data["train_step_gflop"] * 1e9 < 16 * 3.3 * 384_926


def test_a_net_pytorch_has_no_twin_of_gets_a_note_and_no_timer():
    sys.path.insert(0, str(ROOT / "scripts"))
    import timing

    from configs import smoke

    config = smoke.get_config()
    config.model.name = "plain8"
    info, timer = timing.torch_timer(config, num_classes=4, steps=1)
    assert timer is None and info["torch_device"] is None
    assert "plain" in info["torch_note"]


def test_step_profile_splits_the_step_by_compiled_operation(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/step_profile.py",
            "--config",
            "configs/smoke.py",
            "--config.batch_size=8",
            "--steps=2",
            "--top=5",
        ],
        cwd=ROOT,
        env=main_environment(devices=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("resnet8, batch 8, 16 px, 1 x cpu: ")
    data = json.loads(lines[-1])
    kinds = data["ms_by_kind"]
    # The kinds share out the measured step: what the trace does not name is the rest
    # (operations on several threads at once are not counted twice).
    assert kinds["not attributed"] > 0
    assert sum(kinds.values()) == pytest.approx(data["step_ms"], rel=1e-6)
    assert kinds["transpose/copy"] > 0 and kinds["other fusion"] > 0
    assert len(data["top_ms"]) == 5
    assert all("fusion" in name or "conv" in name or "copy" in name for name in data["top_ms"])


def test_step_profile_counts_time_on_several_threads_once(tmp_path):
    """An operation on two threads at once, beside another: its time is shared, not doubled."""
    us = [
        # The same fusion on two threads over 0-100 us, a copy on a third over 50-150 us.
        {"ph": "X", "name": "fusion.1", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "name": "fusion.1", "ts": 0, "dur": 100, "tid": 2},
        {"ph": "X", "name": "copy.2", "ts": 50, "dur": 100, "tid": 3},
        # The runtime's own spans are not operations.
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 400, "tid": 4},
    ]
    trace = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    trace.parent.mkdir(parents=True)
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": us}).encode()))
    code = (
        "import importlib.util, json, pathlib, sys\n"
        "sys.path.insert(0, str(pathlib.Path(sys.argv[1]).parent))  # scripts/timing.py\n"
        "spec = importlib.util.spec_from_file_location('step_profile', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps(module.operation_times(sys.argv[2])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, ROOT / "scripts" / "step_profile.py", tmp_path],
        cwd=ROOT,
        env=main_environment(devices=1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seconds = json.loads(result.stdout)
    # 0-50 us: the fusion alone; 50-100: the fusion's two events and the copy share it
    # (2/3 and 1/3); 100-150: the copy alone. 150 us in all, as long as something ran.
    assert seconds == pytest.approx({"fusion.1": 50e-6 + 50e-6 * 2 / 3, "copy.2": 50e-6 * 4 / 3})
    assert sum(seconds.values()) == pytest.approx(150e-6)
