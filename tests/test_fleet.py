"""Fleets behind the smg router, end to end (issue 15): `megatron-opd train` on the quickstart with
2 rollout servers behind a real smg router and 1 teacher server. One rollout server's SGLang
process is SIGKILLed mid-run: the run goes on, the server is drained from the router, restarted,
gets the current weights from the learner's publisher and rejoins the router (listed again,
serving the current weight version); no sample is lost or trained twice, counted by id in the
learner's ledger and spool; the supervisor's fleet_stats.json carries every server's figures.

`FleetRun` starts and watches such a run; other tests (a multi-turn environment, each pause
mode) reuse it with their own overrides.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.ledger import assert_exactly_once
from tests.test_e2e_quickstart import ROOT, _records, _train_cmd

pytestmark = pytest.mark.slow

FLEET = ("rollout.num_servers=2", "server.router=smg")  # the default policy: cache_aware


class FleetRun:
    """`megatron-opd train` on the quickstart in a subprocess, with `overrides`, and what a test
    reads while it runs. Use as a context manager: leaving kills whatever is still running."""

    def __init__(self, run_dir: Path, *overrides: str, timeout: float = 600):
        self.run_dir, self.timeout = Path(run_dir), timeout
        self.proc = subprocess.Popen(_train_cmd(self.run_dir, *FLEET, *overrides), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.out = self.err = ""

    def __enter__(self) -> "FleetRun":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    p.kill()
                except psutil.Error:
                    pass
            self.proc.kill()
            self.proc.communicate()

    def wait_for(self, cond, what: str, timeout: float | None = None) -> None:
        deadline = time.time() + (timeout or self.timeout)
        while not cond():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"the run ended ({self.proc.returncode}) before {what}:\n"
                                     f"{out[-2000:]}\n{err[-4000:]}")
            assert time.time() < deadline, f"{what}: not within the deadline"
            time.sleep(0.3)

    def finish(self, timeout: float | None = None) -> None:
        self.out, self.err = self.proc.communicate(timeout=timeout or self.timeout)
        assert self.proc.returncode == 0, self.out[-3000:] + self.err[-5000:]

    def steps_done(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        return sum("train/loss" in line for line in metrics.read_text().splitlines()) \
            if metrics.exists() else 0

    def version(self) -> int:
        """The learner's published weight version (its last metrics record)."""
        train = [r for r in _records(self.run_dir) if "train/loss" in r] \
            if (self.run_dir / "metrics.jsonl").exists() else []
        return train[-1]["weights/version"] if train else 0

    def wiring(self) -> dict:
        return json.loads((self.run_dir / "wiring.json").read_text())

    def router_workers(self, role: str = "rollout") -> dict[str, bool]:
        """{url: healthy} as the fleet's smg router lists them."""
        url = self.wiring()[f"{role}_router_url"]
        return {w["url"]: w["is_healthy"]
                for w in requests.get(f"{url}/workers", timeout=5).json()["workers"]}

    def server_process(self, url: str) -> psutil.Process:
        """The SGLang main process (not its watchdog) listening at `url`."""
        port = url.rsplit(":", 1)[1]
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd[1:3] == ["-m", "sglang.launch_server"] and cmd[cmd.index("--port") + 1] == port:
                return p
        raise AssertionError(f"no SGLang process on port {port}")

    def fleet_stats(self) -> dict:
        try:
            return json.loads((self.run_dir / "fleet_stats.json").read_text())
        except FileNotFoundError:
            return {}


def served_version(url: str) -> int:
    return int(requests.get(f"{url}/model_info", timeout=5).json()["weight_version"])


