"""What SGLang needs to serve tiny models on a CPU-only machine (and nothing else).

Applied only inside the SGLang server processes we launch, through `sglang_site/sitecustomize.py`
on their PYTHONPATH (SGLang starts its scheduler and detokenizer with the multiprocessing *spawn*
method, so each child re-runs site initialisation and gets the same patches). Never applied when
CUDA is available, never at import time of megatron_opd.

Gaps on CPU (measured, see docs/sglang-on-cpu.md):
1. `sgl_kernel`: its CPU build is not on PyPI; on CPUs without AMX SGLang takes torch-native
   paths and only *imports* names from it.
2. `torchvision`: PyPI wheels link CUDA torch; SGLang imports it for multimodal models only.
3. `--enable-return-routed-experts`: the host buffer of routed expert ids is registered as pinned
   memory through CUDA (`cudaHostRegister`), which raises on a CPU-only torch.
4. `sampling_seed`: read only under `--enable-deterministic-inference`, which refuses the one CPU
   attention backend (torch_native), so a seed was silently ignored; and seeded sampling hashes
   with sgl_kernel's `murmur_hash32_cpu`, absent here. Two patches make a CPU server honour
   per-request seeds (reproducible evaluation, learner/evaluate.py).

Three more patches are applied on every device (`install_sglang_run_patches`, from the same
sitecustomize): the scheduler's torch.distributed store listens on the host it was given, not
on every interface; the ~20 kB `server_args=` log line becomes a short, wrapped one; and
prompt-token log-probs (teacher scoring), which ignore the request's temperature, are scored at
it (`patch_input_logprobs_at_request_temperature`: device-independent code, tested on CPU; on a
GPU the orchestrator's measured-temperature check still refuses a server where it does not act).

One more, on every device but only on teacher servers of teacher.signal=hidden (the launcher
sets HIDDEN_STATES_ENV; sitecustomize then applies it): hidden states leave the server as base64
frames of bfloat16 or float32 instead of JSON float lists (`patch_hidden_states_as_frames`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types

from megatron_opd.compat import warn_if_untested

TESTED_SGLANG = ("0.5.23",)
STAND_IN_VERSION = "0.0.0"
_applied: list[str] = []


class _StandInMeta(type):
    """Attribute access on a stand-in yields another stand-in, so import-time expressions such as
    `torchvision.transforms.InterpolationMode.BICUBIC` evaluate; *calling* one raises clearly."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__} is an import-time stand-in installed by "
                           "megatron_opd.compat.sglang_cpu; it is not usable on this CPU build")


def _stand_in(qualname: str) -> type:
    return _StandInMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{self.__name__}.{name}")


class _StandInDistribution(importlib.metadata.Distribution):
    """Package metadata for a stand-in: libraries that probe `importlib.metadata.version(root)`
    (transformers does, for torchvision) get a parseable version that is older than any real
    release, so they take their paths for an absent/old package."""

    def __init__(self, name: str):
        self._name = name

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: {STAND_IN_VERSION}\n"
        return None

    def locate_file(self, path):
        return path


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of `root` and its submodules with inert modules."""

    def __init__(self, root: str):
        self.root = root

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name in (None, self.root):
            return iter([_StandInDistribution(self.root)])
        return iter(())

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []  # a package, so submodule imports come back to this finder
        module.__megatron_opd_stand_in__ = True
        return module

    def exec_module(self, module):
        pass


def _real_module_usable(name: str) -> bool:
    if any(isinstance(f, _StandInFinder) and f.root == name for f in sys.meta_path):
        return False
    try:
        if importlib.util.find_spec(name) is None:
            return False
        __import__(name)
        return True
    except Exception:  # present but broken (e.g. a CUDA-linked torchvision): replace it
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return False


def _install_stand_in(root: str) -> bool:
    if _real_module_usable(root) or any(
            isinstance(f, _StandInFinder) and f.root == root for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _StandInFinder(root))
    return True


def patch_sgl_kernel_stand_in() -> bool:
    """Target: `import sgl_kernel` (and submodules) from sglang 0.5.23 import paths. Why: the CPU
    build of sgl-kernel is not on PyPI; without AMX SGLang only imports its names."""
    return _install_stand_in("sgl_kernel")


def patch_torchvision_stand_in() -> bool:
    """Target: `import torchvision.*` from sglang 0.5.23 multimodal utilities (imported at server
    start even for text models). Why: PyPI torchvision links CUDA torch and fails to import."""
    return _install_stand_in("torchvision")


_HOST_REGISTER_MODULE = "sglang.srt.mem_cache.pool_host.common"
_HOST_REGISTER_FUNCTION = "_cuda_host_register"
_REGISTERED_RANGES_ATTR = "_sglang_cuda_host_registered_ranges"  # same module's bookkeeping


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then `patch(module)`; everything else is the real loader's."""

    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... (tracebacks, inspect)
        return getattr(self._loader, name)


