"""Where pi_old comes from (ALGORITHMS.md §6; config `correction.proximal`; docs/off-policy.md).

The policy-gradient ratio is split r = r_d * r_s around pi_old, the train-side policy of the
version that generated each token. This module produces log pi_old(y_t) per response token.

Invariants (everything below keeps them):
1. Version v is the weights after v applied optimizer steps; a token tagged v was sampled by the
   rollout fleet holding exactly those (published) weights.
2. For every trainable token the answer is either exact (the policy of the token's own version,
   scored by the learner's own forward code in the loss's temperature convention) or the
   behaviour log-prob mu ("fallback"); fallbacks are counted, never silent.
3. Nothing here touches the loss mask: a token beyond `async.max_staleness` was masked by
   `collate` and stays masked whatever the strategy.
4. The live parameters are restored bit for bit after every swap (exchange by copy, no
   arithmetic on them).
5. Every object holds this rank's shards only (sharded like the model) and every rank calls the
   same methods in the same order: the scoring passes are collective (TP, EP, PP), so the set of
   versions to score comes from the global batch, never from a rank's share.

Strategies:
- `behaviour`: no pi_old (mu stands in: r_d = 1). No memory, no time.
- `snapshot`: parameters of versions [v - S, v] in CPU memory (S = async.max_staleness); one
  forward pass per distinct version in the batch.
- `replica`: a second model on the learner ranks holding the version the rollout fleet serves
  (refreshed at each publication); exact for the tokens of that version, mu for the rest.
- `interrupt`: before each weight update, the tokens of the version being replaced are scored
  with its weights and kept per sample (`learner/interrupt.py`, filled into the batch as
  `interrupt_logprobs`); tokens of the fleet's current version are scored here, like `replica`
  but with the live weights (or the lag's snapshot). No parameter copies at publish_lag 0.
- `ewma`: PPO-EWMA proximal policy: a bias-corrected EWMA of the parameters after every step
  (fp32, CPU), reset to the live weights when the step's active fraction falls below tau (at
  most once per `ewma_cooldown` + 1 steps).
- `loglinear` / `linear`: no pass at all; the loss interpolates mu and pi_theta by version
  (`interpolation_alpha`; a baseline).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from megatron_opd.learner.train_step import LossFn, MicroBatch


# ----------------------------------------------------------------------------- parameters
def local_params(chunks: list) -> list[torch.Tensor]:
    """This rank's parameter tensors in a fixed order (what the forward pass reads)."""
    return [p for c in chunks for _, p in sorted(c.named_parameters(), key=lambda kv: kv[0])]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class VersionedSnapshots:
    """CPU copies of this rank's parameters keyed by version, the newest `keep` kept."""

    def __init__(self, params: list[torch.Tensor], keep: int):
        self.params, self.keep = params, keep
        self.store: dict[int, list[torch.Tensor]] = {}

    def capture(self, version: int) -> None:
        self.store[version] = [p.detach().to("cpu", copy=True) for p in self.params]
        for v in sorted(self.store)[:-self.keep]:
            del self.store[v]

    def drop_all(self) -> None:
        self.store.clear()

    @contextlib.contextmanager
    def swapped_in(self, version: int) -> Iterator[None]:
        """The live parameters hold `version` inside the block (exchanged tensor by tensor: one
        tensor of scratch, and both sides come back bit-exact)."""
        snap = self.store[version]
        _exchange(self.params, snap)
        try:
            yield
        finally:
            _exchange(self.params, snap)

    @property
    def bytes(self) -> int:
        return sum(nbytes(s) for s in self.store.values())


@torch.no_grad()
def _exchange(live: list[torch.Tensor], other: list[torch.Tensor]) -> None:
    for p, s in zip(live, other):
        tmp = p.detach().to("cpu", copy=True)
        p.copy_(s.to(p.device))
        s.copy_(tmp)


