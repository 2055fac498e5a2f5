"""The job spec: defaults, target/tau conversion, field-naming errors, schema, fingerprint."""

from __future__ import annotations

import math

import pytest

from app_common.events import EpochEnded, MegabatchEnded, MegabatchMetrics, event_from_dict, event_to_dict
from app_common.spec import JobSpec, SparsitySpec, SpecError, TrainingSpec, sparsity_from_tau, tau_from_sparsity


def test_target_sparsity_and_tau_describe_the_same_density():
    assert tau_from_sparsity(0.634) == pytest.approx(4.5044, abs=1e-4)
    assert sparsity_from_tau(4.5) == pytest.approx(1 - 0.8**4.5)
    by_target = SparsitySpec(target=0.634)
    by_tau = SparsitySpec(tau=by_target.resolved_tau)
    assert by_target.target_density == pytest.approx(0.366)
    assert by_tau.target_density == pytest.approx(0.366)
    # Neither given: the paper's tau = 4.5.
    assert SparsitySpec().resolved_tau == 4.5
    assert SparsitySpec(target=0.0).resolved_tau == 0.0


def test_default_milestones_are_40_and_80_percent_of_the_epochs():
    assert TrainingSpec(epochs=50).resolved_milestones == [20, 40]
    assert TrainingSpec(epochs=3).resolved_milestones == [1, 2]
    assert TrainingSpec(epochs=10, milestones=[3]).resolved_milestones == [3]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"sparsity": {"target": 0.5, "tau": 2.0}}, "sparsity"),
        ({"sparsity": {"target": 1.0}}, "sparsity.target"),
        ({"dataset": {"name": "cifar10"}}, "dataset"),
        ({"training": {"milestones": [5, 3]}}, "training"),
        ({"training": {"epochs": 2, "warmup_epochs": 2}}, "training"),
        ({"stream": {"val_fraction": 1.0}}, "stream.val_fraction"),
        ({"architecture": "resnet9000"}, "architecture"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_errors_name_the_field(body, field):
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict(body)
    assert [e.field for e in exc.value.errors] == [field]
    assert exc.value.errors[0].reason


def test_the_schema_states_target_xor_tau():
    import jsonschema_rs

    schema = JobSpec.model_json_schema()
    assert schema["$defs"]["SparsitySpec"]["not"]["required"] == ["target", "tau"]
    # A stored spec carries both keys, one null: valid; two numbers are not.
    validator = jsonschema_rs.validator_for(schema)
    assert validator.is_valid(JobSpec.from_dict({"sparsity": {"target": 0.5}}).to_dict())
    assert not validator.is_valid({"sparsity": {"target": 0.5, "tau": 2.0}})


@pytest.mark.parametrize("body", [{"training": {"epochs": "3"}}, {"training": {"epochs": True}},
                                  {"training": {"seed": False}}, {"training": {"lr": "0.1"}}])
def test_spec_types_are_strict(body):
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict(body)
    assert exc.value.errors[0].field.startswith("training.")


def test_fingerprint_is_stable_and_sensitive():
    a = JobSpec.from_dict({"training": {"seed": 1}})
    assert a.fingerprint() == JobSpec.from_dict({"training": {"seed": 1}}).fingerprint()
    assert a.fingerprint() != JobSpec.from_dict({"training": {"seed": 2}}).fingerprint()
    assert JobSpec.from_dict(a.to_dict()) == a


def test_events_round_trip_through_dicts():
    epoch = EpochEnded(megabatch=1, epoch=2, epochs=3, lr=0.1, train_loss=0.5, train_accuracy=0.9, val_accuracy=0.8)
    assert event_from_dict(event_to_dict(epoch)) == epoch
    assert event_to_dict(epoch)["type"] == "epoch_ended"
    metrics = MegabatchMetrics(
        index=1, train_samples=90, val_samples=10, target_density=0.8, density=0.8, layer_density={"w": 0.8},
        nonzero_params=800, prunable_params=1000, test_accuracy=0.9, test_errors=10, test_total=100,
        val_accuracy=0.85, train_accuracy=0.95, generalization_gap=10.0, generalization_gap_last=11.0,
        selected_epoch=2, train_loss=0.2, wall_time_s=1.0, train_time_s=0.8, images_per_s=100.0,
        epochs=[{"epoch": 1}, {"epoch": 2}], train_accuracy_clean=0.93, generalization_gap_clean=8.0,
    )
    ended = MegabatchEnded(megabatch=1, megabatches=4, metrics=metrics)
    wire = event_to_dict(ended)
    # On the wire the metrics are a flat dict (the JSON of result.json's megabatch entries).
    assert wire["metrics"] == metrics.to_dict() and wire["metrics"]["index"] == 1
    back = event_from_dict({**wire, "extra": "ignored", "metrics": {**wire["metrics"], "newer_key": 1}})
    assert back == ended and isinstance(back, MegabatchEnded) and isinstance(back.metrics, MegabatchMetrics)
    with pytest.raises(ValueError, match="unknown event type"):
        event_from_dict({"type": "nonsense"})
    assert math.isclose(epoch.lr, 0.1)


def test_reference_options_default_to_todays_behaviour():
    spec = JobSpec()
    assert spec.sparsity.score_batch_size is None and spec.sparsity.score_source == "current"
    assert spec.training.momentum_carry is False and spec.training.decay_norms_and_biases is False
    reference = JobSpec.from_dict({
        "architecture": "resnet20_a",
        "sparsity": {"score_source": "first", "score_batch_size": 100},
        "training": {"momentum_carry": True, "decay_norms_and_biases": True, "precision": "fp32"},
    })
    assert reference.fingerprint() != spec.fingerprint()
    with pytest.raises(SpecError, match="sparsity.score_batch_size"):
        JobSpec.from_dict({"sparsity": {"score_batch_size": 0}})
    assert "fp32" in (TrainingSpec.model_fields["precision"].description or "")
