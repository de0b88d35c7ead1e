"""Interrupt sync (`correction.proximal=interrupt`): the learner's store, the orchestrator's
gate and continuation, the messages over real ZeroMQ sockets, and a real run (SGLang rollout and
teacher servers, megatron learner) in which every trained token's pi_old is exact.

The run's check is independent of the implementation: on CPU the train-side and SGLang's
log-probs of one version agree to ~1e-13 in KL (`offpolicy/mismatch_kl`, ALGORITHMS.md §6), while
a token scored with another version's weights is off by the staleness KL (~1e-3 here). So
pi_old of stale tokens, partial rollouts continued across updates among them, must come out with
mismatch_kl at the 1e-13 level and no fallback to mu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from megatron_opd.interrupt_sync import InterruptGate
from megatron_opd.serving.resume import merge_partial
from megatron_opd.learner.interrupt import InterruptStore, rows_to_score
from megatron_opd.serving.sglang_client import GenerateResult, ServerUnavailable
from megatron_opd.transport import PartialRollouts, ProtocolError, decode, encode
from test_transport import make_sample
from test_transport_channel import pair, pump  # noqa: F401 (fixture)


def test_store_keeps_only_the_interrupted_versions_tokens_and_hands_them_over_once():
    store = InterruptStore()
    # a partial row of 3 tokens (versions 4, 5, 5) scored at the interrupt of version 5
    assert store.put("a", np.array([-1.0, -2.0, -3.0]), np.array([4, 5, 5]), 5) == 2
    # the finished response is longer; version 4 was scored at its own interrupt earlier
    assert store.put("a", np.array([-9.0, -8.0, -7.0, -6.0]), np.array([4, 5, 5, 6]), 4) == 1
    s = make_sample(T=5, sid="a")
    got = store.take([s, make_sample(T=2, sid="b")], width=6).numpy()
    np.testing.assert_array_equal(got[0, :3], [-9.0, -2.0, -3.0])
    assert np.isnan(got[0, 3:]).all() and np.isnan(got[1]).all()
    assert store.take([s], width=6).isnan().all()  # taken once
    store.put("old", np.array([-1.0]), np.array([1]), 1)
    store.put("new", np.array([-1.0]), np.array([3]), 3)
    store.forget_older_than(2)
    assert set(store.rows) == {"new"}


def test_rows_to_score_prefers_received_samples_and_skips_rows_without_the_version():
    received = [make_sample(T=3, sid="a"), make_sample(T=2, sid="b")]
    received[0].token_versions[:] = [1, 2, 2]
    received[1].token_versions[:] = [1, 1]
    answer = PartialRollouts.pack(7, 2, [("a", [1], [5], [2]), ("c", [1, 2], [3, 4], [1, 2]),
                                         ("d", [1], [9], [1])])
    rows = rows_to_score(decode(encode(answer)), received, version=2)
    assert [r[0] for r in rows] == ["a", "c"]
    assert len(rows[0][2]) == 3  # the received sample, not the shorter partial row


def test_continuation_is_the_exact_token_sequence_with_its_versions():
    first = GenerateResult([5, 6], np.array([-0.1, -0.2], np.float32), np.array([3, 3]), 3,
                           "abort")
    more = GenerateResult([7], np.array([-0.3], np.float32), np.array([4]), 4, "stop")
    m = merge_partial(first, more)
    assert m.output_ids == [5, 6, 7] and m.finish_reason == "stop" and m.weight_version == 4
    np.testing.assert_array_equal(m.token_versions, [3, 3, 4])
    np.testing.assert_array_equal(m.output_logprobs, np.array([-0.1, -0.2, -0.3], np.float32))


def test_gate_answers_with_every_unsent_row_after_the_running_calls_return():
    gate = InterruptGate()
    assert gate.begin_generate()
    returned = threading.Event()

    def running_call():  # returns its partial output once the servers are paused
        returned.wait(5)
        gate.end_generate({"x-0": ([1], [5, 6], np.array([2, 2]))})

    threading.Thread(target=running_call).start()
    gate.rows["y-0"] = ([1], [4], np.array([2]))  # finished, being scored by the teacher
    class Server:  # the running call returns once the server aborted it
        def abort_all(self):
            returned.set()

        def pause_generation(self, mode):
            assert mode == "abort"

    class Down:  # a server being restarted: counted, the interrupt goes on
        def abort_all(self):
            raise ServerUnavailable("down")

        def pause_generation(self, mode):
            raise ServerUnavailable("down")

    rows = gate.interrupt([Down(), Server()], grace_s=5)
    assert sorted(r[0] for r in rows) == ["x-0", "y-0"] and gate.stats["late_calls"] == 0
    assert gate.stats["server_errors"] == 2
    # closed: a worker waits; reopened: it goes on
    started = []
    t = threading.Thread(target=lambda: started.append(gate.begin_generate()))
    t.start()
    t.join(0.3)
    assert not started
    gate.reopen()
    t.join(5)
    assert started == [True]
    gate.sent("x-0")
    assert set(gate.rows) == {"y-0"}


def test_partial_rollouts_invariants_are_enforced():
    ok = PartialRollouts.pack(1, 2, [("a", [1, 2], [3, 4], [1, 2])])
    assert decode(encode(ok)).keys == ["a"]
    bad = [PartialRollouts.pack(1, 2, [("a", [1], [3, 4], [2, 1])]),  # versions go back
           PartialRollouts.pack(1, 2, [("a", [1], [3], [2]), ("a", [1], [3], [2])]),  # repeat
           PartialRollouts(1, 2, ["a"], np.array([1], np.int32), np.array([2], np.int32),
                           np.array([1, 2], np.int32), np.array([0, 0]))]  # lengths don't add up
    for msg in bad:
        with pytest.raises(ProtocolError):
            encode(msg)


def test_partial_rollouts_travel_outside_credit_and_need_a_handshake(pair):  # noqa: F811
    server, client = pair(credit=1)
    assert client.send(make_sample(sid="s0"), timeout_ms=2000)  # the one credit is spent
    msg = PartialRollouts.pack(9, 3, [("s1", [1], [2, 3], [3, 3])])
    assert client.send_outside_credit(msg)
    pump(server, client, 5.0, until=lambda: server.partial_rollouts)
    assert server.partial_rollouts[0].keys == ["s1"] and server.stats["partial_rollouts"] == 1
    assert [s.sample_id for s in server.queued_samples()] == ["s0"]  # ordered before it
    fresh, c2 = pair(handshake=False)  # no Hello answered yet: refused, sent nothing
    assert not c2.send_outside_credit(msg, timeout_ms=200)


@pytest.mark.slow
def test_run_with_interrupt_sync_trains_every_token_with_its_exact_pi_old(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_opd.cli", "train", "--config",
           "configs/quickstart.yaml", f"run.dir={run}", "train.steps=6", "eval.interval=3",
           "correction.proximal=interrupt", "async.max_staleness=2", "logging.progress=false"]
    # (no env.num_eval_prompts override: it is part of the prepared models' cache key, and a
    # second `prepare` of the quickstart models cost CI a minute)
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert len(steps) == 6
    for r in steps:
        assert r["offpolicy/interrupt_answered"] == 1.0
        assert r["offpolicy/proximal_fallback_fraction"] == 0.0
        assert r["offpolicy/mismatch_kl"] < 1e-9, r["step"]
    # the check has teeth: stale tokens whose pi_old differs from pi_theta were trained, and
    # some responses were interrupted mid-generation and continued under the next version
    assert max(r["samples/staleness_mean"] for r in steps) > 0.5
    assert max(r["offpolicy/staleness_kl"] for r in steps) > 1e-4
    assert max(r["offpolicy/interrupt_unsent_rows"] for r in steps) > 0
    assert max(r["samples/multi_version_fraction"] for r in steps) > 0
