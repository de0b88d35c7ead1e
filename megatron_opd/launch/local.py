"""The embedded launcher (`megatron-opd train`) and `megatron-opd precompute-teacher`: every
process on this machine."""

from __future__ import annotations

from megatron_opd.config import Config
from megatron_opd.launch.checks import preflight
from megatron_opd.launch.runner import run
from megatron_opd.launch.sites import LocalSite, make_servers


def train(cfg: Config) -> dict:
    """The embedded launcher: every process of the run on this machine (the learner too, so
    its precision is checked here before anything starts)."""
    preflight(cfg, files=True, learner=True)
    return run(cfg, LocalSite())


def precompute_teacher(cfg: Config):
    """`megatron-opd precompute-teacher`: the offline store of this config, made if missing
    (starts a rollout server with the student init and a teacher server, and stops both)."""
    from megatron_opd.envs import prepare_models
    from megatron_opd.offline_build import build_store
    from megatron_opd.offline_store import open_store, store_key, store_path

    store = open_store(store_path(cfg), store_key(cfg))
    if store is not None:
        return store
    preflight(cfg, files=True, learner=False)  # no learner runs here
    models = prepare_models(cfg, progress=cfg.logging.progress)
    path = store_path(cfg)
    logs = path.with_name(path.name + ".logs")
    fleets = make_servers(cfg, models, logs)
    servers = fleets["rollout"] + fleets["teacher"]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout=cfg.server.start_timeout_s)
        return build_store(cfg, fleets["rollout"][0].url, fleets["teacher"][0].url,
                           str(models.student_dir), progress=cfg.logging.progress)
    finally:
        for s in servers:
            s.stop()
