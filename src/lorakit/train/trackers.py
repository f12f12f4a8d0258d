"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, MLflow and a CSV file.

Each tracker receives the same numbers as ``metrics.jsonl``, at the same steps, under these names:

=====================  ======================  =====================  =====================
``metrics.jsonl``      tracker key             ``metrics.jsonl``      tracker key
=====================  ======================  =====================  =====================
``loss``               ``train/loss``          ``eval_loss``          ``eval/loss``
``lr``                 ``train/learning_rate`` ``eval_ppl``           ``eval/perplexity``
``grad_norm``          ``train/grad_norm``     ``epoch``              ``train/epoch``
``tokens_per_s``       ``train/tokens_per_s``
=====================  ======================  =====================  =====================

Only rank 0 opens trackers. The clients are used directly rather than through ``accelerate.tracking``:
accelerate's tracker classes log through its own process state (``PartialState``), which a lorakit run
does not create (it has its own :mod:`lorakit.train.distributed`), and its MLflow tracker has no way
to choose the tracking URI without changing the process-wide MLflow default.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing ``<output_dir>/tensorboard/``;
* ``wandb``: ``wandb.init(dir=output_dir, mode=$WANDB_MODE or "offline")``: offline unless asked,
  so no data leaves the machine by default (``wandb sync <output_dir>/wandb/offline-run-*`` uploads);
* ``mlflow``: an ``MlflowClient`` on ``$MLFLOW_TRACKING_URI``, by default
  ``sqlite:///<output_dir>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///...`` shows it);
* ``csv``: ``<output_dir>/metrics.csv``, one row per logged step, written with :mod:`csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # config.py imports this module to validate report_to
    from lorakit.train.config import TrainConfig

# name -> the pip package of its client (csv needs none)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")
KEYS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss",
    "eval_ppl": "eval/perplexity",
}


def missing_modules(name: str) -> list[str]:
    """Modules tracker ``name`` needs that are not installed.

    MLflow's default store (sqlite under output_dir) also needs SQLAlchemy and alembic, which the full
    ``mlflow`` package brings and ``mlflow-skinny`` does not.
    """
    modules = [name] if name in PACKAGES else []
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        modules += ["sqlalchemy", "alembic"]
    return [module for module in modules if importlib.util.find_spec(module) is None]


def is_available(name: str) -> bool:
    """Whether tracker ``name`` can start here (csv always can)."""
    return not missing_modules(name)


def resolve_report_to(names: Iterable[str] | None) -> list[str]:
    """The trackers to open for ``report_to``: ``none``/empty -> [], ``all`` -> every available one.

    Raises ValueError for an unknown name, ``none`` combined with others, or a tracker whose package is
    not installed (the message names the pip package).
    """
    wanted = [str(n).strip().lower() for n in names or [] if str(n).strip()]
    if not wanted or wanted == ["none"]:
        return []
    if "none" in wanted:
        raise ValueError("'report_to' cannot combine 'none' with trackers.")
    resolved: list[str] = []
    for name in wanted:
        if name == "all":
            resolved += [t for t in TRACKERS if is_available(t)]
        elif name not in TRACKERS:
            raise ValueError(f"'report_to' knows {', '.join(TRACKERS)}, none and all; got '{name}'.")
        elif name in missing_modules(name):
            raise ValueError(
                f"report_to '{name}' needs the package '{PACKAGES[name]}': pip install {PACKAGES[name]}"
            )
        elif missing_modules(name):
            raise ValueError(
                f"report_to 'mlflow' keeps runs in sqlite:///<output_dir>/mlflow.db, which needs "
                f"{' and '.join(missing_modules(name))} (mlflow-skinny lacks them): pip install mlflow, "
                "or set MLFLOW_TRACKING_URI to your tracking server."
            )
        else:
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's tracked numbers under tracker keys; non-finite values are left out."""
    return {
        KEYS[key]: float(value)
        for key, value in record.items()
        if key in KEYS and isinstance(value, int | float) and math.isfinite(value)
    }


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config values every client accepts as hyper-parameters: scalars kept, the rest as strings."""
    return {
        key: value if isinstance(value, bool | int | float | str) else ("" if value is None else str(value))
        for key, value in config.items()
    }


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class CsvTracker:
    """``metrics.csv``: a header ``step,<tracker keys>``, then one row per log call (empty = not logged)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.columns = ["step", *KEYS.values()]
        kept = self._rows_up_to(resume_step) if resume_step is not None else []
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)

    def _rows_up_to(self, step: int) -> list[dict[str, str]]:
        """Rows of an interrupted run up to its checkpoint; later ones are logged again after resume."""
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8", newline="") as handle:
            return [
                row
                for row in csv.DictReader(handle)
                if row.get("step", "").isdigit() and int(row["step"]) <= step
            ]

    def log(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({"step": step, **values})

    def finish(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker:
    """Scalars in ``<output_dir>/tensorboard``; on resume, events after the checkpoint are purged."""

    def __init__(self, logdir: Path, config: dict[str, Any], resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge)
        if resume_step is None:
            # Indented 4 spaces: TensorBoard renders text as markdown, and this keeps it a code block.
            text = "\n".join(f"    {key}: {value}" for key, value in config.items())
            self.writer.add_text("config", text, global_step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<output_dir>/wandb``; offline unless ``WANDB_MODE`` says otherwise."""

    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorakit"),
            name=run_name,
            dir=str(output_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            settings=wandb.Settings(console="off"),  # our log lines stay ours; metrics go through log()
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run through an explicit ``MlflowClient`` (no process-wide MLflow state is changed)."""

    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (
                None
                if "MLFLOW_TRACKING_URI" in os.environ
                else (output_dir.resolve() / "mlartifacts").as_uri()
            )
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in config.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Trackers:
    """The open trackers of a run; :meth:`log_record` takes metrics.jsonl records."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or []

    def log_record(self, record: dict[str, Any]) -> None:
        values = tracker_values(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, int(record["step"]))

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish(failed)


def open_trackers(config: TrainConfig, *, enabled: bool = True, resume_step: int | None = None) -> Trackers:
    """Start the trackers of ``config.report_to`` in ``config.output_dir`` (none when ``enabled`` is False).

    ``resume_step``: the step of the checkpoint a resumed run continues from; the CSV file and TensorBoard
    drop what an interrupted run logged after it, so each step appears once (W&B and MLflow start a new run).
    """
    if not enabled:
        return Trackers()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    values, run_name = flat_config(dataclasses.asdict(config)), output_dir.resolve().name
    trackers: list[Tracker] = []
    try:
        for name in resolve_report_to(config.report_to):
            if name == "csv":
                trackers.append(CsvTracker(output_dir / "metrics.csv", resume_step))
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(output_dir / "tensorboard", values, resume_step))
            elif name == "wandb":
                trackers.append(WandbTracker(output_dir, values, run_name))
            else:
                trackers.append(MlflowTracker(output_dir, values, run_name))
    except BaseException:
        Trackers(trackers).close(failed=True)
        raise
    return Trackers(trackers)
