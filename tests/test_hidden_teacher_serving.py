"""The hidden-state teacher (teacher.signal=hidden, issue 16) from a real SGLang teacher server to
the learner's batch: the server's hidden-state frames (compat patch), the rows at the scored
positions, the learner's recomputation of the teacher's log-probs from them (one rank and TP2
under gloo) against what the same server returns as top-K log-probs, the sample field through
ZeroMQ and collate, payload accounting, and the config and schema rules.

One module-scoped server (a tiny fp32 model, --enable-return-hidden-states, float32 frames).
Run as a script it is the TP2 worker (`torch.distributed.run ... --worker DIR`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the TP2 worker, started by torch.distributed.run
    sys.path.insert(0, str(ROOT))

TOL = 1e-4  # fp32 server vs the learner's fp32 recomputation (the bound)
SEQS = [[1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31], [1, 13, 4, 5, 6, 9, 8, 31, 7],
        [1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31]]  # a shared prompt (a radix-cache hit), last id 31
STARTS = [6, 6, 6]
K = 5


def _worker(out_dir: str) -> None:
    """rank r of 2: this rank's half of the teacher's head (padded vocabulary), the log-probs of
    the given ids from the given hidden states, all-reduced over the vocabulary shards."""
    import torch.distributed as dist

    from megatron_opd.learner.hidden_teacher import TeacherHead, teacher_logprobs_from_hidden

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d = np.load(Path(out_dir) / "inputs.npz")
    head = TeacherHead.from_hf(str(d["model"]), tp_rank=rank, tp_size=world,
                               padded_vocab_size=int(d["padded"]))
    got = teacher_logprobs_from_hidden(head, torch.from_numpy(d["hidden"]),
                                       torch.from_numpy(d["ids"]).long(), group=dist.group.WORLD,
                                       temperature=float(d["temperature"]))
    diff = float((got.double() - torch.from_numpy(d["want"]).double()).abs().max())
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"max_abs_diff": diff, "v_local": head.v_local, "valid_rows": head.valid_rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[sys.argv.index("--worker") + 1])
    sys.exit(0)


from megatron_opd import sample_fields as sf  # noqa: E402
from megatron_opd.compat.sglang_cpu import HIDDEN_STATES_ENV, hidden_states_frame  # noqa: E402
from megatron_opd.config import ConfigError, load_config  # noqa: E402
from megatron_opd.serving.sglang_client import (  # noqa: E402
    GenerateResult, SGLangClient, decode_hidden_states)
from megatron_opd.transport import (  # noqa: E402
    ProtocolError, Sample, SampleReceiver, SampleSender, decode, encode, free_tcp_endpoint)
from tests.test_sglang_serving import save_model  # noqa: E402

QUICKSTART = ROOT / "configs/quickstart.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(model dir, server URL): one tiny teacher served with hidden states as float32 frames."""
    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    root = tmp_path_factory.mktemp("hidden_teacher")
    path = save_model(root / "teacher", 0)
    srv = SGLangServer("teacher", str(path), free_port(), str(root / "teacher.log"),
                       max_total_tokens=2048, threads=1,
                       # the teacher fleet's own flags (launch/fleet.py)
                       extra_args=("--enable-return-hidden-states", "--chunked-prefill-size", "4096"),
                       hidden_states_dtype="float32")
    srv.start()
    try:
        srv.wait_ready(300)
        yield path, srv.url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(teacher):
    """transformers' final hidden states (after the norm) and log-probs, float32, per sequence."""
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(teacher[0], dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for x in SEQS:
            o = m(torch.tensor([x]), output_hidden_states=True)
            out.append((o.hidden_states[-1][0].numpy(), o.logits[0].double()))
    return out


# --- the server: frames, rows, exact log-probs ---------------------------------------------------

@pytest.mark.slow
def test_server_sends_hidden_states_as_frames_equal_to_transformers(teacher, reference):
    """The patched server's prefill rows are one float32 frame per request: after the final
    norm (transformers' last hidden_states) for the positions it computed."""
    payload = {"input_ids": SEQS[:1], "return_hidden_states": True, "return_logprob": True,
               "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
               "logprob_start_len": 0}
    r = requests.post(f"{teacher[1]}/generate", json=payload, timeout=60)
    r.raise_for_status()
    frame = r.json()[0]["meta_info"]["hidden_states"][0]
    assert isinstance(frame, dict) and frame["dtype"] == "float32"
    rows = decode_hidden_states(frame, "float32")
    want = reference[0][0]
    assert rows.shape[1] == want.shape[1] and rows.shape[0] <= len(SEQS[0])
    np.testing.assert_allclose(rows, want[len(SEQS[0]) - rows.shape[0]:], atol=TOL, rtol=0)
    # what the frame saves on the HTTP leg: the same values as JSON floats (upstream's form)
    as_json = len(orjson.dumps(rows.astype(np.float64).tolist()))
    assert len(frame["b64"]) == 4 * ((rows.size * 4 + 2) // 3) < as_json / 3


def _score(url, dtype, temperature):
    return SGLangClient(url, timeout=60).score(SEQS, start=STARTS, top_k=K,
                                               temperature=temperature, hidden=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_hidden_equal_the_servers_top_k_one_rank(teacher, reference, temperature):
    """teacher_logprobs_from_hidden(head from the checkpoint, the sample's hidden rows, ids) ==
    the same server's top-K and sampled-token log-probs at the same positions (both calls: the
    second scores the shared prompt from the radix cache)."""
    from megatron_opd.learner.hidden_teacher import TeacherHead, teacher_logprobs_from_hidden

    head = TeacherHead.from_hf(str(teacher[0]))
    for _ in range(2):
        for x, s, r in zip(SEQS, STARTS, _score(teacher[1], "float32", temperature)):
            n = len(x) - s
            assert r.hidden.shape == (n, 64) and r.hidden.dtype == np.float32
            h = torch.from_numpy(r.hidden)
            top = teacher_logprobs_from_hidden(head, h, torch.from_numpy(r.topk_ids).long(),
                                               temperature=temperature)
            assert float((top - torch.from_numpy(r.topk_logprobs)).abs().max()) <= TOL
            tok = teacher_logprobs_from_hidden(head, h, torch.tensor(x[s:]),
                                               temperature=temperature)
            assert float((tok - torch.from_numpy(r.logprobs)).abs().max()) <= TOL
            assert r.http_bytes > 0
    # the rows are transformers' at positions s-1 .. len-2 (the ones predicting the tokens)
    r = _score(teacher[1], "float32", 1.0)[1]
    np.testing.assert_allclose(r.hidden, reference[1][0][STARTS[1] - 1:-1], atol=TOL, rtol=0)


@pytest.mark.slow
def test_hidden_states_through_the_smg_router_equal_direct_calls(teacher, tmp_path):
    """A hidden-state teacher fleet of several servers is scored through smg (RoutedClient, one
    sequence per request): the router passes `return_hidden_states` and the frames through, so
    the rows, top-K and log-probs equal a direct call's."""
    from megatron_opd.procs import free_port
    from megatron_opd.serving.router import RoutedClient, SmgRouter

    router = SmgRouter("teacher-router", [teacher[1]], "round_robin", free_port(),
                       str(tmp_path / "router.log"))
    router.start()
    try:
        router.wait_ready(120)
        routed = RoutedClient(router.url, timeout=60).score(SEQS, start=STARTS, top_k=K,
                                                            hidden="float32")
    finally:
        router.stop()
    # (one sequence per request there, a batch here: sums in another order, ~5e-7 apart)
    for got, want in zip(routed, _score(teacher[1], "float32", 1.0)):
        assert got.hidden.dtype == np.float32 and got.hidden.shape == want.hidden.shape
        np.testing.assert_allclose(got.hidden, want.hidden, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_logprobs_from_hidden_equal_the_servers_top_k_under_tp2(teacher, tmp_path):
    """The same under TP2: two gloo processes, each with half of the (padded) head."""
    temperature = 0.7
    rs = _score(teacher[1], "float32", temperature)
    hidden = np.concatenate([r.hidden for r in rs])
    ids = np.concatenate([r.topk_ids for r in rs])
    want = np.concatenate([r.topk_logprobs for r in rs])
    np.savez(tmp_path / "inputs.npz", model=str(teacher[0]), padded=40, hidden=hidden, ids=ids,
             want=want, temperature=temperature)  # 40 = 32 ids + 8 padding rows on rank 1
    from megatron_opd.procs import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", __file__,
           "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(x["v_local"], x["valid_rows"]) for x in ranks] == [(20, 20), (20, 12)]
    assert all(x["max_abs_diff"] <= TOL for x in ranks), ranks


# --- orchestrator -> ZeroMQ -> batch -----------------------------------------------------------

def _config(*overrides):
    return load_config(QUICKSTART, ["rollout.group_size=2", "train.batch_size=16",
                                    "teacher.signal=hidden", f"teacher.top_k={K}", *overrides])


def _digits(cfg):
    from megatron_opd.envs.digits import DigitsEnv

    env = DigitsEnv(cfg)
    return env, [DigitsEnv._prompt(env.task.make("rev", [1, 2, 3]))]


def _gen(out):
    n = len(out)
    return GenerateResult(output_ids=list(out), output_logprobs=np.full(n, -0.5, np.float32),
                          token_versions=np.zeros(n, np.int64), weight_version=0,
                          finish_reason="stop")


def _samples(cfg, url, responses):
    from megatron_opd.orchestrator import make_groups, request_prompts
    from megatron_opd.serving.teachers import TeacherRouter

    env, ex = _digits(cfg)
    router = TeacherRouter.single(cfg, SGLangClient(url, timeout=60))
    prompts = request_prompts(ex, cfg.rollout.group_size)
    scored = router.score([p + list(getattr(r, "output_ids")) for p, r in zip(prompts, responses)],
                          start=[len(p) for p in prompts])
    (group,) = make_groups(cfg, env, ex, responses, scored.results, ["g-0"], scored.revisions)
    return prompts, scored.results, group


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_samples_carry_hidden_rows_through_zeromq_to_the_batch(teacher, dtype):
    """make_groups -> Sample.teacher_hidden (float32, or bfloat16 bits) -> real ZeroMQ -> collate:
    [B, T, d] in the samples' precision (bf16 stays bf16), the scored rows exactly, zero padding; a
    multi-turn sample's tool-token rows are zeros; the payload metrics are the bytes sent."""
    from megatron_opd.episodes import Trajectory
    from megatron_opd.learner.batch import collate

    cfg = _config(f"teacher.hidden_dtype={dtype}")
    _, ex = _digits(cfg)
    traj = Trajectory(prompt_ids=list(ex[0].token_ids), output_ids=[9, 4, 20, 21, 5, 3],
                      loss_mask=[1, 1, 0, 0, 1, 1], output_logprobs=[-0.5] * 6,
                      token_versions=[0] * 6, reward=1.0, done=True)
    prompts, scores, group = _samples(cfg, teacher[1], [_gen([5, 6, 3]), traj])
    ep = free_tcp_endpoint()
    rx, tx = SampleReceiver(ep, max_message_bytes=1 << 22), SampleSender(ep)
    try:
        for s in group:
            tx.send(s)
        got, deadline = [], time.time() + 10
        while len(got) < 2 and time.time() < deadline:
            m = rx.recv(timeout_ms=100)
            if m is not None:
                got.append(m)
    finally:
        tx.close(), rx.close()
    assert [s.sample_id for s in got] == [s.sample_id for s in group]
    wire = np.uint16 if dtype == "bfloat16" else np.float32
    for s, sc, mask in zip(got, scores, [None, np.asarray(traj.loss_mask)]):
        assert s.teacher_hidden.dtype == wire and s.teacher_hidden.shape == (s.num_tokens, 64)
        want = sc.hidden if mask is None else np.where(mask[:, None] > 0, sc.hidden, 0)
        assert np.array_equal(s.teacher_hidden, want)
        assert s.metadata["teacher_http_bytes"] == pytest.approx(sc.http_bytes)
    batch, _ = collate(got, pad_id=0, step=0, max_staleness=None)
    assert batch.teacher_hidden.dtype == getattr(torch, dtype)
    assert list(batch.teacher_hidden.shape) == [2, 6, 64]
    rows = batch.teacher_hidden.float()  # (bf16 -> float32 is exact)
    for b, s in enumerate(got):
        h = s.teacher_hidden
        wide = sf.bf16_bits_to_float32(h) if h.dtype == np.uint16 else h
        assert torch.equal(rows[b, :s.num_tokens], torch.from_numpy(wide))
        assert not rows[b, s.num_tokens:].any()
    assert not rows[1, 2:4].any()  # the tool tokens
    if dtype == "bfloat16":  # the server's float32 rows rounded to bfloat16 (half an ulp: 2^-9;
        # this request is computed in another batch, so its float32 rows may differ in the last bits)
        f32 = SGLangClient(teacher[1], timeout=60).score(
            [prompts[0] + [5, 6, 3]], start=[len(prompts[0])], hidden="float32")[0].hidden
        np.testing.assert_allclose(sf.bf16_bits_to_float32(got[0].teacher_hidden), f32,
                                   rtol=2.0 ** -8, atol=1e-6)
    # payload accounting: teacher frames on the wire per token; HTTP body per scored token
    frames = [encode(s) for s in got]
    names = [[t["name"] for t in orjson.loads(bytes(f[0]))["tensors"]] for f in frames]
    zmq_bytes = sum(memoryview(fr).nbytes for f, n in zip(frames, names)
                    for name, fr in zip(n, f[1:]) if name in sf.TEACHER_FIELDS)
    tokens = sum(s.num_tokens for s in got)
    m = sf.teacher_payload_metrics(got)
    assert m["teacher/bytes_per_token_zmq"] == zmq_bytes / tokens
    assert m["teacher/bytes_per_token_zmq"] == 4 + 8 * K + 64 * (2 if dtype == "bfloat16" else 4)
    assert m["teacher/bytes_per_token_http"] == pytest.approx(
        sum(sc.http_bytes for sc in scores) / tokens)


def test_bfloat16_frames_round_to_nearest_even_and_decode_exactly():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 16)) * 10.0 ** rng.integers(-20, 20, (7, 16))).astype(np.float32)
    frame = hidden_states_frame(x.astype(np.float64).tolist(), "bfloat16")
    assert frame["dtype"] == "bfloat16" and frame["shape"] == [7, 16]
    bits = decode_hidden_states(frame, "bfloat16")
    ref = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(bits, ref.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(sf.bf16_bits_to_float32(bits), ref.float().numpy())
    f32 = decode_hidden_states(hidden_states_frame(x.tolist(), "float32"), "float32")
    assert np.array_equal(f32, x)
    assert np.array_equal(decode_hidden_states(x.tolist(), "float32"), x)  # upstream's lists
    with pytest.raises(Exception, match="float32"):
        decode_hidden_states(frame, "float32")  # never widened silently from bf16


def test_evaluation_scoring_asks_no_hidden_states():
    """The router asks for hidden states in training scoring only: evaluation's client view
    (for_prompts) and a router of another signal send no `hidden`."""
    from megatron_opd.serving.teachers import TeacherRouter

    class Recorder:
        def __init__(self):
            self.kwargs = []

        def score(self, input_ids, *, start, **kw):
            self.kwargs.append(kw)
            return [None] * len(input_ids)

    cfg, rec = _config("teacher.hidden_dtype=float32"), Recorder()
    router = TeacherRouter.single(cfg, rec)
    router.score([[1, 2, 3]], start=[1])
    router.for_prompts(cfg, "digits", []).score([[1, 2, 3]], start=[1], top_k=2)
    plain = TeacherRouter.single(load_config(QUICKSTART, ["teacher.top_k=2"]), rec)
    plain.score([[1, 2, 3]], start=[1])
    assert [k.get("hidden") for k in rec.kwargs] == ["float32", None, None]


# --- config, fleet, schema ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides, signal", [
    ([], "sampled"), (["teacher.top_k=8"], "topk"),  # auto: what top_k implies (old configs)
    (["teacher.signal=hidden"], "hidden"), (["teacher.signal=hidden", "teacher.top_k=4"], "hidden"),
    (["teacher.signal=topk", "teacher.top_k=4"], "topk")])