def assert_router_serves_like_its_servers(router: str, urls: list[str]) -> None:
    """Batched scoring and generation through smg (RoutedClient: one sequence per request)
    answer what a direct call to one of its servers answers (a publish between the calls can
    change the weights: tried again)."""
    import numpy as np

    from megatron_opd.serving.router import RoutedClient
    from megatron_opd.serving.sglang_client import SGLangClient

    seqs, start = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 9, 8, 7, 6, 5]], [3, 2]
    routed = RoutedClient(router, timeout=60, retry_timeout_s=60)
    for _ in range(5):
        via = routed.score(seqs, start=start, top_k=2)
        direct = [SGLangClient(u, timeout=60).score(seqs, start=start, top_k=2) for u in urls]
        if any(all(np.allclose(a.logprobs, b.logprobs, atol=1e-5)
                   and (a.topk_ids == b.topk_ids).all() for a, b in zip(via, d))
               for d in direct):
            break
    else:
        raise AssertionError("the router's scores match no server's")
    out = routed.generate([q[:4] for q in seqs], [{"max_new_tokens": 4, "temperature": 1.0}] * 2)
    assert len(out) == 2
    for r in out:
        assert len(r.output_ids) == len(r.output_logprobs) == len(r.token_versions) >= 1


def test_a_killed_rollout_server_is_drained_restarted_and_rejoins(tmp_path):
    t0 = time.time()
    steps = 24
    # Weights by disk: the disk publisher waits for the restarted server, so the run is still
    # going when it rejoins. (With distributed updates a server killed mid-update is dropped
    # and the run goes on without it: tests/test_weight_sync_dead_server.py; a 24-step run
    # finished before the restarted server answered.)
    with FleetRun(tmp_path / "run", f"train.steps={steps}", "eval.interval=1000",
                  "weight_sync.method=disk") as run:
        run.wait_for(lambda: run.steps_done() >= 3, "3 steps")
        wiring = run.wiring()
        urls = wiring["rollout_urls"]
        assert len(urls) == 2 and wiring["rollout_router_url"] and not wiring["teacher_router_url"]
        assert wiring["rollout_router_url"] not in urls
        assert run.router_workers() == {u: True for u in urls}
        assert_router_serves_like_its_servers(wiring["rollout_router_url"], urls)
        run.wait_for(lambda: run.fleet_stats().get("fleet/rollout-0/gen_tokens_per_s", 0) > 0,
                     "tokens/s measured", 60)
        victim = urls[1]
        run.server_process(victim).send_signal(signal.SIGKILL)
        killed_at = run.steps_done()
        # drained: the router stops listing it while it is down
        run.wait_for(lambda: victim not in run.router_workers(), "drained", 60)
        restarts = run.run_dir / "server_restarts.json"
        run.wait_for(lambda: json.loads(restarts.read_text()).get("rollout-1") == 1, "restarted")
        # rejoined: listed again, and serving the weights of the learner's current version
        run.wait_for(lambda: run.router_workers().get(victim), "rejoined", 300)
        at_rejoin = run.version()
        assert served_version(victim) >= at_rejoin - 1 > 0  # a publish may be under way
        rejoined_at = run.steps_done()
        run.wait_for(lambda: run.fleet_stats().get("fleet/rollout-1/up") == 1, "stats", 30)
        stats = run.fleet_stats()
        run.finish()
    print(f"fleet run: {time.time() - t0:.0f} s; killed at step {killed_at}, rejoined at step "
          f"{rejoined_at} (version {at_rejoin})")
    assert "rollout-1 drained from rollout-router" in run.err
    assert "rollout-1 rejoined rollout-router" in run.err
    assert "SGLang server rollout-1 exited with code -9; restart 1/3" in \
        (run.run_dir / "logs" / "rollout-1.log").read_text()
    train = [r for r in _records(run.run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(steps))
    assert [r["weights/version"] for r in train] == list(range(1, steps + 1))
    assert json.loads((run.run_dir / "server_restarts.json").read_text()) == \
        {"teacher": 0, "rollout-0": 0, "rollout-1": 1}
    assert_exactly_once(run.run_dir)
    for name in ("teacher", "rollout-0", "rollout-1"):
        for key in ("queue", "running", "gen_tokens_per_s", "errors", "restarts", "up"):
            assert f"fleet/{name}/{key}" in stats, (name, key, stats)
    assert stats["fleet/rollout-1/restarts"] == 1 and stats["fleet/rollout-1/up"] == 1
    assert stats["fleet/rollout-0/weight_version"] >= at_rejoin - 1
