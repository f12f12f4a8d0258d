"""Early stopping on the held-out loss and the best adapter in best/ (kept, and written as the final one)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lorakit.train.config import ConfigError, load_config
from lorakit.train.early_stopping import BestAdapter, EarlyStopping
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics

from .helpers import adapter_tensors, qa_records, tiny_run_flags, write_jsonl


# ------------------------------------------------------------------------------------------------ rule
def test_patience_counts_evaluations_without_improvement() -> None:
    stopping = EarlyStopping(patience=2)
    outcomes = [stopping.update(step, loss) for step, loss in enumerate([3.0, 2.5, 2.6, 2.4, 2.45], start=1)]
    assert outcomes == [True, True, False, True, False]
    assert (stopping.best_step, stopping.best_loss, stopping.should_stop) == (4, 2.4, False)
    stopping.update(6, 2.4)  # equal is no improvement
    assert stopping.should_stop and stopping.evals_without_improvement == 2


def test_threshold_and_non_finite_losses() -> None:
    stopping = EarlyStopping(patience=3, threshold=0.1)
    assert not stopping.update(1, math.nan) and stopping.best_step is None  # NaN never becomes the best
    assert stopping.update(2, 2.0)
    assert not stopping.update(3, 1.95)  # better, but by less than the threshold
    assert stopping.update(4, 1.85) and stopping.evals_without_improvement == 0
    assert EarlyStopping(patience=None).should_stop is False


def test_off_by_default_and_step_zero_is_only_the_baseline(tmp_path) -> None:
    assert not BestAdapter(tmp_path).enabled
    best = BestAdapter(tmp_path, patience=1)
    assert not best.observe(0, 1.0, model=None)  # the untrained adapter is never the best one
    assert best.stopping.best_step is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"early_stopping_patience": "0"}, "'early_stopping_patience' must be >= 1"),
        ({"early_stopping_patience": "2", "eval_steps": "0"}, "needs eval_steps > 0"),
        ({"early_stopping_threshold": "-0.1"}, "'early_stopping_threshold' must be >= 0"),
    ],
)
def test_bad_settings_are_config_errors(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)


def test_needs_held_out_data(tiny_run_inputs, tmp_path) -> None:
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "run", eval_dataset="none", eval_split="0")
    with pytest.raises(ConfigError, match="need held-out data"):
        train(load_config(None, flags | {"load_best_model_at_end": "true"}))


# ------------------------------------------------------------------------------------------- real runs
PATIENCE = 3


def _flags(inputs, output_dir, **overrides):
    """Constant lr without warm-up, so a shorter run follows the same trajectory step for step."""
    settings = dict(
        eval_dataset=str(inputs["upper_eval"]),
        learning_rate=3e-2,
        lr_scheduler="constant",
        warmup_steps=0,
        max_steps=20,
        eval_steps=1,
        save_steps=1,
        save_total_limit=3,
        sample_max_new_tokens=0,
    )
    return tiny_run_flags(inputs, output_dir, **(settings | overrides))


@pytest.fixture(scope="module")
def inputs(tiny_run_inputs, tmp_path_factory):
    """Held-out answers in capitals: training on lower-case answers soon makes them less likely."""
    upper = [dict(r, output=r["output"].upper()) for r in qa_records(6, offset=100)]
    return tiny_run_inputs | {"upper_eval": write_jsonl(tmp_path_factory.mktemp("es") / "upper.jsonl", upper)}


@pytest.fixture(scope="module")
def stopped_run(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("es") / "run"
    result = train(load_config(None, _flags(inputs, output_dir, early_stopping_patience=PATIENCE)))
    return output_dir, result


def test_stops_after_patience_evaluations_without_improvement(stopped_run) -> None:
    output_dir, result = stopped_run
    evals = [
        (r["step"], r["eval_loss"]) for r in read_metrics(output_dir / "metrics.jsonl") if "eval_loss" in r
    ]
    trained = evals[1:]  # step 0 is the baseline
    best_step, best_loss = min(trained, key=lambda pair: pair[1])
    summary = result.summary
    assert summary["stopped_early"] and summary["steps"] == best_step + PATIENCE < 20
    assert [step for step, _ in evals] == list(range(summary["steps"] + 1))  # no duplicate final eval
    assert (summary["best_step"], summary["best_eval_loss"]) == (best_step, best_loss)
    assert json.loads((output_dir / "best" / "best.json").read_text()) == {
        "step": best_step,
        "eval_loss": best_loss,
    }
    assert summary["eval_loss_end"] == evals[-1][1] and summary["eval_loss_end"] > best_loss
    saved = json.loads((output_dir / "summary.json").read_text())
    assert saved["best_step"] == best_step and saved["stopped_early"] is True


def test_best_adapter_is_kept_and_written_bit_for_bit(stopped_run, inputs, tmp_path) -> None:
    output_dir, result = stopped_run
    best_step = result.summary["best_step"]
    kept = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert f"step-{best_step:08d}" not in kept and len(kept) == 3  # pruned by save_total_limit, best/ stays
    final, best = adapter_tensors(result.adapter_dir), adapter_tensors(output_dir / "best")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    # The same run stopped by max_steps at the best step, with no early stopping at all.
    reference = train(load_config(None, _flags(inputs, tmp_path / "ref", max_steps=best_step)))
    expected = adapter_tensors(reference.adapter_dir)
    assert all(torch.equal(final[k], expected[k]) for k in final)
    last = adapter_tensors(output_dir / "checkpoints" / kept[-1] / "adapter")  # the last state is kept too
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_resume_replays_the_counters_and_stops_at_the_same_step(stopped_run, inputs, tmp_path) -> None:
    """Resume one evaluation after the best: a reset counter would stop one step later."""
    output_dir, result = stopped_run
    best_step, stop_step = result.summary["best_step"], result.summary["steps"]
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    for later in range(best_step + 2, stop_step + 1):
        shutil.rmtree(copy / "checkpoints" / f"step-{later:08d}")
    shutil.rmtree(copy / "adapter")
    resumed = train(load_config(None, _flags(inputs, copy, resume="true", early_stopping_patience=PATIENCE)))
    assert resumed.summary["steps"] == stop_step and resumed.summary["best_step"] == best_step
    final, expected = adapter_tensors(resumed.adapter_dir), adapter_tensors(result.adapter_dir)
    assert all(torch.equal(final[k], expected[k]) for k in final)
    losses = [
        [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(folder / "metrics.jsonl")]
        for folder in (copy, output_dir)
    ]
    assert losses[0] == losses[1]


def test_load_best_model_at_end_alone_trains_to_the_end(stopped_run, inputs, tmp_path) -> None:
    """No stopping, but the final adapter is the best one (the stopped run's, when at the same step)."""
    output_dir, stopped = stopped_run
    flags = _flags(inputs, tmp_path / "run", max_steps=8, save_steps=0, load_best_model_at_end="true")
    result = train(load_config(None, flags))
    evals = [
        (r["eval_loss"], r["step"])
        for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
        if "eval_loss" in r
    ]
    assert result.summary["steps"] == 8 and result.summary["stopped_early"] is False
    assert (result.summary["best_eval_loss"], result.summary["best_step"]) == min(evals[1:])
    final = adapter_tensors(result.adapter_dir)
    for best_dir in [tmp_path / "run" / "best"] + [output_dir / "best"] * (
        result.summary["best_step"] == stopped.summary["best_step"]
    ):
        best = adapter_tensors(best_dir)
        assert all(torch.equal(final[k], best[k]) for k in final)


# ------------------------------------------------------------------------------ best/ after the resume point
@pytest.fixture(scope="module")
def kept_run(inputs, tmp_path_factory):
    """Every step evaluated and checkpointed, the best adapter delivered at the end."""
    output_dir = tmp_path_factory.mktemp("es") / "kept"
    flags = _flags(inputs, output_dir, max_steps=6, save_total_limit=10, load_best_model_at_end="true")
    return output_dir, train(load_config(None, flags))


def _resume_after_a_stale_best(kept_run, inputs, copy, *, keep_best_checkpoint: bool):
    """Resume one step after the best from a copy whose best/ was written beyond the resume point.

    The abandoned continuation's best/ is simulated by the last state (step 6), recorded with a loss below
    every real one: kept, it would be the delivered adapter, since the resumed run never improves on it.
    """
    output_dir, result = kept_run
    best_step, last = result.summary["best_step"], result.summary["steps"]
    resume_step = best_step + 1
    assert resume_step < last
    shutil.copytree(output_dir, copy)
    for later in range(resume_step + 1, last + 1):
        shutil.rmtree(copy / "checkpoints" / f"step-{later:08d}")
    if not keep_best_checkpoint:  # pruned, as by save_total_limit
        shutil.rmtree(copy / "checkpoints" / f"step-{best_step:08d}")
    shutil.rmtree(copy / "adapter")
    shutil.rmtree(copy / "best")
    shutil.copytree(output_dir / "checkpoints" / f"step-{last:08d}" / "adapter", copy / "best")
    shutil.copy(output_dir / "checkpoints" / f"step-{last:08d}" / "trainable.safetensors", copy / "best")
    (copy / "best" / "best.json").write_text(json.dumps({"step": last, "eval_loss": 0.5}))
    flags = _flags(inputs, copy, max_steps=6, save_total_limit=10, load_best_model_at_end="true")
    return train(load_config(None, flags | {"resume": "true"}))


def test_resume_replaces_a_best_written_after_the_checkpoint(kept_run, inputs, tmp_path, capsys) -> None:
    _, result = kept_run
    resumed = _resume_after_a_stale_best(kept_run, inputs, tmp_path / "run", keep_best_checkpoint=True)
    best_step = result.summary["best_step"]
    for key in ("best_step", "best_eval_loss"):
        assert resumed.summary[key] == result.summary[key]
    final, expected = adapter_tensors(resumed.adapter_dir), adapter_tensors(result.adapter_dir)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    best = adapter_tensors(tmp_path / "run" / "best")
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == best_step
    source = tmp_path / "run" / "checkpoints" / f"step-{best_step:08d}"
    assert f"best rebuilt from {source}" in capsys.readouterr().out


def test_resume_drops_a_stale_best_whose_replacement_is_pruned(kept_run, inputs, tmp_path, capsys) -> None:
    _, result = kept_run
    resumed = _resume_after_a_stale_best(kept_run, inputs, tmp_path / "run", keep_best_checkpoint=False)
    assert resumed.summary["best_step"] == result.summary["best_step"]  # never the abandoned step 6
    assert not (tmp_path / "run" / "best").exists()  # no improvement after the resume point
    final = adapter_tensors(resumed.adapter_dir)
    last = adapter_tensors(tmp_path / "run" / "checkpoints" / f"step-{6:08d}" / "adapter")
    assert all(torch.equal(final[k], last[k]) for k in final)  # the last state, and it says so
    out = capsys.readouterr().out
    assert "after the resume point); the checkpoint of the best step so far" in out
    assert f"note: the best adapter (step {result.summary['best_step']}) is no longer on disk" in out