def test_signal_resolves_and_keeps_old_configs(overrides, signal):
    cfg = load_config(QUICKSTART, overrides)
    assert cfg.teacher.signal == signal and cfg.teacher.hidden_dtype == "bfloat16"


@pytest.mark.parametrize("overrides, key", [
    (["teacher.signal=sampled", "teacher.top_k=4"], "teacher.top_k"),
    (["teacher.signal=topk"], "teacher.top_k"),
    (["teacher.signal=hidden", "teacher.mode=offline"], "teacher.signal"),
    (["teacher.signal=hidden", "teacher.route_by=env",
      "teacher.teachers=[{name: digits, revision: d1}]"], "teacher.signal"),
    (["teacher.signal=logits"], "teacher.signal"),
    (["teacher.hidden_dtype=float16"], "teacher.hidden_dtype"),
])
def test_bad_signal_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(QUICKSTART, overrides)


def test_teacher_servers_of_the_hidden_signal_return_hidden_states_as_frames(tmp_path):
    from types import SimpleNamespace

    from megatron_opd.launch.fleet import fleet_specs, server_options
    from megatron_opd.serving.sglang_server import SGLangServer

    models = SimpleNamespace(teacher_dir=tmp_path / "t", student_dir=tmp_path / "s")
    for dtype in ("bfloat16", "float32"):
        cfg = _config(f"teacher.hidden_dtype={dtype}")
        fleets = fleet_specs(cfg, models)
        assert all("--enable-return-hidden-states" in s.extra_args for s in fleets["teacher"])
        # a chunked prefill answers with its last chunk's rows only: a chunk holds a sequence
        longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens,
                                                   cfg.env.max_response_tokens)
        for s in fleets["teacher"]:
            chunk = int(s.extra_args[s.extra_args.index("--chunked-prefill-size") + 1])
            assert chunk >= max(4096, longest)
        assert not any("--enable-return-hidden-states" in s.extra_args for s in fleets["rollout"])
        envs = {s.role: SGLangServer(s.name, s.model_dir, 1, str(tmp_path / "log"),
                                     extra_args=s.extra_args, **server_options(cfg)).environment()
                for f in fleets.values() for s in f}
        assert envs["teacher"][HIDDEN_STATES_ENV] == dtype
        assert HIDDEN_STATES_ENV not in envs["rollout"]
    plain = fleet_specs(load_config(QUICKSTART), models)
    assert not any("--enable-return-hidden-states" in s.extra_args for s in plain["teacher"])


