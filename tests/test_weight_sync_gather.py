"""What a parallel learner streams to SGLang is the checkpoint it loaded, bit for bit.

Under TP2 (expert-TP 2), EP2 and PP2 (real megatron-core, two torchrun processes, gloo) the
learner loads an HF checkpoint into its shards; `iter_hf_weights(chunks, spec, groups)` must then
give, on every rank, exactly the checkpoint's tensors: same names, in a fixed streaming order, same
dtypes, same values. The order is the world-of-one order, except under expert parallelism, where
each layer's experts come gathered by local slot (slot s of every EP rank together: experts s,
E/ep + s, ... with gate+up, then their down): `expected_order` spells it out. Gathered for
publishing (`dst=0`), global rank 0 alone gets the same tensors in the world-of-one order. All
layouts run in one torchrun (the megatron groups are rebuilt between them) to keep the test fast.

This file is also the torchrun worker (`python -m torch.distributed.run ... this_file.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from megatron_opd.models.spec import MoEModelSpec

SPEC = MoEModelSpec(vocab_size=48, hidden_size=64, num_layers=4, num_attention_heads=4,
                    num_kv_heads=2, head_dim=16, moe_ffn_hidden_size=32, num_experts=8,
                    moe_router_topk=2)
LAYOUTS = {
    "tp2": dict(tensor_parallel=2, expert_tensor_parallel=2),
    "ep2": dict(expert_parallel=2),
    "pp2": dict(pipeline_parallel=2),
    "tp2_experts_replicated": dict(tensor_parallel=2),  # expert data parallel 2
    "dp2": dict(),
}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.")


def expected_order(world1: list[str], ep: int) -> list[str]:
    """The streaming order under `ep`-way expert parallelism, from the world-of-one order."""
    per_rank = SPEC.num_experts // ep
    out, done = [], set()
    for name in world1:
        m = _EXPERT.match(name)
        if not m:
            out.append(name)
        elif m.group(1) not in done:  # the layer's whole expert block, by local slot
            done.add(m.group(1))
            hp = f"model.layers.{m.group(1)}.mlp.experts."
            for slot in range(per_rank):
                experts = [r * per_rank + slot for r in range(ep)]
                out += [f"{hp}{e}.{p}_proj.weight" for e in experts for p in ("gate", "up")]
                out += [f"{hp}{e}.down_proj.weight" for e in experts]
    return out


def _worker(spec_json: str, layouts_json: str, hf_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import iter_hf_weights, load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

    install_megatron_cpu_compat()
    spec = MoEModelSpec(**json.loads(spec_json))
    for name, fields in json.loads(layouts_json).items():
        layout = ParallelConfig(**fields)
        groups = init_distributed(layout, seed=0)
        chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
        load_hf_checkpoint(chunks, hf_dir, spec, groups)
        streamed = [(n, t.clone()) for n, t in iter_hf_weights(chunks, spec, groups)]
        torch.save(streamed, Path(out_dir) / f"{name}.rank{dist.get_rank()}.pt")
        # publishing: gathered to global rank 0 only
        to0 = [(n, t.clone()) for n, t in iter_hf_weights(chunks, spec, groups, dst=0)]
        torch.save(to0, Path(out_dir) / f"{name}.dst0.rank{dist.get_rank()}.pt")
        del chunks
        dist.barrier()
        parallel_state.destroy_model_parallel()
    destroy_distributed()


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A saved Qwen3-MoE whose every element is random (no all-ones norms hiding a mix-up)."""
    from safetensors.torch import load_file
    from transformers import Qwen3MoeForCausalLM

    from megatron_opd.models.spec import to_hf_config

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(to_hf_config(SPEC)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(path)
    hf = {}
    for f in sorted(path.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    return hf


def test_streamed_weights_are_the_loaded_checkpoint_under_tp_ep_pp(tmp_path):
    from megatron_opd.models.hf_mapping import hf_names, hf_to_megatron, megatron_to_hf
    from megatron_opd.procs import free_port

    hf = _checkpoint(tmp_path / "hf")
    assert set(hf) == set(hf_names(SPEC))
    # the fixed streaming order: what a world of one streams
    order = list(megatron_to_hf(hf_to_megatron(hf, SPEC), SPEC))
    assert sorted(order) == sorted(hf)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", __file__, json.dumps(dataclasses.asdict(SPEC)),
           json.dumps(LAYOUTS), str(tmp_path / "hf"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name, fields in LAYOUTS.items():
        expected = expected_order(order, fields.get("expert_parallel", 1))
        assert sorted(expected) == sorted(order)
        for rank in (0, 1):
            streamed = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            assert [n for n, _ in streamed] == expected, f"{name} rank {rank}: names/order differ"
            for n, t in streamed:
                assert t.dtype == hf[n].dtype, f"{name} rank {rank}: {n} dtype {t.dtype}"
                assert t.is_contiguous(), f"{name} rank {rank}: {n} not contiguous"
                assert torch.equal(t, hf[n]), f"{name} rank {rank}: {n} differs"
        # gathered to rank 0 only: the world-of-one order there, nothing on the other rank
        to0 = torch.load(tmp_path / f"{name}.dst0.rank0.pt")
        assert [n for n, _ in to0] == order, f"{name} dst=0: names/order differ"
        for n, t in to0:
            assert t.dtype == hf[n].dtype and t.is_contiguous(), f"{name} dst=0: {n}"
            assert torch.equal(t, hf[n]), f"{name} dst=0: {n} differs"
        assert torch.load(tmp_path / f"{name}.dst0.rank1.pt") == []


class _FakeServer:
    """Records the publisher's calls; `fail` names the call that raises."""

    def __init__(self, log: list, fail: str = ""):
        self.log, self.fail = log, fail

    def __getattr__(self, name):
        def call(*args):
            self.log.append(name)
            if name == self.fail:
                raise RuntimeError(f"{name} failed")
        return call


def _publisher(log, monkeypatch, fail=""):
    from megatron_opd.weight_sync import DistributedWeightPublisher

    class Done:
        def wait(self):
            log.append("wait")

    def broadcast(t, src, group, async_op=False):
        log.append(f"broadcast {tuple(t.shape)}")
        return Done() if async_op else None

    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    pub = DistributedWeightPublisher([_FakeServer(log, fail)], master_port=1, bucket_bytes=16)
    pub.group = object()  # connect() without a server
    return pub


def test_publisher_opens_the_update_before_sending_and_always_resumes_generation(monkeypatch):
    import pytest

    log = []

    def weights():
        yield "a", torch.zeros(2, 2)  # 16 bytes: a bucket of its own
        yield "b", torch.zeros(3)
    _publisher(log, monkeypatch).publish(weights(), version=1)
    # (each bucket's update request and its broadcast run concurrently; broadcasts are
    # asynchronous, waited for at the bucket's end)
    log[:] = [x for x in log if x != "wait"]
    assert log[:2] == ["pause_generation", "begin_weight_update"]
    assert sorted(log[2:4]) == ["broadcast (2, 2)", "update_weights_from_distributed"]
    assert sorted(log[4:6]) == ["broadcast (3,)", "update_weights_from_distributed"]
    assert log[6:] == ["end_weight_update", "continue_generation"]

    def broken():
        yield "a", torch.zeros(2, 2)
        raise ValueError("gather failed")
    log.clear()
    with pytest.raises(ValueError, match="gather failed"):
        _publisher(log, monkeypatch).publish(broken(), version=2)
    assert log[-2:] == ["end_weight_update", "continue_generation"]

    log.clear()  # the server refuses to open the update: nothing sent, generation resumed
    with pytest.raises(RuntimeError, match="begin_weight_update failed"):
        _publisher(log, monkeypatch, fail="begin_weight_update").publish(weights(), version=3)
    assert log == ["pause_generation", "begin_weight_update", "continue_generation"]

    log.clear()  # nothing to send still reports a failed opening
    with pytest.raises(RuntimeError, match="pause_generation failed"):
        _publisher(log, monkeypatch, fail="pause_generation").publish(iter(()), version=4)
    assert log == ["pause_generation"]


def test_later_publishes_announce_each_bucket_before_producing_it(monkeypatch):
    """After the first publish the publisher knows the stream (names, dtypes, shapes): it asks
    the server to receive a bucket first and broadcasts each tensor as soon as it is produced,
    producing the next bucket before waiting for the previous one; a stream that departs from
    the first one is an error naming the tensor."""
    import pytest

    log = []

    def weights(shape_b=(3,)):
        log.append("produce a")
        yield "a", torch.zeros(2, 2)  # 16 bytes: a bucket of its own
        log.append("produce b")
        yield "b", torch.zeros(*shape_b)
    pub = _publisher(log, monkeypatch)
    pub.publish(weights(), version=1)
    assert pub.manifest == [("a", "float32", [2, 2]), ("b", "float32", [3])]
    log.clear()
    pub.publish(weights(), version=2)
    # Each server opens its update (pause, begin) in its own thread while the stream produces:
    # only per-thread order is fixed. Every tensor is broadcast after it is produced and once
    # the update is open; b is produced before anything is waited for.
    assert log.count("update_weights_from_distributed") == 2
    main = [x for x in log if x not in ("update_weights_from_distributed", "pause_generation",
                                        "begin_weight_update")]
    assert main == ["produce a", "broadcast (2, 2)", "produce b", "broadcast (3,)", "wait",
                    "wait", "end_weight_update", "continue_generation"]
    assert log.index("pause_generation") < log.index("begin_weight_update") < min(
        i for i, x in enumerate(log) if x.startswith("broadcast"))
    log.clear()
    with pytest.raises(RuntimeError, match=r"departs .* at b float32\[3\]: got b float32\[4\]"):
        pub.publish(weights(shape_b=(4,)), version=3)
    # (bucket b's update request, from its thread, may be logged after the update is closed)
    assert [x for x in log if x != "update_weights_from_distributed"][-2:] == [
        "end_weight_update", "continue_generation"]
    assert pub.manifest is None  # the next publish learns the stream again


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
