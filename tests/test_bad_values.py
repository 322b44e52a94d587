"""Bad values for every config key and every numeric command-line flag: one line `hybvit: error: ...` that names
the key or flag, exit status 2, nothing written. Generated from config.RULES and the dataclasses, so a new key
gets these checks without a new test."""
import copy
import dataclasses

import pytest

from hybvit.cli import main
from hybvit.config import PLUS_KEYS, REMOVED, REMOVED_OUTPUTS, RULES, Config
from hybvit.errors import HybvitError


def bad_values(key: str, kind: str) -> list[str]:
    rule = RULES.get(key)
    if rule is None:
        return {"bool": ["maybe", "2"], "str": []}[kind]
    values = ["abc"] if rule[0] not in ("choice", "device") else ["bogus-value"]
    if rule[0] == "every":
        values += ["-3", "5x", "1.5ep", "ep"]
    if rule[0] == "int":
        values += ["nan", "inf", "1e400", "1.5"] + ([str(rule[1] - 1)] if rule[1] is not None else []) \
                  + ([str(rule[2] + 1)] if rule[2] is not None else [])
    if rule[0] == "float":
        values += ["nan", "inf", "-inf", str(rule[1] - 1 if rule[1] == 0 else rule[1] / 2)] \
                  + ([str(rule[2] * 2)] if rule[2] is not None else [])
    if rule[0] == "prob":
        values += ["nan", "-0.1", "1.5"] + ([] if rule[1] else ["1"])
    if rule[0] == "device":
        values += ["cuda:x", "gpu"]
    return values


CASES = [(f"{section}.{f.name}", v) for section in Config.SECTIONS
         for f in dataclasses.fields(getattr(Config(), section)) for v in bad_values(f"{section}.{f.name}", f.type)]


def test_every_key_has_a_rule_or_is_free_text_or_a_switch():
    for section in Config.SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            assert f"{section}.{f.name}" in RULES or f.type in ("bool", "str"), f"{section}.{f.name} has no rule"
    assert len(CASES) > 200