def _sample(hidden) -> Sample:
    T = 4
    return Sample(sample_id="s", group_id="g", prompt_ids=np.arange(1, 4, dtype=np.int32),
                  response_ids=np.arange(5, 5 + T, dtype=np.int32),
                  loss_mask=np.ones(T, np.uint8), behaviour_logprobs=np.full(T, -1, np.float32),
                  token_versions=np.zeros(T, np.int64), teacher_logprobs=np.full(T, -1, np.float32),
                  teacher_topk_ids=np.zeros((T, 0), np.int32),
                  teacher_topk_logprobs=np.zeros((T, 0), np.float32), teacher_hidden=hidden,
                  teacher_temperature=1.0)


def _bad_hidden_frames():
    good = encode(_sample(sf.float32_to_bf16_bits(np.ones((4, 8), np.float32))))
    head = orjson.loads(bytes(good[0]))

    def replaced(tensor: dict | None = None, frame: bytes | None = None):
        h = dict(head, tensors=[dict(t, **tensor) if tensor and t["name"] == "teacher_hidden"
                                else t for t in head["tensors"]])
        return [orjson.dumps(h)] + [bytes(f) for f in good[1:-1]] + [frame or bytes(good[-1])]

    inf = np.ones((4, 8), np.uint16) * 0x3F80
    inf[2, 3] = 0x7F80  # bfloat16 +inf
    nan = np.ones((4, 8), np.float32)
    nan[1, 1] = np.nan
    return {
        "bad_dtype": replaced({"dtype": "float16"}),
        "bad_shape": replaced({"shape": [3, 8]}, bytes(3 * 8 * 2)),  # T rows, not 3
        "non_finite": replaced(frame=inf.tobytes()),
        "non_finite_f32": replaced({"dtype": "float32"}, nan.tobytes()),
    }


