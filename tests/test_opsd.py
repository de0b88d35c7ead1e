"""Privileged self-distillation (teacher.source=self, teacher.prompt=privileged; docs/teachers.md).

No server: the config rules name their key, privileged chat rows, the refresh schedule. One
module-scoped SGLang server of the OPSD quickstart's student init serves as student and as its
own teacher: a sample's teacher scores equal a direct call on privileged prompt + response at the
response positions (and differ from the plain prompt's), and a refreshed copy's revision names
the version whose weights scored (equal to transformers with those weights, float64). One short
end-to-end run of configs/opsd-quickstart.yaml must lower the held-out reverse KL to the
privileged teacher (0.210 -> 0.131 measured; accuracy does not rise reliably on this toy).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_opd.config import ConfigError, load_config
from megatron_opd.data.prompts import PromptDataError, PromptRow, privileged_row
from megatron_opd.envs import make_env
from megatron_opd.envs.privileged import teacher_prompt_ids
from megatron_opd.serving.self_teacher import (SelfTeacher, TeacherRefresher, revision_version,
                                               self_revision)
from megatron_opd.serving.teachers import TeacherRouter

ROOT = Path(__file__).resolve().parents[1]
OPSD = str(ROOT / "configs/opsd-quickstart.yaml")
CACHE = f"run.cache_dir={ROOT / '.cache/megatron-opd'}"
TOL = 1e-4  # fp32 server vs float64 transformers


# --- no server ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["teacher.privileged_template=hint: {prompt}"], "teacher.privileged_template"),
    (["teacher.privileged_template={hint} {answer}"], "teacher.privileged_template"),
    (["teacher.privileged_template=<bos> say {hint} ="], "teacher.privileged_template"),
    (["teacher.privileged_template={prompt} {prompt} {prompt} {hint}"],
     "teacher.privileged_template"),  # longer than the student's positions
    (["teacher.self_refresh=0"], "teacher.self_refresh"),
    (["teacher.source=teacher"], "teacher.source"),
    (["teacher.prompt=hinted"], "teacher.prompt"),
    (["teacher.hint_key="], "teacher.hint_key"),
    (["teacher.mode=offline"], "teacher.source"),
    (["teacher.signal=hidden"], "teacher.signal"),
    (["teacher.route_by=env", "teacher.teachers=[{name: a, revision: ra}]"], "teacher.source"),
    (["teacher.source=external", "teacher.mode=offline"], "teacher.prompt"),
    (["env.name=calculator", "teacher.source=external", "init.student=/s", "init.teacher=/t"],
     "teacher.prompt"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(OPSD, overrides)
    assert str(err.value).startswith(f"{key}: "), str(err.value)


def test_privileged_rows_put_the_hint_in_the_last_user_message():
    row = PromptRow("p.jsonl:3", (("system", "be brief"), ("user", "2+2? {hint}")), "4",
                    {"hint": "it is even", "n": 2})
    out = privileged_row(row, "{prompt}\nHint: {hint}", "hint")
    # the prompt's own "{hint}" is text, not a placeholder; the system message is untouched
    assert out.messages == (("system", "be brief"), ("user", "2+2? {hint}\nHint: it is even"))
    assert (out.row_id, out.label, out.metadata) == (row.row_id, row.label, row.metadata)
    assert privileged_row(row, "{hint}", "n").messages[-1] == ("user", "2")  # JSON of a non-str
    with pytest.raises(PromptDataError, match=r"p.jsonl:3: no 'solution' column .*teacher.hint_key"):
        privileged_row(row, "{prompt} {hint}", "solution")


def test_chat_rows_carry_their_hint_into_the_teachers_prompt(tmp_path):
    from tests.hf_fixtures import chatml, make_char_tokenizer

    tok = make_char_tokenizer(tmp_path / "tok")
    rows = [{"messages": [{"role": "user", "content": f"reverse: {w}"}], "label": w[::-1],
             "hint": w[::-1][:2] if i != 3 else "x" * 200} for i, w in enumerate(
                 ["abc", "hello", "tiny", "qwerty", "moe", "kv", "opd", "zmq"])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(ROOT / "configs/hf-example.yaml", [
        f"init.student={tok}", f"init.teacher={tok}", f"data.train={tmp_path / 'train.jsonl'}",
        "data.eval=", "env.num_eval_prompts=2", "data.max_prompt_tokens=64", "data.epochs=1",
        "teacher.prompt=privileged",
        'teacher.privileged_template="{prompt}\\nStarts with: {hint}"'])
    env = make_env(cfg, tok)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok)
    seen = list(env.train_prompts())
    assert len(seen) == 5 and env.stats()["data/dropped_privileged"] == 1  # the 200-char hint
    for p in seen:
        row = next(r for r in rows if chatml(r["messages"]) == hf.decode(p.token_ids))
        text = chatml([{"role": "user",
                        "content": row["messages"][0]["content"] + "\nStarts with: " + row["hint"]}])
        assert teacher_prompt_ids(p) == tuple(hf(text, add_special_tokens=False)["input_ids"])


def test_the_digits_hint_is_the_answer_as_a_copy_prompt():
    cfg = load_config(OPSD, [CACHE])
    env = make_env(cfg)
    for p in [*env.eval_prompts()[:5], *[next(env.train_prompts(start=i)) for i in range(5)]]:
        answer = env.task.answer_for(p.token_ids)[:-1]  # without <eos>
        t = env.task
        assert teacher_prompt_ids(p) == (t.bos, t.ids["copy"], *answer, t.ids["="])
        assert p.token_ids[1] in (t.ids["copy"], t.ids["rev"])  # the student's prompt is plain


def test_evaluation_scores_held_out_responses_after_the_privileged_prompt():
    from megatron_opd.envs.privileged import privileged_scoring

    cfg = load_config(OPSD, [CACHE])
    env = make_env(cfg)
    prompts = env.eval_prompts()[:3]
    calls = []

    class Recorder:  # what the evaluation's scoring client receives
        def score(self, input_ids, *, start, top_k=0, temperature=1.0):
            calls.append((input_ids, start, top_k))
            return ["ok"] * len(input_ids)

    client = privileged_scoring(cfg, Recorder(), prompts)
    response = [5, 6, 2]
    other = [1, 9, 9, 9]  # a prompt it was not given: scored as is
    assert client.score([list(p.token_ids) + response for p in prompts] + [other + response],
                        start=[len(p.token_ids) for p in prompts] + [4], top_k=32) == ["ok"] * 4
    ((seqs, start, top_k),) = calls
    assert seqs == [list(teacher_prompt_ids(p)) + response for p in prompts] + [other + response]
    assert start == [len(teacher_prompt_ids(p)) for p in prompts] + [4] and top_k == 32
    plain = Recorder()
    assert privileged_scoring(load_config(OPSD, [CACHE, "teacher.prompt=plain"]), plain,
                              prompts) is plain


def test_refresh_schedule_and_revisions():
    r = TeacherRefresher(every=4)
    assert r.revisions == {"self@v0"}
    due = []
    for v in range(1, 14):  # one publish per version; the refreshed ones
        if r.due(v):
            r.refresh(lambda: iter(()), v)  # no publisher: a rank other than 0
            due.append(v)
    assert due == [4, 8, 12] and r.revisions == {"self@v12"}
    resumed = TeacherRefresher(every=4)  # servers restarted at 0, the learner at version 7
    assert resumed.due(7)
    assert revision_version(self_revision(12)) == 12
    assert revision_version("teacher-v0") is None and revision_version("self@v1x") is None


# --- one real SGLang server: the student init, as student and as its own teacher ----------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from megatron_opd.envs import prepare_models
    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    cfg = load_config(OPSD, [CACHE, "teacher.top_k=4", "rollout.group_size=2"])
    models = prepare_models(cfg, progress=False)
    root = tmp_path_factory.mktemp("opsd")
    srv = SGLangServer("opsd", str(models.student_dir), free_port(), str(root / "server.log"),
                       extra_args=("--weight-version", "0"), max_total_tokens=2048, threads=1)
    try:
        srv.start()
        srv.wait_ready(300)
        yield cfg, models, srv.url, root
    finally:
        srv.stop()


def _teacher(cfg, url):
    from megatron_opd.serving.sglang_client import SGLangClient

    return SelfTeacher(TeacherRouter.single(cfg, SGLangClient(url)), [SGLangClient(url)])


def _reference(model_dir_or_model, seq):
    """transformers' log-probs of every next token, float64."""
    from transformers import Qwen3MoeForCausalLM

    m = model_dir_or_model if isinstance(model_dir_or_model, torch.nn.Module) else \
        Qwen3MoeForCausalLM.from_pretrained(model_dir_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([seq])).logits[0].double(), -1)


