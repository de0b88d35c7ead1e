"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard scalars, a PNG of curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: the run continues from a checkpoint taken after `resume_step` steps;
        records of later steps (logged before the crash, now being redone) are dropped first."""
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _complete_step(line) is not None
                    and _complete_step(line) < resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps past steps
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _complete_step(line: str) -> int | None:
    """The step of a JSONL record; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The complete records of a metrics.jsonl. The learner may be writing its last line while
    someone reads (the launcher's progress bar): a final line without its newline is not a
    record yet and is left out; a malformed complete line is an error."""
    text = Path(path).read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # partial last line (being written)
    return [json.loads(line) for line in lines if line.strip()]


CURVES = (
    ("train/loss", "train loss"),
    ("eval/reverse_kl", "held-out reverse KL(student || teacher)"),
    ("eval/accuracy", "held-out task accuracy"),
    ("samples/staleness_mean", "mean token staleness (versions)"),
)


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, CURVES):
        if key.startswith("eval/"):  # plot each evaluation once, at the version it measured
            pts = {r["eval/version"]: r[key] for r in records
                   if r.get(key) is not None and r.get("eval/version") is not None}
            xs, ys = list(pts), list(pts.values())
            ax.set_xlabel("policy version (learner steps)")
        else:
            xs = [r["step"] for r in records if r.get(key) is not None]
            ys = [r[key] for r in records if r.get(key) is not None]
            ax.set_xlabel("learner step")
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