def test_malformed_hidden_frames_are_rejected_named_and_counted():
    """Over real ZeroMQ: each malformed teacher_hidden is refused with its reason and counted;
    the receiver keeps serving. The sender refuses the same before sending."""
    import zmq

    for bad, reason in [(np.ones((4, 8), np.float64), "bad_dtype"),
                        (np.ones((5, 8), np.float32), "bad_shape"),
                        (np.ones(4, np.float32), "bad_shape"),
                        (np.full((4, 8), np.inf, np.float32), "non_finite"),
                        (np.full((4, 8), 0x7FC0, np.uint16), "non_finite")]:  # bf16 NaN
        with pytest.raises(ProtocolError) as err:
            _sample(bad).validate()
        assert err.value.reason == reason
    ep = free_tcp_endpoint()
    rx = SampleReceiver(ep, max_message_bytes=1 << 20)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep)
    try:
        cases = _bad_hidden_frames()
        for case, frames in cases.items():
            raw.send_multipart(frames)
        deadline = time.time() + 10
        while rx.stats["rejected_total"] < len(cases) and time.time() < deadline:
            assert rx.recv(timeout_ms=100) is None
        assert rx.stats["rejected_by_reason"] == {"bad_dtype": 1, "bad_shape": 1,
                                                 "non_finite": 2}
        good = _sample(np.ones((4, 8), np.float32))
        raw.send_multipart([bytes(f) for f in encode(good)])
        deadline, got = time.time() + 10, None
        while got is None and time.time() < deadline:
            got = rx.recv(timeout_ms=100)
        assert np.array_equal(got.teacher_hidden, good.teacher_hidden)
        assert decode(encode(_sample(None))).teacher_hidden is None  # optional
    finally:
        rx.close(), raw.close()
