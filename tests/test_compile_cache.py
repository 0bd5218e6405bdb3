"""The persistent compilation cache (resnet_jax/compile_cache.py) as the commands use it."""

import json
import re

from helpers import run_main

# The line every command logs when it ends, and training after its first step.
COUNTS = re.compile(r"ompilation cache (\S+): (\d+) programs read, (\d+) compiled \((\d+) stored\)")


def _train(workdir, toy_folder, *extra):
    return run_main(
        "--config",
        "configs/smoke.py",
        f"--workdir={workdir}",
        f"--config.data_dir={toy_folder}",
        "--config.num_train_steps=4",
        "--config.log_every_steps=2",
        "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=4",
        *extra,
    )


def _evaluate(workdir, toy_folder, cache):
    return run_main(
        "--config",
        "configs/smoke.py",
        f"--workdir={workdir}",
        f"--config.data_dir={toy_folder}",
        "--mode=eval",
        f"--compilation_cache={cache}",
    )


def _counts(result):
    """(read, compiled, stored) of the command's last cache line."""
    assert result.returncode == 0, result.stderr[-3000:]
    found = COUNTS.findall(result.stderr)
    assert found, result.stderr[-3000:]
    return tuple(int(n) for n in found[-1][1:])


def test_a_second_run_reads_the_programs_the_first_stored(toy_folder, tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "first", toy_folder, f"--compilation_cache={cache}")
    read, compiled, stored = _counts(first)
    # conftest stores every program (no compile-time threshold): the steps, init, eval.
    assert read == 0 and stored >= 3 and compiled >= stored
    assert len([p for p in cache.iterdir() if p.name.endswith("-cache")]) == stored

    second = _train(tmp_path / "second", toy_folder, f"--compilation_cache={cache}")
    assert _counts(second) == (stored, compiled - stored, 0)
    # The first step's line says it too, with the time to get there.
    assert re.search(
        r"Step 1 done [\d.]+ s after the run started \(compilation cache", second.stderr
    )
    # Read or compiled, the programs compute the same run.
    results = [
        json.loads((tmp_path / w / "eval_results.json").read_text()) for w in ("first", "second")
    ]
    assert results[0] == results[1]

    # Evaluating the checkpoint reads the cache too; `none` leaves it alone (an evaluation,
    # one program to compile where training has three; test_full_disk trains with `none`).
    evaluated = _evaluate(tmp_path / "first", toy_folder, cache)
    assert _counts(evaluated)[0] >= 1
    before = sorted(p.name for p in cache.iterdir())
    off = _evaluate(tmp_path / "second", toy_folder, "none")  # Not evaluated yet.
    assert off.returncode == 0, off.stderr[-3000:]
    assert "ompilation cache" not in off.stderr
    assert json.loads(off.stdout.strip().splitlines()[-1])["top1"] == results[0]["top1"]
    assert sorted(p.name for p in cache.iterdir()) == before


def test_an_unusable_cache_folder_is_a_warning_not_a_failure(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = run_main(
        "--config",
        "configs/paper_cifar10.py:20",
        "--mode=summary",
        f"--compilation_cache={not_a_folder}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Cannot use {not_a_folder} as the compilation cache" in result.stderr
    assert "--compilation_cache=none" in result.stderr
