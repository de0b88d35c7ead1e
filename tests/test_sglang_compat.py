"""The SGLang CPU compat patches, one by one (no server needed)."""

import importlib.metadata
import sys

import pytest
import torch.distributed  # noqa: F401  (loaded before any test's clean_meta_path snapshot)

from megatron_opd.compat import sglang_cpu


@pytest.fixture
def clean_meta_path():
    saved_path, saved_mods = list(sys.meta_path), dict(sys.modules)
    yield
    sys.meta_path[:] = saved_path
    for k in list(sys.modules):
        if k not in saved_mods:
            del sys.modules[k]


def test_stand_in_answers_imports_only_when_the_real_module_is_absent(clean_meta_path):
    assert sglang_cpu._install_stand_in("megatron_opd_absent_pkg") is True
    import megatron_opd_absent_pkg.sub.deeper as mod  # noqa: F401  (submodules resolve too)
    from megatron_opd_absent_pkg import SomeKernel

    assert mod.__megatron_opd_stand_in__
    chained = SomeKernel.Mode.BICUBIC  # import-time attribute chains evaluate
    with pytest.raises(RuntimeError, match="stand-in"):
        chained()
    assert importlib.metadata.version("megatron_opd_absent_pkg") == sglang_cpu.STAND_IN_VERSION
    # a real, importable module is never shadowed
    assert sglang_cpu._install_stand_in("json") is False
    assert sglang_cpu._install_stand_in("megatron_opd_absent_pkg") is False  # idempotent


def test_named_patches_target_sgl_kernel_and_torchvision(clean_meta_path):
    sglang_cpu.patch_sgl_kernel_stand_in()
    sglang_cpu.patch_torchvision_stand_in()
    import sgl_kernel
    import torchvision.transforms as T

    assert sgl_kernel.__megatron_opd_stand_in__ and T.__megatron_opd_stand_in__
    from packaging.version import Version

    assert Version(importlib.metadata.version("torchvision")) < Version("0.27")


