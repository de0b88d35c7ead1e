"""The orchestrator process: prompts → rollout fleet → teacher fleet → samples to the learner.

Prompts, loss masks and rewards come from the run's environment (megatron_opd/envs/); a
multi-turn environment's episodes run through megatron_opd/episodes.py (token in / token out,
tool tokens masked). Responses go on through weight updates in every `weight_sync.pause_mode`
(`turn_generator`): aborted ones are continued, never sent cut; in_place ones decoded on stale
KV are flagged (`stale_kv` in the metadata, counted in the stats line). Each
prompt is sampled `rollout.group_size` times (a GRPO group: one group_id, rewards from the
environment's verifier, sent back to back). With `teacher.mode=offline` the samples come from
the offline store instead (megatron_opd/offline_store.py), and no rollout or teacher request is
made for training.

Generation runs ahead of training (asynchronous) but only within the staleness budget: a new
request is admitted while `started + k <= (version + max_staleness + 1) * batch_size`, so with
in-order consumption a sample started at version v is trained by step v + max_staleness. The
learner enforces the bound per token anyway (and counts what it drops).

`python -m megatron_opd.orchestrator --run-dir DIR` (reads DIR/config.yaml and DIR/wiring.json).
"""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from megatron_opd.config import Config, load_config
from megatron_opd.envs import Environment, EnvPrompt
from megatron_opd.envs.privileged import teacher_prompt_ids
from megatron_opd.episodes import Trajectory, run_episodes
from megatron_opd.interrupt_sync import InterruptGate, generate_continuing
from megatron_opd.serving.self_teacher import wrap_self_teacher
from megatron_opd.serving.teachers import TeacherRouter, route_key
from megatron_opd.transport import (ControlSubscriber, Interrupt, PartialRollouts, Sample,
                                    SampleClient, Shutdown, WeightsPublished)
from megatron_opd.wiring import RunWiring


# After the servers' abort-mode pause returned, how long the running /generate calls may take to
# come back before the partial rollouts are sent without them (counted as late_calls). Calls that
# reach a paused server are held there with no tokens, so in practice this only bounds the wait
# for such a held call (it never returns before the update).
INTERRUPT_GRACE_S = 2.0


class Admission:
    """The staleness budget shared by the generation workers."""

    def __init__(self, batch_size: int, max_staleness: int):
        self.batch_size, self.max_staleness = batch_size, max_staleness
        self.version, self.started, self.stopped = 0, 0, False
        self._cv = threading.Condition()

    def acquire(self, k: int) -> bool:
        """Block until k more samples may start; False once stopped."""
        with self._cv:
            while not self.stopped and \
                    self.started + k > (self.version + self.max_staleness + 1) * self.batch_size:
                self._cv.wait(timeout=1.0)
            if self.stopped:
                return False
            self.started += k
            return True

    def set_version(self, version: int) -> None:
        with self._cv:
            if version > self.version:
                self.version = version
                self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()


def _compact(routed: np.ndarray | None) -> np.ndarray | None:
    """Expert ids in the narrowest integer type the schema allows (fewer bytes on the wire)."""
    if routed is None:
        return None
    top = int(routed.max(initial=0))
    return routed.astype(np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32)


def sampling_params(cfg: Config, env: Environment) -> dict:
    """No sampling seed: the group_size copies of a prompt in one request sample independently
    (temperature > 0 is validated)."""
    return {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "stop_token_ids": list(env.special.stop_ids)}


def request_prompts(examples: list[EnvPrompt], group_size: int) -> list[list[int]]:
    """The sequences of one /generate call: each prompt repeated group_size times, back to back
    (copy j of prompt i at position i * group_size + j)."""
    return [list(ex.token_ids) for ex in examples for _ in range(group_size)]