class EwmaParams:
    """theta_prox = bias-corrected EWMA of the parameters (ALGORITHMS.md §6.4):
    W <- beta * W + 1;  theta_prox <- theta_prox * (beta * W_old / W) + theta / W.
    Kept in float32 on the CPU; `reset` restarts it at the live weights (W = 1)."""

    def __init__(self, params: list[torch.Tensor], beta: float):
        self.params, self.beta = params, beta
        self.prox = [p.detach().to("cpu", dtype=torch.float32, copy=True) for p in params]
        self.weight = 1.0
        self.resets = 0

    @torch.no_grad()
    def update(self) -> None:
        w_old = self.weight
        self.weight = self.beta * w_old + 1.0
        keep = self.beta * w_old / self.weight
        for q, p in zip(self.prox, self.params):
            q.mul_(keep).add_(p.detach().to("cpu", dtype=torch.float32), alpha=1.0 / self.weight)

    @torch.no_grad()
    def reset(self) -> None:
        for q, p in zip(self.prox, self.params):
            q.copy_(p.detach().to("cpu", dtype=torch.float32))
        self.weight = 1.0
        self.resets += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        saved = [p.detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for p, q in zip(self.params, self.prox):
                p.copy_(q.to(device=p.device, dtype=p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s.to(p.device))

    @property
    def bytes(self) -> int:
        return nbytes(self.prox)


def ewma_beta(beta: float, max_staleness: int) -> float:
    """`correction.ewma_beta`, or W / (W + 2) with W the staleness window when it is 0."""
    return beta if beta > 0 else max_staleness / (max_staleness + 2)


def interpolation_alpha(token_versions: torch.Tensor, version: int) -> torch.Tensor:
    """AReaL-style proximal version by interpolation (a baseline, §6.5): pi_prox stands for the
    policy one step back, v_prox = max(v - 1, v_t), placed between mu (version v_t) and pi_theta
    (version v) at alpha = (v_prox - v_t) / (v - v_t) (0 when v_t = v: pi_prox = mu)."""
    lag = (version - token_versions).clamp_min(0).double()
    return torch.where(lag > 1, (lag - 1) / lag.clamp_min(1), torch.zeros_like(lag))


def interpolated_logprobs(kind: str, behaviour: torch.Tensor, current: torch.Tensor,
                          alpha: torch.Tensor) -> torch.Tensor:
    """log pi_prox from mu and sg(pi_theta): "loglinear" interpolates log-probs,
    "linear" probabilities."""
    a = alpha.to(current.dtype)
    b, c = behaviour.to(current.dtype), current.detach()
    if kind == "loglinear":
        return b + a * (c - b)
    if kind == "linear":
        return torch.logaddexp(torch.log1p(-a) + b, torch.log(a) + c)
    raise ValueError(f"correction.proximal: {kind!r} is not an interpolation")


# ----------------------------------------------------------------------------- scoring
Scorer = Callable[[list, list[MicroBatch]], dict[int, torch.Tensor]]


class ProximalPolicy:
    """One strategy's state and its per-step work. `score(models, micro)` runs a forward-only
    pass of `models` (DDP-wrapped or plain chunks) over the micro-batches and returns
    {micro index: log-probs [b, T]} (empty on ranks that do not compute the loss)."""

    def __init__(self, kind: str, chunks: list, ddp: list, *, max_staleness: int,
                 publish_lag: int, ewma_beta_: float = 0.0, ewma_tau: float = 0.9,
                 ewma_cooldown: int = 0,
                 replica_chunks: list | None = None):
        self.kind, self.ddp, self.tau = kind, ddp, ewma_tau
        # steps after a reset during which no other reset happens (0: none)
        self.cooldown, self.since_reset = ewma_cooldown, 0
        self.params = local_params(chunks)
        self.version = 0  # the live weights' version
        keep = (max_staleness + 1) if kind == "snapshot" else (publish_lag + 1 if publish_lag else 0)
        self.snapshots = VersionedSnapshots(self.params, keep) if keep else None
        self.ewma = EwmaParams(self.params, ewma_beta(ewma_beta_, max_staleness)) \
            if kind == "ewma" else None
        self.replica, self.replica_version = replica_chunks, None
        self.fleet_version = 0
        self.replica_params = local_params(replica_chunks) if replica_chunks else None
        self.stats = {"time_s": 0.0}  # this strategy's own seconds, summed (bench/offpolicy.py)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, version: int) -> None:
        """The live weights are `version` (a fresh run: 0; resumed: the checkpoint's). Older
        versions are not in the checkpoint: their tokens fall back to mu (counted)."""
        self.version = version
        if self.snapshots is not None:
            self.snapshots.drop_all()
            self.snapshots.capture(version)
        if self.ewma is not None:
            self.ewma.reset()
            self.ewma.resets, self.since_reset = 0, 0

    def after_step(self, version: int, active_fraction: float | None) -> None:
        t0 = time.perf_counter()
        self.version = version
        if self.snapshots is not None:
            self.snapshots.capture(version)
        if self.ewma is not None:
            self.since_reset += 1
            if active_fraction is not None and active_fraction < self.tau \
                    and self.since_reset > self.cooldown:
                self.ewma.reset()
                self.since_reset = 0
            else:
                self.ewma.update()
        self.stats["time_s"] += time.perf_counter() - t0

    def published_version(self, lag: int) -> int:
        """The version the fleet gets after this step: the newest held within the lag."""
        if not lag or self.snapshots is None:
            return self.version
        target = max(self.version - lag, 0)
        # after a resume the older versions are gone: the oldest one held goes out instead
        return target if target in self.snapshots.store else min(self.snapshots.store)

    @contextlib.contextmanager
    def holding(self, version: int) -> Iterator[None]:
        """The live parameters hold `version` inside the block (for publishing lagged weights)."""
        if version == self.version:
            yield
        else:
            with self.snapshots.swapped_in(version):
                yield

    def on_publish(self, version: int) -> None:
        """The rollout fleet now serves `version`: the replica follows it."""
        self.fleet_version = version
        if self.replica is None:
            return
        with torch.no_grad(), self.holding(version):
            for r, p in zip(self.replica_params, self.params):
                r.copy_(p.detach())
        self.replica_version = version

    # -- per step -------------------------------------------------------------------------
    def fill_old_logprobs(self, micro: list[MicroBatch], batch_versions: torch.Tensor,
                          batch_mask: torch.Tensor, score: Scorer, *, version: int,
                          batch_stored: torch.Tensor | None = None) -> dict[str, float]:
        """Sets `mb.data["old_logprobs"]` [b, T] on every micro-batch this rank scores (from
        `mb.data["token_versions"]` and `behaviour_logprobs`); `batch_versions` / `batch_mask`
        are the *global* batch's, identical on every rank, and so is `batch_stored` (interrupt:
        the batch's `interrupt_logprobs`, also in each `mb.data`). The interpolations set
        `mb.data["proximal_alpha"]` instead (the loss mixes mu and pi_theta with it). Returns
        this step's metrics."""
        if self.kind in ("loglinear", "linear"):
            for mb in micro:
                mb.data["proximal_alpha"] = interpolation_alpha(mb.data["token_versions"], version)
        if self.kind in ("behaviour", "loglinear", "linear"):
            return self._metrics(0.0, 0, 0)
        t0 = time.perf_counter()
        trainable = batch_mask > 0
        wanted = sorted({int(v) for v in batch_versions[trainable].unique().tolist()})
        if self.kind == "ewma":
            with self.ewma.swapped_in():
                passes = {None: score(self.ddp, micro)}
        elif self.kind == "replica":
            passes = {self.replica_version: score(self.replica, micro)} \
                if self.replica_version in wanted else {}
        elif self.kind == "interrupt":  # the fleet's version: its interrupt is still to come
            v = self.fleet_version
            held = v == self.version or (self.snapshots is not None and v in self.snapshots.store)
            passes = {}
            if v in wanted and held:
                with self.holding(v):
                    passes[v] = score(self.ddp, micro)
        else:  # snapshot: one pass per held version the batch needs
            passes = {}
            for v in wanted:
                if v in self.snapshots.store:
                    with self.holding(v):
                        passes[v] = score(self.ddp, micro)
        for i, mb in enumerate(micro):  # forward_backward numbers micro-batches by position
            d = mb.data
            old = d["behaviour_logprobs"].to(torch.float32).clone()
            if "interrupt_logprobs" in d:
                stored = d["interrupt_logprobs"].to(torch.float32)
                old = torch.where(stored.isnan(), old, stored)
            for v, rows in passes.items():
                if i in rows:
                    take = torch.ones_like(old, dtype=torch.bool) if v is None \
                        else d["token_versions"] == v
                    old = torch.where(take, rows[i].to(old.dtype), old)
            d["old_logprobs"] = old
        covered = torch.zeros_like(trainable)
        if batch_stored is not None:
            covered |= trainable & ~batch_stored.isnan()
        for v in passes:
            covered |= trainable if v is None else trainable & (batch_versions == v)
        tokens = int(trainable.sum())
        elapsed = time.perf_counter() - t0
        self.stats["time_s"] += elapsed
        return self._metrics(elapsed, tokens - int(covered.sum()), tokens)

    def _metrics(self, elapsed: float, fallback: int, tokens: int) -> dict[str, float]:
        return {"offpolicy/extra_bytes": float(self.extra_bytes),
                "offpolicy/proximal_fallback_fraction": fallback / tokens if tokens else 0.0,
                "offpolicy/ewma_resets": float(self.ewma.resets if self.ewma else 0),
                "time/proximal_s": elapsed}

    @property
    def extra_bytes(self) -> int:
        """Memory this strategy holds beyond the live model (this rank)."""
        n = 0
        if self.snapshots is not None:
            n += self.snapshots.bytes
        if self.ewma is not None:
            n += self.ewma.bytes
        if self.replica_params is not None:
            n += nbytes(self.replica_params)
        return n


def token_logprobs_fn(temperature_of: Callable[[MicroBatch], torch.Tensor | None], tp_group,
                      rows_out: dict[int, torch.Tensor]) -> LossFn:
    """Forward-only loss that records log pi(y_t) [b, T] per micro-batch (vocab-parallel, in
    the loss's temperature convention: `temperature_of(mb)` is what the training loss uses)."""
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        stats = vocab_parallel_token_stats(logits, d["response_ids"], group=tp_group,
                                           temperature=temperature_of(mb),
                                           positions=d["response_index"])
        rows_out[mb.index] = stats.logprobs.detach().to(torch.float32)
        zero = stats.logprobs.new_zeros(()).detach()
        return zero, torch.zeros((), dtype=torch.int), {}
    return loss_fn


def make_scorer(objective, groups, replay_for: Callable[[list], object] | None = None) -> Scorer:
    """The collective forward-only pass `ProximalPolicy` scores with: log pi(y_t) of each
    micro-batch under `models`, with MoE routing replay when `replay_for(models)` gives one."""
    from megatron_opd.learner.losses import per_token_temperature, ratio_temperatures
    from megatron_opd.learner.train_step import forward_backward

    def temperature_of(mb: MicroBatch) -> torch.Tensor | None:  # what the training loss uses
        return per_token_temperature(ratio_temperatures(objective, mb.data),
                                     mb.data["response_index"])

    def score(models: list, micro: list[MicroBatch]) -> dict[int, torch.Tensor]:
        rows: dict[int, torch.Tensor] = {}
        replay = replay_for(models) if replay_for else None
        hook = (lambda mb, _: replay.force(mb.data["routed_experts"])) if replay else None
        fn = token_logprobs_fn(temperature_of, groups.tp, rows)
        with torch.no_grad():
            forward_backward(models, micro, fn, groups, forward_only=True, pre_forward=hook)
        if replay:
            replay.off()
        return rows
    return score
