"""Server faults (docs/fault-tolerance.md): a real SGLang server SIGKILLed mid-request is restarted
by the supervisor, the request is re-issued whole and comes back complete and right; the weight
publisher reconnects to the restarted rollout server and serves the published weights again.

One tiny server is shared by the tests of this module (each kill costs one restart, ~20-40 s).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.serving.sglang_client import SGLangClient, ServerUnavailable
from megatron_opd.serving.sglang_server import (SGLangServer, ServerRestartLimit,
                                                ServerSupervisor, free_port, server_restarts)
from megatron_opd.tokenizer import SPECIALS, save_tokenizer

# Long enough contexts that a request of a few prompts is still in flight a second after it
# was sent (the kill must hit a running generation).
SPEC = MoEModelSpec(max_position_embeddings=512)
TOL = 1e-4  # fp32 on both sides; SGLang's torch-native attention sums in another order
SEQ = [1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31]


def _save_model(path, seed):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(to_hf_config(SPEC)).float().save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(SPEC.vocab_size - 3)])
    return path


def _hf_logprobs(model_dir, seqs):
    """float64 log-softmax of transformers' fp32 logits, [B, L, V] (equal-length seqs)."""
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(m.eval()(torch.tensor(seqs)).logits.double(), -1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _save_model(root / "A", 0), _save_model(root / "B", 1)


class _Supervision:
    """What the launcher's loop does, in a thread: check every 0.2 s, restart the dead."""

    def __init__(self, supervisor: ServerSupervisor):
        self.supervisor, self.errors = supervisor, []
        self._stop = threading.Event()
        self.paused = threading.Lock()  # held: no check (another supervisor acts meanwhile)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            with self.paused:
                try:
                    self.supervisor.check()
                except BaseException as e:  # noqa: BLE001 (reported by the test)
                    self.errors.append(e)
                    return
            time.sleep(0.2)

    def close(self):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def supervised(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    srv = SGLangServer("rollout", str(models[0]), free_port(), str(logs / "rollout.log"),
                       max_total_tokens=4096, threads=1, extra_args=("--weight-version", "0"))
    srv.start()
    try:
        srv.wait_ready(300)
        sup = _Supervision(ServerSupervisor([srv], max_restarts=5,
                                            counts_path=logs / "server_restarts.json"))
        yield srv, sup
        sup.close()
        assert not sup.errors, sup.errors
    finally:
        srv.stop()


def _kill_when(srv: SGLangServer, ready) -> int:
    """SIGKILL the server's main process (not its group: the supervisor finds the rest) once
    `ready()`; return the pid killed."""
    deadline = time.time() + 60
    while not ready():
        assert time.time() < deadline, "the kill condition never held"
        time.sleep(0.05)
    pid = srv.pid
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_restarted(srv: SGLangServer, old_pid: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not (srv.alive() and srv.pid != old_pid):
        assert time.time() < deadline, "the supervisor did not restart the server"
        time.sleep(0.1)


def test_request_in_flight_when_the_server_is_killed_is_retried_after_restart(supervised, models):
    srv, sup = supervised
    client = SGLangClient(srv.url, timeout=60, retry_timeout_s=300)
    prompts = [SEQ[i:i + 4 + i % 3] for i in range(8)]
    n_new = 480  # (context 512)
    params = {"temperature": 0.0, "max_new_tokens": n_new, "ignore_eos": True}
    result, done = {}, threading.Event()

    def call():
        try:
            result["out"] = client.generate(prompts, params)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e
        done.set()

    t0 = time.time()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    # in flight: the server has the request running (tokens generated, not finished)
    old_pid = _kill_when(srv, lambda: time.time() - t0 > 0.5)
    assert not done.is_set(), "the request finished before the kill: make it longer"
    thread.join(timeout=400)
    assert done.is_set() and "error" not in result, result.get("error")
    print(f"killed, restarted and re-generated in {time.time() - t0:.1f} s")

    assert srv.pid != old_pid and sup.supervisor.restarts == {"rollout": 1}
    assert client.retries >= 1
    assert server_restarts(sup.supervisor.counts_path) == 1
    log = open(srv.log_path).read()
    assert "SGLang server rollout exited with code -9; restart 1/5" in log
    # A fresh, complete result: every prompt has all its tokens, greedy and with the right
    # log-probs under transformers (the served weights are the init again: version 0).
    out = result["out"]
    assert len(out) == len(prompts)
    for p, r in zip(prompts, out):
        assert len(r.output_ids) == n_new and r.finish_reason == "length"
        assert r.weight_version == 0 and set(r.token_versions.tolist()) == {0}
        lp = _hf_logprobs(models[0], [p + r.output_ids])[0]
        rows = lp[len(p) - 1:len(p) - 1 + n_new]
        chosen = rows[torch.arange(n_new), torch.tensor(r.output_ids)]
        assert np.abs(r.output_logprobs - chosen.numpy()).max() < TOL
        # greedy: each token is the argmax (up to ties within the tolerance)
        assert (rows.max(-1).values - chosen).max().item() < TOL


def test_publisher_reconnects_to_a_restarted_rollout_server(supervised, models, tmp_path):
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.weight_sync import (DiskWeightPublisher, DistributedWeightPublisher,
                                          publish_with_retries)

    srv, sup = supervised
    restarts0 = sup.supervisor.restarts["rollout"]
    client = SGLangClient(srv.url, timeout=60, retry_timeout_s=300)
    weights_b = load_file(str(models[1] / "model.safetensors"))
    weights_a = load_file(str(models[0] / "model.safetensors"))
    start = 6

    def served_logprobs():
        return client.score([SEQ], start=[start])[0].logprobs

    def expected(model_dir):  # transformers on the published tensors (saved there)
        ref = _hf_logprobs(model_dir, [SEQ])[0]
        return np.array([ref[j - 1, SEQ[j]].item() for j in range(start, len(SEQ))])

    install_megatron_cpu_compat()
    init_distributed(ParallelConfig())  # the learner's own world exists beside the update group
    pub = DistributedWeightPublisher([client], reconnect_timeout_s=300, timeout_s=60)
    try:
        pub.connect()
        pub.publish(weights_b.items(), version=1)
        assert client.weight_version() == "1"
        # The rollout server dies between two publishes and comes back with the init (v0).
        # (The update then fails against the old group's dead peer and a server without the
        # group; the disk case below publishes while the server is still down.)
        old_pid = _kill_when(srv, lambda: True)
        _wait_restarted(srv, old_pid)
        client.wait_ready(300)
        assert client.weight_version() == "0"
        t0 = time.time()
        publish_with_retries(lambda: iter(weights_b.items()), pub, version=2, attempts=3)
        print(f"publish with reconnect took {time.time() - t0:.1f} s")
        assert pub.reconnects == 1
        assert client.weight_version() == "2"
        got = served_logprobs()
        assert np.abs(got - expected(models[1])).max() < TOL
        assert np.abs(got - expected(models[0])).max() > 0.1
        res = client.generate([SEQ[:6]], {"temperature": 1.0, "max_new_tokens": 3})[0]
        assert res.weight_version == 2 and set(res.token_versions.tolist()) == {2}
        # the re-formed group keeps working
        pub.publish(weights_a.items(), version=3)
        assert client.weight_version() == "3"
        assert np.abs(served_logprobs() - expected(models[0])).max() < TOL
    finally:
        pub.close()
        destroy_distributed()

    # The disk publisher: the server is killed; the publish waits for the restart and loads.
    disk = DiskWeightPublisher([client], tmp_path / "weights", models[0], reconnect_timeout_s=300)
    old_pid = _kill_when(srv, lambda: True)
    disk.publish(weights_b.items(), version=4)
    assert srv.pid != old_pid
    assert client.weight_version() == "4"
    assert np.abs(served_logprobs() - expected(models[1])).max() < TOL
    assert sup.supervisor.restarts["rollout"] == restarts0 + 2


def test_a_server_that_stops_answering_is_killed_and_restarted(supervised):
    """The health check: a server whose process is alive but answers no probe (SIGSTOPped) for
    health_timeout_s is killed and restarted; the probe's figures say what it saw."""
    from megatron_opd.serving.sglang_server import FleetProbe

    srv, sup = supervised
    with sup.paused:  # this supervisor alone acts on the server during the test
        probe = FleetProbe([srv], versioned={"rollout"}, interval_s=0.3, timeout_s=1.0).start()
        health = ServerSupervisor([srv], max_restarts=1, probe=probe, health_timeout_s=3.0)
        try:
            deadline = time.time() + 60
            while not probe.get("rollout").ok_at:
                assert time.time() < deadline, "the probe never got an answer"
                time.sleep(0.1)
            stats = health.stats()
            assert stats["fleet/rollout/weight_version"] is not None
            assert stats["fleet/rollout/queue"] == 0 and stats["fleet/rollout/up"] == 1
            server = next(p for p in psutil.Process(srv.pid).children()
                          if "sglang.launch_server" in p.cmdline())
            server.suspend()  # alive, answering nothing
            stopped_at, old_pid = time.time(), srv.pid
            assert health.check() == []  # not yet: the timeout has not passed
            while health.check() != ["rollout"]:
                assert time.time() - stopped_at < 30, "the unanswering server was not restarted"
                time.sleep(0.2)
            assert time.time() - stopped_at >= 3.0
            assert srv.alive() and srv.pid != old_pid
            assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
            assert health.stats()["fleet/rollout/errors"] >= 1
            assert "failed its health check for 3 s; killed; restart 1/1" in \
                open(srv.log_path).read()
        finally:
            probe.close()


class _Sleeper(SGLangServer):
    """A stand-in server process (a sleeping Python), so the bound is checked without SGLang."""

    def command(self):
        return [sys.executable, "-c", "import time; time.sleep(600)"]


def test_supervisor_restarts_on_the_same_port_until_the_bound_then_names_the_server(tmp_path):
    srv = _Sleeper("teacher", "unused", 12345, str(tmp_path / "teacher.log"))
    srv.start()
    counts = tmp_path / "server_restarts.json"
    sup = ServerSupervisor([srv], max_restarts=2, counts_path=counts)
    try:
        assert sup.check() == [] and json.loads(counts.read_text()) == {"teacher": 0}
        for n in (1, 2):
            pid = srv.pid
            os.kill(pid, signal.SIGKILL)
            srv.proc.wait()
            assert sup.check() == ["teacher"]
            assert srv.alive() and srv.pid != pid and srv.port == 12345
            assert json.loads(counts.read_text()) == {"teacher": n}
            assert f"exited with code -9; restart {n}/2 on port 12345" in \
                (tmp_path / "teacher.log").read_text()
        os.kill(srv.pid, signal.SIGKILL)
        srv.proc.wait()
        with pytest.raises(ServerRestartLimit) as err:
            sup.check()
        assert "SGLang server teacher died" in str(err.value)
        assert "server.max_restarts=2" in str(err.value) and "last lines of" in str(err.value)
        assert server_restarts(counts) == 2
    finally:
        srv.stop()


def test_client_without_retries_fails_at_once_and_with_retries_gives_up_at_the_deadline():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    with pytest.raises(ServerUnavailable):
        SGLangClient(url).generate([[1, 2]], {"max_new_tokens": 1})
    with pytest.raises(ServerUnavailable, match="after retrying"):
        SGLangClient(url, retry_timeout_s=1.5).score([[1, 2, 3]], start=[1])
    assert time.time() - t0 < 10


# End to end: tests/test_fleet.py SIGKILLs a rollout server behind the router, and
# tests/test_e2e_hf.py a learner, each counting every sample by id.
