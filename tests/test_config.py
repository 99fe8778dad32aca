"""The training config: every field's type and range checked at load time, errors that name
the field and the value, YAML 1.1's numbers-in-strings read as numbers (pure Python, fast)."""

import dataclasses
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, StageConfig, TrainConfig, from_dict, load_config
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# configs/paper/ and configs/zoo/ hold experiment files (tests/test_experiment.py)
PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name not in ("paper", "zoo"))
S32 = {"name": "32s", "steps": 2, "lr": 0.1}
S16 = {"name": "16s", "steps": 2, "lr": 0.1}

# (field, bad value, what the message says after "field: ") -- at least one per field.
BAD = [
    ("name", "", "must be 1-64 letters"),
    ("name", "my run", "must be 1-64 letters"),
    ("name", "it's", "must be 1-64 letters"),
    ("name", 5, "must be 1-64 letters"),
    ("dataset", "coco", "must be one of voc, sbd, nyud, siftflow, pascal, context, synthetic"),
    ("dataset", 3, "must be one of"),
    ("train_split", "", "must be a non-empty string"),
    ("train_split", 1, "must be a non-empty string"),
    ("val_split", None, "must be a non-empty string"),
    ("width", 0, "must be > 0"),
    ("width", -0.5, "must be > 0"),
    ("width", "abc", "must be a number"),
    ("width", True, "must be a number"),
    ("width", float("nan"), "must be a finite number"),
    ("width", float("inf"), "must be a finite number"),
    ("input", "rgbx", "must be one of rgb, hha, rgbd, rgb-hha"),
    ("backbone", "resnet50", "must be one of vgg16, alexnet, googlenet"),
    ("model", "pspnet", "must be one of unet, segnet, deeplab_largefov, pspnet_resnet50"),
    ("heads", 5, "must map one or two head names"),
    ("heads", {}, "must map one or two head names"),
    ("heads", {"a": 1, "b": 2, "c": 3}, "must map one or two head names"),
    ("fusion_init", {"color": "a"}, "must map color and hha to checkpoints"),
    ("fusion_init", "a,b", "must map color and hha to checkpoints"),
    ("backbone_weights", 5, "must be a file path or a URI"),
    ("backbone_weights", "", "must be a file path or a URI"),
    ("learn_upsampling", "yes", "must be true or false"),
    ("learn_upsampling", 1, "must be true or false"),
    ("optimizer", "rmsprop", "must be one of sgd, adam"),
    ("batch_size", 0, "must be >= 1"),
    ("batch_size", 1.5, "must be a whole number"),
    ("batch_size", "two", "must be a number"),
    ("momentum", 1.0, "must be < 1"),
    ("momentum", -0.1, "must be >= 0"),
    ("weight_decay", -1e-4, "must be >= 0"),
    ("weight_decay", "abc", "must be a number"),
    ("weight_decay", [5e-4], "must be a number"),
    ("bias_lr_mult", -2, "must be >= 0"),
    ("normalize_loss", "true", "must be true or false"),
    ("schedule", "step", "must be one of fixed, poly"),
    ("poly_power", 0, "must be > 0"),
    ("mirror", 0, "must be true or false"),
    ("jitter", -1, "must be >= 0"),
    ("random_scale", [2.0, 1.0], "must be [low, high] with low <= high"),
    ("random_scale", [0, 1.0], "must be > 0"),
    ("random_scale", 1.5, "must be [low, high], e.g. [0.5, 2.0]"),
    ("crop_size", -1, "must be >= 0"),
    ("crop_size", 32.5, "must be a whole number"),
    ("jitter", 2.5, "must be a whole number"),
    ("loss_sampling", 0, "must be > 0"),
    ("loss_sampling", 1.5, "must be <= 1"),
    ("class_weights", "inverse", "must be one of none, inverse_frequency, median_frequency"),
    ("sampling", "epoch", "must be one of random, shuffle, stream"),
    ("pad_multiple", 0, "must be >= 1"),
    ("channels_last", None, "must be true, false or auto"),
    ("channels_last", "yes", "must be true, false or auto"),
    ("amp", "fp8", "must be one of off, bf16, fp16, auto"),
    ("amp", True, "must be one of off, bf16, fp16, auto"),
    ("compile", "yes", "must be true or false"),
    ("seed", -1, "must be >= 0"),
    ("seed", 2**63, "must be < 9223372036854775808"),
    ("workers", 0, "must be >= 1"),
    ("workers", "2x", "must be a number"),
    ("use_gpu", "no", "must be true or false"),
    ("cpus_per_worker", 0, "must be > 0"),
    ("placement_strategy", "pack", "must be one of PACK, SPREAD"),
    ("checkpoint_every", 0, "must be >= 1"),
    ("val_every", -1, "must be >= 0"),
    ("max_failures", -2, "must be >= -1"),
    ("cache_dataset", None, "must be true or false"),
    ("threads_per_worker", -1, "must be >= 0"),
    ("fail_at_step", -1, "must be >= 0"),
    ("fail_at_step", 2.5, "must be a whole number"),
    ("stages", 5, "must be a list of {name, steps, lr} mappings"),
    ("stages", "32s", "must be a list of {name, steps, lr} mappings"),
    ("stages", {"32s": S32}, "must be a list of {name, steps, lr} mappings"),
    ("stages", [], "must name at least one stage"),
]


