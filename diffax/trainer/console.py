"""What a person watching a run sees: one progress line, a few messages, and a summary at the end.

The console gets warnings, errors, the messages of :func:`say` and the progress line; every log record at INFO
and above (the trainer's, CLU's metric lines, Orbax, grain, JAX) goes to ``WORKDIR/diffax.log`` (one file per
process: ``diffax.process_<i>.log`` beyond process 0). On a terminal the progress line is redrawn in place;
when the output is not a terminal (a launcher, a log file, CI) it is a plain line every ``train.log_every``
steps. Only process 0 writes to the console. The CLU / TensorBoard metrics are unaffected.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import sys
import time
from typing import TextIO

from absl import logging as absl_logging

LOG_NAME = 'diffax.log'


def log_path(workdir: str, process_index: int) -> pathlib.Path:
  name = LOG_NAME if process_index == 0 else f'diffax.process_{process_index}.log'
  return pathlib.Path(workdir) / name


def setup_logging(workdir: str) -> pathlib.Path | None:
  """Sends INFO records to the workdir's log file and keeps only warnings on the console.

  Call it before JAX initialises its backends (their INFO lines then stay off the console too). A remote
  workdir (``gs://...``) keeps every record on the console, as there is no local file to append to. Returns
  the log file, or None.
  """
  if '://' in workdir:
    return None
  absl_logging.get_absl_handler().setLevel(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top  (the process index needs the backends)
  path = log_path(workdir, jax.process_index())
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(path, mode='a')
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  logging.getLogger().addHandler(handler)
  return path


def _is_terminal(stream: TextIO) -> bool:
  return bool(getattr(stream, 'isatty', lambda: False)())


def say(message: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
  """Logs ``message`` and, if ``enabled`` (process 0), prints it on its own line above the progress line."""
  logging.info(message)
  if enabled:
    stream = stream or sys.stdout
    stream.write(('\r\033[K' if _is_terminal(stream) else '') + message + '\n')
    stream.flush()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


class Progress:
  """``step N/M  loss L  I img/s  ETA m:ss``, in place on a terminal, every ``every`` steps otherwise.

  Throughput is measured over the last ``window`` updates, so compilation and evaluation pauses drop out of
  it after a while.
  """

  def __init__(self, num_steps: int, batch_size: int, *, every: int, enabled: bool = True,
               stream: TextIO | None = None, window: int = 50, min_interval: float = 0.25):
    self.num_steps, self.batch_size, self.every = num_steps, batch_size, every
    self.enabled, self.stream = enabled, stream or sys.stdout
    self.in_place = _is_terminal(self.stream)
    self.times: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
    self.min_interval, self.last_draw = min_interval, 0.0

  def line(self, step: int, loss: float) -> str:
    text = f'step {step}/{self.num_steps}  loss {loss:.4f}'
    if len(self.times) >= 2:
      (s0, t0), (s1, t1) = self.times[0], self.times[-1]
      if t1 > t0 and s1 > s0:
        steps_per_second = (s1 - s0) / (t1 - t0)
        eta = (self.num_steps - step) / steps_per_second
        text += f'  {steps_per_second * self.batch_size:.0f} img/s  ETA {_duration(eta)}'
    return text

  def update(self, step: int, loss: float) -> None:
    now = time.perf_counter()
    self.times.append((step, now))
    if not self.enabled:
      return
    if self.in_place:
      if now - self.last_draw >= self.min_interval or step == self.num_steps:
        self.stream.write('\r\033[K' + self.line(step, loss))
        self.stream.flush()
        self.last_draw = now
    elif step % self.every == 0 or step == self.num_steps:
      self.stream.write(self.line(step, loss) + '\n')
      self.stream.flush()

  def close(self) -> None:
    """Ends the in-place line so what follows starts on a fresh one."""
    if self.enabled and self.in_place and self.last_draw:
      self.stream.write('\n')
      self.stream.flush()
