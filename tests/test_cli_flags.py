"""`personalize train`'s trainer and method flags come from the Config dataclasses: every field with help metadata
is a flag (shown in `train --help` with each method's default) or a --set key (shown by `personalize methods`),
and a value given either way reaches the method's config."""
import dataclasses
import re
import typing

import pytest

from test_bad_input import run_cli

from personalize import methods as registry
from personalize.training import TrainConfig, resolve_settings


def _fields(config_cls):
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("help")]


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


CASES = [(name, f) for name in registry.names() for f in _fields(registry.get(name).Config)]
FLAGGED = [(name, f) for name, f in CASES if f.metadata.get("flag")]
TRAINER = [f for f in _fields(TrainConfig) if f.metadata.get("flag")]


def test_every_setting_has_help():
    for config_cls in [TrainConfig] + [registry.get(n).Config for n in registry.names()]:
        missing = [f.name for f in dataclasses.fields(config_cls) if not f.metadata.get("help")]
        assert not missing, f"{config_cls.__name__}: no help metadata for {missing}"


@pytest.fixture
def train_help(capsys, monkeypatch):
    """`personalize train --help`, one option per line: {'--flag': its help text}."""
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)
    code, out, err = run_cli(capsys, ["train", "--help"])
    assert code == 0, err
    helps = {}
    for line in out.splitlines():
        m = re.match(r"│\s+(--[a-z-]+)(?:\s+--no-[a-z-]+)?\s+<[^>]+>\s+(.*?)\s*│$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return out, helps


def _shown_defaults(help_text: str, methods: list[str]) -> dict[str, str]:
    """method -> the default the help shows for it. Groups ``m1, m2: text [default: ...]`` are joined by '; ';
    a default reads ``X`` (all), ``X; m3 Y`` (all but m3) or ``m1 X, m2 Y``."""
    shown = {}
    for group in re.split(r"(?<=\]);\s", help_text):
        seg = re.search(r"\[default: ([^\]]*)\]", group)
        assert seg, f"no [default: ...] in {group!r}"
        head = group.split(": ", 1)[0]
        scope = [m for m in head.split(", ") if m in methods] or methods
        common, _, rest = seg.group(1).partition("; ")
        pairs = [p.rsplit(" ", 1) for p in common.split(", ")]
        if all(len(p) == 2 and p[0] in methods for p in pairs):
            explicit, common = dict(pairs), None
        else:
            explicit = {}
        explicit.update(dict(p.rsplit(" ", 1) for p in rest.split(", ")) if rest else {})
        for m in scope:
            shown[m] = explicit.get(m, common)
    return shown


@pytest.mark.parametrize("method, field", FLAGGED, ids=[f"{n}-{f.name}" for n, f in FLAGGED])
def test_method_flag_in_train_help_with_its_default(train_help, method, field):
    _, helps = train_help
    flag = _dashed(field.name)
    assert flag in helps, f"{flag} missing from 'train --help'"
    assert field.metadata["help"] in helps[flag]
    assert _shown_defaults(helps[flag], registry.names()).get(method) == str(field.default), helps[flag]


@pytest.mark.parametrize("field", TRAINER, ids=[f.name for f in TRAINER])
def test_trainer_flag_in_train_help_with_each_methods_default(train_help, field):
    _, helps = train_help
    flag = _dashed(field.name)
    assert flag in helps, f"{flag} missing from 'train --help'"
    shown = _shown_defaults(helps[flag], registry.names())
    for name in registry.names():
        expected = registry.get(name).train_defaults.get(field.name, field.default)
        assert shown.get(name) == str(expected), (name, helps[flag])


def test_train_help_lists_every_methods_defaults(train_help):
    out, _ = train_help
    text = " ".join(out.split())
    for name in registry.names():
        cls = registry.get(name)
        assert f"{name}: steps=" in text
        for f in dataclasses.fields(cls.Config):
            assert f"{f.name}={f.default}" in text, (name, f.name)


def test_methods_lists_every_setting_with_default_and_help(capsys, monkeypatch):
    from personalize.cli import console

    monkeypatch.setattr(console.out_console, "width", 1000)
    code, summary, err = run_cli(capsys, ["methods"])
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in summary.splitlines() if line.count("│") >= 4}
    for name in registry.names():
        code, out, err = run_cli(capsys, ["methods", name])
        assert code == 0, err
        table = {cells[1].strip(): [c.strip() for c in cells[2:5]]
                 for cells in (line.split("│") for line in out.splitlines()) if len(cells) >= 6}
        cls = registry.get(name)
        for f in _fields(cls.Config):
            assert f"{f.name}={f.default}" in rows[name], (name, f.name)
            default, flag, text = table[f.name]
            assert default == str(f.default) and text == f.metadata["help"], (name, f.name, table[f.name])
            assert flag == (_dashed(f.name) if f.metadata.get("flag") else "--set")
        for f in _fields(TrainConfig):
            assert table[f.name][0] == str(cls.train_defaults.get(f.name, f.default)), (name, f.name)
        for knob, text in cls.knobs.items():
            assert knob in out and text in " ".join(out.split()), (name, knob)


