"""scripts/compare_models.py end to end on tiny models: the numbers in its JSON, table and PNG."""

import json
import struct
import subprocess
import sys

from helpers import ROOT, main_environment

from configs import default
from resnet_jax import summary

MODELS = ("resnet8", "densenet10", "densenet10:memory_efficient")


def test_compare_models_writes_consistent_json_table_and_png(tmp_path):
    env = main_environment(devices=1)
    # XLA:CPU's LLVM optimisation is most of a cold compile here; it changes neither the
    # buffer assignment (the memory figures) nor the counts this test checks, only speed.
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/compare_models.py",
            f"--models={','.join(MODELS)}",
            "--batch_size=4",
            "--steps=1",
            "--repeats=1",
            "--image_size=8",
            "--num_classes=10",
            f"--out={tmp_path}",
            "--cpu_remat",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "model_comparison.json").read_text()) == data
    assert (data["batch_size"], data["image_size"], data["num_classes"]) == (4, 8, 10)
    assert data["cpu_remat"] is True
    rows = {row["model"]: row for row in data["models"]}
    assert tuple(rows) == MODELS

    table = (tmp_path / "model_comparison.md").read_text()
    for name, row in rows.items():
        config = default.get_config()
        config.model.name, *options = name.split(":")
        config.model.memory_efficient = options == ["memory_efficient"]
        config.image_size = 8
        config.model.num_classes = 10  # The last layer's size: params differ from 100's.
        info = summary.model_summary(config)
        assert row["params"] == info["total_params"]
        assert row["gflop_per_example"] == info["flops_per_example"] / 1e9
        # Memory per example is the slope of XLA's temporary bytes from batch 2 to 4.
        temp = row["temp_bytes"]
        assert row["activation_bytes_per_example"] == (temp["4"] - temp["2"]) / 2 > 0
        assert row["step_bytes"] > temp["4"]  # Plus parameters, optimizer state, batch.
        assert row["activation_bytes_per_example_per_param"] == (
            row["activation_bytes_per_example"] / row["params"]
        )
        assert row["train_img_per_s"] > 0
        assert f"| {name} | {row['params']:,} |" in table
    # DenseNet's trade-off: fewer parameters, more activation memory per example.
    dense, res = rows["densenet10"], rows["resnet8"]
    assert dense["params"] < res["params"]
    assert dense["activation_bytes_per_example"] > res["activation_bytes_per_example"]
    assert (
        dense["activation_bytes_per_example_per_param"]
        > 3 * (res["activation_bytes_per_example_per_param"])
    )
    # Recomputing each dense layer's concatenation and bottleneck: the same net, less memory.
    lean = rows["densenet10:memory_efficient"]
    assert lean["params"] == dense["params"]
    assert lean["gflop_per_example"] == dense["gflop_per_example"]
    assert lean["activation_bytes_per_example"] < 0.9 * dense["activation_bytes_per_example"]
    assert "keeping jax.checkpoint's recomputation" in table
    assert table.strip().splitlines()[-1].endswith("(figures/model_comparison.png)")

    png = (tmp_path / "figures" / "model_comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1300, 975)  # 10 x 7.5 inches at 130 dpi.
    assert len(png) > 20_000  # Four labelled panels, not an empty canvas.


def run_refused(*args):
    """compare_models.py with arguments it must refuse before doing any work."""
    return subprocess.run(
        [sys.executable, "scripts/compare_models.py", *args],
        cwd=ROOT,
        env=main_environment(devices=1),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_batch_size_one_is_refused():
    result = run_refused("--batch_size=1")
    assert result.returncode != 0
    assert "--batch_size must be at least 2" in result.stderr


def test_unknown_model_option_is_refused():
    result = run_refused("--models=densenet100:lean")
    assert result.returncode != 0
    assert "unknown option 'lean' after 'densenet100'" in result.stderr
    assert "memory_efficient" in result.stderr
