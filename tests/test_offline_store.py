"""Offline OPD store (megatron_opd/offline_store.py): exact round trip, atomic writes, no pickle,
config identity, cycling with unique ids; and `megatron-opd precompute-teacher` against real
SGLang CPU servers with tiny prepared models, checked against `transformers`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import megatron_opd.offline_store as store_mod
from megatron_opd.config import load_config
from megatron_opd.offline_store import (MANIFEST, StoreError, open_store, store_key, store_path,
                                        write_store)
from megatron_opd.transport import Sample

ROOT = Path(__file__).resolve().parents[1]


def make_samples(n_groups=5, group_size=3, K=4, seed=0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        P = int(rng.integers(2, 7))
        prompt = rng.integers(1, 30, P).astype(np.int32)
        for j in range(group_size):
            T = int(rng.integers(1, 9))
            out.append(Sample(
                sample_id=f"x{g}-{j}", group_id=f"x{g}", prompt_ids=prompt.copy(),
                response_ids=rng.integers(1, 30, T).astype(np.int32),
                loss_mask=(rng.random(T) > 0.1).astype(np.uint8),
                behaviour_logprobs=-rng.random(T).astype(np.float32),
                token_versions=np.zeros(T, dtype=np.int64),
                teacher_logprobs=-rng.random(T).astype(np.float32),
                teacher_topk_ids=rng.integers(0, 32, (T, K)).astype(np.int32),
                teacher_topk_logprobs=-rng.random((T, K)).astype(np.float32),
                teacher_revision="teacher-v7", reward=float(rng.integers(0, 2)),
                metadata={"op": ["rev", "sort"][g % 2]}, finish_reason=["stop", "length"][j % 2],
                temperature=0.8, top_p=0.9, teacher_temperature=[1.0, 1.25][g % 2]))
    return out


SAME = ("prompt_ids", "response_ids", "loss_mask", "behaviour_logprobs", "teacher_logprobs",
        "teacher_topk_ids", "teacher_topk_logprobs")


@pytest.mark.parametrize("K", [4, 0])
def test_round_trip_is_exact_and_keeps_groups(tmp_path, monkeypatch, K):
    monkeypatch.setattr(store_mod, "SHARD_SIZE", 4)  # several shards, a group across two
    samples = make_samples(K=K)
    manifest = write_store(tmp_path / "s", samples, "abc123")
    assert [e["count"] for e in manifest["shards"]] == [4, 4, 4, 3]
    store = open_store(tmp_path / "s", "abc123")
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m == manifest
    assert (m["config_hash"], m["teacher_revision"], m["count"], m["top_k"], m["group_size"],
            m["num_groups"]) == ("abc123", "teacher-v7", 15, K, 3, 5)
    got = list(store.iter_samples())
    assert len(got) == len(samples) == store.count
    for i, ((group, s), ref) in enumerate(zip(got, samples)):
        s.validate()
        assert group == i // 3
        for name in SAME:
            a, b = getattr(s, name), getattr(ref, name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
        assert (s.reward, s.temperature, s.top_p, s.teacher_temperature, s.finish_reason,
                s.metadata["op"]) == (ref.reward, ref.temperature, ref.top_p,
                                      ref.teacher_temperature, ref.finish_reason,
                                      ref.metadata["op"])
        assert s.teacher_revision == "teacher-v7"
        assert s.token_versions.tolist() == [0] * s.num_tokens
    assert [len(g) for g in store.groups()] == [3] * 5


def test_training_groups_cycle_in_order_with_unique_ids(tmp_path):
    samples = make_samples(n_groups=2, group_size=2)
    write_store(tmp_path / "s", samples, "h")
    it = open_store(tmp_path / "s").training_groups("run")
    groups = [next(it) for _ in range(5)]  # 2.5 cycles
    flat = [s for g in groups for s in g]
    assert len({s.sample_id for s in flat}) == 10
    assert [g[0].group_id for g in groups] == [
        "run-off-c0-g000000000", "run-off-c0-g000000001", "run-off-c1-g000000000",
        "run-off-c1-g000000001", "run-off-c2-g000000000"]
    for i, s in enumerate(flat):
        assert s.response_ids.tolist() == samples[i % 4].response_ids.tolist()


def test_a_store_without_manifest_is_never_used_and_gets_replaced(tmp_path):
    path = tmp_path / "s"
    write_store(path, make_samples(), "h")
    (path / MANIFEST).unlink()  # what a crash before the manifest would look like
    assert open_store(path) is None
    write_store(path, make_samples(seed=1), "h2")
    assert open_store(path, "h2").count == 15


def test_a_crash_mid_write_leaves_nothing_that_looks_like_a_store(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SHARD_SIZE", 4)
    calls = {"n": 0}
    real = np.savez

    def failing_savez(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(store_mod.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        write_store(tmp_path / "s", make_samples(), "h")
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    assert open_store(tmp_path / "s") is None


def test_tampered_or_foreign_stores_are_refused(tmp_path):
    path = tmp_path / "s"
    write_store(path, make_samples(), "h")
    with pytest.raises(StoreError, match="teacher.offline_store: .* another config"):
        open_store(path, "other-hash")
    shard = path / "shard-00000.npz"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="do not match the manifest"):
        list(open_store(path).iter_samples())
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not an offline store"):
        write_store(tmp_path / "notastore", make_samples(), "h")
    assert (tmp_path / "notastore" / "precious.txt").read_text() == "keep me"


def test_a_version_2_store_is_refused_with_a_clear_message(tmp_path):
    """Version 2 stores hold no teacher_temperature: refused (naming the versions and how to
    rebuild), never read as temperature 1."""
    path = tmp_path / "s"
    write_store(path, make_samples(), "h")
    m = json.loads((path / MANIFEST).read_text())
    assert m["version"] == store_mod.OFFLINE_VERSION == 3 and m["teacher_temperature"] == 1.0
    m["version"] = 2
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="not a version-3 .* version 2.*remove it to rebuild"):
        open_store(path, "h")


def test_shards_hold_only_plain_arrays_and_pickles_are_refused(tmp_path):
    path = tmp_path / "s"
    write_store(path, make_samples(), "h")
    shard = path / "shard-00000.npz"
    with zipfile.ZipFile(shard) as zf:
        for name in zf.namelist():  # every member is a .npy of a non-object dtype
            arr = np.load(io.BytesIO(zf.read(name)), allow_pickle=False)
            assert arr.dtype != object and not arr.dtype.hasobject, name
            assert b"pickle" not in zf.read(name)[:128], name
    # a shard that needs pickle (an object array), even with a matching hash, is refused
    with np.load(shard, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["metadata"] = np.array([{"evil": 1}] * len(arrays["metadata"]), dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    shard.write_bytes(buf.getvalue())
    m = json.loads((path / MANIFEST).read_text())
    import hashlib

    m["shards"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="pickle"):
        list(open_store(path).iter_samples())


def test_store_identity_follows_what_makes_the_data():
    def cfg(*o):
        return load_config(ROOT / "configs/quickstart.yaml", list(o))

    base = store_key(cfg())
    for o in ("rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.group_size=4",
              "teacher.top_k=8", "teacher.revision=t2", "teacher.offline_samples=100",
              "run.seed=3", "prepare.teacher_steps=10", "rollout.max_new_tokens=11"):
        assert store_key(cfg(o)) != base, o
    for o in ("train.lr=0.1", "rollout.prompts_per_request=4", "teacher.mode=offline",
              "run.dir=elsewhere", "eval.interval=3"):
        assert store_key(cfg(o)) == base, o
    # the teacher's scoring temperature decides the data too (only 1.0 validates today)
    from megatron_opd.offline_store import store_config
    assert store_config(cfg())["teacher"]["temperature"] == 1.0
    assert store_path(cfg("run.cache_dir=/c")) == Path(f"/c/offline/{base}")
    assert store_path(cfg("teacher.offline_store=/x/y")) == Path("/x/y")


# ------------------------------------------------------------------ real servers (slow)
TINY = ["env.digits.ops=[rev]", "env.digits.min_digits=2", "env.digits.max_digits=3",
        "env.num_eval_prompts=8",
        "prepare.teacher_steps=30", "prepare.student_steps=10", "prepare.batch_size=32",
        "rollout.max_new_tokens=6", "rollout.group_size=2", "rollout.prompts_per_request=4",
        "teacher.top_k=4", "teacher.offline_samples=14", "logging.progress=false",
        "server.max_total_tokens=2048", "rollout.temperature=0.9"]


@pytest.mark.slow
def test_precompute_teacher_with_real_servers_matches_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opd.envs.digits import DigitsEnv
    from megatron_opd.envs.digits_models import cache_key

    overrides = TINY + [f"run.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "megatron_opd.cli", "precompute-teacher", "--config",
           str(ROOT / "configs/quickstart.yaml"), *overrides]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    first_seconds = time.time() - t0
    info = json.loads(out.stdout[out.stdout.index("{"):])
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    assert info["store"] == str(store_path(cfg)) and info["config_hash"] == store_key(cfg)
    assert (info["count"], info["top_k"], info["group_size"]) == (14, 4, 2)
    store = open_store(info["store"], store_key(cfg))
    samples = [s for _, s in store.iter_samples()]
    groups = list(store.groups())
    assert len(samples) == 14 and [len(g) for g in groups] == [2] * 7

    task = DigitsEnv(cfg).task
    prepared = tmp_path / "cache" / f"prepared-{cache_key(cfg)}"
    teacher = AutoModelForCausalLM.from_pretrained(prepared / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(prepared / "student_init",
                                                   dtype=torch.float32).eval()
    for g in groups:
        assert len({tuple(s.prompt_ids) for s in g}) == 1  # one prompt per group
    for s in samples:
        P, T = len(s.prompt_ids), s.num_tokens
        seq = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        with torch.no_grad():
            lq = torch.log_softmax(teacher(seq).logits[0, P - 1:P - 1 + T].double(), -1)
            lp = torch.log_softmax(student(seq).logits[0, P - 1:P - 1 + T].double() / 0.9, -1)
        resp = torch.tensor(s.response_ids, dtype=torch.long)
        np.testing.assert_allclose(s.teacher_logprobs, lq[torch.arange(T), resp], atol=2e-4)
        # behaviour log-probs: log_softmax(logits / temperature), no top-p renormalisation
        np.testing.assert_allclose(s.behaviour_logprobs, lp[torch.arange(T), resp], atol=2e-4)
        top = lq.topk(4, -1)
        np.testing.assert_allclose(s.teacher_topk_logprobs, top.values, atol=2e-4)
        gathered = lq.gather(-1, torch.as_tensor(s.teacher_topk_ids, dtype=torch.long))
        np.testing.assert_allclose(gathered, s.teacher_topk_logprobs, atol=2e-4)
        # reward: exact answer (digits reversed) followed by <eos>
        digits = [task.vocab[i] for i in s.prompt_ids[2:-1]]
        want = [task.ids[d] for d in reversed(digits)] + [task.eos]
        assert s.reward == float(list(s.response_ids[:len(want)]) == want)
        assert (s.temperature, s.top_p) == (0.9, 1.0) and s.teacher_revision == "teacher-v0"
        assert s.response_ids[-1] == task.eos or s.num_tokens == 6
    held_out = {ex.prompt_ids for ex in task.eval_set(8, cfg.run.seed)}
    assert not any(tuple(s.prompt_ids) in held_out for s in samples)

    # Second call: the store of this config is reused (no servers: fast, same manifest).
    t0 = time.time()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):]) == info
    assert time.time() - t0 < first_seconds / 2
    assert open_store(info["store"]).manifest["created_at"] == store.manifest["created_at"]
