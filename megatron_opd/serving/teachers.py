"""The teacher fleet: which teacher scores a sequence, at which temperature, under which revision.

A run has one teacher (`init.teacher`, `teacher.revision`, `teacher.num_servers`) or several
named ones (`teacher.teachers`), each with its checkpoint, revision and fleet of servers. With
several, every sequence is routed by a key (`teacher.route_by`): the environment's name, or a
dataset column carried in the prompt's metadata. A teacher serves the keys in its `routes` (its
name when none are listed); a key no teacher serves goes to `teacher.default`, or is an error
naming the key before any request is made.

Scoring is prefill-only (max_new_tokens 0): the log-prob of every response token and the top-K
at every response position, from the teacher's fleet (through its router when it has one). All
teachers score at `teacher.temperature`, the temperature the objective assumes: SGLang scores
prompt tokens from the raw logits, so our servers carry a compat patch that applies the request's
temperature (compat/sglang_cpu.py), and `verify_temperature` measures, per server, the temperature
it actually applied before any sample is labelled with it. docs/teachers.md.

No torch here: the orchestrator and the learner's batch code import it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SINGLE = "teacher"  # the name of the run's teacher when teacher.teachers lists none
TEMPERATURE_RTOL = 1e-3  # measured vs configured temperature (fp32 log-probs of a top-2 gap)


class TeacherRoutingError(ValueError):
    """A sequence's route key names no teacher (and no default is configured)."""


class TeacherTemperatureError(RuntimeError):
    """A teacher server scores at another temperature than `teacher.temperature`."""


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run: its Hugging Face directory ("" = the prepared quickstart teacher),
    the revision id put on the samples it scores, its servers and the route keys it serves."""
    name: str
    init: str
    revision: str
    num_servers: int
    routes: tuple[str, ...]


def teacher_specs(cfg) -> list[TeacherSpec]:
    """The run's teachers, in config order: the one of `init.teacher` / `teacher.*`, or those of
    `teacher.teachers` (a named teacher's `init` "" is the run's teacher, init.teacher)."""
    t = cfg.teacher
    if not t.teachers:
        return [TeacherSpec(SINGLE, cfg.init.teacher, t.revision, t.num_servers, ())]
    return [TeacherSpec(n.name, n.init or cfg.init.teacher, n.revision, n.num_servers,
                        tuple(n.routes) or (n.name,)) for n in t.teachers]


def hidden_dtype(cfg) -> str | None:
    """The dtype teacher scoring asks hidden states in: teacher.hidden_dtype with
    teacher.signal=hidden, else None (not asked)."""
    return cfg.teacher.hidden_dtype if cfg.teacher.signal == "hidden" else None


def current_revisions(cfg) -> frozenset[str]:
    """The revisions that score this run's samples now (a sample under any other one was scored
    by an older teacher: the learner's `revision_changed`)."""
    return frozenset(s.revision for s in teacher_specs(cfg))


def route_key(cfg, env_name: str, metadata: dict) -> str:
    """The key that picks a sequence's teacher: "" with one teacher; the environment's name
    (route_by env); the prompt's `teacher.route_column` value (route_by column: a dataset
    column, which the environment carries in the prompt's metadata)."""
    by = cfg.teacher.route_by
    if by == "none":
        return ""
    if by == "env":
        return env_name
    column = cfg.teacher.route_column
    if column not in metadata:
        if cfg.teacher.default:
            return ""  # no key: the default teacher
        raise TeacherRoutingError(
            f"teacher.route_column: the prompt has no {column!r} column (its metadata has "
            f"{sorted(metadata)}); add it to the data or set teacher.default")
    value = metadata[column]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TeacherRoutingError(f"teacher.route_column: {column!r} must hold a string or an "
                                  f"integer to route by, got {value!r}")
    return str(value)


@dataclass
class RoutedScores:
    """Scores in the order of the sequences given, with the teacher and revision of each."""
    results: list  # ScoreResult per sequence
    teachers: list[str]
    revisions: list[str]


@dataclass
class TeacherFleet:
    """One teacher's servers as a client sees them: `client` takes scoring traffic (the router's
    URL, or every server round-robin); `server_urls` are the servers themselves (checks)."""
    spec: TeacherSpec
    client: object  # SGLangClient (or anything with its score())
    server_urls: tuple[str, ...] = ()


