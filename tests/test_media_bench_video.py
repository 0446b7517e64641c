"""experiments/bench_video.py runs: on the smallest clip the DiT's rows carry finite numbers, the same parameters
with and without remat, and the recomputed forward passes in remat's FLOPs."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_video_prints_its_table(tmp_path):
  out = tmp_path / 'table.md'
  proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'bench_video.py'), '--models', 'dit:dit3d_tiny',
                         '--frames', '2', '--resolutions', '8', '--remat', 'none,full', '--steps', '1', '--out',
                         str(out)], capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.strip('|').split('|') for line in out.read_text().splitlines() if line.startswith('| dit3d_tiny')]
  assert [(r[1].strip(), r[2].strip()) for r in rows] == [('2 x 8 x 8', 'none'), ('2 x 8 x 8', 'full')]
  values = [[float(v) for v in r[3:]] for r in rows]  # params, temp, peak, GFLOPs, compile s, step ms
  assert all(v >= 0 for row in values for v in row) and all(row[0] > 0 and row[3] > 0 for row in values)
  (plain, remat) = values
  assert remat[0] == plain[0]  # remat changes what is stored, not the model
  assert remat[3] > plain[3]  # ... and recomputes the blocks' forward passes in the backward pass
  bad = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'bench_video.py'), '--remat', 'some'],
                       capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert bad.returncode != 0 and "Unknown remat policy 'some'" in bad.stderr
