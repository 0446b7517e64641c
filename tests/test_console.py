"""The console: the progress line in place on a terminal and plain lines elsewhere, messages above it."""

import io

from diffax.trainer import console


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_plain_lines_every_log_step_when_not_a_terminal():
  out = io.StringIO()
  progress = console.Progress(10, 8, every=5, stream=out)
  for step in range(1, 11):
    progress.update(step, loss=1.0 / step)
  progress.close()
  lines = out.getvalue().splitlines()
  assert [l.split()[1] for l in lines] == ['5/10', '10/10']
  assert lines[1].startswith('step 10/10  loss 0.1000') and 'img/s' in lines[1] and 'ETA 0:00' in lines[1]
  assert '\r' not in out.getvalue()


def test_in_place_on_a_terminal_and_messages_above_it():
  out = _Terminal()
  progress = console.Progress(3, 4, every=100, stream=out, min_interval=0.0)
  progress.update(1, loss=0.5)
  console.say('Resumed from step 1.', stream=out)
  progress.update(2, loss=0.25)
  progress.update(3, loss=0.125)
  progress.close()
  text = out.getvalue()
  # Each draw returns to the line start and clears it; the message clears the line and ends with a newline.
  assert text.count('\r\033[K') == 4 and text.endswith('step 3/3  loss 0.1250' + text.split('loss 0.1250')[1])
  assert '\r\033[KResumed from step 1.\n' in text and text.endswith('\n') and text.count('\n') == 2


def test_eta_from_the_measured_rate():
  progress = console.Progress(100, 2, every=10, stream=io.StringIO())
  progress.times.extend([(10, 0.0), (20, 5.0)])  # 2 steps/s
  assert progress.line(20, 0.5) == 'step 20/100  loss 0.5000  4 img/s  ETA 0:40'


def test_disabled_progress_prints_nothing():
  out = io.StringIO()
  progress = console.Progress(2, 1, every=1, stream=out, enabled=False)
  progress.update(1, 0.1)
  progress.update(2, 0.1)
  progress.close()
  console.say('hidden', enabled=False, stream=out)
  assert out.getvalue() == ''