def make_groups(cfg: Config, env: Environment, examples: list[EnvPrompt], results, scores,
                group_ids: list[str], revisions: list[str] | None = None) -> list[list[Sample]]:
    """Generate + score results of one request (laid out as `request_prompts`) -> one list of
    Samples per prompt: its group_size responses, one group_id, loss masks and rewards from the
    environment (a multi-turn `Trajectory` carries its own: tool tokens masked, the episode's
    reward, its turns in the metadata).

    A group in which any response came back empty (e.g. an aborted request) is dropped whole,
    so every group that reaches the learner has exactly group_size samples (batches then hold
    whole groups). With group_size 1 the sample id is the group id. A response decoded partly
    on KV of older weights (pause_mode=in_place) is flagged: metadata `stale_kv: true`.
    `revisions`: the revision of the teacher that scored each sequence (None: teacher.revision)."""
    g, k = cfg.rollout.group_size, cfg.teacher.top_k
    if not len(results) == len(scores) == len(examples) * g == len(group_ids) * g:
        raise ValueError(f"make_groups: {len(examples)} prompts x group_size {g} != "
                         f"{len(results)} results / {len(scores)} scores / {len(group_ids)} ids")
    out = []
    for i, (ex, gid) in enumerate(zip(examples, group_ids)):
        members = list(zip(results[i * g:(i + 1) * g], scores[i * g:(i + 1) * g]))
        if any(len(res.output_ids) == 0 for res, _ in members):
            continue
        group = []
        for j, (res, sc) in enumerate(members):
            n = len(res.output_ids)
            hidden = getattr(sc, "hidden", None)  # teacher.signal=hidden: [n, d]
            if isinstance(res, Trajectory):
                mask, logprobs, versions = res.arrays()
                reward, meta = res.reward, {**ex.metadata, **res.metadata}
                if hidden is not None:  # tool tokens: zero rows (masked; never a target)
                    hidden = np.where(mask[:, None] > 0, hidden, hidden.dtype.type(0))
            else:
                mask = env.loss_mask(ex, res.output_ids)
                logprobs = np.asarray(res.output_logprobs, dtype=np.float32)
                versions = np.asarray(res.token_versions, dtype=np.int64)
                reward, meta = env.reward(ex, res.output_ids), dict(ex.metadata)
                if getattr(res, "stale_kv", False):
                    meta["stale_kv"] = True
            if getattr(sc, "http_bytes", 0):  # payload accounting: the learner's teacher/* metrics
                meta["teacher_http_bytes"] = float(sc.http_bytes)
            group.append(Sample(
                sample_id=gid if g == 1 else f"{gid}-{j}", group_id=gid,
                prompt_ids=np.asarray(ex.token_ids, dtype=np.int32),
                response_ids=np.asarray(res.output_ids, dtype=np.int32),
                loss_mask=mask, behaviour_logprobs=logprobs, token_versions=versions,
                teacher_logprobs=np.asarray(sc.logprobs, dtype=np.float32),
                teacher_topk_ids=np.asarray(sc.topk_ids, dtype=np.int32).reshape(n, k),
                teacher_topk_logprobs=np.asarray(sc.topk_logprobs, dtype=np.float32).reshape(n, k),
                teacher_revision=revisions[i * g + j] if revisions else cfg.teacher.revision,
                routed_experts=_compact(res.routed_experts),
                teacher_hidden=hidden,
                reward=reward, metadata=meta,
                created_at=time.time(), finish_reason=res.finish_reason,
                temperature=float(cfg.rollout.temperature), top_p=float(cfg.rollout.top_p),
                # what the teacher servers apply (measured: TeacherRouter.verify_temperature)
                teacher_temperature=float(cfg.teacher.temperature),
            ))
        out.append(group)
    return out


def sample_ids(group_ids: list[str], group_size: int) -> list[str]:
    """The sample id of each sequence of a request (laid out as `request_prompts`)."""
    return [gid if group_size == 1 else f"{gid}-{j}" for gid in group_ids for j in range(group_size)]