@pytest.mark.parametrize(("key", "value", "why"), BAD,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_every_bad_field_names_the_field_and_the_value(key, value, why):
    with pytest.raises(ConfigError) as err:
        from_dict({key: value})
    msg = str(err.value)
    assert msg.startswith(f"{key}: {why}"), msg
    assert msg.endswith(f"got {value!r}"), msg
    assert "\n" not in msg and isinstance(err.value, UserError)


def test_the_table_covers_every_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {k for k, _, _ in BAD} == fields


@pytest.mark.parametrize(("stages", "message"), [
    ([S32, {**S16, "lr": -0.1}], "stages[1].lr: must be > 0, got -0.1"),
    ([{**S32, "steps": 0}], "stages[0].steps: must be >= 1, got 0"),
    ([{**S32, "steps": 2.5}], "stages[0].steps: must be a whole number, got 2.5"),
    ([{**S32, "lr": "abc"}], "stages[0].lr: must be a number, got 'abc'"),
    ([{**S32, "name": "64s"}], "stages[0].name: must be one of 32s, 16s, 8s, 8s-atonce, train, got "
                               "'64s'"),
    ([5], "stages[0]: must be a mapping {name, steps, lr}, got 5"),
    ([{"name": "32s", "steps": 2}], "stages[0].lr: missing"),
    ([{"name": "32s", "step": 2, "lr": 0.1}], "stages[0]: unknown key 'step' (did you mean "
                                               "'steps'?)"),
    ([{**S32, "name": "8s"}, S32], "stages: must follow 32s -> 16s -> 8s"),
    ([S32, S32], "stages: must follow 32s -> 16s -> 8s"),
    ([{**S32, "name": "8s-atonce"}, S32], "stages: 8s-atonce trains in one stage on its own"),
    ([{**S32, "train": "frozen"}], "stages[0].train: must be one of all, score_only, got "
                                   "'frozen'"),
    ([{**S32, "train": "score_only"}, S16], "stages: train: score_only (a fixed trunk) ends a "
                                            "config, got it on 32s"),
])
def test_bad_stages_name_the_stage_and_the_field(stages, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"stages": stages})
    assert message in str(err.value)


