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

One file per sample, `<seq:012d>.sample`: the message's ZeroMQ frames (the schema's own encoding,
never pickle) as length-prefixed records. Files whose name does not parse, temp files of an
interrupted write, or contents that fail to decode are reported and skipped, never trained.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from megatron_opd.transport.schema import ProtocolError, Sample, decode, encode

_SUFFIX = ".sample"
_LEN = struct.Struct("<Q")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SampleSpool:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):  # a write interrupted by a crash: never acknowledged
            tmp.unlink()
        seqs = self._seqs()
        self.next_seq = (max(seqs) + 1) if seqs else 0

    def _seqs(self) -> list[int]:
        out = []
        for p in self.dir.glob(f"*{_SUFFIX}"):
            try:
                out.append(int(p.name[:-len(_SUFFIX)]))
            except ValueError:
                continue
        return sorted(out)

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}{_SUFFIX}"

    def append(self, samples: list[Sample]) -> list[int]:
        """Write samples durably (each file fsynced, then the directory once); returns their
        sequence numbers. Only after this returns may the samples be acknowledged."""
        seqs = []
        for s in samples:
            seq = self.next_seq
            self.next_seq += 1
            final = self._path(seq)
            tmp = final.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                for frame in encode(s):
                    buf = memoryview(frame).cast("B")
                    f.write(_LEN.pack(buf.nbytes))
                    f.write(buf)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            seqs.append(seq)
        if samples:
            _fsync_dir(self.dir)
        return seqs

    def pending(self, after: int) -> list[tuple[int, Sample]]:
        """Spooled samples with sequence number > `after`, in order (the ones to train first
        on resume). Unreadable files are skipped and reported in `self.corrupt`."""
        self.corrupt: list[str] = []
        out = []
        for seq in self._seqs():
            if seq <= after:
                continue
            try:
                out.append((seq, self._read(self._path(seq))))
            except (ProtocolError, OSError, struct.error, ValueError) as e:
                self.corrupt.append(f"{self._path(seq).name}: {e}")
        return out

    @staticmethod
    def _read(path: Path) -> Sample:
        data = path.read_bytes()
        frames, pos = [], 0
        while pos < len(data):
            (n,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + n > len(data):
                raise ValueError("truncated record")
            frames.append(memoryview(data)[pos:pos + n])
            pos += n
        msg = decode(frames)
        if not isinstance(msg, Sample):
            raise ValueError(f"not a sample: {type(msg).__name__}")
        return msg

    def release_through(self, seq: int) -> int:
        """Delete spooled samples with sequence number <= seq (their training is in a committed
        checkpoint). Returns how many were deleted."""
        n = 0
        for s in self._seqs():
            if s > seq:
                break
            self._path(s).unlink(missing_ok=True)
            n += 1
        return n

    def ids(self) -> list[str]:
        """Sample ids of everything still spooled (for the dedup state on resume)."""
        return [s.sample_id for _, s in self.pending(after=-1)]