class _PostImportPatcher(importlib.abc.MetaPathFinder):
    """Patches one module right after its first import. The module is found by the finders that
    follow on sys.meta_path (so it loads exactly as it would without us); only its loader is
    wrapped. Nothing is imported early."""

    def __init__(self, fullname: str, patch):
        self.fullname, self.patch = fullname, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self.patch)
                return spec
        return None


def _patch_when_imported(fullname: str, patch) -> bool:
    """`patch(module)` now if `fullname` is already imported, else right after its import."""
    if fullname in sys.modules:
        return patch(sys.modules[fullname])
    if any(isinstance(f, _PostImportPatcher) and f.fullname == fullname for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _PostImportPatcher(fullname, patch))
    return True


def _no_op_host_register_without_cuda(module) -> bool:
    original = getattr(module, _HOST_REGISTER_FUNCTION)
    if getattr(original, "__megatron_opd_patch__", False):
        return False

    def _cuda_host_register(buffer, registration_granularity_bytes=None):
        import torch

        if torch.cuda.is_available():
            return original(buffer, registration_granularity_bytes)
        # Nothing pinned: record no registered ranges, as upstream does for host memory it did
        # not register (so a later `_cuda_host_unregister` has nothing to undo).
        setattr(buffer, _REGISTERED_RANGES_ATTR, [])

    _cuda_host_register.__megatron_opd_patch__ = True
    _cuda_host_register.__wrapped__ = original
    setattr(module, _HOST_REGISTER_FUNCTION, _cuda_host_register)
    return True


def patch_cuda_host_register_no_op() -> bool:
    """Target: `sglang.srt.mem_cache.pool_host.common._cuda_host_register` (sglang 0.5.23), which
    `alloc_with_host_register` calls (a module-global lookup) when `BaseHostCache` allocates the
    pinned host buffer of `--enable-return-routed-experts` (RoutedExpertsCapturer). Why: it calls
    `torch.cuda.cudart().cudaHostRegister`, which raises "Torch not compiled with CUDA enabled";
    on CPU there is nothing to pin, so the patched function registers nothing when CUDA is absent.

    How: this runs from sitecustomize, before SGLang is imported, and importing that module early
    would drag in much of `sglang.srt`; so a post-import hook on sys.meta_path replaces the
    function right after the module's first import (or at once if it is already imported)."""
    return _patch_when_imported(_HOST_REGISTER_MODULE, _no_op_host_register_without_cuda)


_RENDEZVOUS_MODULE = "torch.distributed.rendezvous"
_CREATE_STORE_FUNCTION = "_create_c10d_store"


def _store_listens_on_its_host(module) -> bool:
    original = getattr(module, _CREATE_STORE_FUNCTION)
    if getattr(original, "__megatron_opd_patch__", False):
        return False

    def _create_c10d_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or module._torchelastic_use_agent_store():  # clients: nothing listens
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        if not 0 <= port < 2**16:
            raise ValueError(f"port must have value from 0 to 65535 but was {port}.")
        from megatron_opd.listeners import tcp_store

        # upstream's server arguments, but listening on `hostname` only
        return tcp_store(hostname, port, world_size, is_master=True, timeout=timeout,
                         multi_tenant=True, use_libuv=use_libuv)

    _create_c10d_store.__megatron_opd_patch__ = True
    _create_c10d_store.__wrapped__ = original
    setattr(module, _CREATE_STORE_FUNCTION, _create_c10d_store)
    return True