def test_the_paper_experiment_fields_load_and_default_to_the_plain_recipe():
    cfg = from_dict({"stages": [{**S32, "train": "score_only"}], "jitter": 32,
                     "loss_sampling": "5e-1", "class_weights": "median_frequency"})
    assert cfg.stages[0].train == "score_only" and cfg.jitter == 32
    assert cfg.loss_sampling == 0.5 and cfg.class_weights == "median_frequency"
    plain = from_dict({})
    assert (plain.jitter, plain.loss_sampling, plain.class_weights) == (0, 1.0, "none")
    assert all(s.train == "all" for s in plain.stages)
    with pytest.raises(ConfigError, match="class_weights: 'inverse_frequency' weighs one "
                                          "head's classes; this config has 2 heads"):
        from_dict({"dataset": "siftflow", "heads": {"semantic": 33, "geometric": 3},
                   "class_weights": "inverse_frequency"})


def test_rules_between_fields():
    with pytest.raises(ConfigError, match=r"input: 'hha' needs depth/HHA images, which only "
                                          r"nyud rows have, got dataset='voc'"):
        from_dict({"input": "hha"})
    with pytest.raises(ConfigError, match=r"heads: a second head reads label_geo"):
        from_dict({"heads": {"semantic": 21, "geometric": 3}})
    with pytest.raises(ConfigError, match=r"heads\.geometric: must be >= 1, got 0"):
        from_dict({"dataset": "siftflow", "heads": {"semantic": 33, "geometric": 0}})
    assert from_dict({"dataset": "nyud", "input": "rgbd"}).in_channels == 4
    with pytest.raises(ConfigError, match=r"^backbone: 'alexnet' nets are FCN-32s only \(the "
                                          r"skips of 16s and 8s are VGG16's\), so stages must "
                                          r"be one 32s stage, got \['32s', '16s'\]$"):
        from_dict({"backbone": "alexnet", "stages": [S32, S16]})
    with pytest.raises(ConfigError, match=r"backbone: 'googlenet' reads 3-channel images"):
        from_dict({"backbone": "googlenet", "dataset": "nyud", "input": "rgbd",
                   "stages": [S32]})
    train = {"name": "train", "steps": 2, "lr": 0.1}
    with pytest.raises(ConfigError, match=r"^batch_size: 'deeplabv3_resnet50' needs at least 2 "):
        from_dict({"model": "deeplabv3_resnet50", "stages": [train]})
    cfg = from_dict({"model": "deeplabv3_resnet50", "batch_size": 2, "stages": [train]})
    assert cfg.stage_variant(cfg.stages[0]) == "deeplabv3_resnet50"
    with pytest.raises(ConfigError, match=r"^stages: a model: net .* trains in one stage named "
                                          r"'train' .* got \['32s'\] with model='fcn_resnet50'"):
        from_dict({"model": "fcn_resnet50", "stages": [S32]})
    with pytest.raises(ConfigError, match=r"got \['train'\] with model=None"):
        from_dict({"stages": [train]})
    with pytest.raises(ConfigError, match=r"^model: 'fcn_resnet50' reads RGB images"):
        from_dict({"model": "fcn_resnet50", "dataset": "nyud", "input": "hha",
                   "stages": [train]})
    with pytest.raises(ConfigError, match=r"^width: 'fcn_resnet50' is torchvision's net, which "
                                          r"has no width multiplier: width must be 1.0, got 0.5"):
        from_dict({"model": "fcn_resnet50", "width": 0.5, "stages": [train]})
    with pytest.raises(ConfigError, match=r"^model: 'fcn_resnet50' is a whole net; backbone: "):
        from_dict({"model": "fcn_resnet50", "backbone": "alexnet", "stages": [train]})
    cfg = from_dict({"backbone": "googlenet", "stages": [S32]})
    assert cfg.stage_variant(cfg.stages[0]) == "fcn32s_googlenet"
    assert from_dict({"stages": [S32, S16]}).stage_variant(StageConfig(**S16)) == "fcn16s"


def test_every_problem_is_reported_on_one_line():
    with pytest.raises(ConfigError) as err:
        from_dict({"width": 0, "workers": "two", "stages": [S32, {**S16, "lr": -1}]})
    msg = str(err.value)
    assert msg == ("width: must be > 0, got 0; workers: must be a number, got 'two'; "
                   "stages[1].lr: must be > 0, got -1")