def test_install_is_a_no_op_with_cuda(monkeypatch, clean_meta_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = list(sys.meta_path)
    assert sglang_cpu.install_sglang_cpu_compat() == []
    assert sys.meta_path == before


def test_teacher_temperature_patch_is_a_run_patch_on_every_device(monkeypatch, clean_meta_path):
    """A GPU teacher scores at teacher.temperature too: the patch is installed with the run
    patches, which do not look at the device (the CPU compat, a no-op with CUDA, lacks it)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sglang_cpu.install_sglang_cpu_compat() == []
    for other in ("patch_rendezvous_store_binds_its_host", "patch_server_args_log_line_short"):
        monkeypatch.setattr(sglang_cpu, other, lambda: False)  # (they patch torch for good)
    sglang_cpu.install_sglang_run_patches()
    target = sglang_cpu._LOGITS_MODULE
    hooked = any(getattr(f, "fullname", None) == target for f in sys.meta_path)
    module = sys.modules.get(target)
    assert hooked or getattr(module.InputLogprobProcessor.forward, "__megatron_opd_patch__", False)


def test_rendezvous_store_listens_on_the_host_it_is_given(monkeypatch):
    """SGLang's scheduler creates its torch.distributed store through
    `torch.distributed.rendezvous._create_c10d_store` (`tcp://<--host>:<port>`): upstream's
    server listens on every interface, the patched one on that host only."""
    import importlib
    import os
    from datetime import timedelta

    from megatron_opd.procs import free_port
    from tests.net_listeners import beyond_loopback, listeners

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # (the module)
    me, timeout = [os.getpid()], timedelta(seconds=30)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(rendezvous, "_create_c10d_store", rendezvous._create_c10d_store)
    upstream = rendezvous._create_c10d_store("127.0.0.1", free_port(), 0, 1, timeout)
    assert any(port == upstream.port for _, port, _ in beyond_loopback(me))
    del upstream
    assert sglang_cpu.patch_rendezvous_store_binds_its_host() is True
    assert sglang_cpu.patch_rendezvous_store_binds_its_host() is False  # once
    port = free_port()
    store = rendezvous._create_c10d_store("127.0.0.1", port, 0, 1, timeout)
    assert {p: a for a, p, _ in listeners(me)}[port] == "127.0.0.1"
    client = rendezvous._create_c10d_store("127.0.0.1", port, 1, 2, timeout)  # rank 1: upstream
    client.set("k", "v")
    assert store.get("k") == b"v"
    assert not beyond_loopback(me)


class _ServerArgs:
    """What SGLang 0.5.23 hands `_server_args_for_logging`: the record with its launch command."""
    launch_command = ("--host 127.0.0.1 --port 30000 --model-path /models/student --dtype "
                      "float32 --max-total-tokens 16384 --skip-server-warmup --device cpu "
                      "--attention-backend torch_native --sleep-on-idle --weight-version 0")


def test_server_args_log_line_is_short_and_wrapped():
    import types

    def upstream(server_args):  # sglang 0.5.23: every resolved field, one dict
        return {f"field_{i}": f"value {i}" * 3 for i in range(546)}

    engine = types.ModuleType("engine")
    engine._server_args_for_logging = upstream
    assert len(f"server_args={upstream(_ServerArgs())}") > 15000
    assert sglang_cpu._short_server_args_log(engine) is True
    assert sglang_cpu._short_server_args_log(engine) is False  # once
    line = f"server_args={engine._server_args_for_logging(_ServerArgs())}"
    rows = line.splitlines()
    assert len(line) < 600 and all(len(r) <= sglang_cpu.LOG_LINE_WIDTH + 12 for r in rows), rows
    assert "546 resolved fields" in rows[0] and "/server_info" in rows[0]
    assert " ".join(r.strip() for r in rows).endswith(_ServerArgs.launch_command)


@pytest.fixture(scope="module")
def input_logprob_processor():
    """SGLang's real input log-prob pass (imported once: its Triton bindings do not survive a
    second import in one process, so not under clean_meta_path)."""
    from sglang.srt.layers.logprob_processor import InputLogprobProcessor

    return InputLogprobProcessor


def _input_logprob_module(InputLogprobProcessor):
    """A module shaped like sglang's logits_processor for the temperature patch: the real
    `InputLogprobProcessor` (subclassed, so patching it leaves SGLang's class alone) and a
    `LogitsMetadata` whose builder records what it was given."""
    import types

    class LogitsMetadata(types.SimpleNamespace):
        @classmethod
        def from_forward_batch(cls, forward_batch):
            return cls(extend_return_logprob=forward_batch.return_logprob, temperature=None)

    return types.SimpleNamespace(LogitsMetadata=LogitsMetadata,
                                 InputLogprobProcessor=type("P", (InputLogprobProcessor,), {}))


@pytest.mark.parametrize("chunk", [0, 2])
def test_input_logprobs_are_at_each_requests_temperature(monkeypatch, input_logprob_processor,
                                                         chunk):
    """SGLang 0.5.23's prompt-token log-probs ignore the request's temperature; patched, the real
    input log-prob pass (chunked or not) returns log_softmax(z / T) of each row's own request,
    top-K included, and hands the sampler the raw logits."""
    import types

    import torch

    monkeypatch.setenv("SGLANG_ENABLE_LOGPROB_CHUNK", "1" if chunk else "0")
    monkeypatch.setenv("SGLANG_LOGPROB_CHUNK_SIZE", str(max(chunk, 1)))
    mod = _input_logprob_module(input_logprob_processor)
    assert sglang_cpu._tempered_input_logprobs(mod) is True
    assert sglang_cpu._tempered_input_logprobs(mod) is False  # once
    fb = types.SimpleNamespace(return_logprob=True, sampling_info=types.SimpleNamespace(
        temperatures=torch.tensor([[0.5], [2.0], [1.0]])))
    temps = [0.5, 2.0, 1.0]
    meta = mod.LogitsMetadata.from_forward_batch(fb)
    assert meta.temperature is fb.sampling_info.temperatures
    gen = torch.Generator().manual_seed(0)
    vocab, lens = 11, [4, 3, 2]  # pruned rows per request; each one's last row is its sample row
    weight = torch.randn(vocab, 6, generator=gen)
    states = torch.randn(sum(lens), 6, generator=gen)
    ids = torch.randint(0, vocab, (sum(lens),), generator=gen)
    seq_of_row = [i for i, n in enumerate(lens) for _ in range(n)]
    sample_rows = [sum(lens[:i + 1]) - 1 for i in range(len(lens))]
    meta.__dict__.update(
        sample_indices_cpu=sample_rows, input_logprob_indices_cpu=list(range(sum(lens))),
        extend_return_top_logprob=True, extend_token_ids_logprob=False,
        top_logprobs_nums=[3, 3, 3], extend_logprob_pruned_lens_cpu=lens,
        extend_input_logprob_token_ids_gpu=ids)
    calls = []

    def get_logits(h, lm_head, md, use_logits_buffer=True):
        calls.append(h @ weight.T)
        return calls[-1]

    proc = mod.InputLogprobProcessor(vocab)
    result, sampled = proc.forward(
        pruned_states=states, sample_indices=torch.tensor(sample_rows),
        input_logprob_indices=torch.arange(sum(lens)), token_to_seq_idx=seq_of_row + [2],
        lm_head=None, get_logits_fn=get_logits, logits_metadata=meta)
    assert [len(c) for c in calls] == ([9] if chunk == 0 else [2, 2, 2, 2, 1])  # or chunks of 2
    z = states.double() @ weight.double().T
    ref = torch.log_softmax(z / torch.tensor(temps, dtype=torch.float64)[seq_of_row, None], -1)
    got = torch.cat([torch.as_tensor(t).reshape(-1) for t in result.token_logprobs])
    assert (got.double() - ref[torch.arange(len(ids)), ids]).abs().max() < 1e-5
    rows = [r for per_seq in result.top_logprobs_val for r in per_seq]
    idx = [r for per_seq in result.top_logprobs_idx for r in per_seq]
    for j, (vals, top) in enumerate(zip(rows, idx)):
        assert list(top) == ref[j].topk(3).indices.tolist()
        assert max(abs(v - ref[j, i].item()) for v, i in zip(vals, top)) < 1e-5
    # the sampler gets the raw logits back (exactly: T = 0.5, 2, 1 are powers of two)
    assert torch.equal(sampled, torch.cat(calls)[sample_rows])


def test_input_logprobs_at_temperature_one_take_upstreams_path(input_logprob_processor):
    import types

    import torch

    mod = _input_logprob_module(input_logprob_processor)
    upstream = mod.InputLogprobProcessor.forward
    seen = []
    mod.InputLogprobProcessor.forward = lambda self, **kw: seen.append(kw) or ("r", "s")
    sglang_cpu._tempered_input_logprobs(mod)
    for temps in (None, torch.ones(2, 1)):
        meta = types.SimpleNamespace(temperature=temps)
        fn = object()
        assert mod.InputLogprobProcessor.forward(
            None, pruned_states=None, sample_indices=None, input_logprob_indices=None,
            token_to_seq_idx=[], lm_head=None, get_logits_fn=fn, logits_metadata=meta) == ("r", "s")
        assert seen[-1]["get_logits_fn"] is fn  # untouched
    assert upstream is not mod.InputLogprobProcessor.forward
