"""Vocabulary padding: a vocab_size that tensor parallelism does not divide.

megatron builds the model with `padded_vocab_size(spec, tp)` rows; padded ids must never enter
a statistic or gradient, and HF files never see them. Checked against independent references:
- `vocab_parallel_token_stats(vocab_size=...)` on logits whose padding columns hold garbage (large
  logits) equals float64 `log_softmax` of the unpadded logits, unsharded and under TP=2 (gloo),
  including a shard that is padding only; its padding gradient is exactly 0;
- a Qwen3-MoE model with vocab_size 37 under TP=2 (padded to 38, and to 128 with
  make_vocab_size_divisible_by=64: rank 1's shard is all padding), real torchrun processes: loss,
  log-probs, entropies and every gradient equal the one-process unpadded run, which equals
  `transformers`; the padded logits are -inf; the HF stream and export are bit-identical to the
  original files (vocab_size 37);
- checkpoint conversion under TP=2 and back under TP=1 (and the reverse): bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megatron_opd.learner.vocab_parallel import vocab_parallel_reverse_kl, vocab_parallel_token_stats
from megatron_opd.models.spec import MoEModelSpec, hf_causal_lm_class, padded_vocab_size, to_hf_config
from megatron_opd.procs import free_port
from tests.gloo import gloo_rank

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "vocab_padding_worker.py"
TOOL = ROOT / "tools" / "convert_checkpoint.py"
V = 37  # true vocabulary: odd, so TP=2 pads it
LEAD = (3, 5)
K = 4


def test_padded_vocab_size_rule():
    spec = MoEModelSpec(vocab_size=V)
    assert [padded_vocab_size(spec, tp) for tp in (1, 2, 4)] == [37, 38, 40]
    spec = dataclasses.replace(spec, make_vocab_size_divisible_by=64)
    assert [padded_vocab_size(spec, tp) for tp in (1, 2)] == [64, 128]
    assert padded_vocab_size(MoEModelSpec(vocab_size=151936), 8) == 151936  # Qwen3: no padding
    with pytest.raises(ValueError, match="model.make_vocab_size_divisible_by"):
        dataclasses.replace(spec, make_vocab_size_divisible_by=0).validate()


def test_validate_parallel_accepts_a_vocabulary_tp_does_not_divide():
    from megatron_opd.config import ConfigError, ParallelConfig, validate_parallel

    spec = MoEModelSpec(vocab_size=V)
    validate_parallel(ParallelConfig(tensor_parallel=2, expert_tensor_parallel=2), spec)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):  # other checks stay
        validate_parallel(ParallelConfig(tensor_parallel=3, expert_tensor_parallel=3), spec)


# ----------------------------------------------------------------------------- statistics
def _inputs(seed: int, padded: int):
    """Unpadded float64 logits [*, V], ids / top-K ids including the last real id, and the same
    logits padded to `padded` columns holding garbage far above every real logit."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*LEAD, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, LEAD, generator=g)
    ids.view(-1)[0] = V - 1
    topk = torch.randint(0, V, (*LEAD, K), generator=g)
    topk[..., 0] = V - 1
    garbage = 50 + torch.rand(*LEAD, padded - V, generator=g, dtype=torch.float64)
    return z, ids, topk, torch.cat([z, garbage], dim=-1)


def _reference(z, ids, topk, temperature=None):
    """float64 autograd through log_softmax of the unpadded logits."""
    z = z.detach().clone().requires_grad_(True)
    zs = z if temperature is None else z / temperature[..., None]
    logp = torch.log_softmax(zs, -1)
    out = {"lp": logp.gather(-1, ids[..., None]).squeeze(-1),
           "h": -(logp.exp() * logp).sum(-1), "tk": zs.gather(-1, topk),
           "lse": torch.logsumexp(zs, -1)}
    loss = out["lp"].sum() + 0.3 * out["h"].sum() + 0.1 * out["tk"].sum() + 0.2 * out["lse"].sum()
    (grad,) = torch.autograd.grad(loss, z)
    return {k: v.detach() for k, v in out.items()} | {"grad": grad}