def _other_value(config_cls, field):
    """A value of the field's type that is not its default, as (command-line args, value in the config)."""
    if field.metadata.get("flag") == "multiple":
        return [_dashed(field.name), "class-folder"], "class-folder"
    hint = typing.get_type_hints(config_cls)[field.name]
    kind = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
    if kind is bool:
        value = not field.default
        return [_dashed(field.name) if value else "--no-" + field.name.replace("_", "-")], value
    if kind is str:
        value = {"mixed_precision": "bf16"}.get(field.name, "cat")
    elif kind is float:
        value = field.default / 2 if field.default else 0.5  # rank_fraction stays in (0, 1]
    else:
        value = field.default + 1
    return [_dashed(field.name), str(value)], value


@pytest.fixture
def resolved(monkeypatch):
    """Replace the trainer by one that resolves the settings the CLI hands it (no model, no training)."""
    import personalize.training

    seen = {}

    def fake_train(base, images, *, method, settings, **kwargs):
        seen["train"], seen["method"] = resolve_settings(registry.get(method), settings)
        raise SystemExit(0)

    monkeypatch.setattr(personalize.training, "train", fake_train)
    return seen


def _train_args(tmp_path, method, *extra):
    return ["train", "--method", method, "--base", "tiny", "--images", tmp_path / "photos", "--token", "<disc>",
            "--superclass", "ball", "--out", tmp_path / "out.safetensors", *extra]


@pytest.mark.parametrize("method, field", FLAGGED, ids=[f"{n}-{f.name}" for n, f in FLAGGED])
def test_method_flag_reaches_the_config_and_wins_over_set(capsys, tmp_path, resolved, method, field):
    cls = registry.get(method)
    args, value = _other_value(cls.Config, field)
    code, _, err = run_cli(capsys, _train_args(tmp_path, method, *args))
    assert code == 0, err
    assert getattr(resolved["method"], field.name) == value
    # an explicit flag wins over --set; without the flag, --set decides; without either, the method's default
    if field.metadata.get("flag") != "multiple":
        code, _, err = run_cli(capsys, _train_args(tmp_path, method, "--set", f"{field.name}={field.default}", *args))
        assert code == 0 and getattr(resolved["method"], field.name) == value, err
    code, _, err = run_cli(capsys, _train_args(tmp_path, method))
    assert code == 0 and getattr(resolved["method"], field.name) == field.default, err


@pytest.mark.parametrize("method", registry.names())
def test_trainer_flags_reach_the_trainer_config(capsys, tmp_path, resolved, method):
    cls = registry.get(method)
    args, values = [], {}
    for f in TRAINER:
        a, values[f.name] = _other_value(TrainConfig, f)
        args += a
    code, _, err = run_cli(capsys, _train_args(tmp_path, method, *args))
    assert code == 0, err
    assert {k: getattr(resolved["train"], k) for k in values} == values
    code, _, err = run_cli(capsys, _train_args(tmp_path, method))
    assert code == 0, err
    assert all(getattr(resolved["train"], f.name) == cls.train_defaults.get(f.name, f.default) for f in TRAINER)


def test_a_flag_of_another_method_is_refused(capsys, tmp_path, resolved):
    code, _, err = run_cli(capsys, _train_args(tmp_path, "perfusion", "--num-vectors", "2"))
    assert code == 2 and "unknown setting" in err and "num_vectors" in err


def test_a_method_flag_reaches_a_trained_concept(capsys, photos, tmp_path):
    """A real run on the tiny base: --num-vectors 2 is in the written concept's config."""
    from personalize import load_concept

    out = tmp_path / "ti.safetensors"
    code, _, err = run_cli(capsys, ["train", "--method", "textual-inversion", "--base", "tiny", "--images", photos,
                                    "--token", "<disc>", "--superclass", "ball", "--out", out, "--num-vectors", "2",
                                    "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0",
                                    "--device", "cpu"])
    assert code == 0, err
    assert load_concept(out).config["num_vectors"] == 2
