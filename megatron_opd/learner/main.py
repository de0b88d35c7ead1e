"""The learner: receive samples, train the student with OPD under any megatron layout, publish
weights, evaluate, checkpoint, log.

`python -m megatron_opd.learner.main --run-dir DIR` (or under torchrun for several ranks) reads
DIR/config.yaml (resolved) and DIR/wiring.json. Policy version v = number of optimizer steps
applied and published; the rollout server starts at version 0 (the student's init). Global rank
0 alone talks to the sockets and servers; every rank trains and gathers weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_opd.config import Config, load_config
from megatron_opd.logs import event, quiet_known_warnings
from megatron_opd.sample_fields import teacher_payload_metrics
from megatron_opd.serving.self_teacher import make_refresher
from megatron_opd.serving.teachers import TeacherRouter, current_revisions
from megatron_opd.wiring import RunWiring


def run_learner(cfg: Config, wiring: RunWiring) -> dict:
    from megatron_opd.compat.megatron_cpu import install_megatron_compat
    from megatron_opd.envs import make_env
    from megatron_opd.envs.privileged import privileged_scoring
    from megatron_opd.learner.checkpoint import (TrainerState, latest_checkpoint,
                                                 load_checkpoint, save_checkpoint)
    from megatron_opd.learner.evaluate import EvalVersionError, evaluate
    from megatron_opd.learner.interrupt import interrupt_sync
    from megatron_opd.learner.io import broadcast_batch
    from megatron_opd.learner.losses import objective_fields, objective_loss_fn
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.preemption import PreemptionWatch
    from megatron_opd.learner.routing_replay import RoutingReplay
    from megatron_opd.learner.train_step import (forward_backward, optimizer_step,
                                                 split_microbatches, wrap_for_training)
    from megatron_opd.models.hf_mapping import iter_hf_weights, load_hf_checkpoint, save_hf_checkpoint
    from megatron_opd.models.precision import resolve_here
    from megatron_opd.objectives.freshness import context_lag
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

    run_dir = Path(wiring.run_dir)
    install_megatron_compat()
    groups = init_distributed(cfg.parallel, seed=cfg.run.seed)
    rank0 = dist.get_rank() == 0
    env = make_env(cfg, wiring.student_dir)  # special ids, held-out prompts, decoding
    special = env.special
    spec = dataclasses.replace(cfg.model, eos_token_id=special.eos, pad_token_id=special.pad,
                               **({} if special.bos is None else {"bos_token_id": special.bos}))
    precision = resolve_here(cfg.precision, distributed_optimizer=cfg.train.distributed_optimizer)
    print(f"[learner] precision: {precision.describe()}", flush=True)
    r3 = cfg.train.routing_replay == "r3"
    config = transformer_config(spec, layout=cfg.parallel, moe_enable_routing_replay=r3,
                                **precision.transformer_config_kwargs())
    chunks = build_model_chunks(spec, config, te_layer_spec=precision.needs_te_layer_spec)
    replay = RoutingReplay(chunks, cfg.parallel.tensor_parallel, groups.tp_rank,
                           config.sequence_parallel) if r3 else None
    ddp, optimizer, scheduler = wrap_for_training(chunks, cfg.train, groups, precision)
    proximal, score_old = _proximal_policy(cfg, spec, config, chunks, ddp, groups, replay,
                                           te_layer_spec=precision.needs_te_layer_spec)
    ckpt_root = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if cfg.train.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, chunks, optimizer, scheduler)
    else:
        load_hf_checkpoint(chunks, wiring.student_dir, spec, groups)
        # bf16/fp16 params: the optimizer's fp32 main copies were taken from the random init
        optimizer.reload_model_params()
        state = TrainerState(counters={"skipped_steps": 0, "dropped_stale_tokens": 0})
    proximal.start(state.version)
    io = _RankZeroIO(cfg, wiring, state, resumed=resume_from is not None) if rank0 else None
    hidden = cfg.teacher.signal == "hidden"  # the teacher's exact distribution from its head
    loss_fn = objective_loss_fn(cfg.objective, groups.tp,
                                masked_token_ids(cfg.objective.masked_tokens, wiring.student_dir),
                                cfg.correction,
                                teacher_head=_teacher_head(cfg, spec, wiring, groups) if hidden
                                else None)
    eval_set = env.eval_prompts() if rank0 else []  # rank 0 asks the servers

    interrupt = cfg.correction.proximal == "interrupt"
    refresher = make_refresher(cfg, wiring, rank0)  # teacher.source=self (serving/self_teacher)
    if rank0 and refresher is not None:
        io.teacher_revisions = refresher.revisions

    def next_published(state) -> int:  # what the fleet gets after this step (if it steps)
        final = state.step + 1 == cfg.train.steps
        lag = 0 if final else cfg.async_.publish_lag
        return max(state.version + 1 - lag, 0) if lag else state.version + 1

    def publish(newest: bool = False) -> float:  # every rank gathers; rank 0 streams
        from megatron_opd.weight_sync import publish_with_retries

        # async.publish_lag > 0: the fleet gets the version lag steps back (held by `proximal`),
        # except the final weights, which are evaluated
        version = state.version if newest else proximal.published_version(cfg.async_.publish_lag)
        # a restarted rollout server: the publisher reconnects, every rank gathers again.
        # The full tensors are gathered to global rank 0 only (dst=0), which streams them.
        with proximal.holding(version):
            t = publish_with_retries(lambda: iter_hf_weights(chunks, spec, groups, dst=0),
                                     io.publisher if rank0 else None, version,
                                     attempts=cfg.server.max_restarts + 1)
        proximal.on_publish(version)
        if refresher is not None and refresher.due(version):  # teacher.source=self: its copy
            t += refresher.refresh(lambda: iter_hf_weights(chunks, spec, groups, dst=0), version,
                                   attempts=cfg.server.max_restarts + 1)
            if rank0:
                io.teacher_revisions = refresher.revisions
        if rank0:
            io.announce(state, version)
        return t

    def run_eval() -> dict:
        # the version the fleet serves (older than the learner's under async.publish_lag):
        # sampled by the fleet and scored by the learner holding the same weights
        version = proximal.fleet_version
        for attempt in range(2):
            try:
                with proximal.holding(version):
                    return evaluate(ddp, groups, env, eval_set, io and io.rollout,
                                    # teacher.prompt=privileged: after the hinted prompts
                                    io and privileged_scoring(
                                        cfg, io.teacher.for_prompts(cfg, env.name, eval_set),
                                        eval_set),
                                    version, spec.vocab_size,
                                    cfg.rollout.max_new_tokens, seed=cfg.run.seed + version,
                                    micro_batch_size=cfg.parallel.micro_batch_size,
                                    samples_dir=run_dir / "samples" if rank0 else None,
                                    exact_kl_max_vocab=cfg.eval.exact_kl_max_vocab)
            except EvalVersionError as e:  # raised on every rank together
                if attempt:
                    raise
                # a rollout server serves other weights (restarted since the publish): publish
                # the fleet's version again (the publisher reconnects to it), evaluate again
                print(f"[learner] {e}; publishing version {version} again", flush=True)
                publish(newest=version == state.version)

    def checkpoint(hf_export=None) -> None:
        if rank0:
            io.record_cursor(state)  # what was consumed and accepted, into meta.json
        save_checkpoint(ckpt_root, chunks, optimizer, scheduler, state,
                        keep=cfg.train.keep_checkpoints, hf_export=hf_export)
        if rank0:
            io.release_spool(state, ckpt_root)  # trained and in every kept checkpoint

    preemption = PreemptionWatch(run_dir)
    saved_step = state.step if resume_from is not None else -1  # of the newest checkpoint
    if state.version > 0:  # resumed: the fleet restarted from the init weights
        publish()
    else:
        proximal.on_publish(0)  # the fleet starts from the init weights
    last_eval = run_eval()
    if rank0:
        io.announce(state, proximal.fleet_version)
    while state.step < cfg.train.steps:
        if preemption.requested():  # Slurm's warning: checkpoint now, the job requeues itself
            if state.step != saved_step:
                checkpoint()
            if rank0:
                preemption.mark_done(state.step)
                io.close(state, last_eval, final=False)
            print(f"[learner] preempted: checkpoint at step {state.step} saved; exiting",
                  flush=True)
            destroy_distributed()
            return last_eval
        t0 = time.time()
        samples, batch, stale = (io.next_batch(cfg, state, special.pad) if rank0
                                 else (None, None, None))
        t_wait = time.time() - t0
        batch = broadcast_batch(batch)
        if r3 and batch.routed_experts is None:
            raise RuntimeError("train.routing_replay=r3: samples arrived without routed_experts "
                               "(is the rollout server started with --enable-return-routed-experts?)")
        fields = objective_fields(cfg.objective, hidden) + ("token_versions", "revision_changed") + \
            (("routed_experts",) if r3 else ()) + (("interrupt_logprobs",) if interrupt else ())
        micro = split_microbatches(batch, fields, groups, cfg.parallel.micro_batch_size)
        offpolicy = proximal.fill_old_logprobs(
            micro, batch.token_versions, batch.loss_mask, score_old, version=state.version,
            batch_stored=batch.interrupt_logprobs if interrupt else None)
        for mb in micro:  # the supervision drift of freshness control (§7)
            mb.data["context_lag"] = context_lag(mb.data["token_versions"], mb.data["loss_mask"],
                                                 state.version, mb.data["revision_changed"])
        loss, tokens, terms = forward_backward(
            ddp, micro, loss_fn, groups,
            pre_forward=(lambda mb, _: replay.force(mb.data["routed_experts"])) if r3 else None)
        if r3:
            replay.off()
        if interrupt and next_published(state) != proximal.fleet_version:
            # (that pass only scores tokens: its rows, partial rollouts among them, carry no
            # teacher_hidden, so the hidden signal's fields are not asked for)
            offpolicy |= interrupt_sync(io, proximal, score_old, groups, cfg, special.pad,
                                        objective_fields(cfg.objective), seq=time.time_ns())
        stepped, grad_norm = optimizer_step(optimizer, scheduler, loss)
        state.step += 1
        t_sync = 0.0
        if stepped:
            state.version += 1
            proximal.after_step(state.version, terms.get("offpolicy/active_fraction"))
            t_sync = publish(newest=state.step == cfg.train.steps)
        else:  # never publish weights made from a non-finite step
            state.counters["skipped_steps"] += 1
        if state.version % cfg.eval.interval == 0 and stepped or state.step == cfg.train.steps:
            last_eval = run_eval()
        if cfg.train.checkpoint_interval and state.step % cfg.train.checkpoint_interval == 0 \
                and state.step < cfg.train.steps:
            checkpoint()
            saved_step = state.step
        if rank0:
            state.counters["dropped_stale_tokens"] += stale.dropped_tokens
            io.log(state, samples, stale, last_eval, {
                "train/loss": loss, "train/tokens": tokens, "train/grad_norm": grad_norm,
                "train/lr": optimizer.param_groups[0]["lr"],
                **{k if k.startswith("offpolicy/") else f"train/{k}": v
                   for k, v in terms.items()}, **offpolicy,
                "time/wait_samples_s": t_wait, "time/weight_sync_s": t_sync,
                "time/step_s": time.time() - t0})
    if cfg.train.checkpoint:
        checkpoint(hf_export=lambda path: save_hf_checkpoint(
            chunks, spec, path, tokenizer_dir=wiring.student_dir, groups=groups,
            source=wiring.student_dir))  # the init's config.json, generation config, tokenizer
    if rank0:
        io.close(state, last_eval)
        event("learner", "finished", step=state.step, version=state.version)
    destroy_distributed()
    return last_eval


def _proximal_policy(cfg: Config, spec, config, chunks, ddp, groups, replay, te_layer_spec):
    """`correction.proximal` with its scoring pass; the replica is a second model on these
    ranks (same layout, no optimizer), with its own routing replay under R3."""
    from megatron_opd.learner.proximal import ProximalPolicy, make_scorer
    from megatron_opd.learner.routing_replay import RoutingReplay
    from megatron_opd.models.qwen3_moe import build_model_chunks

    corr = cfg.correction
    replica = build_model_chunks(spec, config, te_layer_spec=te_layer_spec) \
        if corr.proximal == "replica" else None
    replays = {id(ddp): replay}
    if replica is not None and replay is not None:
        replays[id(replica)] = RoutingReplay(replica, cfg.parallel.tensor_parallel, groups.tp_rank,
                                             config.sequence_parallel)
    policy = ProximalPolicy(corr.proximal, chunks, ddp, max_staleness=cfg.async_.max_staleness,
                            publish_lag=cfg.async_.publish_lag, ewma_beta_=corr.ewma_beta,
                            ewma_tau=corr.ewma_reset_tau,
                            ewma_cooldown=corr.ewma_reset_cooldown, replica_chunks=replica)
    return policy, make_scorer(cfg.objective, groups, lambda models: replays.get(id(models)))


def _teacher_head(cfg: Config, spec, wiring: RunWiring, groups):
    """teacher.signal=hidden: this TP rank's rows of the teacher's output head, read once from the
    Hugging Face directory the teacher servers load, split like the student's vocab-parallel
    logits (docs/teacher-signals.md)."""
    from megatron_opd.learner.hidden_teacher import TeacherHead
    from megatron_opd.models.spec import padded_vocab_size

    tp = cfg.parallel.tensor_parallel
    head = TeacherHead.from_hf(wiring.teacher_dir, tp_rank=groups.tp_rank, tp_size=tp,
                               padded_vocab_size=padded_vocab_size(spec, tp))
    if head.vocab_size != spec.vocab_size:
        raise ValueError(f"teacher.signal=hidden: the teacher's head has {head.vocab_size} rows, "
                         f"the student's vocabulary {spec.vocab_size}")
    return head


def masked_token_ids(tokens: list[str], tokenizer_dir) -> tuple[int, ...]:
    """`objective.masked_tokens` as ids of the student's tokenizer; each must be one token."""
    if not tokens:
        return ()
    from megatron_opd.config import ConfigError
    from megatron_opd.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab()
    missing = [(i, t) for i, t in enumerate(tokens) if t not in vocab]
    if missing:
        i, t = missing[0]
        raise ConfigError(f"objective.masked_tokens[{i}]: {t!r} is not a token of the student's "
                          f"tokenizer ({tokenizer_dir})")
    return tuple(vocab[t] for t in tokens)


