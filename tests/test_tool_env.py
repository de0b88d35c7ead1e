"""The sandboxed tool (time and memory limits, errors as results) and the calculator environment
on a real tokenizer with tool-call tokens (no servers): episodes stepped by hand, malformed calls
as error observations, deterministic streams, held-out prompts, config errors naming the key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from megatron_opd.config import ConfigError, load_config
from megatron_opd.envs import make_env
from megatron_opd.envs.tools import calculator, run_sandboxed

ROOT = Path(__file__).resolve().parents[1]
CALL_START, CALL_END = "<tool_call>", "</tool_call>"


def make_tool_tokenizer(out_dir) -> Path:
    """The character tokenizer of tests/hf_fixtures.py (ChatML, <|im_end|> eos) plus Qwen's two
    tool-call tokens as special tokens (one id each, as in real Qwen tokenizers)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from tests.hf_fixtures import make_char_tokenizer

    d = make_char_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (CALL_START, CALL_END)],
                   special_tokens=True)
    tok.save_pretrained(str(d))
    return d


def tool_config(tok_dir, *overrides):
    return load_config(ROOT / "configs/hf-example.yaml", [
        "env.name=calculator", f"init.student={tok_dir}", f"init.teacher={tok_dir}",
        "data.train=", "data.eval=", "env.num_eval_prompts=8", "rollout.max_new_tokens=16",
        "env.max_response_tokens=200", "env.max_turns=3", *overrides])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tool_tokenizer(tmp_path_factory.mktemp("tooltok"))


@pytest.fixture(scope="module")
def env(tok_dir):
    return make_env(tool_config(tok_dir), tok_dir)


# ----------------------------------------------------------------------------- the sandbox
def test_sandbox_kills_a_program_past_its_time_limit():
    t0 = time.monotonic()
    res = run_sandboxed("while True:\n    pass\n", "", timeout_s=0.5, memory_mb=128)
    assert not res.ok and res.error == "timeout" and "time limit" in res.output
    assert time.monotonic() - t0 < 5  # killed, not waited for


def test_sandbox_memory_limit_is_an_error_result():
    res = run_sandboxed("b = bytearray(1 << 30)\nprint(len(b))\n", "", timeout_s=5, memory_mb=128)
    assert not res.ok and res.error == "memory" and "128 MiB" in res.output
    ok = run_sandboxed("b = bytearray(1 << 20)\nprint(len(b))\n", "", timeout_s=5, memory_mb=128)
    assert ok.ok and ok.output == str(1 << 20)  # below the limit it runs


def test_sandbox_cannot_write_files_and_reads_only_stdin(tmp_path):
    target = tmp_path / "out.txt"
    res = run_sandboxed(f"import sys\nf = open({str(target)!r}, 'w')\nf.write('x' * 100)\n"
                        "f.flush()\n", "", timeout_s=5, memory_mb=128)
    assert not res.ok  # RLIMIT_FSIZE 0: the write fails
    assert not target.exists() or target.stat().st_size == 0
    echo = run_sandboxed("import sys\nprint(sys.stdin.read()[::-1])\n", "abc", timeout_s=5,
                         memory_mb=128)
    assert echo.ok and echo.output == "cba"