def turn_generator(cfg: Config, rollout, gate: InterruptGate | None = None):
    """generate(inputs, params, keys, prefixes) -> results (None once stopped): requests that
    go on through weight updates. With an interrupt gate, through `generate_continuing`
    (partial rows registered for the learner); else through `generate_through_updates` for
    `weight_sync.pause_mode` (abort: aborted responses are continued from their partial
    output, never sent as finished; in_place: `stale_kv` flags; retract: nothing to do)."""
    from megatron_opd.serving.resume import generate_through_updates

    r3 = cfg.train.routing_replay == "r3"
    shape = (cfg.model.num_layers, cfg.model.moe_router_topk)

    def generate(inputs, params, keys, prefixes=None):
        if gate is not None:
            return generate_continuing(rollout, inputs, params, keys, gate, prefixes)
        return generate_through_updates(rollout, inputs, params,
                                        pause_mode=cfg.weight_sync.pause_mode,
                                        return_routed_experts=r3, routed_experts_shape=shape)
    return generate


def rollout_and_score(cfg: Config, env: Environment, rollout, teacher, examples: list[EnvPrompt],
                      group_ids: list[str], gate: InterruptGate | None = None
                      ) -> list[list[Sample]]:
    """One request: group_size responses per prompt from the rollout fleet, every one scored by
    the teacher (sampled-token log-prob, and top-K when teacher.top_k > 0, at every response
    position: a multi-turn trajectory's tool tokens too). Responses survive weight updates
    (`turn_generator`). A multi-turn environment runs its episodes (megatron_opd/episodes.py)."""
    prompts = request_prompts(examples, cfg.rollout.group_size)
    keys = sample_ids(group_ids, cfg.rollout.group_size)
    generate = turn_generator(cfg, rollout, gate)
    if env.multi_turn:
        per_seq = [ex for ex in examples for _ in range(cfg.rollout.group_size)]
        results = run_episodes(env, per_seq, generate, sampling_params(cfg, env), keys)
    else:
        params = [sampling_params(cfg, env) for _ in prompts]
        results = generate(prompts, params, keys)
    if results is None:  # stopped (shutting down)
        return []
    per_seq = [ex for ex in examples for _ in range(cfg.rollout.group_size)]
    # the teacher's prompt: the student's, or with teacher.prompt=privileged the hinted one
    # (tokenised once by the environment); the response tokens and positions are the same
    t_prompts = [list(teacher_prompt_ids(ex)) for ex in per_seq]
    scored = teacher.score([p + list(r.output_ids) for p, r in zip(t_prompts, results)],
                           start=[len(p) for p in t_prompts],
                           keys=[route_key(cfg, env.name, ex.metadata) for ex in per_seq])
    groups = make_groups(cfg, env, examples, results, scored.results, group_ids,
                         scored.revisions)
    if gate is not None:  # a dropped group's rows are never sent: forget them now
        kept = {x.sample_id for g in groups for x in g}
        for key in keys:
            if key not in kept:
                gate.sent(key)
    return groups


def count_sample(counts: dict, metadata: dict) -> None:
    """The stats line's counters of sent samples: `stale_kv` (decoded partly on KV of older
    weights, pause_mode=in_place), and for multi-turn environments assistant `turns` and
    `truncated` episodes (max_turns / max_tokens)."""
    counts["stale_kv"] += bool(metadata.get("stale_kv"))
    if "turns" in counts:
        counts["turns"] += int(metadata.get("turns", 0))
        counts["truncated"] += "truncated" in metadata


def accepted_in_checkpoint(run_dir: Path):
    """The sample ids the learner had accepted at its latest checkpoint (a resumed run skips
    their prompts; ids accepted after it are dropped by the learner as duplicates)."""
    import json

    from megatron_opd.transport import SeenIds

    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return SeenIds()
    meta = run_dir / "checkpoints" / latest.read_text().strip() / "meta.json"
    if not meta.is_file():
        return SeenIds()
    cursor = json.loads(meta.read_text()).get("data_cursor", {})
    return SeenIds.from_state(cursor["accepted"]) if "accepted" in cursor else SeenIds()