def _run(shard, ids, topk, temperature=None, **kw):
    shard = shard.detach().clone().requires_grad_(True)
    st = vocab_parallel_token_stats(shard, ids, entropy=True, topk_ids=topk,
                                    temperature=temperature, vocab_size=V, **kw)
    loss = (st.logprobs.sum() + 0.3 * st.entropy.sum() + 0.1 * st.topk_logits.sum()
            + 0.2 * st.logsumexp.sum())
    loss.backward()
    return {"lp": st.logprobs.detach(), "h": st.entropy.detach(), "tk": st.topk_logits.detach(),
            "lse": st.logsumexp.detach(), "grad": shard.grad}


def _close(got, ref, cols=slice(None), tol=1e-10):
    for k in ("lp", "h", "tk", "lse"):
        torch.testing.assert_close(got[k].double(), ref[k], atol=tol, rtol=tol, msg=k)
    torch.testing.assert_close(got["grad"][..., cols].double(), ref["grad"][..., cols], atol=tol,
                               rtol=tol)


@pytest.mark.parametrize("with_temperature", [False, True])
def test_padding_columns_are_excluded_unsharded(with_temperature):
    z, ids, topk, padded = _inputs(0, 40)
    temp = torch.full(LEAD, 0.7, dtype=torch.float64) if with_temperature else None
    got = _run(padded, ids, topk, temp, chunk_tokens=4)
    ref = _reference(z, ids, topk, temp)
    _close(got, ref | {"grad": torch.cat([ref["grad"], torch.zeros(*LEAD, 3).double()], -1)})
    assert torch.equal(got["grad"][..., V:], torch.zeros(*LEAD, 3, dtype=torch.float64))
    # positions: token t of row i reads the logits at position positions[i, t]
    pos = torch.tensor([[4, 3, 2, 1, 0]] * LEAD[0])
    st = vocab_parallel_token_stats(padded, ids, positions=pos, vocab_size=V, temperature=temp)
    ref_pos = _reference(z.gather(1, pos[..., None].expand(-1, -1, V)), ids, topk, temp)
    torch.testing.assert_close(st.logprobs, ref_pos["lp"], atol=1e-10, rtol=1e-10)
    # reverse KL on a teacher support of real ids
    q = torch.log_softmax(torch.randn(*LEAD, K, dtype=torch.float64), -1)
    kl = vocab_parallel_reverse_kl(padded, topk[..., 1:], q[..., 1:], got["lse"], vocab_size=V,
                                   temperature=temp)
    logp = (z if temp is None else z / temp[..., None]).log_softmax(-1).gather(-1, topk[..., 1:])
    torch.testing.assert_close(kl, (logp.exp() * (logp - q[..., 1:])).sum(-1), atol=1e-10,
                               rtol=1e-10)


