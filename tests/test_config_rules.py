"""Every field of the config tree has a rule, proven by trying a bad value for each.

The tree is walked here from the dataclass types (not from config.py's own walker), so a field
added without a rule fails: a number needs a range in `config.RANGES` (each value just outside
it, and NaN / infinity for floats, must be refused at load naming the key); a string or list of
strings is a path (`config.PATHS`: "" refused at load where it must not be empty; a missing
input, a file where a directory is written, refused by `launch.checks.check_paths` naming the
key), text with a rule (`config.TEXT`) or explicitly free (`config.FREE`, with the reason, and
then any value loads); `Literal` and `bool` fields refuse a value outside their type.
"""

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import pytest

from megatron_opd import config as C
from megatron_opd.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/quickstart.yaml"
HF_EXAMPLE = ROOT / "configs/hf-example.yaml"
# teacher.model is an optional section: it is walked in the chat example with it set (its
# checkpoint directories need not exist to load: their spec is then a stand-in).
TEACHER_MODEL_BASE = (HF_EXAMPLE, ["data.train=x.jsonl", "init.student=/nonexistent/s",
                                   "init.teacher=/nonexistent/t", "teacher.model={}"])
BAD_WORD = "no-such-choice"


def _optional_section(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union) and len(args) == 1 \
            and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def leaves(cls=Config, prefix=""):
    """(dotted key, "Section.field", type) of every leaf of the tree, optional sections too."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + ("async" if f.name == "async_" else f.name)
        section = tp if dataclasses.is_dataclass(tp) else _optional_section(tp)
        if section is not None:
            yield from leaves(section, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from leaves(typing.get_args(tp)[0], key + "[0].")  # a list of sections
        else:
            yield key, f"{cls.__name__}.{f.name}", tp


LEAVES = list(leaves())


def _scalar(tp):
    """(int | float | str | bool | "literal", is a list) of a leaf's type."""
    is_list = typing.get_origin(tp) is list
    if is_list:
        (tp,) = typing.get_args(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return "literal", is_list
    assert tp in (int, float, str, bool), f"unexpected config type {tp}"
    return tp, is_list


# teacher.teachers is a list of sections: its items' fields are walked on a one-item list.
TEACHERS_ITEM = ["teacher.teachers=[{name: a, revision: ra}]", "teacher.route_by=env"]


def _base(key):
    if key.startswith("teacher.teachers[0]."):
        return QUICKSTART, TEACHERS_ITEM
    return TEACHER_MODEL_BASE if key.startswith("teacher.model.") else (QUICKSTART, [])


def _refused(key, value, expect_key=None):
    """Load with `key=value` on the field's base config: it must fail naming `expect_key`."""
    path, overrides = _base(key)
    with pytest.raises(ConfigError) as err:
        load_config(path, [*overrides, f"{key}={value}"])
    named = expect_key or key
    assert re.match(re.escape(named) + r"(\[\d+\])?: ", str(err.value)), \
        f"{key}={value}: {err.value}"
    return str(err.value)


def test_the_bases_load_and_every_leaf_is_walked():
    load_config(QUICKSTART)
    cfg = load_config(*TEACHER_MODEL_BASE)
    assert cfg.teacher.model is not None
    keys = {k for k, _, _ in LEAVES}
    for must in ("train.weight_decay", "run.dir", "async.max_staleness", "teacher.model.rope_theta",
                 "cluster.teacher.nodes", "objective.token_selection.keep_ratio"):
        assert must in keys
    assert len(keys) == len(LEAVES) > 200


def test_every_field_has_exactly_one_rule_and_no_rule_is_stale():
    """A new field fails here until it gets a rule (or is listed in FREE, with the reason)."""
    names = {name for _, name, _ in LEAVES}
    for table in (C.RANGES, C.PATHS, C.TEXT, C.FREE):
        assert not set(table) - names, f"rules for fields that do not exist: {set(table) - names}"
    missing = []
    for key, name, tp in LEAVES:
        kind, _ = _scalar(tp)
        homes = [t for t in ("RANGES", "PATHS", "TEXT", "FREE") if name in getattr(C, t)]
        if kind in (int, float):
            ok = homes == ["RANGES"]
        elif kind is str:
            ok = len(homes) == 1 and homes[0] != "RANGES"
        else:  # Literal / bool: the type is the rule
            ok = not homes
        if not ok:
            missing.append(f"{key} ({name}, {kind}, in {homes or 'no table'})")
    assert not missing, "fields without exactly one rule:\n" + "\n".join(missing)
    for name, reason in C.FREE.items():
        assert len(reason) > 10, f"{name}: FREE needs the reason"


def _intervals(text):
    """The rule text parsed here independently: [(lo, lo in, hi, hi in)]."""
    out = []
    for part in text.split(" or "):
        m = re.fullmatch(r"([\[(])(-?[\d.]+), (-?[\d.]+)([\])])", part)
        if m:
            out.append((float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"))
            continue
        m = re.fullmatch(r"(>=|>) (-?[\d.]+)", part)
        if m:
            out.append((float(m[2]), m[1] == ">=", math.inf, False))
            continue
        m = re.fullmatch(r"-?[\d.]+", part)
        assert m, f"cannot read the rule {text!r}"
        out.append((float(part), True, float(part), True))
    return out


def _inside(v, intervals):
    return any((lo < v or (inc_lo and v == lo)) and (v < hi or (inc_hi and v == hi))
               for lo, inc_lo, hi, inc_hi in intervals)


def _outside_values(text, kind):
    """Values just outside the rule's range, generated from its bounds."""
    intervals = _intervals(text)
    bounds = {b for lo, _, hi, _ in intervals for b in (lo, hi) if math.isfinite(b)}
    steps = (1,) if kind is int else (1, 0.5, 1e-3)
    candidates = {b + s * d for b in bounds for s in steps for d in (-1, 1)} | bounds
    bad = sorted(v for v in candidates if not _inside(v, intervals))
    bad = [int(v) for v in bad if v == int(v)] if kind is int else bad
    assert bad, f"{text}: no value outside it?"
    return bad


NUMERIC = [(k, n, tp) for k, n, tp in LEAVES if _scalar(tp)[0] in (int, float)]


@pytest.mark.parametrize("key, name, tp", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_number_out_of_range_is_refused_naming_the_key(key, name, tp):
    kind, is_list = _scalar(tp)
    rule = C.RANGES[name]
    text = rule if isinstance(rule, str) else rule[0]
    for v in _outside_values(text, kind):
        message = _refused(key, f"[{v}]" if is_list else v)
        assert "must be" in message
    if kind is float:
        for v in (".nan", ".inf", "-.inf"):
            assert "finite" in _refused(key, f"[{v}]" if is_list else v)
    # the default is inside its own range
    path, overrides = _base(key)
    cfg = load_config(path, overrides)
    value = cfg
    for part in key.replace("async.", "async_.").split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index[:-1])]
    for v in (value if is_list else [value]):
        assert v is None or _inside(v, _intervals(text)), f"{key} default {v} outside {text}"


TEXTS = [(k, n) for k, n, tp in LEAVES if _scalar(tp)[0] is str]


@pytest.mark.parametrize("key, name", TEXTS, ids=[k for k, _ in TEXTS])
def test_every_text_field_refuses_what_its_rule_says(key, name, tmp_path):
    _, is_list = _scalar(dict((k, tp) for k, _, tp in LEAVES)[key])
    wrap = (lambda v: f"[{v!r}]") if is_list else (lambda v: v)
    if name in C.FREE:  # any value loads
        path, overrides = _base(key)
        load_config(path, [*overrides, f"{key}={wrap('any thing, at all')}"])
    elif name in C.TEXT:
        _refused(key, wrap("" if C.TEXT[name] == "nonempty" else BAD_WORD))
    elif C.PATHS[name].empty is None:
        assert "must not be empty" in _refused(key, "")
        _refused(key, "' '")


def _path_base(tmp_path):
    """A chat config whose every path exists, so each check can be broken alone."""
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("")
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    from megatron_opd.transport.auth import write_secret

    write_secret(tmp_path / "run.key")
    return [f"run.dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}",
            f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
            f"init.student={tmp_path / 'student'}", f"init.teacher={tmp_path / 'teacher'}",
            f"teacher.offline_store={tmp_path / 'store'}",
            f"transport.secret_file={tmp_path / 'run.key'}", "slurm.python=/bin/sh"]


PATH_FIELDS = [(k, n) for k, n, _ in LEAVES if n in C.PATHS]


@pytest.mark.parametrize("key, name", PATH_FIELDS, ids=[k for k, _ in PATH_FIELDS])
def test_every_path_field_is_checked_before_anything_starts(key, name, tmp_path):
    """Inputs must exist, output directories must be directories that can be made; the nodes'
    paths are checked where the shared filesystem is seen (submit)."""
    from megatron_opd.launch.checks import check_paths

    item = TEACHERS_ITEM if key.startswith("teacher.teachers[0].") else []
    base = _path_base(tmp_path) + item
    check_paths(load_config(HF_EXAMPLE, base), node_paths=True)  # the base passes
    rule = C.PATHS[name]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad = {"input": [tmp_path / "missing"], "node": [tmp_path / "missing", a_file],
           "output": [a_file, a_file / "below"]}[rule.kind]
    for value in bad:
        cfg = load_config(HF_EXAMPLE, [*base, f"{key}={value}"])
        with pytest.raises(ConfigError, match="^" + re.escape(key) + ": ") as err:
            check_paths(cfg, node_paths=True)
        assert str(value) in str(err.value)
    if rule.kind == "node":  # not checked where the nodes' filesystem may not be seen
        check_paths(load_config(HF_EXAMPLE, [*base, f"{key}={bad[0]}"]), node_paths=False)
    if rule.empty is not None:  # "" means something (in the quickstart at least)
        check_paths(load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", *item, f"{key}="]),
                    node_paths=True)


LITERALS = [(k, tp) for k, _, tp in LEAVES if _scalar(tp)[0] in ("literal", bool)]


@pytest.mark.parametrize("key, tp", LITERALS, ids=[k for k, _ in LITERALS])
def test_every_choice_and_switch_refuses_other_values(key, tp):
    _refused(key, "maybe" if _scalar(tp)[0] is bool else BAD_WORD)


@pytest.mark.parametrize("override", ["train.weight_decay=-1", "train.warmup_steps=-1",
                                      "run.dir="])
def test_the_issue_14_examples_are_refused_at_load(override):
    """The values that used to pass the config and fail later (or never)."""
    key = override.split("=")[0]
    message = _refused(key, override.split("=", 1)[1])
    assert message in (f"{key}: must be >= 0, got {-1.0 if 'decay' in key else -1}",
                       "run.dir: must not be empty, give a directory")


def test_config_imports_no_torch():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, megatron_opd.config; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