def test_unknown_keys_are_refused_by_name_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"^unknown key 'wdith' \(did you mean 'width'\?\)$"):
        from_dict({"wdith": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(known: .*batch_size"):
        from_dict({"zzz": 1})


def _write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    text = ("weight_decay: 5e-4\nmomentum: 9E-1\n"
            "stages:\n  - {name: 32s, steps: 1e5, lr: 1e-10}\n")
    assert yaml.safe_load(text)["weight_decay"] == "5e-4"  # what PyYAML (YAML 1.1) returns
    cfg = load_config(_write(tmp_path, text))
    assert cfg.weight_decay == 5e-4 and isinstance(cfg.weight_decay, float)
    assert cfg.momentum == 0.9
    assert cfg.stages == (StageConfig("32s", 100000, 1e-10),)
    assert isinstance(cfg.stages[0].steps, int)


def test_a_word_where_a_number_belongs_is_refused_with_the_file_and_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "weight_decay: abc\n"))
    assert str(err.value) == f"config {tmp_path / 'tiny.yaml'}: weight_decay: must be a " \
                             "number, got 'abc'"
    with pytest.raises(ConfigError, match=r"config .*tiny\.yaml: stages\[1\]\.lr: must be > 0, "
                                          r"got -0\.1$"):
        load_config(_write(tmp_path, "stages:\n  - {name: 32s, steps: 1, lr: 0.1}\n"
                                     "  - {name: 16s, steps: 1, lr: -0.1}\n"))


def test_stages_that_is_not_a_list_is_one_config_error_not_a_type_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "stages: 5\n"))
    assert str(err.value).endswith(
        "stages: must be a list of {name, steps, lr} mappings, got 5")


@pytest.mark.parametrize(("text", "message"), [
    ("width: [", r"not valid YAML at line 1, column 9"),
    ("- 1\n- 2\n", r"must be a mapping of config keys \(key: value lines\), got a list"),
    ("just words\n", r"must be a mapping of config keys .* got a str"),
    ("1: 2\n", r"unknown key 1 "),
])
def test_files_that_are_not_a_config(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    preset = ROOT / "configs/demo.yaml"
    with pytest.raises(ConfigError, match=r"demo\.yaml: workers: must be >= 1, got 0"):
        load_config(preset, workers=0)
    with pytest.raises(ConfigError, match=r"unknown key 'worker' \(did you mean 'workers'"):
        load_config(preset, worker=3)
    assert load_config(preset, workers=None).workers == 2  # None: the file's value
    assert load_config(preset, workers=1, use_gpu=True).workers == 1
    with pytest.raises(ConfigError, match=r"stages \['8s-atonce'\] are not in the config"):
        load_config(preset).only_stages(["8s-atonce"])


def test_building_or_replacing_in_code_is_validated_too():
    with pytest.raises(ConfigError, match=r"^input: must be one of .*got 'rgbx'$"):
        dataclasses.replace(TrainConfig(), input="rgbx")
    with pytest.raises(ConfigError, match=r"^stage\.steps: must be >= 1, got 0$"):
        StageConfig("32s", 0, 0.1)
    with pytest.raises(ConfigError, match=r"^stages\[1\]: must be a mapping"):
        TrainConfig(stages=(StageConfig("32s", 1, 0.1), "16s"))
    # Numbers are normalised, so equal configs have equal digests however they were written.
    assert TrainConfig(width=1, cpus_per_worker="5e-1").digest() == \
        TrainConfig(width=1.0, cpus_per_worker=0.5).digest()
    assert TrainConfig(stages=[S32]).stages == (StageConfig("32s", 2, 0.1),)


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(ROOT)) for p in PRESETS])
def test_every_preset_loads_pickles_and_round_trips(preset):
    cfg = load_config(preset)
    again = pickle.loads(pickle.dumps(cfg))  # what crosses the Ray boundary
    assert again == cfg and again.digest() == cfg.digest()
    assert type(again.stages[0]) is StageConfig and again.in_channels == cfg.in_channels
    back = from_dict(cfg.to_dict())
    assert back == cfg and back.digest() == cfg.digest()
    # The resolved config saved beside a run (yaml) loads back to the same digest.
    assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).digest() == cfg.digest()
    assert re.fullmatch(r"[0-9a-f]{64}", cfg.digest())


