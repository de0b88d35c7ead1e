"""The learner's durable sample spool: what the learner has accepted survives a crash.

Exactly-once bookkeeping between orchestrator and learner:
- The orchestrator keeps every sample it sent until the learner acknowledges it, and re-sends it
  otherwise (at-least-once delivery); the learner drops ids it has accepted before (dedup).
- The learner acknowledges a sample only after it is *here*, on disk (written, fsynced, renamed):
  an acknowledged sample is never lost, even if the learner dies the next instant.
- Samples are consumed in spool order (FIFO). A checkpoint records `consumed_through`: the last
  sequence number whose sample went into a step at or before that checkpoint. Spooled files at or
  below it are deleted once the checkpoint is committed; on resume everything above it is fed to
  training again, first, in the same order: so every accepted sample is trained exactly once in
  the history the final model comes from (steps after the last checkpoint are redone).

One segment file per `append` call (one fsync for a whole batch of arrivals), named
`<first seq:012d>+<count>.seg`: for each sample, its frame count then its ZeroMQ frames (the
schema's own encoding, never pickle) as length-prefixed records. Temp files of an interrupted
write are removed; files whose name does not parse or whose contents fail to decode are reported
and skipped, never trained.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from megatron_opd.transport.schema import ProtocolError, Sample, decode, encode

_SUFFIX = ".seg"
_LEN = struct.Struct("<Q")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SampleSpool:
    def __init__(self, directory: str | Path, consumed_through: int = -1):
        """`consumed_through`: the resumed checkpoint's cursor. Sequence numbers only grow over
        a run's whole history, even when every segment was released (a finished run continued
        with more steps): numbering again from 0 would put new samples at or below the cursors
        of kept checkpoints, so a fallback to an older one would skip them and a release would
        delete them untrained."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):  # a write interrupted by a crash: never acknowledged
            tmp.unlink()
        segs = self._segments()
        self.next_seq = max((segs[-1][0] + segs[-1][1]) if segs else 0, consumed_through + 1)
        self.corrupt: list[str] = []

    def _segments(self) -> list[tuple[int, int, Path]]:
        """(first seq, count, path) of every segment, in order."""
        out = []
        for p in self.dir.glob(f"*{_SUFFIX}"):
            try:
                first, count = p.name[:-len(_SUFFIX)].split("+")
                out.append((int(first), int(count), p))
            except ValueError:
                continue
        return sorted(out)

    def append(self, samples: list[Sample]) -> list[int]:
        """Write samples durably (one segment, fsynced, renamed into place, directory fsynced);
        returns their sequence numbers. Only after this returns may they be acknowledged."""
        if not samples:
            return []
        first = self.next_seq
        final = self.dir / f"{first:012d}+{len(samples)}{_SUFFIX}"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for s in samples:
                frames = encode(s)
                f.write(_LEN.pack(len(frames)))
                for frame in frames:
                    buf = memoryview(frame).cast("B")
                    f.write(_LEN.pack(buf.nbytes))
                    f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self.next_seq += len(samples)
        return list(range(first, self.next_seq))

    def pending(self, after: int) -> list[tuple[int, Sample]]:
        """Spooled samples with sequence number > `after`, in order (the ones to train first
        on resume). Unreadable segments are skipped and reported in `self.corrupt`."""
        self.corrupt = []
        out = []
        for first, count, path in self._segments():
            if first + count - 1 <= after:
                continue
            try:
                samples = self._read(path)
                if len(samples) != count:
                    raise ValueError(f"{len(samples)} samples, name says {count}")
            except (ProtocolError, OSError, struct.error, ValueError) as e:
                self.corrupt.append(f"{path.name}: {e}")
                continue
            out.extend((first + i, s) for i, s in enumerate(samples) if first + i > after)
        return out

    @staticmethod
    def _read(path: Path) -> list[Sample]:
        data = path.read_bytes()
        view = memoryview(data)
        out, pos = [], 0

        def take() -> memoryview:
            nonlocal pos
            (n,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + n > len(data):
                raise ValueError("truncated record")
            pos += n
            return view[pos - n:pos]

        while pos < len(data):
            (nframes,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if nframes > 64:
                raise ValueError(f"implausible frame count {nframes}")
            msg = decode([take() for _ in range(nframes)])
            if not isinstance(msg, Sample):
                raise ValueError(f"not a sample: {type(msg).__name__}")
            out.append(msg)
        return out

    def release_through(self, seq: int) -> int:
        """Delete segments whose samples all have sequence number <= seq (their training is in
        a committed checkpoint). Returns how many samples went."""
        n = 0
        for first, count, path in self._segments():
            if first + count - 1 > seq:
                break
            path.unlink(missing_ok=True)
            n += count
        return n

    def ids(self) -> list[str]:
        """Sample ids of everything still spooled (for the dedup state on resume)."""
        return [s.sample_id for _, s in self.pending(after=-1)]


class SampleLedger:
    """`<run>/ledger.jsonl`: the learner's account of every sample id, for audits and the
    exactly-once tests. `{"accepted": [ids]}` when samples became durable (spooled, then acked);
    `{"step": s, "trained": [ids]}` when step s trained them. On resume, step records of steps
    being redone are dropped (their training is not in the checkpoint); acceptances stay. A run
    that does not resume starts a new ledger: it describes exactly one run."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        import json

        self._json = json
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the crash
                if "step" not in rec or rec["step"] < resume_step:
                    keep.append(line)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        self._file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def accepted(self, ids: list[str]) -> None:
        if ids:
            self._file.write(self._json.dumps({"accepted": ids}) + "\n")

    def trained(self, step: int, ids: list[str]) -> None:
        self._file.write(self._json.dumps({"step": step, "trained": ids}) + "\n")

    def close(self) -> None:
        self._file.close()