class TeacherRouter:
    """Sends each sequence to its teacher's fleet and puts the answers back in order."""

    def __init__(self, fleets: list[TeacherFleet], *, temperature: float, top_k: int,
                 default: str = "", hidden: str | None = None):
        if not fleets:
            raise ValueError("TeacherRouter: no teacher")
        self.fleets = {f.spec.name: f for f in fleets}
        self.temperature, self.top_k, self.default = float(temperature), int(top_k), default
        # teacher.signal=hidden: the dtype its scoring asks hidden states in (None: not asked)
        self.hidden = hidden
        self._by_key: dict[str, str] = {}
        for f in fleets:
            for key in f.spec.routes:
                if self._by_key.setdefault(key, f.spec.name) != f.spec.name:
                    raise ValueError(f"route key {key!r} served by two teachers")
        if default and default not in self.fleets:
            raise ValueError(f"default teacher {default!r} is not one of {list(self.fleets)}")
        self._single = fleets[0].spec.name if len(fleets) == 1 and not fleets[0].spec.routes \
            else None

    @classmethod
    def from_config(cls, cfg, clients: dict, server_urls: dict[str, list[str]] | None = None
                    ) -> "TeacherRouter":
        """The config's teachers over `clients` ({teacher name: its fleet's scoring client}:
        RunWiring.teacher_clients); `server_urls` ({name: its servers}) for the checks that ask
        every server. Missing or unknown teachers are an error naming them."""
        specs = teacher_specs(cfg)
        if set(clients) != {s.name for s in specs}:
            raise ValueError(f"teacher clients for {sorted(clients)}, the config's teachers are "
                             f"{[s.name for s in specs]}")
        server_urls = server_urls or {}
        fleets = [TeacherFleet(s, clients[s.name], tuple(server_urls.get(s.name, ())))
                  for s in specs]
        return cls(fleets, temperature=cfg.teacher.temperature, top_k=cfg.teacher.top_k,
                   default=cfg.teacher.default, hidden=hidden_dtype(cfg))

    @classmethod
    def single(cls, cfg, client) -> "TeacherRouter":
        """The run's one teacher (teacher.teachers empty) served by `client`."""
        if cfg.teacher.teachers:
            raise ValueError("TeacherRouter.single: teacher.teachers lists several teachers")
        return cls([TeacherFleet(teacher_specs(cfg)[0], client)],
                   temperature=cfg.teacher.temperature, top_k=cfg.teacher.top_k,
                   hidden=hidden_dtype(cfg))

    def teacher_for(self, key: str) -> str:
        if self._single is not None:
            return self._single
        name = self._by_key.get(key) or self.default
        if not name:
            raise TeacherRoutingError(
                f"teacher.teachers: no teacher serves route key {key!r} (served: "
                f"{sorted(self._by_key)}); add it to a teacher's routes or set teacher.default")
        return name

    def score(self, input_ids: list[list[int]], *, start: list[int],
              keys: list[str] | None = None, top_k: int | None = None,
              temperature: float | None = None, hidden: bool = True) -> RoutedScores:
        """Prefill-only scoring of each sequence by its teacher (positions >= start[i]: the
        sampled-token log-prob and the top-K), at the router's temperature and top-K unless
        given (evaluation asks for its own). `keys`: one route key per sequence (None: "" for
        every one: the single teacher, or the default). Every key is resolved before any request
        is sent; the teachers are asked concurrently. `hidden`: with teacher.signal=hidden, also
        the hidden states (False: not, e.g. evaluation)."""
        top_k = self.top_k if top_k is None else int(top_k)
        temperature = self.temperature if temperature is None else float(temperature)
        keys = [""] * len(input_ids) if keys is None else list(keys)
        if len(keys) != len(input_ids) or len(start) != len(input_ids):
            raise ValueError(f"score: {len(input_ids)} sequences, {len(start)} starts, "
                             f"{len(keys)} route keys")
        names = [self.teacher_for(k) for k in keys]
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)

        extra = {"hidden": self.hidden} if hidden and self.hidden else {}

        def ask(name: str) -> list:
            idx = rows[name]
            return self.fleets[name].client.score(
                [input_ids[i] for i in idx], start=[start[i] for i in idx], top_k=top_k,
                temperature=temperature, **extra)

        results: list = [None] * len(input_ids)
        if len(rows) == 1:
            answers = {name: ask(name) for name in rows}
        else:
            with ThreadPoolExecutor(len(rows)) as pool:
                answers = dict(zip(rows, pool.map(ask, rows)))
        for name, idx in rows.items():
            if len(answers[name]) != len(idx):
                raise RuntimeError(f"teacher {name}: {len(answers[name])} scores for "
                                   f"{len(idx)} sequences")
            for i, r in zip(idx, answers[name]):
                results[i] = r
        return RoutedScores(results, names, [self.fleets[n].spec.revision for n in names])

    def for_prompts(self, cfg, env_name: str, prompts) -> "PromptKeyedTeacher":
        """This router as a plain scoring client (`score(...) -> [ScoreResult]`, SGLangClient's
        signature) for sequences that start with one of `prompts` (EnvPrompts): each sequence's
        route key is its prompt's. For callers that score prompt + response and know their
        prompts, not their keys (evaluation)."""
        keys = {tuple(p.token_ids): route_key(cfg, env_name, p.metadata) for p in prompts}
        return PromptKeyedTeacher(self, keys)

    def verify_temperature(self, probe_ids: list[int], client_for=None) -> dict[str, float]:
        """Measure, on every server of every teacher, the temperature its scoring applies, and
        refuse a mismatch with `teacher.temperature` (a server without the compat patch scores at
        1 whatever it is asked). Returns {url: measured}. At temperature 1 nothing is asked.

        How: the top-2 log-prob gap of a position is (z1 - z2) / T, so gap(1) / gap(T) is the
        applied T; the position with the widest gap is used. `client_for(url)` builds a client
        for one server (default: a plain SGLangClient)."""
        if self.temperature == 1.0:
            return {}
        if client_for is None:
            from megatron_opd.serving.sglang_client import SGLangClient

            client_for = SGLangClient
        if len(probe_ids) < 2:
            raise ValueError("verify_temperature: the probe needs at least 2 tokens")
        measured = {}
        for name, fleet in self.fleets.items():
            for url in fleet.server_urls:
                client = client_for(url)
                start = [1]
                at_one = client.score([probe_ids], start=start, top_k=2, temperature=1.0)[0]
                at_t = client.score([probe_ids], start=start, top_k=2,
                                    temperature=self.temperature)[0]
                gap_one = at_one.topk_logprobs[:, 0] - at_one.topk_logprobs[:, 1]
                j = int(gap_one.argmax())
                gap_t = float(at_t.topk_logprobs[j, 0] - at_t.topk_logprobs[j, 1])
                if gap_one[j] <= 0 or gap_t <= 0:
                    raise TeacherTemperatureError(f"teacher {name} at {url}: the probe has no "
                                                  "top-2 gap to measure a temperature from")
                t = float(gap_one[j]) / gap_t
                measured[url] = t
                if abs(t - self.temperature) > TEMPERATURE_RTOL * self.temperature:
                    raise TeacherTemperatureError(
                        f"teacher {name} at {url} scores at temperature {t:.4g}, not "
                        f"teacher.temperature = {self.temperature:g}: the server lacks the "
                        "patch that applies a scoring request's temperature (megatron_opd."
                        "compat.sglang_cpu.patch_input_logprobs_at_request_temperature; "
                        "docs/teachers.md)")
        return measured


class PromptKeyedTeacher:
    """A TeacherRouter seen as one client: a sequence's prompt (its ids before `start`) picks
    its route key; a prompt it was not given has key "" (the single teacher, or the default)."""

    def __init__(self, router: TeacherRouter, keys: dict[tuple[int, ...], str]):
        self.router, self.keys = router, keys

    def score(self, input_ids: list[list[int]], *, start: list[int], top_k: int = 0,
              temperature: float = 1.0) -> list:
        keys = [self.keys.get(tuple(x[:s]), "") for x, s in zip(input_ids, start)]
        return self.router.score(input_ids, start=start, keys=keys, top_k=top_k,
                                 temperature=temperature, hidden=False).results