def patch_rendezvous_store_binds_its_host() -> bool:
    """Target: `torch.distributed.rendezvous._create_c10d_store` (torch 2.13.0), through which
    SGLang's scheduler (sglang 0.5.23 `distributed/bootstrap.py`: `init_process_group` with
    `tcp://<--host>:<dist port>`) creates its TCPStore. Why: a TCPStore server listens on every
    interface whatever host it is given, so each server exposed an unauthenticated store port
    beyond loopback. The patched function makes rank 0's store listen on that host only
    (`megatron_opd.listeners.tcp_store`); clients and agent stores are upstream's.
    A post-import hook, like the patch above: nothing is imported early."""
    return _patch_when_imported(_RENDEZVOUS_MODULE, _store_listens_on_its_host)


_ENGINE_MODULE = "sglang.srt.entrypoints.engine"
_SERVER_ARGS_LOG_FUNCTION = "_server_args_for_logging"
LOG_LINE_WIDTH = 100


class _ServerArgsForLog:
    """What SGLang's `server_args=...` log line prints: how the server was launched, wrapped,
    instead of its ~20 kB one-line dict of every resolved field."""

    def __init__(self, server_args, resolved: dict):
        self.fields = len(resolved)
        self.launch_command = getattr(server_args, "launch_command", None) or ""

    def __str__(self) -> str:
        import textwrap

        text = (f"<{self.fields} resolved fields: GET /server_info lists them> launched with: "
                f"{self.launch_command or '(unknown)'}")
        return "\n    ".join(textwrap.wrap(text, LOG_LINE_WIDTH, break_long_words=False,
                                           break_on_hyphens=False))

    __repr__ = __str__


def _short_server_args_log(module) -> bool:
    original = getattr(module, _SERVER_ARGS_LOG_FUNCTION)
    if getattr(original, "__megatron_opd_patch__", False):
        return False

    def _server_args_for_logging(server_args):
        return _ServerArgsForLog(server_args, original(server_args))

    _server_args_for_logging.__megatron_opd_patch__ = True
    _server_args_for_logging.__wrapped__ = original
    setattr(module, _SERVER_ARGS_LOG_FUNCTION, _server_args_for_logging)
    return True


def patch_server_args_log_line_short() -> bool:
    """Target: `sglang.srt.entrypoints.engine._server_args_for_logging` (sglang 0.5.23), whose
    result the engine logs as `server_args={...}` (its only use). Why: that line is ~20 kB, the
    first thing in every server log. The patched function returns an object that prints the
    field count and the launch command (the arguments we gave), wrapped at 100 columns; the full
    resolved set stays one request away (`GET /server_info`)."""
    return _patch_when_imported(_ENGINE_MODULE, _short_server_args_log)


def install_sglang_run_patches() -> list[str]:
    """Patches every SGLang server of a run gets, on any device (they are about where sockets
    listen and what the log says, not about the hardware); returns the names applied."""
    warn_if_untested("sglang", TESTED_SGLANG, "megatron_opd.compat.sglang_cpu")
    applied = [p.__name__ for p in (patch_rendezvous_store_binds_its_host,
                                    patch_server_args_log_line_short,
                                    patch_input_logprobs_at_request_temperature) if p()]
    _applied.extend(applied)
    return applied


_SAMPLING_INFO_MODULE = "sglang.srt.sampling.sampling_batch_info"
_SAMPLER_MODULE = "sglang.srt.layers.sampler"


def _random_seeds(n: int, device):
    import random

    import torch

    return torch.tensor([random.getrandbits(62) for _ in range(n)], dtype=torch.int64,
                        device=device)


def _seeded_batches(module) -> bool:
    cls = module.SamplingBatchInfo
    if getattr(cls.from_schedule_batch, "__megatron_opd_patch__", False):
        return False
    build, merge = cls.from_schedule_batch.__func__, cls.merge_batch

    def from_schedule_batch(klass, batch, vocab_size):
        info = build(klass, batch, vocab_size)
        seeds = [r.sampling_params.sampling_seed for r in batch.reqs]
        if info.sampling_seed is None and any(x is not None for x in seeds):
            import torch

            fill = _random_seeds(len(seeds), info.temperatures.device).tolist()
            info.sampling_seed = torch.tensor(
                [x if x is not None else f for x, f in zip(seeds, fill)], dtype=torch.int64,
                device=info.temperatures.device)
        return info

    def merge_batch(self, other):
        if (self.sampling_seed is None) != (other.sampling_seed is None):
            for info in (self, other):  # upstream concatenates only when both have seeds
                if info.sampling_seed is None:
                    info.sampling_seed = _random_seeds(len(info), info.temperatures.device)
        return merge(self, other)

    from_schedule_batch.__megatron_opd_patch__ = True
    merge_batch.__wrapped__ = merge
    cls.from_schedule_batch = classmethod(from_schedule_batch)
    cls.merge_batch = merge_batch
    return True


