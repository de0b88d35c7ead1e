"""pi_old strategies against the true historical weights (started by torchrun from
tests/test_proximal.py; every rank writes `<out>.rank<r>.pt`).

A real megatron learner (any layout) trains a few OPD steps with a high learning rate, so every
version's policy differs. After each step the probe batch is scored with the *live* weights:
`ref[v]`, the brute-force reference for version v. Snapshot, replica (held one version behind by
async.publish_lag=1), interrupt (before every optimizer step the probe's tokens of the fleet's
version are scored by the collective scoring pass and kept per row) and EWMA policies run beside
the training, and at the end each fills
pi_old for a probe whose tokens carry mixed versions. Also records the parameters of every
version (for the closed-form EWMA) and, per strategy, the gradient of a batch whose over-stale
tokens hold junk, twice with different junk (a token beyond the bound must not be trained).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.transport import Sample

STALENESS = 2
STEPS = 4
BETA = 0.5
RESET_AT = 3  # the step after which the EWMA is told its active fraction fell below tau


def make_samples(n: int, vocab: int, seed: int, versions: list[int], junk: float = 0.0) -> list:
    """n samples; token t of sample i has version versions[(i + t) % len(versions)]. Tokens
    whose version is negative get version -100 (over-stale) and, with `junk`, junk log-probs
    (the token ids stay: they are the context of the tokens after them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P, T = 3, 6
        tv = np.asarray([versions[(i + t) % len(versions)] for t in range(T)], dtype=np.int64)
        resp = rng.integers(1, vocab, T).astype(np.int32)
        teacher = -rng.random(T).astype(np.float32) * 3
        behaviour = -rng.random(T).astype(np.float32) * 3
        if junk:
            stale = tv < 0
            teacher[stale] = -junk
            behaviour[stale] = -2 * junk
        out.append(Sample(
            sample_id=f"s{i}", group_id=f"s{i}", prompt_ids=rng.integers(1, vocab, P).astype(np.int32),
            response_ids=resp, loss_mask=np.ones(T, dtype=np.uint8), behaviour_logprobs=behaviour,
            token_versions=np.abs(tv) if not junk else np.where(tv < 0, -100, tv),
            teacher_logprobs=teacher, teacher_topk_ids=np.zeros((T, 0), dtype=np.int32),
            teacher_topk_logprobs=np.zeros((T, 0), dtype=np.float32), reward=0.0,
            temperature=1.0, top_p=1.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ObjectiveConfig, ParallelConfig, TrainConfig
    from megatron_opd.learner.batch import collate
    from megatron_opd.learner.losses import objective_fields, objective_loss_fn
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.proximal import ProximalPolicy, local_params, make_scorer
    from megatron_opd.learner.train_step import (forward_backward, optimizer_step,
                                                 split_microbatches, wrap_for_training)
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    spec = MoEModelSpec(**json.loads(args.spec))
    groups = init_distributed(layout, seed=0)
    config = transformer_config(spec, layout=layout)
    chunks = build_model_chunks(spec, config)
    load_hf_checkpoint(chunks, args.hf, spec, groups)
    ddp, optimizer, scheduler = wrap_for_training(
        chunks, TrainConfig(steps=STEPS, lr=2e-2, warmup_steps=0, grad_clip=0.0), groups)
    objective = ObjectiveConfig()
    loss_fn = objective_loss_fn(objective, groups.tp)
    fields = objective_fields(objective) + ("token_versions",)
    score = make_scorer(objective, groups)
    mbs = layout.micro_batch_size

    def micro_of(batch):
        return split_microbatches(batch, fields, groups, mbs)

    replica = build_model_chunks(spec, config)
    load_hf_checkpoint(replica, args.hf, spec, groups)  # any weights: on_publish overwrites
    policies = {
        "snapshot": ProximalPolicy("snapshot", chunks, ddp, max_staleness=STALENESS, publish_lag=0),
        "replica": ProximalPolicy("replica", chunks, ddp, max_staleness=STALENESS, publish_lag=1,
                                  replica_chunks=replica),
        "ewma": ProximalPolicy("ewma", chunks, ddp, max_staleness=STALENESS, publish_lag=0,
                               ewma_beta_=BETA, ewma_tau=0.9),
    }
    # interrupt sync: before each optimizer step the probe's tokens of the fleet's version (the
    # live one: publish_lag 0) are scored by the collective scoring pass and stored per row
    from megatron_opd.learner.interrupt import InterruptStore, score_batch

    policies["interrupt"] = ProximalPolicy("interrupt", chunks, ddp, max_staleness=STEPS,
                                           publish_lag=0)
    store = InterruptStore()
    for p in policies.values():
        p.start(0)
        p.on_publish(p.published_version(1 if p.kind == "replica" else 0))

    # the probe: token versions spread over [0, STEPS] (STEPS + 1 distinct values)
    probe, _ = collate(make_samples(4 * mbs * groups.dp_size, spec.vocab_size, 7,
                                    list(range(STEPS + 1))), 0, step=STEPS, max_staleness=None)
    probe_micro = micro_of(probe)

    def probe_logprobs() -> dict[int, torch.Tensor]:
        return score(ddp, probe_micro)

    ref = {0: probe_logprobs()}
    params = {0: [p.detach().double().clone() for p in local_params(chunks)]}
    for step in range(STEPS):
        batch, _ = collate(make_samples(2 * mbs * groups.dp_size, spec.vocab_size, 100 + step,
                                        [step]), 0, step=step, max_staleness=STALENESS)
        loss, _, _ = forward_backward(ddp, micro_of(batch), loss_fn, groups)
        it = policies["interrupt"]
        with it.holding(it.fleet_version):
            rows = score_batch(probe, objective_fields(objective), groups, mbs, score, ddp)
        for b in range(rows.shape[0]):
            store.put(f"row{b}", rows[b].numpy(), probe.token_versions[b].numpy(), it.fleet_version)
        stepped, _ = optimizer_step(optimizer, scheduler, loss)
        assert stepped
        v = step + 1
        for name, p in policies.items():
            active = 0.0 if (name == "ewma" and v == RESET_AT) else 1.0
            p.after_step(v, active)
            p.on_publish(p.published_version(1 if name == "replica" else 0))
        ref[v] = probe_logprobs()
        params[v] = [p.detach().double().clone() for p in local_params(chunks)]

    result = {"ref": ref, "params": params,
              "token_versions": {i: mb.data["token_versions"] for i, mb in enumerate(probe_micro)},
              "behaviour": {i: mb.data["behaviour_logprobs"] for i, mb in enumerate(probe_micro)},
              "replica_version": policies["replica"].replica_version}
    probe.interrupt_logprobs = store.take(
        [Sample(sample_id=f"row{b}", group_id="", prompt_ids=np.zeros(1, np.int32),
                response_ids=np.zeros(probe.response_ids.shape[1], np.int32),
                loss_mask=np.zeros(0, np.uint8), behaviour_logprobs=np.zeros(0, np.float32),
                token_versions=np.zeros(0, np.int64), teacher_logprobs=np.zeros(0, np.float32),
                teacher_topk_ids=np.zeros((0, 0), np.int32),
                teacher_topk_logprobs=np.zeros((0, 0), np.float32))
         for b in range(probe.response_ids.shape[0])], probe.response_ids.shape[1])
    for name, p in policies.items():
        micro = split_microbatches(probe, fields + (("interrupt_logprobs",) if name == "interrupt"
                                                    else ()), groups, mbs)
        metrics = p.fill_old_logprobs(micro, probe.token_versions, probe.loss_mask, score,
                                      version=STEPS, batch_stored=probe.interrupt_logprobs
                                      if name == "interrupt" else None)
        result[name] = {i: mb.data["old_logprobs"] for i, mb in enumerate(micro)}
        result[f"{name}_metrics"] = metrics
    ew = policies["ewma"].ewma
    result["ewma_prox"] = [q.double() for q in ew.prox]
    result["ewma_resets"] = ew.resets
    # the live weights after all that swapping are still version STEPS, bit for bit
    result["live_intact"] = all(torch.equal(a.double(), b) for a, b in
                                zip(local_params(chunks), params[STEPS]))

    # over-stale tokens (version -100, far beyond the bound) hold junk: the gradient must not
    # depend on it, whatever the strategy
    grads = {}
    for name, p in {"behaviour": ProximalPolicy("behaviour", chunks, ddp, max_staleness=STALENESS,
                                                publish_lag=0), **policies}.items():
        out = []
        for junk in (3.0, 17.0):
            batch, report = collate(make_samples(2 * mbs * groups.dp_size, spec.vocab_size, 5,
                                                 [STEPS, -1, STEPS - 1], junk=junk),
                                    0, step=STEPS, max_staleness=STALENESS)
            assert report.dropped_tokens > 0
            micro = micro_of(batch)
            p.fill_old_logprobs(micro, batch.token_versions, batch.loss_mask, score, version=STEPS)
            forward_backward(ddp, micro, loss_fn, groups)
            out.append([q.main_grad.detach().double().clone() if getattr(q, "main_grad", None)
                        is not None else q.grad.detach().double().clone()
                        for q in local_params(chunks)])
        grads[name] = out
    result["stale_grads"] = grads
    # control: without the bound the junk is trained, so the comparison above can fail
    control = []
    for junk in (3.0, 17.0):
        batch, _ = collate(make_samples(2 * mbs * groups.dp_size, spec.vocab_size, 5,
                                        [STEPS, -1, STEPS - 1], junk=junk),
                           0, step=STEPS, max_staleness=None)
        forward_backward(ddp, micro_of(batch), loss_fn, groups)
        control.append([q.main_grad.detach().double().clone() for q in local_params(chunks)])
    result["control_grads"] = control
    torch.save(result, f"{args.out}.rank{dist.get_rank()}.pt")
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
