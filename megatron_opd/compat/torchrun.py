"""torchrun whose rendezvous store listens on `--master-addr` only.

    python -m megatron_opd.compat.torchrun <torch.distributed.run arguments>

The learner's torchrun (launch/fleet.py `torchrun_command`: a static rendezvous) hosts the
world's TCPStore in its agent on node rank 0; upstream's store binds every interface whatever
`--master-addr` says. This entry point applies the one patch below to the agent process only
(the ranks it starts use the agent's store as clients, TORCHELASTIC_USE_AGENT_STORE), then runs
torchrun unchanged. Any device: it is about where a socket listens.
"""

from __future__ import annotations

TESTED_TORCH = ("2.13.0",)  # any local build (+cpu, +cu128, ...)


def _bound_store(host_name, port, world_size=None, is_master=False, timeout=None, *args,
                 **kwargs):
    """`TCPStore(...)` as static_tcp_rendezvous calls it, its server listening on host_name."""
    from datetime import timedelta

    from megatron_opd.listeners import tcp_store

    kwargs.pop("use_libuv", None)
    return tcp_store(host_name, port, world_size, is_master,
                     timeout if timeout is not None else timedelta(seconds=300), *args, **kwargs)


_bound_store.__megatron_opd_patch__ = True


def patch_static_rendezvous_store_binds_master_addr() -> bool:
    """Target: the name `TCPStore` in `torch.distributed.elastic.rendezvous.
    static_tcp_rendezvous` (torch 2.13.0), which `StaticTCPRendezvous.next_rendezvous` calls as
    `TCPStore(master_addr, master_port, world_size, is_master, timeout, multi_tenant=True)`. Why:
    the agent's store then listens on every interface. The replacement takes the same arguments
    and makes the server listen on master_addr only (`megatron_opd.listeners.tcp_store`)."""
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous as module

    if getattr(module.TCPStore, "__megatron_opd_patch__", False):
        return False
    _bound_store.__wrapped__ = module.TCPStore
    module.TCPStore = _bound_store
    return True


def main() -> None:
    import warnings

    import torch
    from torch.distributed.run import main as torchrun_main

    if torch.__version__.split("+")[0] not in TESTED_TORCH:
        warnings.warn(f"megatron_opd.compat.torchrun was tested with torch {TESTED_TORCH}, "
                      f"found {torch.__version__}")
    patch_static_rendezvous_store_binds_master_addr()
    torchrun_main()


if __name__ == "__main__":
    main()