def test_padded_ids_are_refused():
    _, ids, topk, padded = _inputs(0, 40)
    ids = ids.clone()
    ids[0, 0] = V  # a padding id: not a token
    with pytest.raises(ValueError, match="ids out of range"):
        vocab_parallel_token_stats(padded, ids, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_token_stats(padded, topk[..., 0], vocab_size=41)


def test_gradcheck_with_padding():
    z, ids, topk, padded = _inputs(1, 40)
    padded = padded[:1, :2].detach().clone().requires_grad_(True)

    def f(x):
        st = vocab_parallel_token_stats(x, ids[:1, :2], entropy=True, topk_ids=topk[:1, :2],
                                        vocab_size=V, chunk_tokens=1)
        return st.logprobs, st.entropy, st.topk_logits, st.logsumexp

    assert torch.autograd.gradcheck(f, (padded,), eps=1e-6, atol=1e-5)


_TP_CASES = {  # name -> (padded vocabulary, dtype, chunk_tokens)
    "pad38": (38, torch.float64, 4),
    "pad38_fp32": (38, torch.float32, 1000),
    "shard_all_padding": (80, torch.float64, 3),  # rank 1 holds ids 40..79: padding only
}


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        group = dist.new_group([0, 1])
        results = {}
        for name, (padded_v, dtype, chunk) in _TP_CASES.items():
            z, ids, topk, padded = _inputs(2, padded_v)
            v_local = padded_v // world
            shard = padded.to(dtype)[..., rank * v_local:(rank + 1) * v_local]
            results[name] = _run(shard, ids, topk, group=group, chunk_tokens=chunk)
            q = torch.log_softmax(torch.randn(*LEAD, K, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(3)), -1)
            results[name]["kl"] = vocab_parallel_reverse_kl(
                shard, topk, q, results[name]["lse"], group=group, vocab_size=V)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_tp2_padded_shards_equal_the_unpadded_reference(tmp_path):
    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    q = torch.log_softmax(torch.randn(*LEAD, K, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(3)), -1)
    for name, (padded_v, dtype, _) in _TP_CASES.items():
        z, ids, topk, _ = _inputs(2, padded_v)
        ref = _reference(z.to(dtype).double(), ids, topk)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        full_grad = torch.cat([ranks[0][name]["grad"], ranks[1][name]["grad"]], -1)
        assert torch.equal(full_grad[..., V:], torch.zeros_like(full_grad[..., V:])), name
        for r in range(2):
            _close(ranks[r][name] | {"grad": full_grad[..., :V]}, ref, tol=tol)
            logp = ref["lp"].new_tensor(torch.log_softmax(z.to(dtype).double(), -1)
                                        .gather(-1, topk))
            torch.testing.assert_close(ranks[r][name]["kl"].double(),
                                       (logp.exp() * (logp - q)).sum(-1), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- the model
SPEC = MoEModelSpec(family="qwen3_moe", vocab_size=V, hidden_size=64, num_layers=2,
                    num_attention_heads=4, num_kv_heads=2, head_dim=16, moe_ffn_hidden_size=32,
                    num_experts=4, moe_router_topk=2)
TP2 = dict(tensor_parallel=2, expert_tensor_parallel=2, micro_batch_size=2)
RUNS = {  # name -> (nproc, layout, spec changes, --explicit)
    "ref": (1, dict(micro_batch_size=2), {}, True),
    "tp2_explicit": (2, TP2, {}, True),
    "tp2_model_mask": (2, TP2, {}, False),  # the learner's loss: no vocab_size passed
    "tp2_div64": (2, TP2, dict(make_vocab_size_divisible_by=64), False),
}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _worker(tmp: Path, name: str) -> dict:
    nproc, layout, changes, explicit = RUNS[name]
    spec = dataclasses.replace(SPEC, **changes)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), "--layout", json.dumps(layout),
           "--spec", json.dumps(dataclasses.asdict(spec)), "--hf", str(tmp / "hf"),
           "--data", str(tmp / "data.pt"), "--out", str(tmp / f"{name}.pt"),
           "--export", str(tmp / f"export_{name}"), *(["--explicit"] if explicit else [])]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / f"{name}.pt") | {"spec": spec, "nproc": nproc}


def _read_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_padding")
    torch.manual_seed(0)
    hf = hf_causal_lm_class(SPEC)(to_hf_config(SPEC)).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(40.0)  # decisive routing: no near ties that summation order flips
    hf.save_pretrained(tmp / "hf")
    g = torch.Generator().manual_seed(1)
    B, S = 4, 10  # sequence parallel: TP divides the sequence
    data = {"input_ids": torch.randint(0, V, (B, S), generator=g),
            "targets": torch.randint(0, V, (B, S), generator=g)}
    data["targets"][0, :3] = V - 1  # the last real id (on the shard holding the padding)
    data["weights"] = torch.rand(B, S, generator=g) * (torch.rand(B, S, generator=g) > 0.2)
    torch.save(data, tmp / "data.pt")
    return tmp, hf, data


