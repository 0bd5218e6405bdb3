"""The training loop's one line per log step, and the line that ends a run.

    step 100/468 (21%) loss 1.0600 top1 0.6100 lr 0.0890 | 380 img/s | ETA 2m10s

The rate counts the images of the steps since the previous line over the time since then
(evaluations and checkpoints in that interval included, compilation not); it is what
TensorBoard's `train_examples_per_sec` shows. The ETA multiplies the steps left by the
time per step over the last `ETA_WINDOW` log lines (from the first step while there are
fewer), so it counts the evaluations and checkpoints in that window, and follows a pace
that changes: a pause (a suspended VM, a SIGSTOP) or a busier machine weighs on it only
until it is that many lines back (taken over the whole run, the pace had shown "ETA 36h"
after a 24-minute pause, for a run with 3 h to go). clu's `ReportProgress` still writes
`steps_per_sec` and `uptime` to TensorBoard; its first reading times steps dispatched but
not yet run (the host does not wait for them), the later ones agree with this rate.
"""

import collections
import time

# Log lines the ETA's pace is taken over: 2,000 steps with the default 100-step lines,
# five CIFAR epochs of batch 128 and their evaluations.
ETA_WINDOW = 20


def duration(seconds: float) -> str:
    """`45s`, `2m10s`, `1h05m`: the two largest units, for a line a person reads."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class TrainProgress:
    """Times a run from the end of its first step (input, initialisation and compilation
    are behind by then) and formats the progress lines.

    Args:
      start_step: the step the run starts from (0, or the resumed checkpoint's).
      num_steps: the last step.
      batch_size: the global batch size, for images per second.
      clock: seconds as a float; tests pass their own.
    """

    def __init__(self, start_step: int, num_steps: int, batch_size: int, clock=time.perf_counter):
        self.num_steps = num_steps
        self.batch_size = batch_size
        self._clock = clock
        self._last = (start_step, clock())
        # (step, time) at the first step's end and at each log line since, the last
        # ETA_WINDOW + 1 of them: the ETA's pace runs from the oldest.
        self._marks: collections.deque = collections.deque(maxlen=ETA_WINDOW + 1)

    def first_step_done(self, step: int) -> None:
        """Starts the clocks of the rate and the ETA at the end of the first step."""
        self._last = (step, self._clock())
        self._marks.append(self._last)

    def images_per_second(self, step: int) -> float:
        """Images per second since the previous `line` (or the first step), and restarts it."""
        last_step, last_time = self._last
        now = self._clock()
        self._last = (step, now)
        if self._marks:
            self._marks.append(self._last)
        if step <= last_step:
            return 0.0
        return (step - last_step) * self.batch_size / max(now - last_time, 1e-9)

    def eta(self, step: int) -> str:
        """The time the steps left will take at the recent pace (see the module's doc), or `?`."""
        if not self._marks or step <= self._marks[0][0]:
            return "?"
        since_step, since_time = self._marks[0]
        seconds_per_step = (self._clock() - since_time) / (step - since_step)
        return duration((self.num_steps - step) * seconds_per_step)

    def line(self, step: int, metrics: dict[str, float], images_per_second: float) -> str:
        """`step 100/468 (21%) loss ... top1 ... lr ... | N img/s | ETA ...`."""
        percent = 100 * step // max(self.num_steps, 1)
        return (
            f"step {step}/{self.num_steps} ({percent}%) loss {metrics['loss']:.4f} "
            f"top1 {metrics['top1']:.4f} lr {metrics['learning_rate']:.4g} | "
            f"{images_per_second:.0f} img/s | ETA {self.eta(step)}"
        )


def eval_line(step: int, results: dict, seconds: float) -> str:
    """`eval at step 468: top1 0.9105 top5 0.9987 loss 0.2512 on 10,000 images (4.1 s)`."""
    ema = f" (EMA weights: top1 {results['ema_top1']:.4f})" if "ema_top1" in results else ""
    return (
        f"eval at step {step}: top1 {results['top1']:.4f} top5 {results['top5']:.4f} "
        f"loss {results['loss']:.4f} on {results['num_examples']:,} images{ema} "
        f"({seconds:.1f} s)"
    )


def closing_line(workdir: str, results: dict, seconds: float) -> str:
    """Where the run's results are and what to run next, in one line."""
    return (
        f"Done in {duration(seconds)}: top-1 {100 * results['top1']:.2f}% on "
        f"{results['num_examples']:,} test images at step {results['step']}. Checkpoints in "
        f"{workdir}/checkpoints, results in {workdir}/eval_results.json, curves: tensorboard "
        f"--logdir {workdir}. Next: python -m resnet_jax.report --workdir {workdir} (curves, "
        f"per-class accuracy, confusion matrix); python -m resnet_jax.predict --workdir "
        f"{workdir} IMAGE..."
    )
