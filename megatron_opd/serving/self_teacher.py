"""The student as its own teacher (`teacher.source: self`, ALGORITHMS.md §10 OPSD).

The teacher fleet (teacher.num_servers servers) starts from the student init, at weight version
0, and the learner loads its published weights into it every `teacher.self_refresh` versions
(`TeacherRefresher`, by disk: a refresh is rare and must not hold up the rollout fleet's update
group). self_refresh 1 makes the teacher the newest published policy; N > 1 a lagged copy that
changes only every N versions (a slow "target" teacher: its scores of similar responses do not
move with every step, and a response is not scored by the very weights that will train on it).

Every sample carries the revision of the weights that scored it, `self@v<version>`: the
orchestrator reads the weight version of every teacher server before and after a scoring request
(`SelfTeacher`) and scores again when a refresh ran in between, so the tag is the version the
scores come from, never a guess. The learner treats `self@v<last refreshed version>` as the
current revision (older ones get `revision_changed`, the supervision drift of ALGORITHMS.md §7).

No torch at import: the orchestrator imports this.
"""

from __future__ import annotations

import re
import time

from megatron_opd.serving.teachers import RoutedScores, TeacherRouter

PREFIX = "self@v"
TEACHER_WEIGHTS_DIR = "teacher_weights"  # under the run directory: the refreshes' HF dirs
CONSISTENT_TIMEOUT_S = 120.0  # how long a refresh may keep the teacher servers on two versions


def self_revision(version: int) -> str:
    return f"{PREFIX}{int(version)}"


def revision_version(revision: str) -> int | None:
    """The weight version a `self@v<version>` revision names (None: not a self revision)."""
    m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", revision)
    return int(m.group(1)) if m else None


class SelfTeacher:
    """A TeacherRouter over the self teacher's fleet whose scores carry the revision of the
    weights that produced them. `servers`: a client per teacher server (their weight_version)."""

    def __init__(self, router: TeacherRouter, servers: list, timeout_s: float = CONSISTENT_TIMEOUT_S):
        if not servers:
            raise ValueError("SelfTeacher: no teacher server to read the weight version of")
        self.router, self.servers, self.timeout_s = router, list(servers), timeout_s

    def version(self) -> int | None:
        """The weight version every teacher server holds (None while they differ: a refresh is
        loading them one by one)."""
        seen = {s.weight_version() for s in self.servers}
        if len(seen) != 1:
            return None
        (v,) = seen
        try:
            return int(v)
        except ValueError:
            raise RuntimeError(f"teacher.source=self: a teacher server holds weight version "
                               f"{v!r}, not a number (was it started with --weight-version 0?)"
                               ) from None

    def _steady_version(self) -> int:
        deadline = time.monotonic() + self.timeout_s
        while (v := self.version()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"teacher.source=self: the teacher servers held different "
                                   f"weight versions for {self.timeout_s:.0f} s")
            time.sleep(0.05)
        return v

    def score(self, input_ids, *, start, keys=None, top_k=None, temperature=None) -> RoutedScores:
        """TeacherRouter.score with revisions `self@v<version>`: scored again while a refresh
        changed the servers' version during the request."""
        while True:
            before = self._steady_version()
            out = self.router.score(input_ids, start=start, keys=keys, top_k=top_k,
                                    temperature=temperature)
            if self.version() == before:
                return RoutedScores(out.results, out.teachers,
                                    [self_revision(before)] * len(out.results))

    def __getattr__(self, name):  # verify_temperature, for_prompts, fleets ...: the router's
        return getattr(self.router, name)


def wrap_self_teacher(cfg, router: TeacherRouter, teacher_urls: list[str]):
    """The orchestrator's teacher: `router` itself, or with teacher.source=self a SelfTeacher
    that reads the version of every teacher server."""
    if cfg.teacher.source != "self":
        return router
    from megatron_opd.serving.sglang_client import fleet_client

    return SelfTeacher(router, [fleet_client([u], cfg.server) for u in teacher_urls])


class TeacherRefresher:
    """Learner side: which version the self teacher holds, and loading a newer one into it.

    Every learner rank keeps one (the gather that streams the weights is collective, so every
    rank must agree on when a refresh is due); only global rank 0 has the `publisher`."""

    def __init__(self, every: int, publisher=None, version: int = 0):
        if every < 1:
            raise ValueError(f"teacher.self_refresh: must be >= 1, got {every}")
        self.every, self.publisher, self.version = every, publisher, version

    def due(self, version: int) -> bool:
        """A published `version` reaches the teacher when it is `every` versions past the
        teacher's (a resumed run's servers restart at 0: its first publish refreshes them)."""
        return version - self.version >= self.every

    def refresh(self, make_weights, version: int, attempts: int = 1) -> float:
        """Every rank: stream the weights (`make_weights()`), rank 0 loads them into the teacher
        servers as `version`. Returns the seconds it took."""
        from megatron_opd.weight_sync import publish_with_retries

        t = publish_with_retries(make_weights, self.publisher, version, attempts=attempts)
        self.version = version
        return t

    @property
    def revisions(self) -> frozenset[str]:
        """The revision the teacher scores under now (learner.batch.collate's current set)."""
        return frozenset({self_revision(self.version)})


def make_refresher(cfg, wiring, rank0: bool) -> TeacherRefresher | None:
    """teacher.source=self: the refresher of this learner rank (None otherwise). Rank 0's loads
    weights by disk (run_dir/teacher_weights, the newest kept), pausing nothing: a scoring
    request finishes before a load starts (SGLang waits for running requests)."""
    if cfg.teacher.source != "self":
        return None
    publisher = None
    if rank0:
        from pathlib import Path

        from megatron_opd.serving.sglang_client import fleet_client
        from megatron_opd.weight_sync import DiskWeightPublisher

        publisher = DiskWeightPublisher(
            [fleet_client([u], cfg.server) for u in wiring.teacher_urls],
            directory=Path(wiring.run_dir) / TEACHER_WEIGHTS_DIR,
            base_model_dir=wiring.student_dir, keep=1,
            reconnect_timeout_s=cfg.server.start_timeout_s + cfg.server.request_timeout_s,
            pause_mode=None)
    return TeacherRefresher(cfg.teacher.self_refresh, publisher)