def test_presets_exist():
    assert len(PRESETS) >= 9, PRESETS


@pytest.mark.parametrize(("text", "message"), [
    ("width: [", "not valid YAML"),
    ("stages: 5\n", "stages: must be a list of {name, steps, lr} mappings, got 5"),
])
def test_the_cli_shows_a_bad_config_as_one_line_and_exit_2(tmp_path, text, message):
    bad = _write(tmp_path, text, "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--config", str(bad),
                           "--data", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "bad.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# The README's "Configs and pre-flight" rows that are a config alone: input column -> the YAML.
README_ROWS = {
    "`weight_decay: abc`": "weight_decay: abc",
    "a stage with `lr: -0.1`": "stages: [{name: 32s, steps: 2, lr: 0.1}, "
                               "{name: 16s, steps: 2, lr: -0.1}]",
    "`stages: 5`": "stages: 5",
    "`stages: []`": "stages: []",
    "`{name: 32s, step: 2, lr: 0.1}`": "stages: [{name: 32s, step: 2, lr: 0.1}]",
    "stage name `64s`": "stages: [{name: 64s, steps: 2, lr: 0.1}]",
    "stages 8s then 32s": "stages: [{name: 8s, steps: 2, lr: 0.1}, {name: 32s, steps: 2, lr: 0.1}]",
    "`wdith: 1`": "wdith: 1",
    "`momentum: 1.0`": "momentum: 1.0",
    '`mirror: "yes"`': 'mirror: "yes"',
    "`dataset: coco`": "dataset: coco",
    "`input: hha` with dataset voc": "dataset: voc\ninput: hha",
}


@pytest.mark.parametrize("row", sorted(README_ROWS))
def test_readme_config_rows_say_what_the_config_check_says(row):
    """Each such README row's message (``…`` standing for the rest) is what loading says."""
    prefix = f"| {row} | "
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"README has no (or more than one) config row {row!r}"
    shown = re.search(r"`([^`]+)`", lines[0][len(prefix):])
    assert shown, lines[0]
    pattern = ".*".join(re.escape(part) for part in shown.group(1).split("…"))
    with pytest.raises(ConfigError) as err:
        from_dict(yaml.safe_load(README_ROWS[row]))
    assert re.search(pattern, str(err.value)), (
        f"README row {row!r} shows `{shown.group(1)}`; the check says: {err.value}")


def test_the_config_names_every_successor_of_the_model_table():
    """config.MODELS (no torch import) is fcn_core.models' table beyond the FCNs."""
    from fcn_core.models import SCALABLE, SUCCESSORS
    from pipelines.config import FIXED_WIDTH, MODELS

    assert MODELS == SUCCESSORS
    assert FIXED_WIDTH == tuple(n for n in SUCCESSORS if n not in SCALABLE)


def test_a_preset_path_from_another_folder_is_the_projects_unless_one_is_here(
        tmp_path, monkeypatch):
    """`fcn demo` (default --config configs/demo.yaml) or `fcn experiment
    configs/paper/table2.yaml` run outside the checkout: the project's presets; a file of
    that name here wins; one that is nowhere is still the one-line error."""
    from pipelines.experiment import load_experiment

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.yaml") == load_config(ROOT / "configs/demo.yaml")
    assert load_experiment("configs/paper/table2.yaml").name == "table2"
    (tmp_path / "configs").mkdir()
    text = (ROOT / "configs/demo.yaml").read_text().replace("name: demo", "name: mine")
    (tmp_path / "configs" / "demo.yaml").write_text(text)
    assert load_config("configs/demo.yaml").name == "mine"
    with pytest.raises(ConfigError, match=r"config file not found: .*/configs/nope\.yaml"):
        load_config("configs/nope.yaml")
