"""scripts/input_benchmark.py end to end on tiny settings, and its CPU-time accounting."""

import json
import math
import subprocess
import sys

from helpers import ROOT, main_environment

ROW_KEYS = {
    "path",
    "image_size",
    "workers",
    "augment",
    "images",
    "img_per_s",
    "img_per_cpu_s",
    "cores_busy",
    "files",
    "decoder",
}


def test_input_benchmark_prints_a_table_and_json(tmp_path):
    out = tmp_path / "input.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/input_benchmark.py",
            "--sizes=16,64",
            "--workers=0,1",
            "--decoders=before,opencv",
            "--breakdown",
            "--batch_size=8",
            "--batches=2",
            "--repeats=1",
            "--num_files=40",
            f"--json_out={out}",
        ],
        cwd=ROOT,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("4 x cpu; host: ")
    data = json.loads(lines[-1])
    assert json.loads(out.read_text()) == data

    rows = {(r["path"], r["image_size"], r["workers"], r["decoder"]): r for r in data["rows"]}
    assert sorted(rows, key=str) == sorted(
        [
            ("device", 16, None, None),
            ("stream", 16, 0, "pil"),
            ("stream", 16, 1, "pil"),
            ("device", 64, None, None),
            ("stream", 64, 0, "before"),
            ("stream", 64, 0, "opencv"),
            ("stream", 64, 1, "before"),
            ("stream", 64, 1, "opencv"),
        ],
        key=str,
    )
    for key, row in rows.items():
        assert set(row) == ROW_KEYS, key
        assert row["images"] == 2 * 8, key  # --batches x --batch_size, per timed window
        for name in ("img_per_s", "img_per_cpu_s", "cores_busy"):
            assert math.isfinite(row[name]) and row[name] > 0, (key, name, row[name])
        assert math.isclose(row["cores_busy"], row["img_per_s"] / row["img_per_cpu_s"])
    # One table line per row, between the header lines and the files' lines.
    assert sum(line.split()[:1] in (["device"], ["stream"]) for line in lines) == len(rows)
    assert {r["augment"] for r in data["rows"] if r["image_size"] == 16} == {"crop_flip"}
    assert rows["stream", 64, 0, "opencv"]["augment"] == "random_resized_crop"
    assert rows["device", 64, None, None]["augment"] == "crop_flip"
    assert {r["files"] for r in data["rows"] if r["path"] == "stream"} == {"png", "generated"}

    # One breakdown per decoder at the ImageNet size, with every stage timed.
    assert [(b["image_size"], b["decoder"]) for b in data["breakdown"]] == [
        (64, "before"),
        (64, "opencv"),
    ]
    for b in data["breakdown"]:
        stages = b["ms_per_image"]
        assert list(stages) == [
            "read and header",
            "decode",
            "crop and resize",
            "flip",
            "grain and batching",
            "transfer",
            "total",
        ]
        assert all(v >= 0 for v in stages.values()) and stages["decode"] > 0
    files = {f["image_size"]: f for f in data["files"]}
    assert (files[16]["jpegs"], files[64]["jpegs"]) == (None, "generated")
    assert (files[16]["format"], files[16]["width"], files[16]["height"]) == ("png", 16, 16)
    assert (files[64]["format"], files[64]["width"], files[64]["height"]) == ("jpeg", 114, 100)
    assert all(f["count"] == 40 and f["mean_bytes"] > 0 for f in files.values())
    assert data["devices"] == 4 and data["platform"] == "cpu" and data["host_cores"] >= 1
    assert data["batch_size"] == 8 and data["batches"] == 2 and data["repeats"] == 1
    assert data["cpu_model"] and data["date"] and len(data["load_after"]) == 3
    assert data["command"].startswith("python scripts/input_benchmark.py --sizes=16,64")


# Burns ~0.3 s of CPU in a child that stays alive, then in one that is reaped, while this
# process sleeps: both must show in _cpu_seconds, which the stream rows divide by.
_CPU_CHECK = """
import subprocess, sys, time
sys.path.insert(0, "scripts")
import input_benchmark as b
burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass\\n"
start, start_self = b._cpu_seconds(), time.process_time()
alive = subprocess.Popen([sys.executable, "-c", burn + "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and b._cpu_seconds() - start < 0.3:
    time.sleep(0.05)
with_alive = b._cpu_seconds() - start
subprocess.run([sys.executable, "-c", burn], check=True)
with_reaped = b._cpu_seconds() - start
alive.communicate(b"")
after_exit = b._cpu_seconds() - start
print(with_alive, with_reaped, after_exit, time.process_time() - start_self)
"""


def test_cpu_seconds_counts_live_and_reaped_children():
    result = subprocess.run(
        [sys.executable, "-c", _CPU_CHECK],
        cwd=ROOT,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with_alive, with_reaped, after_exit, own = map(float, result.stdout.split())
    assert own < 0.25  # This process mostly slept.
    assert with_alive >= 0.3  # The live child's 0.3 s (and its start-up).
    assert with_reaped >= with_alive + 0.3  # Plus the reaped one's.
    # The live child, once it exits and is reaped, is counted once, not twice.
    assert with_reaped - 0.05 <= after_exit <= with_reaped + 0.3
