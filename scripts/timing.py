"""What the speed scripts (benchmark.py, compare_models.py) share."""

import statistics
import time
from collections.abc import Callable


def median_rate(run: Callable[[], None], images: int, repeats: int) -> float:
    """Images per second of `run()` (which processes `images`), the median of `repeats` calls."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)
