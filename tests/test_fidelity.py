"""tools/fidelity.py: the grid is valid config, and the `mini` study (what CI runs) goes end to
end with real servers; its aggregation is checked against figures recomputed here by hand from
the runs' metrics.jsonl, and a second invocation skips the finished runs."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "fidelity.py"


def _tool():
    spec = importlib.util.spec_from_file_location("fidelity", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(*args: str, timeout: float) -> dict:
    out = subprocess.run([sys.executable, str(TOOL), *args,
                          f"--cache-dir={ROOT / '.cache/megatron-opd'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _evals(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """Each version's first evaluation (every line repeats the latest one), and the last line."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals: dict[int, dict] = {}
    for r in lines:
        evals.setdefault(int(r["eval/version"]), r)
    return evals, lines[-1]


def test_every_grid_config_loads():
    tool = _tool()
    for grid in tool.GRIDS.values():
        for name, overrides in grid.items():
            assert tool.refusal(overrides) is None, name


def test_spread_and_ratio_se_by_hand():
    tool = _tool()
    s = tool.spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                + (4 - 7 / 3) ** 2) / 2))
    assert (s["min"], s["max"], s["n"]) == (1.0, 4.0, 3)
    assert tool.spread([5.0])["std"] == 0.0
    # two responses, sums 2 and 6 over 1 and 3 tokens: mean 2, residuals 0 and 0 -> SE 0
    assert tool.ratio_se([2.0, 6.0], [1, 3]) == 0.0
    # residuals 1 and -1 around mean 1 (sums 2, 0 over 1 token each): sqrt(2 * 2) / 2 = 1
    assert tool.ratio_se([2.0, 0.0], [1, 1]) == pytest.approx(1.0)


@pytest.mark.slow
def test_mini_study_end_to_end_resumes_and_aggregates(tmp_path):
    out = tmp_path / "study"
    first = _study("--grid", "mini", "--out", str(out), timeout=900)
    assert first["ran"] == 2 and first["skipped"] == 0 and not first["failed"]
    result = json.loads((out / "fidelity.json").read_text())
    # eval.interval=2 over 4 steps; under publish_lag=2 the evaluation after step 2 measures the
    # fleet's version 0 (the final weights are published and evaluated at once)
    for name, versions in (("sync", [0, 2, 4]), ("naive-k2", [0, 4])):
        run_dir = out / name / "seed0"
        evals, last = _evals(run_dir)
        assert sorted(evals) == versions
        assert result["configs"][name]["curve"]["versions"] == versions
        agg = result["configs"][name]["aggregate"]
        assert agg["kl_final"]["mean"] == last["eval/reverse_kl"]
        assert agg["kl_initial"]["mean"] == evals[0]["eval/reverse_kl"]
        assert agg["acc_final"]["mean"] == last["eval/accuracy"]
        assert agg["kl_final"]["std"] == 0.0 and agg["kl_final"]["n"] == 1
    # controlled staleness: after the first two steps every token is exactly 2 versions old
    runs = result["configs"]
    assert runs["sync"]["runs"]["0"]["staleness_mean"] == 0.0
    train = [json.loads(x) for x in (out / "naive-k2/seed0/metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert [r["samples/staleness_mean"] for r in train][2:] == [2.0] * (len(train) - 2)
    summary, paired = (out / "table.md").read_text().split("\n\n")[0::2][:2]
    assert [r.split(" | ")[0] for r in summary.splitlines()[2:]] == ["| sync", "| naive-k2"]
    assert [r.split(" | ")[:3] for r in paired.splitlines()[2:]] == [["| naive-k2", "sync", "0"]]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation runs nothing and leaves the finished runs as they were
    stamp = (out / "sync/seed0/metrics.jsonl").stat().st_mtime_ns
    t0 = time.time()
    again = _study("--grid", "mini", "--out", str(out), timeout=300)
    assert again["ran"] == 0 and again["skipped"] == 2
    assert time.time() - t0 < 60
    assert (out / "sync/seed0/metrics.jsonl").stat().st_mtime_ns == stamp

    # two seeds by hand: the two real runs as seeds 0 and 1 of one config
    pair = tmp_path / "pair"
    shutil.copytree(out / "sync/seed0", pair / "sync/seed0")
    shutil.copytree(out / "naive-k2/seed0", pair / "sync/seed1")
    figures = _study("--grid", "mini", "--only", "sync", "--seeds", "0,1", "--out", str(pair),
                     "--aggregate-only", timeout=300)
    assert figures["ran"] == 0
    both = json.loads((pair / "fidelity.json").read_text())["configs"]["sync"]
    finals = [_evals(pair / "sync" / s)[1]["eval/reverse_kl"] for s in ("seed0", "seed1")]
    mean = (finals[0] + finals[1]) / 2
    agg = both["aggregate"]["kl_final"]
    assert agg["mean"] == pytest.approx(mean)
    assert agg["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    assert (agg["min"], agg["max"]) == (min(finals), max(finals))
    curves = [_evals(pair / "sync" / s)[0] for s in ("seed0", "seed1")]
    common = sorted(set(curves[0]) & set(curves[1]))  # [0, 4]
    assert both["curve"]["versions"] == common == [0, 4]
    assert both["curve"]["kl_mean"] == pytest.approx(
        [(curves[0][v]["eval/reverse_kl"] + curves[1][v]["eval/reverse_kl"]) / 2 for v in common])
    assert both["curve"]["kl_max"] == [max(c[v]["eval/reverse_kl"] for c in curves)
                                       for v in common]


def test_paired_differences_by_hand():
    """Each config minus its reference on the same seed, only over seeds both finished."""
    tool = _tool()

    def run(last3, train_last):
        return {"kl_last3": last3, "train_kl": [9.0, train_last]}

    configs = {"sync": {"runs": {"0": run(1.0, 2.0), "1": run(2.0, 3.0)}},
               "naive-k4": {"runs": {"0": run(1.5, 2.25), "1": run(2.1, 3.75), "2": run(9, 9)}},
               "weak-opd-sync": {"runs": {"0": run(3.0, 3.0)}},
               "weak-aopd-sync": {"runs": {"0": run(2.5, 2.0)}}}
    got = tool.paired_differences(configs)
    assert got["naive-k4"]["seeds"] == [0, 1]
    assert got["naive-k4"]["eval_kl_last3"]["mean"] == pytest.approx((0.5 + 0.1) / 2)
    assert got["naive-k4"]["train_kl_last"]["max"] == pytest.approx(0.75)
    assert got["weak-aopd-sync"]["reference"] == "weak-opd-sync"
    assert got["weak-aopd-sync"]["eval_kl_last3"]["mean"] == pytest.approx(-0.5)
    assert "sync" not in got
