"""Reading a run's ledger (ledger.jsonl) and the exactly-once check the end-to-end tests share.

The learner's ledger has two kinds of lines: `{"accepted": [ids]}` when samples are accepted into
the spool, and `{"step": s, "trained": [ids]}` per optimizer step (a resumed learner drops the
steps it redoes, so each step appears once in a consistent run).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from megatron_opd.learner.spool import SampleSpool


def read_ledger(run_dir: Path) -> tuple[list, list[tuple[int, list]]]:
    """(accepted ids in order, [(step, trained ids)] in file order)."""
    accepted, trained = [], []
    for line in (Path(run_dir) / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "accepted" in rec:
            accepted += rec["accepted"]
        else:
            trained.append((rec["step"], rec["trained"]))
    return accepted, trained


def trained_by_step(run_dir: Path) -> dict[int, list]:
    return dict(read_ledger(run_dir)[1])


def assert_exactly_once(run_dir: Path, steps: int | None = None) -> Counter:
    """Counted by sample id over the whole run: every step once and in order (when `steps` is
    given), no id accepted twice, none trained twice, and every accepted id either trained or
    still in the spool after the final checkpoint's cursor (0 lost). When an older checkpoint is
    kept, the spool still holds what a fallback to it would replay. Returns the trained counts."""
    run_dir = Path(run_dir)
    accepted, trained = read_ledger(run_dir)
    if steps is not None:
        assert [s for s, _ in trained] == list(range(steps))
    counts = Counter(i for _, ids in trained for i in ids)
    assert counts and max(counts.values()) == 1  # no id trained twice
    assert len(accepted) == len(set(accepted))  # none accepted twice
    ckpts = run_dir / "checkpoints"
    final = ckpts / (ckpts / "latest").read_text().strip()
    through = json.loads((final / "meta.json").read_text())["data_cursor"]["consumed_through"]
    spool = SampleSpool(run_dir / "spool")
    leftover = {s.sample_id for _, s in spool.pending(after=through)}
    assert not leftover & set(counts)
    assert set(accepted) == set(counts) | leftover  # trained, or still spooled
    kept = sorted(ckpts.glob("step_????????"))
    if len(kept) > 1:  # what a fallback to the older checkpoint would replay is still there
        oldest = json.loads((kept[0] / "meta.json").read_text())["data_cursor"]
        held = {s.sample_id for _, s in spool.pending(after=oldest["consumed_through"])}
        since = int(kept[0].name.split("_")[1])
        assert {i for step, ids in trained if step >= since for i in ids} <= held
    return counts
