"""What a Ray job runs is what the flow asked for: the ``fcn ingest`` arguments that
``fcn run`` submits with RAY_ADDRESS=http://head:8265 give back the flow's ingest, and a
generated synthetic root is not silently reused with other parameters."""

import dataclasses

import pytest

from flows.cli import build_parser
from flows.cli.data import ingest_args, ingest_config
from pipelines.errors import UsageError
from pipelines.ingest import SYNTHETIC_PARAMS, IngestConfig, list_sources
from pipelines.jobs import new_lines

# Fields a flow sets that `fcn ingest` has no option for: they keep their defaults in a job.
NOT_ON_THE_CLI = {"batch_size", "synthetic_counts"}


def _round_trip(cfg: IngestConfig) -> IngestConfig:
    return ingest_config(build_parser().parse_args(ingest_args(cfg)))


@pytest.mark.parametrize("cfg", [
    IngestConfig(dataset="synthetic", root="s3://b/raw/synthetic", out="s3://b/shards",
                 synthetic_size=(96, 80), shard_rows=7, engine="ray"),
    IngestConfig(dataset="pascal", root="s3://b/VOC2011", out="/data/shards",
                 sbd_root="s3://b/SBD", protocol="trainaug", allow_missing=True,
                 splits=("train", "val"), engine="local"),
    IngestConfig(dataset="nyud", root="/data/nyud", out="s3://b/shards", compute_hha=True,
                 split_file="s3://b/lists/test.txt"),
    IngestConfig(dataset="context", root="/voc", context_root="/ctx", out="/o"),
], ids=["synthetic", "pascal", "nyud", "context"])
def test_a_jobs_ingest_arguments_give_back_the_flows_ingest(cfg):
    assert _round_trip(cfg) == cfg


def test_every_ingest_field_is_carried_or_named_as_not_an_option():
    """A field added to IngestConfig fails here until the job's arguments carry it (the
    synthetic image size was dropped: a cluster run trained on 64 px where the same run on
    one machine had 128 px, mean IU 0.557 against 0.744)."""
    defaults = IngestConfig(dataset="synthetic", root="/r", out="/o")
    changed = IngestConfig(dataset="synthetic", root="/r2", out="/o2", splits=("val",),
                           split_file="/l.txt", shard_rows=3, synthetic_size=(40, 48),
                           sbd_root="/s", context_root="/c", protocol="trainaug",
                           allow_missing=True, compute_hha=True, engine="local")
    back = _round_trip(changed)
    for f in dataclasses.fields(IngestConfig):
        if f.name in NOT_ON_THE_CLI:
            continue
        assert f.name == "dataset" or getattr(changed, f.name) != getattr(defaults, f.name), \
            f"{f.name}: give it a non-default value above"
        assert getattr(back, f.name) == getattr(changed, f.name), f.name


def test_fcn_ingest_generates_synthetic_data_at_the_size_fcn_run_and_the_demo_use():
    args = build_parser().parse_args(["ingest", "synthetic", "--root", "/r", "--out", "/o"])
    assert ingest_config(args).synthetic_size == (128, 128)
    args = build_parser().parse_args(["ingest", "synthetic", "--root", "/r", "--out", "/o",
                                      "--synthetic-size", "64"])
    assert ingest_config(args).synthetic_size == (64, 64)


def test_fcn_run_passes_the_synthetic_size_through_the_flow_to_ingest():
    import inspect

    from flows.cli.pipeline import _pipeline_params
    from flows.pipeline import fcn_pipeline, ingest_flow

    run = ["run", "--config", "configs/demo.yaml", "--dataset", "synthetic", "--root", "/r"]
    params = _pipeline_params(build_parser().parse_args([*run, "--synthetic-size", "64"]))
    assert params["synthetic_size"] == 64
    assert "synthetic_size" not in _pipeline_params(build_parser().parse_args(run))
    for flow in (fcn_pipeline, ingest_flow):
        assert inspect.signature(flow.fn).parameters["synthetic_size"].default == 128


def test_a_synthetic_root_generated_with_other_parameters_is_refused(tmp_path):
    root = tmp_path / "raw"
    small = IngestConfig(dataset="synthetic", root=root, out=tmp_path / "o",
                         synthetic_size=(32, 32), synthetic_counts=(2, 1))
    assert len(list_sources(small, log=lambda m: None).records) == 3
    assert (root / SYNTHETIC_PARAMS).exists()
    assert len(list_sources(small, log=lambda m: None).records) == 3  # same: reused

    bigger = dataclasses.replace(small, synthetic_size=(64, 64))
    with pytest.raises(UsageError) as e:
        list_sources(bigger, log=lambda m: None)
    assert str(e.value) == (
        f"{root} holds a synthetic set generated with 32x32 images, 2 train + 1 val; this "
        "asks for 64x64 images, 2 train + 1 val: give another --root, or delete it to have "
        "it generated again")

    (root / SYNTHETIC_PARAMS).unlink()  # a root someone made: read as it is
    assert len(list_sources(bigger, log=lambda m: None).records) == 3


LOG = ("2026-12-07 02:01:36,879\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
       "Running entrypoint for job raysubmit_V1: fcn evaluate --model m\n"
       "evaluating m on d [val]\n"
       "\n"
       "pixel_acc 0.9259  mean_a")


def test_a_jobs_log_comes_in_whole_lines_without_the_job_managers_notes(monkeypatch):
    monkeypatch.delenv("FCN_VERBOSE", raising=False)
    lines, shown = new_lines(LOG, 0, final=False)
    assert lines == ["evaluating m on d [val]"]  # the last line is still being written
    assert new_lines(LOG, shown, final=False) == ([], shown)
    more = LOG + "cc 0.6138\n"
    lines, shown = new_lines(more, shown, final=False)
    assert lines == ["pixel_acc 0.9259  mean_acc 0.6138"] and shown == len(more)
    assert new_lines(LOG, len(LOG) - 6, final=True) == (["mean_a"], len(LOG))

    monkeypatch.setenv("FCN_VERBOSE", "1")  # fcn run -v: Ray's own lines too
    assert len(new_lines(LOG, 0, final=False)[0]) == 3