@slow
def test_teacher_scores_the_same_response_after_the_privileged_prompt(served):
    from megatron_opd.orchestrator import rollout_and_score
    from megatron_opd.serving.sglang_client import SGLangClient

    cfg, models, url, _ = served
    env = make_env(cfg)
    import itertools

    # rev prompts (a copy prompt's privileged prompt is itself)
    examples = list(itertools.islice((p for p in env.train_prompts()
                                      if p.metadata["op"] == "rev"), 3))
    client = SGLangClient(url)
    groups = rollout_and_score(cfg, env, client, _teacher(cfg, url), examples, ["a", "b", "c"])
    samples = [s for g in groups for s in g]
    assert len(samples) == 6
    for s, ex in zip(samples, [e for e in examples for _ in range(2)]):
        response = s.response_ids.tolist()
        n = len(response)
        assert s.prompt_ids.tolist() == list(ex.token_ids)  # the student's prompt is trained on
        assert s.teacher_revision == "self@v0"
        assert s.loss_mask.shape == s.teacher_logprobs.shape == s.behaviour_logprobs.shape == (n,)
        hinted = list(teacher_prompt_ids(ex))
        assert hinted != list(ex.token_ids)
        (direct,) = client.score([hinted + response], start=[len(hinted)], top_k=4)
        # the same numbers as a direct call at the response positions (up to the fp32 rounding
        # of a batched prefill: 5e-7 seen)
        np.testing.assert_allclose(s.teacher_logprobs, direct.logprobs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(s.teacher_topk_ids, direct.topk_ids)
        np.testing.assert_allclose(s.teacher_topk_logprobs, direct.topk_logprobs, rtol=0,
                                   atol=1e-5)
        ref = _reference(models.student_dir, hinted + response)
        want = [ref[len(hinted) + t - 1, tok].item() for t, tok in enumerate(response)]
        assert np.abs(s.teacher_logprobs - want).max() < TOL
        # ... and not the plain prompt's: the privileged context changes the teacher
        (plain,) = client.score([list(ex.token_ids) + response], start=[len(ex.token_ids)])
        assert np.abs(plain.logprobs - s.teacher_logprobs).max() > 1e-3


@slow
def test_a_refreshed_copy_scores_under_the_revision_of_its_weights(served):
    from safetensors.torch import load_file

    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.weight_sync import DiskWeightPublisher

    cfg, models, url, root = served
    teacher = _teacher(cfg, url)
    seq = [1, 4, 9, 12, 7, 3, 20, 9, 12, 7, 2]
    start = 4
    init = load_file(str(models.student_dir / "model.safetensors"))
    # "version 4" of the learner: the init perturbed (what the learner publishes: HF tensors)
    g = torch.Generator().manual_seed(4)
    v4 = {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in init.items()}
    refresher = TeacherRefresher(every=4, publisher=DiskWeightPublisher(
        [SGLangClient(url)], root / "teacher_weights", models.student_dir, keep=1,
        pause_mode=None))
    scores = []
    try:
        for version, weights in ((0, None), (4, v4)):
            if weights is not None:
                assert refresher.due(version)
                refresher.refresh(lambda: iter(weights.items()), version)
            out = teacher.score([seq], start=[start])
            assert out.revisions == [f"self@v{version}"] == sorted(refresher.revisions)
            # the weights the revision names, as transformers loads them from the published dir
            loaded = root / "teacher_weights" / f"v{version:06d}" if version else \
                models.student_dir
            ref = _reference(str(loaded), seq)
            want = [ref[j - 1, seq[j]].item() for j in range(start, len(seq))]
            assert np.abs(out.results[0].logprobs - want).max() < TOL, version
            scores.append(out.results[0].logprobs)
        assert np.abs(scores[0] - scores[1]).max() > 1e-2  # the refresh changed the teacher
    finally:  # the module's other tests see the init again
        refresher.refresh(lambda: iter(init.items()), 0)


# --- end to end ---------------------------------------------------------------------------------

E2E_STEPS = 80


def _accuracy_by_op(path: Path) -> dict[str, float]:
    """Greedy held-out accuracy per op from an evaluation's samples file."""
    by: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r["source"], []).append(r["greedy"]["reward"])
    return {op: float(np.mean(v)) for op, v in by.items()}


@slow
def test_opsd_quickstart_closes_the_held_out_gap_to_the_privileged_teacher(tmp_path):
    """The student learns what its own privileged init says: the held-out reverse KL from the
    student (plain prompt) to the self teacher (privileged prompt, frozen) falls."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_opd.cli", "train", "--config", OPSD,
           f"run.dir={run_dir}", CACHE, "logging.progress=false", f"train.steps={E2E_STEPS}",
           f"eval.interval={E2E_STEPS}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["eval/version"]: r for r in records if "eval/version" in r}
    kl0, kl1 = evals[0]["eval/reverse_kl"], evals[E2E_STEPS]["eval/reverse_kl"]
    before = _accuracy_by_op(run_dir / "samples" / "eval-0.jsonl")
    after = _accuracy_by_op(run_dir / f"samples/eval-{E2E_STEPS}.jsonl")
    assert kl1 < 0.85 * kl0, (kl0, kl1, before, after)  # 0.62x at 80 steps measured (0.80x at 40, 0.81x at 50)
    # the teacher was never refreshed (self_refresh > steps): no teacher weights were written
    assert not list((run_dir / "teacher_weights").glob("v*"))