def patch_sampling_seed_honoured() -> bool:
    """Target: `SamplingBatchInfo.from_schedule_batch` and `.merge_batch` (sglang 0.5.23
    `srt/sampling/sampling_batch_info.py`). Why: upstream fills the batch's `sampling_seed` only
    under `--enable-deterministic-inference` (and then gives unseeded requests seed 42), a mode
    that refuses torch_native attention; so on CPU a request's seed was ignored. Patched: a
    batch with a seeded request gets one seed per row, the request's own or a fresh random one
    for an unseeded request (whose sampling stays random); a seeded and an unseeded batch merge
    the same way. Batches without seeded requests are upstream's (torch.multinomial)."""
    return _patch_when_imported(_SAMPLING_INFO_MODULE, _seeded_batches)


_M32 = 0xFFFFFFFF


def _mul32(a, c: int):
    """(a * c) mod 2**32 for int64 tensors 0 <= a < 2**32 and a 32-bit constant (no product
    exceeds 2**49, so nothing overflows int64)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _M32


def _murmur_mix(h, k):
    k = _rotl32(_mul32(k, 0xCC9E2D51), 15)
    h = _rotl32(h ^ _mul32(k, 0x1B873593), 13)
    return (_mul32(h, 5) + 0xE6546B64) & _M32


def murmur_hash32_torch(seed, positions, col_indices):
    """MurmurHash3 (x86, 32 bit, hash seed 0) of the 16-byte key (seed low word, seed high word,
    position, column) for every row and column, as int64 [rows, columns]: the function SGLang's
    Triton kernel `murmur_hash32_kernel` computes (sglang 0.5.23 kernels/ops/sampling/
    murmur_hash.py), in torch integer ops."""
    import torch

    s = seed.to(torch.int64)  # the seeds' bits (upstream casts int64 seeds to uint64)
    n, m = s.shape[0], col_indices.shape[0]
    h = torch.zeros(n, 1, dtype=torch.int64, device=s.device)
    for word in (s & _M32, (s >> 32) & _M32, positions.to(torch.int64) & _M32):
        h = _murmur_mix(h, word.view(n, 1))
    h = _murmur_mix(h.expand(n, m), (col_indices.to(torch.int64) & _M32).view(1, m)) ^ 16
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def _seeded_sampler_on_cpu(module) -> bool:
    hash_, sampler = module.murmur_hash32, module.multinomial_with_seed
    if getattr(hash_, "__megatron_opd_patch__", False):
        return False
    eager = getattr(sampler, "_torchdynamo_orig_callable", None) or sampler  # torch.compile'd

    def murmur_hash32(seed, positions, col_indices):
        if seed.device.type == "cpu":
            return murmur_hash32_torch(seed, positions, col_indices)
        return hash_(seed, positions, col_indices)

    def multinomial_with_seed(logprobs, seed, positions):
        if logprobs.device.type == "cpu":
            return eager(logprobs, seed, positions)  # its `murmur_hash32` is the one above
        return sampler(logprobs, seed, positions)

    for name, patched, original in (("murmur_hash32", murmur_hash32, hash_),
                                    ("multinomial_with_seed", multinomial_with_seed, sampler)):
        patched.__megatron_opd_patch__ = True
        patched.__wrapped__ = original
        setattr(module, name, patched)
    return True


def patch_seeded_sampler_on_cpu() -> bool:
    """Target: `murmur_hash32` and `multinomial_with_seed` as named in `sglang.srt.layers.sampler`
    (sglang 0.5.23; every seeded sampling path calls the latter, which calls the former). Why: on
    CPU `murmur_hash32` calls `torch.ops.sgl_kernel.murmur_hash32_cpu` from sgl-kernel's CPU
    build (not on PyPI; our stand-in has no ops), and `multinomial_with_seed` is torch.compile'd,
    which costs 15-25 s at a server's first seeded request (measured here) for a hash over a
    vocabulary of a few dozen ids. Patched, on CPU tensors only: the same MurmurHash3 in torch
    ops (`murmur_hash32_torch`, checked in tests/test_eval_reproducible.py against the published
    algorithm) and the sampler run eagerly; elsewhere upstream's."""
    return _patch_when_imported(_SAMPLER_MODULE, _seeded_sampler_on_cpu)


