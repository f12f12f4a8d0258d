"""report_to: trackers get metrics.jsonl's numbers at its steps; missing clients are config-time errors."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from lorakit.train import trackers
from lorakit.train.config import ConfigError, load_config
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics
from lorakit.train.trackers import CsvTracker, Trackers, open_trackers, resolve_report_to, tracker_values

from .helpers import tiny_run_flags

TRAIN_KEYS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm"}
TRAIN_KEYS |= {"tokens_per_s": "train/tokens_per_s"}
EVAL_KEYS = {"eval_loss": "eval/loss", "eval_ppl": "eval/perplexity"}


def _expected(records: list[dict], keys: dict[str, str]) -> dict[str, list[tuple[int, float]]]:
    """Tracker key -> [(step, value)] as metrics.jsonl has them."""
    return {
        target: [(r["step"], r[source]) for r in records if source in r] for source, target in keys.items()
    }


# ---------------------------------------------------------------------------------------------- config
def test_report_to_names_resolve() -> None:
    assert resolve_report_to(None) == [] and resolve_report_to(["none"]) == [] and resolve_report_to([]) == []
    assert resolve_report_to(["csv", "CSV "]) == ["csv"]
    everything = resolve_report_to(["all"])
    assert "csv" in everything and all(trackers.is_available(name) for name in everything)
    with pytest.raises(ValueError, match="knows tensorboard, wandb, mlflow, csv"):
        resolve_report_to(["tensorbord"])
    with pytest.raises(ValueError, match="cannot combine 'none'"):
        resolve_report_to(["none", "csv"])


def test_report_to_takes_a_comma_string_or_a_list() -> None:
    assert load_config(None, {"report_to": "csv"}).report_to == ["csv"]
    assert load_config(None, {"report_to": "none,"}).report_to == ["none"]  # stored as given
    assert load_config(None, {"report_to": ["csv", "csv"]}).report_to == ["csv", "csv"]
    # A flag value "csv,TensorBoard" given to a list option arrives as one item.
    assert load_config(None, {"report_to": ["csv,TensorBoard"]}).report_to == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match="cannot combine 'none'"):
        load_config(None, {"report_to": "csv,none"})


@pytest.mark.parametrize(("name", "package"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_client_is_a_config_error_naming_the_pip_package(monkeypatch, name, package) -> None:
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda module: None if module == package else real(module)
    )
    with pytest.raises(ConfigError, match=f"report_to '{name}' needs .*pip install {package}"):
        load_config(None, {"report_to": f"csv,{name}"})
    assert name not in resolve_report_to(["all"])  # 'all' means every installed one


def test_mlflow_default_store_needs_sqlalchemy(monkeypatch) -> None:
    """The default store is sqlite under output_dir; mlflow-skinny alone cannot open it."""
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda m: None if m == "sqlalchemy" else (real(m) or object())
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="sqlalchemy"):
        resolve_report_to(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_report_to(["mlflow"]) == ["mlflow"]


# ------------------------------------------------------------------------------------------------ units
def test_values_use_tracker_names_and_skip_non_finite() -> None:
    record = {"step": 3, "loss": 1.5, "lr": 1e-3, "tokens": 40, "eval_ppl": math.inf, "elapsed_s": 2.0}
    assert tracker_values(record) == {"train/loss": 1.5, "train/learning_rate": 1e-3}


def test_csv_resume_keeps_rows_up_to_the_checkpoint(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    first = CsvTracker(path)
    for step in range(1, 6):
        first.log({"train/loss": float(step)}, step)
    CsvTracker(path, resume_step=3).log({"train/loss": 40.0}, 4)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        ("1", "1.0"),
        ("2", "2.0"),
        ("3", "3.0"),
        ("4", "40.0"),
    ]


def test_other_ranks_open_nothing(tmp_path) -> None:
    config = load_config(None, {"report_to": "csv", "output_dir": str(tmp_path / "run")})
    opened = open_trackers(config, enabled=False)
    assert opened.trackers == [] and not (tmp_path / "run").exists()
    opened.log_record({"step": 1, "loss": 1.0})  # a no-op


def test_a_failing_start_closes_the_trackers_already_open(tmp_path, monkeypatch) -> None:
    closed = []
    monkeypatch.setattr(CsvTracker, "finish", lambda self, failed=False: closed.append(failed))

    def broken(*args, **kwargs):
        raise RuntimeError("no writer")

    monkeypatch.setattr(trackers, "TensorBoardTracker", broken)
    monkeypatch.setattr(trackers, "is_available", lambda name: True)
    config = load_config(None, {"report_to": "csv,tensorboard", "output_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="no writer"):
        open_trackers(config)
    assert closed == [True]
    Trackers().close()  # closing nothing is fine


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def tracked_run(tiny_run_inputs, tmp_path_factory):
    """One tiny run with report_to: all (every installed tracker), offline; its folder and metrics."""
    output_dir = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(name, raising=False)
        flags = tiny_run_flags(tiny_run_inputs, output_dir, report_to="all", max_steps=6, eval_steps=3)
        train(load_config(None, flags))
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    return output_dir, records, resolve_report_to(["all"])


def test_csv_rows_equal_metrics_jsonl(tracked_run) -> None:
    output_dir, records, _ = tracked_run
    with open(output_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for key, expected in _expected(records, TRAIN_KEYS | EVAL_KEYS).items():
        logged = [(int(r["step"]), float(r[key])) for r in rows if r[key]]
        assert logged == expected, key  # exact: csv writes repr(float)


def test_tensorboard_scalars_equal_metrics_jsonl(tracked_run) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, records, _ = tracked_run
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    for key, expected in _expected(records, TRAIN_KEYS | EVAL_KEYS).items():
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(s, float(np.float32(v))) for s, v in expected], key  # event files hold float32
    assert "config/text_summary" in events.Tags()["tensors"]


def _wandb_records(path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, offset, pending = path.read_bytes(), 7, b""  # file header: b":W&B", magic, version
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # block tail too short for a header: padding
            offset += 32768 - offset % 32768
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_logged_values(tracked_run) -> None:
    pytest.importorskip("wandb")
    output_dir, records, _ = tracked_run
    runs = list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # offline by default: nothing left the machine
    logged: dict[str, list[tuple[int, float]]] = {}
    for record in _wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # _step, _runtime, _timestamp: W&B's own
                    logged.setdefault(key, []).append((step, float(item.value_json)))
    assert logged == _expected(records, TRAIN_KEYS | EVAL_KEYS | {"epoch": "train/epoch"})


def test_mlflow_run_holds_the_logged_values(tracked_run) -> None:
    output_dir, records, opened = tracked_run
    if "mlflow" not in opened:
        pytest.skip("mlflow (with its sqlite store) is not installed")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["report_to"] == "['all']"
    for key, expected in _expected(records, TRAIN_KEYS | EVAL_KEYS).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == expected, key


def test_default_run_writes_no_tracker_files(tiny_run_inputs, tmp_path) -> None:
    output_dir = tmp_path / "plain"
    train(
        load_config(None, tiny_run_flags(tiny_run_inputs, output_dir, max_steps=2, sample_max_new_tokens=0))
    )
    assert not {"metrics.csv", "tensorboard", "wandb", "mlflow.db"} & set(os.listdir(output_dir))