@pytest.fixture(scope="module")
def padded_runs(hf_model):
    tmp, hf, data = hf_model
    return tmp, hf, data, {name: _worker(tmp, name) for name in RUNS}


def test_one_process_reference_equals_transformers(padded_runs):
    _, hf, data, runs = padded_runs
    ref = runs["ref"]
    with torch.no_grad():
        logits = hf(input_ids=data["input_ids"]).logits.double()
    assert ref["logits"].shape[-1] == V  # TP=1, divisor 1: nothing padded
    assert (ref["logits"].double() - logits).abs().max().item() <= 1e-5
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, data["targets"][..., None]).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    w = data["weights"].double()
    want = (-(lp * w).sum() + 0.1 * (h * w).sum()) / (w != 0).sum()
    assert ref["loss"] == pytest.approx(want.item(), rel=2e-6)


@pytest.mark.parametrize("name", [n for n in RUNS if n != "ref"])
def test_tp2_padded_model_equals_unpadded_one_process(padded_runs, name):
    tmp, hf, data, runs = padded_runs
    ref, got = runs["ref"], runs[name]
    rows = padded_vocab_size(got["spec"], 2)
    assert rows > V
    # logits: the real columns are the unpadded model's, the padding columns -inf
    assert got["logits"].shape[-1] == rows
    assert (got["logits"][..., :V] - ref["logits"]).abs().max().item() <= 1e-5
    assert bool((got["logits"][..., V:] == float("-inf")).all())
    for k in ("logprobs", "entropy"):
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    assert got["tokens"] == ref["tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)
    vocab = ("embedding.word_embeddings.weight", "output_layer.weight")
    assert set(got["grads"]) == set(ref["grads"])
    for n, g in ref["grads"].items():
        mine = got["grads"][n]
        if n in vocab:  # padding rows: zero weights, zero gradient
            assert mine.shape[0] == rows
            assert torch.equal(mine[V:], torch.zeros_like(mine[V:])), n
            assert torch.equal(got["params"][n][V:], torch.zeros_like(mine[V:])), n
            mine = mine[:V]
        diff = (mine - g).abs().max().item()
        assert diff <= 2e-5 * max(1.0, g.abs().max().item()), f"{name}: {n} differs by {diff}"
    # what SGLang and HF files see: the true vocabulary, bit-identical to the loaded files
    original = _read_hf(tmp / "hf")
    assert set(got["streamed"]) == set(original)
    exported = _read_hf(tmp / f"export_{name}")
    for k, t in original.items():
        assert torch.equal(got["streamed"][k], t), k
        assert torch.equal(exported[k], t), k
    cfg = json.loads((tmp / f"export_{name}" / "config.json").read_text())
    assert cfg["vocab_size"] == V and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "make_vocab_size_divisible_by" not in cfg


# ----------------------------------------------------------------------------- conversion
def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--no-progress"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("into,back", [("tp2", "world1"), ("world1", "tp2")])
def test_conversion_pads_and_strips_across_layouts(hf_model, into, back, tmp_path):
    from megatron_opd.convert.dcp import global_shapes

    src = hf_model[0] / "hf"
    flags = {"world1": [], "tp2": ["--tp", "2", "--etp", "2"]}
    _cli("hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "ckpt"), *flags[into])
    stored = global_shapes(tmp_path / "ckpt" / "step_00000000" / "megatron")
    rows = 38 if into == "tp2" else V
    assert stored["embedding.word_embeddings.weight"][0][0] == rows
    _cli("megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
         *flags[back])
    original, back_t = _read_hf(src), _read_hf(tmp_path / "back")
    assert set(back_t) == set(original)
    for k, t in original.items():
        assert torch.equal(back_t[k], t), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == V