_LOGITS_MODULE = "sglang.srt.layers.logits_processor"


def _tempered_input_logprobs(module) -> bool:
    meta_cls, proc_cls = module.LogitsMetadata, module.InputLogprobProcessor
    if getattr(proc_cls.forward, "__megatron_opd_patch__", False):
        return False
    build, forward = meta_cls.from_forward_batch.__func__, proc_cls.forward

    def from_forward_batch(klass, forward_batch):
        meta = build(klass, forward_batch)
        info = getattr(forward_batch, "sampling_info", None)
        if meta.extend_return_logprob and info is not None:  # the field upstream never fills
            meta.temperature = info.temperatures  # [requests, 1], the requests' own temperatures
        return meta

    def tempered_forward(self, pruned_states, sample_indices, input_logprob_indices,
                         token_to_seq_idx, lm_head, get_logits_fn, logits_metadata,
                         skip_chunking_for_dp_attn=False):
        import torch

        from sglang.srt.environ import envs

        args = dict(pruned_states=pruned_states, sample_indices=sample_indices,
                    input_logprob_indices=input_logprob_indices,
                    token_to_seq_idx=token_to_seq_idx, lm_head=lm_head,
                    logits_metadata=logits_metadata,
                    skip_chunking_for_dp_attn=skip_chunking_for_dp_attn)
        temps = getattr(logits_metadata, "temperature", None)
        if (temps is None or envs.SGLANG_RETURN_ORIGINAL_LOGPROB.get()
                or bool(torch.all(temps == 1.0))):  # raw logits already are temperature 1
            return forward(self, get_logits_fn=get_logits_fn, **args)
        rows = pruned_states.shape[0]
        seq = torch.as_tensor(token_to_seq_idx[:rows], dtype=torch.long, device=temps.device)
        row_t = temps.reshape(-1)[seq].unsqueeze(1)  # each pruned row's request temperature
        done = [0]  # rows already handed out: chunks come in order

        def tempered_logits(states, *a, **kw):
            logits = get_logits_fn(states, *a, **kw)
            t = row_t[done[0]:done[0] + states.shape[0]]
            done[0] += states.shape[0]
            return logits / t.to(logits.dtype)

        result, sampled = forward(self, get_logits_fn=tempered_logits, **args)
        if done[0] != rows:
            raise RuntimeError(f"tempered input log-probs: {done[0]} logit rows for {rows} states")
        if sampled is not None and sample_indices is not None:
            # the sampler divides by the temperature itself: hand it the raw logits back
            sampled = sampled * row_t[sample_indices].to(sampled.dtype)
        return result, sampled

    from_forward_batch.__megatron_opd_patch__ = True
    tempered_forward.__megatron_opd_patch__ = True
    tempered_forward.__wrapped__ = forward
    meta_cls.from_forward_batch = classmethod(from_forward_batch)
    proc_cls.forward = tempered_forward
    return True


def patch_input_logprobs_at_request_temperature() -> bool:
    """Target: `LogitsMetadata.from_forward_batch` and `InputLogprobProcessor.forward` (sglang
    0.5.23 `srt/layers/logits_processor.py`, `srt/layers/logprob_processor.py`). Why: prompt-token
    log-probs (`input_token_logprobs`, `input_top_logprobs`: what teacher scoring reads) are
    log_softmax of the raw logits whatever the request's temperature (`LogitsMetadata.temperature`
    exists but nothing fills it; only output tokens are scored at the sampler's temperature), so a
    teacher could not be scored at the temperature the objective assumes. Patched: the metadata
    carries the batch's per-request temperatures, and the input log-prob pass divides each logit
    row by its request's temperature, so every input log-prob (sampled-token, top-K, token-ids)
    is log_softmax(z / T); requests at T = 1 (and greedy ones, which SGLang sets to 1) and
    SGLANG_RETURN_ORIGINAL_LOGPROB=1 take upstream's path unchanged. The rows handed to the
    sampler are multiplied back by T (it divides by T itself; exact for powers of two, within
    one float rounding otherwise). Device-independent code, tested on CPU; installed with the
    run patches, so GPU teachers get it too (untested there: the orchestrator's measured-
    temperature check, TeacherRouter.verify_temperature, refuses a server where it fails)."""
    return _patch_when_imported(_LOGITS_MODULE, _tempered_input_logprobs)