@pytest.mark.parametrize("expr, ok, out", [
    ("3*(4+5)", True, "27"),
    ("2**10 - 24 // 5", True, str(2**10 - 24 // 5)),
    (" -7 % 3 ", True, str(-7 % 3)),
    ("1/0", False, "error: ZeroDivisionError: division by zero"),
    ("x+1", False, "error: ValueError: only numbers, + - * / // % ** and parentheses"),
    ("__import__('os').system('true')", False,
     "error: ValueError: only numbers, + - * / // % ** and parentheses"),
    ("((1+", False, "error: not an expression: '((1+'"),
])
def test_calculator_evaluates_arithmetic_and_reports_errors(expr, ok, out):
    res = calculator(expr, timeout_s=5, memory_mb=128)
    assert (res.ok, res.output) == (ok, out)


def test_calculator_huge_power_runs_into_the_time_limit():
    res = calculator("9**9**9", timeout_s=0.5, memory_mb=128)
    assert not res.ok and res.error in ("timeout", "memory")


# ----------------------------------------------------------------------------- the environment
def ids(env, text):
    return list(env.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tool_tokens_are_single_ids_and_turn_ends(env):
    assert env.multi_turn and env.turn_end_ids == (env.call_end_id,)
    assert ids(env, CALL_START) == [env.call_start_id] and ids(env, CALL_END) == [env.call_end_id]
    assert env.max_turns == 3 and env.max_response_tokens == 200
    assert env.special.eos == env.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_tool_call_runs_the_calculator_and_the_answer_is_verified(env):
    prompt = next(env.train_prompts())
    expr, label = prompt.metadata["expression"], prompt.label
    assert label == str(eval(expr))  # the task's own answer, from Python
    assert f"Compute {expr}." in env.decode(prompt.token_ids)
    ep = env.reset(prompt)
    step = ep.step(ids(env, f"let me see {CALL_START}{expr}{CALL_END}"), "stop")
    assert not step.done
    assert step.observation == env.observation(label)
    assert env.decode(env.encode_observation(step.observation)) == step.observation
    assert step.info == {"tool_calls": 1, "tool_errors": 0}
    final = ep.step(ids(env, f" {label} <|im_end|>"), "stop")
    assert final.done and final.reward == 1.0
    wrong = env.reset(prompt).step(ids(env, f"{int(label) + 1}<|im_end|>"), "stop")
    assert wrong.done and wrong.reward == 0.0


@pytest.mark.parametrize("turn, why", [
    (f"1+2{CALL_END}", "malformed tool call (a call starts with <tool_call>)"),
    (f"{CALL_START}  {CALL_END}", "malformed tool call (no expression)"),
    (f"{CALL_START}import os{CALL_END}", "not an expression"),
    (f"{CALL_START}a*b{CALL_END}", "only numbers"),
    ("garbage without an end", "the turn ended without a tool call or an answer"),
])
def test_malformed_turns_become_error_observations(env, turn, why):
    ep = env.reset(next(env.train_prompts()))
    step = ep.step(ids(env, turn), "length" if "garbage" in turn else "stop")
    assert not step.done and step.observation.startswith(env.observation("error:")[:40])
    assert why in step.observation and step.info["tool_errors"] == 1


def test_streams_are_deterministic_held_out_and_resumable(tok_dir, env):
    train = [p for _, p in zip(range(200), env.train_prompts())]
    assert [p.position for p in train] == list(range(200))
    held = {p.source for p in env.eval_prompts()}
    assert len(held) == 8 and not held & {p.source for p in train}
    again = make_env(tool_config(tok_dir), tok_dir)
    assert [p.token_ids for p in again.eval_prompts()] == [p.token_ids for p in env.eval_prompts()]
    resumed = again.train_prompts(start=150)
    assert [next(resumed).source for _ in range(50)] == [p.source for p in train[150:]]
    other = make_env(tool_config(tok_dir, "run.seed=1"), tok_dir)
    assert next(other.train_prompts()).source != train[0].source


def test_config_errors_name_the_key(tok_dir):
    def refused(key, *overrides):
        with pytest.raises(ConfigError) as err:
            cfg = tool_config(tok_dir, *overrides)
            make_env(cfg, tok_dir)
        assert str(err.value).startswith(key + ":"), str(err.value)

    refused("env.calculator.observation", "env.calculator.observation=no-result-here")
    refused("env.calculator.min_operands", "env.calculator.min_operands=5")
    refused("rollout.max_new_tokens", "rollout.max_new_tokens=300")
    refused("env.max_turns", "env.max_turns=0")
    refused("teacher.mode", "teacher.mode=offline")
    refused("init.student", "init.student=")
    refused("env.calculator.call_end", "env.calculator.call_end=<|not a token|>")