class _RankZeroIO:
    """Sockets, servers, weight publisher and metrics: global rank 0 only."""

    def __init__(self, cfg: Config, wiring: RunWiring, state, resumed: bool):
        from megatron_opd.metrics import MetricsWriter
        from megatron_opd.transport import ControlPublisher, SampleServer

        # evaluation requests to a server being restarted are re-issued (docs/fault-tolerance.md)
        self.rollout = wiring.rollout_client(cfg.server)  # the router, when a fleet has one
        self.teacher = TeacherRouter.from_config(cfg, wiring.teacher_clients(cfg.server))
        self.restarts_path = Path(wiring.run_dir) / "server_restarts.json"
        self.fleet_stats_path = Path(wiring.run_dir) / "fleet_stats.json"  # the launcher's probe
        secret = wiring.secret_file or None
        tr = cfg.transport
        self.receiver = SampleServer(wiring.samples_endpoint, secret=secret, mac=tr.mac,
                                     run_id=cfg.run.name, credit=tr.credit)
        self.control = ControlPublisher(wiring.control_endpoint, secret=secret, mac=tr.mac)
        self.publisher = _make_publisher(cfg, wiring)
        self.announced = state.version  # the fleet's version, as last announced
        # the revisions that score samples now (teacher.source=self: the refreshed version's)
        self.teacher_revisions = current_revisions(cfg)
        from megatron_opd.learner.interrupt import InterruptStore

        self.interrupts = InterruptStore()  # correction.proximal=interrupt: log pi_old per id
        from megatron_opd.learner.spool import SampleLedger

        self.metrics = MetricsWriter(Path(wiring.run_dir), tensorboard=cfg.logging.tensorboard,
                                     resume_step=state.step if resumed else None)
        self.ledger = SampleLedger(Path(wiring.run_dir) / "ledger.jsonl",
                                   resume_step=state.step if resumed else None)
        self._restore_spool(Path(wiring.run_dir) / "spool", state)
        from megatron_opd.gpu_metrics import GpuMetrics

        self.gpu = GpuMetrics()  # utilisation / memory through nvidia-ml-py; {} without GPUs

    def announce(self, state, version: int) -> None:
        """The fleet serves `version` (the learner's, or older under async.publish_lag)."""
        from megatron_opd.transport import WeightsPublished

        self.announced = version

        self.control.publish(WeightsPublished(version=version, step=state.step,
                                              published_at=time.time()))

    def _restore_spool(self, directory: Path, state) -> None:
        """Accepted samples survive a crash in the spool (learner/spool.py): those consumed by
        steps in the checkpoint are forgotten, the rest are trained first, in arrival order."""
        from collections import deque

        from megatron_opd.learner.spool import SampleSpool

        consumed = int(state.data_cursor.get("consumed_through", -1))
        self.spool = SampleSpool(directory, consumed_through=consumed)
        self.spool.release_through(consumed)
        self.queue = deque(self.spool.pending(after=consumed))
        if self.spool.corrupt:
            print(f"[learner] spool: skipped unreadable {self.spool.corrupt}", flush=True)
        from megatron_opd.transport import SeenIds

        # accepted = in the checkpoint's ledger, or spooled since: a re-sent copy is a duplicate
        seen = SeenIds.from_state(state.data_cursor["accepted"]) \
            if "accepted" in state.data_cursor else SeenIds()
        for _, s in self.queue:
            seen.add(s.sample_id)
        self.receiver.load_seen_state(seen.to_state())
        state.counters.setdefault("accepted_samples", 0)
        state.counters.setdefault("duplicate_samples", 0)
        if self.queue:
            print(f"[learner] resuming with {len(self.queue)} accepted, untrained samples from the "
                  f"spool", flush=True)

    def record_cursor(self, state) -> None:
        state.data_cursor["accepted"] = self.receiver.seen_state()

    def release_spool(self, state, checkpoints: Path) -> None:
        """Forget samples only once every kept checkpoint has consumed them: a resume that falls
        back past a damaged newest checkpoint (learner/checkpoint.py) replays them from here."""
        from megatron_opd.learner.checkpoint import kept_consumed_through

        kept = kept_consumed_through(checkpoints)
        if kept is not None:  # unreadable: release nothing this time
            self.spool.release_through(min([int(state.data_cursor.get("consumed_through", -1)),
                                            *kept]))

    def next_batch(self, cfg: Config, state, pad_id: int):
        from megatron_opd.learner.batch import collate
        from megatron_opd.learner.io import receive_samples

        n = cfg.train.batch_size
        while len(self.queue) < n:
            # re-announced while waiting: the version the fleet serves (async.publish_lag)
            fresh = receive_samples(self.receiver, self.control, n - len(self.queue),
                                    self.announced)
            # durable first, acknowledged after: an accepted sample is never lost
            self.queue.extend(zip(self.spool.append(fresh), fresh))
            self.ledger.accepted([x.sample_id for x in fresh])
            self.receiver.ack([x.sample_id for x in fresh])
            state.counters["accepted_samples"] += len(fresh)
        taken = [self.queue.popleft() for _ in range(n)]
        state.data_cursor["consumed_through"] = taken[-1][0]
        samples = [s for _, s in taken]
        # Offline OPD data is fixed off-policy data by design (version 0): no staleness bound.
        bound = None if cfg.teacher.mode == "offline" else cfg.async_.max_staleness
        batch, stale = collate(samples, pad_id, state.version, bound, self.teacher_revisions)
        batch.interrupt_logprobs = self.interrupts.take(samples, batch.response_ids.shape[1])
        return samples, batch, stale

    def log(self, state, samples, stale, last_eval: dict, train: dict) -> None:
        from megatron_opd.serving.sglang_server import server_restarts

        self.ledger.trained(state.step - 1, [x.sample_id for x in samples])
        self.metrics.log(state.step - 1, {
            **train, **last_eval,
            "train/skipped_steps": state.counters["skipped_steps"],
            "samples/count": len(samples), "samples/staleness_mean": stale.staleness_mean,
            "samples/staleness_max": stale.staleness_max,
            "samples/version_min": min(int(x.token_versions.min()) for x in samples),
            "samples/version_max": max(int(x.token_versions.max()) for x in samples),
            # responses continued across a weight update (retract / interrupt sync)
            "samples/multi_version_fraction": sum(x.min_version != x.max_version
                                                  for x in samples) / len(samples),
            "samples/dropped_stale_tokens": state.counters["dropped_stale_tokens"],
            "samples/rejected_messages": self.receiver.stats["rejected_total"],
            "samples/duplicates_dropped": self.receiver.stats["duplicates"],
            "samples/accepted_total": state.counters["accepted_samples"],
            "servers/restarts": server_restarts(self.restarts_path),
            "samples/with_routed_experts": sum(s.routed_experts is not None for s in samples)
            / len(samples),
            # decoded partly on KV of older weights (weight_sync.pause_mode=in_place)
            "samples/stale_kv_fraction": sum(bool(s.metadata.get("stale_kv")) for s in samples)
            / len(samples),
            **teacher_payload_metrics(samples),  # bytes per token on each leg
            **_fleet_stats(self.fleet_stats_path),
            "weights/version": state.version, **self.gpu.sample()})

    def close(self, state, last_eval: dict, final: bool = True) -> None:
        from megatron_opd.transport import Shutdown

        if final:  # the evaluation of the final weights closes metrics.jsonl
            self.metrics.log(state.step, {**last_eval, "weights/version": state.version})
        self.metrics.close()
        self.ledger.close()
        self.control.publish(Shutdown(reason="training finished" if final else "preempted"))
        self.publisher.close()
        self.gpu.close()


