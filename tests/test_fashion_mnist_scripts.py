"""scripts/fashion_mnist_runs.sh, scripts/fashion_mnist_gpu.sh and scripts/pack_run.sh:
shellcheck-clean, bad arguments refused before anything runs. (Their runs take hours on 2
cores or minutes on a GPU; docs/results.md holds what they measured. A packed run resuming
elsewhere: tests/test_checkpoints.py.)"""

import subprocess

from helpers import ROOT, shellcheck

SCRIPTS = ("scripts/fashion_mnist_runs.sh", "scripts/fashion_mnist_gpu.sh", "scripts/pack_run.sh")


def test_the_scripts_pass_shellcheck():
    result = shellcheck(*SCRIPTS)
    assert result.returncode == 0, result.stdout


def test_the_gpu_script_refuses_a_missing_out_and_an_unknown_stage(tmp_path):
    def run(*args):
        return subprocess.run(
            ["bash", "scripts/fashion_mnist_gpu.sh", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = run()
    assert missing.returncode == 2 and missing.stderr.startswith("usage: bash scripts/")
    unknown = run(tmp_path / "out", "seed", 60, tmp_path / "runs")
    assert unknown.returncode == 2
    assert unknown.stderr == "error: STAGE is seeds or anchor, not 'seed'.\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_the_cpu_runner_refuses_an_unknown_stage_before_anything_runs(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/fashion_mnist_runs.sh", tmp_path / "runs", "seed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "error: STAGE is all, figures, seeds or anchor, not 'seed'.\n"
    assert not (tmp_path / "runs").exists()


def test_pack_run_refuses_what_is_not_a_stopped_run_and_writes_nothing(tmp_path):
    def run(*args):
        return subprocess.run(
            ["bash", ROOT / "scripts" / "pack_run.sh", *map(str, args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("a.tgz").stderr.startswith("usage: bash scripts/pack_run.sh ARCHIVE.tgz WORKDIR")
    (tmp_path / "notes").mkdir()
    not_a_run = run("a.tgz", "notes")
    assert not_a_run.returncode == 2
    assert (
        not_a_run.stderr
        == "error: notes has no checkpoints folder: not a training run's workdir.\n"
    )
    # Killed before its first save: Orbax's unfinished folder is not a checkpoint.
    (tmp_path / "early" / "checkpoints" / "20.orbax-checkpoint-tmp-1").mkdir(parents=True)
    early = run("a.tgz", "early")
    assert early.returncode == 2
    assert early.stderr == "error: early has no complete checkpoint to continue from.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early", "notes"]


def test_pack_run_keeps_absolute_paths_for_extraction_from_the_root(tmp_path):
    for name in ("a", "b"):
        for step in (20, 40):
            (tmp_path / name / "checkpoints" / str(step)).mkdir(parents=True)
            (tmp_path / name / "checkpoints" / str(step) / "commit_success.txt").write_text("")
        (tmp_path / name / "config.json").write_text("{}")
    # A step a resume set aside: not carried.
    (tmp_path / "a" / "corrupt_checkpoints" / "60").mkdir(parents=True)
    (tmp_path / "a" / "corrupt_checkpoints" / "60" / "_CHECKPOINT_METADATA").write_text("")

    def pack(*args):
        return subprocess.run(
            ["bash", ROOT / "scripts" / "pack_run.sh", *map(str, args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    mixed = pack("mixed.tgz", tmp_path / "a", "b")
    assert mixed.returncode == 2 and "all relative or all absolute" in mixed.stderr
    packed = pack("runs.tgz", tmp_path / "a", tmp_path / "b")
    assert packed.returncode == 0, packed.stderr
    assert packed.stderr == ""  # tar's "Removing leading /" is not needed.
    assert packed.stdout.rstrip().endswith("continue with: tar -xzf runs.tgz -C /")
    listing = subprocess.run(
        ["tar", "-tzf", "runs.tgz"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    members = set(listing.stdout.split())
    root = str(tmp_path).lstrip("/")
    assert f"{root}/a/checkpoints/40/commit_success.txt" in members
    assert f"{root}/b/config.json" in members
    assert not any("/checkpoints/20" in m for m in members)  # Only the newest step.
    assert not any("corrupt" in m for m in members)