def install_sglang_cpu_compat() -> list[str]:
    """Apply every patch needed on a CPU-only machine; returns the names applied this call."""
    import torch

    if torch.cuda.is_available():
        return []
    warn_if_untested("sglang", TESTED_SGLANG, "megatron_opd.compat.sglang_cpu")
    applied = []
    for patch in (patch_sgl_kernel_stand_in, patch_torchvision_stand_in,
                  patch_cuda_host_register_no_op, patch_sampling_seed_honoured,
                  patch_seeded_sampler_on_cpu):
        if patch():
            applied.append(patch.__name__)
    _applied.extend(applied)
    return applied


_TOKENIZER_MANAGER_MODULE = "sglang.srt.managers.tokenizer_manager"
HIDDEN_STATES_ENV = "MEGATRON_OPD_HIDDEN_STATES"  # "bfloat16" | "float32": the frames' dtype


def hidden_states_frame(states, dtype: str) -> dict:
    """One forward's hidden states (nested float lists, as the scheduler sends them) as
    {"dtype", "shape", "b64"}: base64 of the raw little-endian values (bfloat16: the bit
    patterns, rounded to nearest even). serving/sglang_client.decode_hidden_states reads it."""
    import base64

    import numpy as np

    from megatron_opd.sample_fields import float32_to_bf16_bits

    arr = np.asarray(states, dtype=np.float32)
    raw = float32_to_bf16_bits(arr) if dtype == "bfloat16" else arr.astype("<f4")
    return {"dtype": dtype, "shape": list(arr.shape),
            "b64": base64.b64encode(raw.tobytes()).decode("ascii")}


def _hidden_states_as_frames(dtype: str):
    def patch(module) -> bool:
        cls = module.TokenizerManager
        original = cls._handle_batch_output
        if getattr(original, "__megatron_opd_patch__", False):
            return False

        async def _handle_batch_output(self, recv_obj):
            states = getattr(recv_obj, "output_hidden_states", None)
            if states:
                recv_obj.output_hidden_states = [
                    None if per_req is None else [hidden_states_frame(f, dtype) for f in per_req]
                    for per_req in states]
            return await original(self, recv_obj)

        _handle_batch_output.__megatron_opd_patch__ = True
        _handle_batch_output.__wrapped__ = original
        cls._handle_batch_output = _handle_batch_output
        return True
    return patch


def patch_hidden_states_as_frames(dtype: str) -> bool:
    """Target: `TokenizerManager._handle_batch_output` (sglang 0.5.23
    `srt/managers/tokenizer_manager.py`), which puts each request's `output_hidden_states` (one
    nested list of floats per forward) into `meta_info["hidden_states"]` as it is. Why: as JSON
    floats a hidden state costs ~20 bytes per value on the HTTP leg (measured: 19.7 B, fp32
    model) against 2 (bfloat16) or 4 (float32) raw. Patched: before the original runs, each
    forward's list becomes one frame (`hidden_states_frame`: 2.67 B per value in base64 for
    bfloat16, 5.33 for float32). The scheduler -> tokenizer-manager leg inside the server is
    upstream's (Python lists). Applied only where HIDDEN_STATES_ENV names a dtype (our teacher
    servers with teacher.signal=hidden); the client reads both forms."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"{HIDDEN_STATES_ENV}: bfloat16 or float32, got {dtype!r}")
    warn_if_untested("sglang", TESTED_SGLANG, "megatron_opd.compat.sglang_cpu")
    applied = _patch_when_imported(_TOKENIZER_MANAGER_MODULE, _hidden_states_as_frames(dtype))
    if applied:
        _applied.append(patch_hidden_states_as_frames.__name__)
    return applied