def one_line_error(capsys, argv, names: tuple[str, ...]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hybvit: error: "), err
    assert any(n in err for n in names), err
    return err


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_bad_config_value(key, value, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["train", "--set", f"{key}={value}", "--out", str(out)], (key, key.split(".")[1]))
    assert not out.exists()


TRAIN_FLAGS = [("--epochs", "nan"), ("--epochs", "inf"), ("--epochs", "-1"), ("--minutes", "nan"),
               ("--minutes", "-5"), ("--steps", "-3"), ("--seed", "-1"), ("--steps", "x"), ("--stop-after", "0"),
               ("--stop-after", "-5"), ("--stop-after", "3x"), ("--stop-after", "1.5ep")]
SAMPLE_FLAGS = [("--num", "0"), ("--batch-size", "0"), ("--batch-size", "-1"), ("--steps", "0"), ("--eta", "-1"),
                ("--eta", "nan"), ("--eps-scale", "0"), ("--eps-scale", "nan"), ("--cfg-scale", "-1"),
                ("--cfg-scale", "inf"), ("--seed", "-2"), ("--device", "bogus"), ("--order", "5"),
                ("--sampler", "euler"), ("--guidance-scale", "-1"), ("--num", "many")]
EVALUATE_FLAGS = [("--num-samples", "0"), ("--batch-size", "0"), ("--steps", "0"), ("--eta", "-0.5"),
                  ("--bpd-images", "0"), ("--bpd-timesteps", "-1"), ("--ood-images", "0"), ("--pgd-images", "0"),
                  ("--pgd-steps", "0"), ("--pgd-step-factor", "0"), ("--speed-samples", "0"), ("--seed", "-1"),
                  ("--device", "tpu"), ("--ece-bins", "x"), ("--pgd-norms", "l3"), ("--pgd-eps-linf", "-1"),
                  ("--eps-scale", "inf"), ("--metrics", "magic"), ("--samples", "missing.npz")]


@pytest.mark.parametrize("flag,value", TRAIN_FLAGS)
def test_bad_train_flag(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["train", flag, value, "--out", str(out)], (flag, flag[2:], "budget"))
    assert not out.exists()


@pytest.mark.parametrize("flag,value", SAMPLE_FLAGS)
def test_bad_sample_flag(flag, value, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["sample", "--run", str(tmp_path / "no-run"), "--num", "4", "--out", str(out), flag, value]
    if flag == "--guidance-scale":
        argv += ["--class", "1"]
    one_line_error(capsys, argv, (flag,))
    assert not out.exists()


@pytest.mark.parametrize("flag,value", EVALUATE_FLAGS)
def test_bad_evaluate_flag(flag, value, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["evaluate", "--run", str(tmp_path / "no-run"), "--metrics", "accuracy", "--out", str(out), flag, value]
    one_line_error(capsys, argv, (flag, "metric"))
    assert not out.exists()


@pytest.mark.parametrize("target", ["folder", "missing-folder", "under-a-file"])
def test_an_output_that_cannot_be_written_is_refused_first(target, tmp_path, capsys):
    (tmp_path / "x.npz").mkdir()
    (tmp_path / "file.txt").write_text("")
    where = {"folder": tmp_path / "x.npz", "missing-folder": tmp_path / "nope" / "s.npz",
             "under-a-file": tmp_path / "file.txt" / "s.npz"}[target]
    argv = ["sample", "--run", str(tmp_path / "no-run"), "--num", "4", "--out", str(where)]
    one_line_error(capsys, argv, ("--out", "folder"))


def test_bad_input_to_the_newer_options(tmp_path, capsys):
    """--samples files, PNG folders and model folders: one line, exit 2, nothing written."""
    import numpy as np
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 8, 8, 1), np.float32))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.png").write_bytes(b"")
    (tmp_path / "text.txt").write_text("x")
    cases = [
        (["evaluate", "--samples", str(tmp_path / "float.npz"), "--data", "digits", "--metrics", "small-fd", "--out",
          str(tmp_path / "o1.json")], ("uint8",), tmp_path / "o1.json"),
        (["evaluate", "--samples", str(tmp_path / "text.txt"), "--data", "digits", "--metrics", "small-fd", "--out",
          str(tmp_path / "o2.json")], ("FILE.npz",), tmp_path / "o2.json"),
        (["evaluate", "--samples", str(tmp_path / "empty"), "--data", "digits", "--metrics", "small-fd", "--out",
          str(tmp_path / "o3.json")], ("--samples",), tmp_path / "o3.json"),
        (["sample", "--run", str(tmp_path / "no-run"), "--num", "2", "--out", f"{tmp_path / 'full'}/"],
         ("not empty",), None),
        (["export", "--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "model")], ("no-run",),
         tmp_path / "model"),
    ]
    for argv, names, out in cases:
        one_line_error(capsys, argv, names)
        assert out is None or not out.exists(), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.npz", "full", "text.txt"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["a.png"]


# ----------------------------------------------------------------------------- configs saved before a removal

def saved(**held) -> dict:
    """A config.json of this format holding the removed options `held` ({"model.dropout": 0.0, ...})."""
    d = copy.deepcopy(Config().to_dict())
    assert d["format"] == 2
    for key, value in held.items():
        section, name = key.split(".")
        d[section][name] = value
    return d


def test_a_saved_config_with_removed_options_at_what_hybvit_now_does_loads():
    cfg = Config.from_saved(saved(**{"model.dropout": 0.0}), "config.json")
    assert cfg == Config() and not cfg.model.plus
    cfg = Config.from_saved(saved(**REMOVED), "config.json")             # every removed option at its old value
    assert cfg == Config() and not cfg.model.plus
    keys = {f"{s}.{f.name}" for s in Config.SECTIONS for f in dataclasses.fields(getattr(cfg, s))}
    assert not keys & (set(REMOVED) | REMOVED_OUTPUTS)                   # none of them is a field any more
    # options that set only outputs load at any value (a paper preset's run previewed with 100 DDIM steps)
    outputs = {"train.num_samples": 64, "train.sample_steps": 100, "train.sample_every": 20000,
               "train.joint_pass": True, "train.compile_mode": "reduce-overhead", "train.inception_weights": "x.pth"}
    assert outputs.keys() <= REMOVED_OUTPUTS and Config.from_saved(saved(**outputs), "config.json") == Config()


@pytest.mark.parametrize("key,value", [("model.dropout", 0.1), ("train.min_lr", 0.001), ("model.conv_stem", 16),
                                       ("model.time_cond", "none"), ("data.mix_alpha", 0.2)])
def test_a_saved_config_with_a_removed_option_at_another_value_is_refused_in_one_line(key, value):
    with pytest.raises(HybvitError, match=f"{key}={value}") as e:
        Config.from_saved(saved(**{key: value}), "config.json")
    assert "\n" not in str(e.value) and "no longer has" in str(e.value)


def test_a_saved_config_with_the_four_plus_options_loads_as_model_plus():
    cfg = Config.from_saved(saved(**PLUS_KEYS, **{"model.dropout": 0.0}), "config.json")
    assert cfg.model.plus and cfg.model.time_cond == "adaln" and cfg.model.long_skips
    assert dataclasses.replace(cfg.model, plus=False) == Config().model                 # nothing else changed
    for left_out in PLUS_KEYS:                          # three of the four: a model hybvit can no longer build
        three = {k: v for k, v in PLUS_KEYS.items() if k != left_out}
        with pytest.raises(HybvitError, match="no longer has"):
            Config.from_saved(saved(**three), "config.json")
        with pytest.raises(HybvitError, match="no longer has"):        # the fourth at its faithful value
            Config.from_saved(saved(**three, **{left_out: REMOVED[left_out]}), "config.json")