def _fleet_stats(path: Path) -> dict:
    """The latest per-server figures the launcher's probe wrote (`fleet/<server>/<figure>`,
    docs/fleets.md); {} before the first, or from a launcher that writes none."""
    import json

    try:
        stats = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet (replaced atomically: never half read)
        return {}
    return {k: v for k, v in stats.items() if k.startswith("fleet/")}


def _make_publisher(cfg: Config, wiring: RunWiring):
    from megatron_opd.serving.sglang_client import fleet_client
    from megatron_opd.weight_sync import DiskWeightPublisher, DistributedWeightPublisher

    # Every rollout server gets the weights (one control client each); evaluation and
    # generation use the fleet client.
    servers = [fleet_client([url], cfg.server) for url in wiring.rollout_urls]
    # a restarted rollout server is waited for this long (docs/fault-tolerance.md)
    reconnect_s = cfg.server.start_timeout_s + cfg.server.request_timeout_s
    if cfg.weight_sync.method == "disk":
        return DiskWeightPublisher(servers, directory=Path(wiring.run_dir) / "weights",
                                   base_model_dir=wiring.student_dir,
                                   reconnect_timeout_s=reconnect_s,
                                   pause_mode=cfg.weight_sync.pause_mode)
    pub = DistributedWeightPublisher(servers, master_addr=wiring.weight_sync_master_addr,
                                     master_port=wiring.weight_sync_master_port or None,
                                     backend=cfg.weight_sync.backend,
                                     server_world_size=wiring.rollout_server_world_size,
                                     bucket_bytes=int(cfg.weight_sync.bucket_mb * (1 << 20)),
                                     reconnect_timeout_s=reconnect_s,
                                     pause_mode=cfg.weight_sync.pause_mode)
    pub.connect()
    return pub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.learner.main")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    quiet_known_warnings()  # before megatron-core is imported (megatron_opd/logs.py: which, why)
    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    event("learner", "start", run_dir=run_dir, steps=cfg.train.steps)
    run_learner(cfg, RunWiring.load(run_dir / "wiring.json"))
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helpers: keep the guard
    sys.exit(main())
