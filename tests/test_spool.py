"""The learner's durable sample spool: exact round trips, order, release, and a real SIGKILL in
the middle of writing (every sample whose append returned is readable afterwards; nothing half
written is ever read)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from megatron_opd.learner.spool import SampleSpool
from tests.test_transport import make_sample

ROOT = Path(__file__).resolve().parents[1]


def _same(a, b) -> None:
    assert a.sample_id == b.sample_id and a.group_id == b.group_id and a.reward == b.reward
    assert a.temperature == b.temperature and a.top_p == b.top_p
    for name in a.TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_round_trip_order_and_release(tmp_path):
    spool = SampleSpool(tmp_path / "spool")
    samples = [make_sample(sid=f"run-{i:09d}", routed=i % 2 == 0) for i in range(5)]
    assert spool.append(samples[:3]) == [0, 1, 2]
    assert spool.append(samples[3:]) == [3, 4]
    got = spool.pending(after=-1)
    assert [seq for seq, _ in got] == [0, 1, 2, 3, 4]
    for (_, s), ref in zip(got, samples):
        _same(s, ref)
    assert spool.release_through(1) == 0  # segment 0..2 is not all consumed yet
    assert spool.release_through(2) == 3
    assert [seq for seq, _ in spool.pending(after=-1)] == [3, 4]
    assert [seq for seq, _ in spool.pending(after=3)] == [4]
    # a new process continues the numbering after what is on disk
    again = SampleSpool(tmp_path / "spool")
    assert again.append([make_sample(sid="run-x")]) == [5]
    assert again.ids() == ["run-000000003", "run-000000004", "run-x"]


def test_numbering_continues_after_the_resumed_cursor_when_every_segment_was_released(tmp_path):
    """A finished run has consumed and released everything; continued with more steps, the
    resumed learner's new samples must number after the checkpoint's cursor (found by the
    lifecycle test: they restarted at 0, below the kept checkpoints' cursors, so a fallback to
    the older checkpoint would have skipped them and a release deleted them untrained)."""
    spool = SampleSpool(tmp_path / "spool")
    assert spool.append([make_sample(sid=f"run-{i:09d}") for i in range(4)]) == [0, 1, 2, 3]
    assert spool.release_through(3) == 4 and spool.pending(after=-1) == []
    resumed = SampleSpool(tmp_path / "spool", consumed_through=3)
    assert resumed.append([make_sample(sid="run-new")]) == [4]
    assert [s.sample_id for _, s in resumed.pending(after=3)] == ["run-new"]
    assert resumed.release_through(3) == 0  # the older checkpoint's cursor keeps it
    # segments on disk beyond the cursor still decide (the cursor never moves numbering back)
    assert SampleSpool(tmp_path / "spool", consumed_through=1).append(
        [make_sample(sid="run-newer")]) == [5]


def test_corrupt_and_partial_files_are_never_read(tmp_path):
    spool = SampleSpool(tmp_path)
    spool.append([make_sample(sid=f"s-{i}") for i in range(3)])
    spool.append([make_sample(sid="s-3")])
    seg = tmp_path / "000000000003+1.seg"
    seg.write_bytes(seg.read_bytes()[:-7])  # cut short
    (tmp_path / "000000000007+1.tmp").write_bytes(b"half")
    (tmp_path / "notes.seg").write_text("not a sequence number")
    again = SampleSpool(tmp_path)
    assert not (tmp_path / "000000000007+1.tmp").exists()
    got = again.pending(after=-1)
    assert [s.sample_id for _, s in got] == ["s-0", "s-1", "s-2"]
    assert len(again.corrupt) == 1 and "000000000003" in again.corrupt[0]


_WRITER = textwrap.dedent("""
    import sys
    from megatron_opd.learner.spool import SampleSpool
    from tests.test_transport import make_sample
    spool = SampleSpool(sys.argv[1])
    i = 0
    while True:
        (seq,) = spool.append([make_sample(T=2000, K=8, sid=f"w-{i}")])
        print(seq, flush=True)  # "acknowledged": the append returned
        i += 1
""")


def test_sigkill_while_writing_loses_no_acknowledged_sample(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked = []
    deadline = time.time() + 60
    while len(acked) < 40 and time.time() < deadline:
        acked.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    got = SampleSpool(tmp_path).pending(after=-1)
    ids = [s.sample_id for _, s in got]
    assert len(acked) == 40
    # everything acknowledged is there, in order, without holes (the writer may have got a few
    # further before the kill landed); no half-written file is read or left behind
    assert len(ids) >= 40 and ids == [f"w-{i}" for i in range(len(ids))]
    assert not list(tmp_path.glob("*.tmp"))
