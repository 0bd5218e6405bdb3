"""scripts/device_check.py at tiny sizes on the CPU: every part's row, the time limits, the files."""

import json
import subprocess
import sys

from helpers import ROOT, main_environment


def _check(out, *flags, devices=1):
    return subprocess.run(
        [sys.executable, "scripts/device_check.py", "--tiny", f"--out={out}", *flags],
        cwd=ROOT,
        env=main_environment(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_part_measures_and_an_overrunning_part_is_cut_off(tmp_path):
    result = _check(tmp_path, "--notorch_compile", "--limits=input=1")
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "device_check.json").read_text())
    assert check["machine"]["platform"] == "cpu" and check["machine"]["devices"] == 1
    rows = {(row["part"], row.get("dtype")): row for row in check["rows"]}
    assert list(rows) == [
        ("step", "float32"),
        ("step", "bfloat16"),
        ("deterministic", "bfloat16"),
        ("input", None),
        ("main", "bfloat16"),
        ("torch", "bfloat16"),
    ]
    for key in [("step", "float32"), ("step", "bfloat16"), ("deterministic", "bfloat16")]:
        row = rows[key]
        assert row["status"] == "ok" and row["batch_size"] == 8
        assert row["train_img_per_s"] > 0 and row["eval_img_per_s"] > 0 and row["compile_s"] > 0
        # XLA's count for the tiny ResNet-8 at batch 8 (4 classes): about 3 x the forward's
        # 384,926 FLOPs per image that --mode=summary reports.
        assert 8 * 3 * 384_926 < row["train_step_gflop"] * 1e9 < 8 * 3.3 * 384_926
        assert row["achieved_tflop_per_s"] > 0 and row["fraction_of_peak"] is None  # A CPU.
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
    assert "| input | 8 | - | - | - | - | - | - | timed out after 1 s |" in table


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