def run_orchestrator(cfg: Config, wiring: RunWiring) -> None:
    from megatron_opd.envs import make_env
    from megatron_opd.serving.sglang_client import fleet_client

    env = make_env(cfg, wiring.student_dir)
    # requests that fail because a server is down are re-issued (other URL, or after restart)
    rollout = wiring.rollout_client(cfg.server)  # through the fleet's router when it has one
    # each teacher's fleet (several teachers: routed per sequence, serving/teachers.py)
    teacher = TeacherRouter.from_config(cfg, wiring.teacher_clients(cfg.server),
                                        wiring.teacher_servers())
    # teacher.source=self: revisions self@v<version> read from the teacher servers
    teacher = wrap_self_teacher(cfg, teacher, wiring.teacher_urls)
    # Admission counts samples: a request of k prompts is k x group_size samples. In offline mode
    # the same budget only bounds how far the feeder runs ahead of the learner (flow control).
    admission = Admission(cfg.train.batch_size, cfg.async_.max_staleness)
    ready: queue.Queue[list[Sample]] = queue.Queue()  # whole groups, sent back to back
    errors: list[BaseException] = []
    k, g = cfg.rollout.prompts_per_request, cfg.rollout.group_size
    accepted = accepted_in_checkpoint(Path(wiring.run_dir))
    skipped = 0
    # interrupt sync (correction.proximal=interrupt): the gate, and one client per rollout
    # server to pause them (interrupt_sync.py)
    gate = InterruptGate() if cfg.correction.proximal == "interrupt" else None
    servers = [fleet_client([u], cfg.server) for u in wiring.rollout_urls] if gate else []
    answered: set[int] = set()

    def group_id(position: int) -> str:  # a prompt's id is its stream position: restart-stable
        return f"{cfg.run.name}-{position:09d}"

    def fully_accepted(gid: str) -> bool:
        members = [gid] if g == 1 else [f"{gid}-{j}" for j in range(g)]
        return all(m in accepted for m in members)

    # A resumed run starts its stream after the accepted prefix (nothing before it is
    # regenerated or tokenized again); accepted prompts after a hole are skipped one by one.
    start = next(n for n in itertools.count() if not fully_accepted(group_id(n)))
    stream = env.train_prompts(start=start)
    stream_lock = threading.Lock()
    if start:
        print(f"[orchestrator] resuming the prompt stream at position {start} (every prompt "
              "before it was accepted by the learner)", flush=True)

    def worker() -> None:
        nonlocal skipped
        try:
            while admission.acquire(k * g):
                examples, ids = [], []
                with stream_lock:
                    while len(examples) < k:
                        ex = next(stream, None)
                        if ex is None:  # a finite dataset ran out before train.steps
                            raise RuntimeError(
                                f"data.train: the {cfg.data.epochs} epoch(s) of prompts ended "
                                "before train.steps; raise data.epochs (0: endless) or lower "
                                "train.steps")
                        gid = group_id(ex.position)
                        if fully_accepted(gid):  # trained or spooled before a restart
                            skipped += 1
                            continue
                        examples.append(ex)
                        ids.append(gid)
                for group in rollout_and_score(cfg, env, rollout, teacher, examples, ids, gate):
                    ready.put(group)
        except BaseException as e:  # surface in the main thread: the process must die loudly
            errors.append(e)
            admission.stop()
            if gate:
                gate.stop()

    def offline_feeder() -> None:
        """Offline OPD (ALGORITHMS.md §9): the stored rollouts of the init, scored once by the
        teacher, in store order, cycling; no rollout or teacher request is made for training."""
        from megatron_opd.offline_store import open_store

        try:
            store = open_store(wiring.offline_store)
            if store is None:
                raise RuntimeError(f"teacher.mode=offline: no complete store at "
                                   f"{wiring.offline_store!r}")
            for group in store.training_groups(cfg.run.name):
                if all(x.sample_id in accepted for x in group):
                    continue
                if not admission.acquire(len(group)):
                    return
                ready.put(group)
        except BaseException as e:
            errors.append(e)
            admission.stop()

    if cfg.teacher.mode == "offline":
        threads = [threading.Thread(target=offline_feeder, daemon=True, name="offline")]
    else:
        # every teacher server scores at teacher.temperature, or the run stops here (a sample's
        # teacher_temperature is what was applied): docs/teachers.md
        measured = teacher.verify_temperature(list(env.eval_prompts()[0].token_ids))
        if measured:
            print(f"[orchestrator] teacher servers score at temperature "
                  f"{', '.join(f'{u}: {t:.4f}' for u, t in measured.items())}", flush=True)
        threads = [threading.Thread(target=worker, daemon=True, name=f"rollout-{i}")
                   for i in range(cfg.rollout.max_inflight_requests)]
    tr, secret = cfg.transport, wiring.secret_file or None
    sender = SampleClient(wiring.samples_endpoint, secret=secret, mac=tr.mac, run_id=cfg.run.name,
                          name="orchestrator", resend_after_s=tr.resend_after_s,
                          max_unacked=tr.max_unacked or None,
                          # a group's samples travel in one ZeroMQ message (flushed by the poll
                          # after each group, or when send waits for credit): docs/transport.md
                          batch_max=64)
    control = ControlSubscriber(wiring.control_endpoint, secret=secret, mac=tr.mac)
    for t in threads:
        t.start()
    sent = 0
    counts = {"stale_kv": 0, "turns": 0, "truncated": 0} if env.multi_turn else {"stale_kv": 0}

    def handle_control(timeout_ms: int) -> None:
        for msg in control.poll(timeout_ms=timeout_ms):
            if isinstance(msg, WeightsPublished):
                if gate and gate.closed:  # the interrupt is over: resume, continue the partials
                    gate.each(servers, lambda c: c.continue_generation())
                    gate.reopen()
                admission.set_version(msg.version)
            elif isinstance(msg, Interrupt) and gate and msg.seq not in answered:
                answered.add(msg.seq)  # the learner repeats it until answered (slow joiner)
                rows = gate.interrupt(servers, grace_s=INTERRUPT_GRACE_S)
                sender.send_outside_credit(PartialRollouts.pack(msg.seq, msg.version, rows))
            elif isinstance(msg, Shutdown):
                print(f"[orchestrator] shutdown: {msg.reason}", flush=True)
                admission.stop()
                if gate:
                    gate.stop()

    try:
        while not admission.stopped:
            sender.poll()  # acks free memory, resends happen, a restarted learner is re-fed
            handle_control(timeout_ms=50)
            while not ready.empty():
                for sample in ready.get_nowait():  # one group, back to back on the one socket
                    while not sender.send(sample, timeout_ms=1000):  # waits for credit
                        handle_control(timeout_ms=0)
                        if admission.stopped:
                            break
                    if gate:
                        gate.sent(sample.sample_id)
                    sent += 1
                    count_sample(counts, sample.metadata)
                    if sent % 100 == 0:
                        st = sender.stats
                        print(f"[orchestrator] sent {sent} samples ({st['resent']} re-sent, "
                              f"{st['unacked']} unacked), version {admission.version}, started "
                              f"{admission.started}, skipped {skipped} accepted prompts"
                              + "".join(f", {k} {v:g}" for k, v in env.stats().items())
                              + "".join(f", {k} {v}" for k, v in (gate.stats if gate else {})
                                        .items())
                              + "".join(f", {k} {v}" for k, v in counts.items()),
                              flush=True)
        if errors:
            raise errors[0]
    finally:
        admission.stop()
        if gate:
            gate.stop()
        sender.close()
        control.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.orchestrator")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_orchestrator(load_config(run_dir / "config.yaml"), RunWiring.load(run_dir / "wiring.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
