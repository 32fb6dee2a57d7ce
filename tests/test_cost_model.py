"""The learned cost model on a committed dataset (blocked_direct measured on ResNet-50's layers):
trained on some layers, it ranks the configs of layers it never saw; peers' data counts by
similarity; too little data gives no model; the store hands it every verified measurement."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoconv import ConvSpec, get_algorithm
from autoconv.algorithms import BLOCKED_DIRECT, IM2COL_GEMM
from autoconv.device import DeviceInfo
from autoconv.store import SQLiteStore, TimedConfig
from autoconv.tuning.cost_model import (
    MIN_TRAINING_ROWS,
    PEER_WEIGHT,
    CostModel,
    candidate_pool,
    device_row,
    peer_weight,
    rank_correlation,
    training_data,
)

DATASET = Path(__file__).parent / "fixtures" / "cost_model_blocked_direct.json"
XEON = DeviceInfo("opencl", "Portable Computing Language", "intel",
                  "pthread-skylake-avx512-Intel(R) Xeon(R) Processor", "3.1+debian", "cpu", 2, 2097152, 4096,
                  (4096, 4096, 4096))


def load_dataset() -> list[TimedConfig]:
    doc = json.loads(DATASET.read_text())
    assert doc["device"]["fingerprint"] == XEON.fingerprint()
    space = get_algorithm(doc["algorithm"]).space
    specs = [ConvSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()}) for layer in doc["layers"]]
    return [TimedConfig(XEON.fingerprint(), specs[index], doc["algorithm"], "t", space.validate(params), ms)
            for index, params, ms in doc["measurements"]]


def convolution_of(row: TimedConfig) -> str:
    """A layer in any layout and epilogue: held out together."""
    return row.spec.convolution().replace(layout="NCHW").key()


@pytest.fixture(scope="module")
def dataset():
    return load_dataset()


def split(rows, every=4, offset=0):
    keys = sorted({convolution_of(r) for r in rows})
    held = set(keys[offset::every])
    return [r for r in rows if convolution_of(r) not in held], [r for r in rows if convolution_of(r) in held]


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_it_ranks_the_configs_of_layers_it_never_saw(dataset, offset):
    train, held_out = split(dataset, offset=offset)
    model = CostModel.fit(train, {}, XEON)
    assert model.knows(BLOCKED_DIRECT) and not model.knows(IM2COL_GEMM)
    correlations = rank_correlation(model, held_out)
    assert len(correlations) >= 8
    # Measured on this data: 0.93-0.96 per fold (a random ranking would average 0).
    assert np.mean(list(correlations.values())) > 0.7
    # The predicted best of each held-out layer is among its measured fastest third.
    for key in {r.spec.key() for r in held_out}:
        rows = {r.params: r.median_ms for r in held_out if r.spec.key() == key}
        if len(rows) < 8:
            continue
        spec = next(r.spec for r in held_out if r.spec.key() == key)
        top = model.rank(spec, BLOCKED_DIRECT, list(rows))[0]
        assert sorted(rows.values()).index(rows[top]) < len(rows) / 3 + 1, key


def test_predicted_times_are_on_the_measured_scale(dataset):
    train, held_out = split(dataset)
    model = CostModel.fit(train, {}, XEON)
    predicted = model.predict_ms(held_out[0].spec, BLOCKED_DIRECT, [r.params for r in held_out[:1]])
    assert 0.25 < predicted[0] / held_out[0].median_ms < 4


def test_too_little_data_gives_no_model_and_no_proposals(dataset):
    model = CostModel.fit(dataset[:MIN_TRAINING_ROWS - 1], {}, XEON)
    assert not model.knows(BLOCKED_DIRECT)
    assert model.propose(dataset[0].spec, XEON, BLOCKED_DIRECT, 4) == []


def test_proposals_are_valid_distinct_canonical_and_exclude_what_is_known(dataset):
    model = CostModel.fit(dataset, {}, XEON)
    spec = dataset[0].spec
    space = get_algorithm(BLOCKED_DIRECT).space
    default = space.canonical(get_algorithm(BLOCKED_DIRECT).heuristic(spec, XEON))
    first = model.propose(spec, XEON, BLOCKED_DIRECT, 6)
    assert len(first) == len(set(first)) == 6
    assert all(p == space.canonical(p) and not p.violations(XEON.limits(), spec) for p in first)
    again = model.propose(spec, XEON, BLOCKED_DIRECT, 6, exclude=[default, first[0]])
    assert default not in again and first[0] not in again
    pool = candidate_pool(spec, XEON, BLOCKED_DIRECT, size=50)
    assert len(pool) == len(set(pool)) == 50
    # Ranked: the proposals' predicted times never decrease.
    predicted = model.predict_ms(spec, BLOCKED_DIRECT, first)
    assert list(predicted) == sorted(predicted)


def test_peers_count_less_the_less_alike_they_are():
    mine = device_row(XEON)
    bigger = device_row(DeviceInfo("opencl", "Portable Computing Language", "intel", "another Xeon", "3.1", "cpu", 8,
                                   2097152, 4096, (4096, 4096, 4096)))
    gpu = device_row(DeviceInfo("opencl", "NVIDIA CUDA", "nvidia", "H100", "550", "gpu", 132, 49152, 1024,
                                (1024, 1024, 64)))
    assert peer_weight(mine, mine) == 1.0
    assert peer_weight(mine, bigger) == pytest.approx(PEER_WEIGHT * 0.25)  # 2 -> 8 compute units: two doublings
    assert peer_weight(mine, gpu) < peer_weight(mine, bigger) / 10


def test_a_new_device_starts_from_its_peers_data(dataset):
    """Every row measured on a peer: the model still ranks for the new device."""
    peer = DeviceInfo("opencl", "Portable Computing Language", "intel", "an AVX2 Xeon", "3.1+debian", "cpu", 4, 2097152,
                      4096, (4096, 4096, 4096))
    train, held_out = split(dataset)
    devices = {XEON.fingerprint(): device_row(XEON)}
    model = CostModel.fit(train, devices, peer)
    assert model.knows(BLOCKED_DIRECT)
    assert np.mean(list(rank_correlation(model, held_out).values())) > 0.6
    # A row of a device no database describes teaches nothing (its features are unknown).
    assert not CostModel.fit(train, {}, peer).knows(BLOCKED_DIRECT)


def test_the_store_hands_over_every_verified_timed_measurement(tmp_path, dataset):
    with SQLiteStore(tmp_path / "t.db") as store:
        store.record_device(XEON)
        for row in dataset[:30]:
            store.record_layer(row.spec)
            store.record_measurement(XEON.fingerprint(), row.spec, row.algorithm, "t", row.params, "ok", row.median_ms, 1e-6)
        row = dataset[0]
        store.record_measurement(XEON.fingerprint(), row.spec, row.algorithm, "t", row.params, "compile_failed",
                                 math.inf, math.inf, "error")
        store.record_measurement(XEON.fingerprint(), row.spec, row.algorithm, "older", row.params, "ok", 1.0, 1e-6)
        measured, devices = training_data([store], "t")
        assert devices == {XEON.fingerprint(): store.device(XEON.fingerprint())}
        assert [(m.spec, m.params, m.median_ms) for m in measured] == [(r.spec, r.params, r.median_ms) for r in dataset[:30]]
        assert len(store.timed_configs()) == 31


def test_the_tuners_model_is_retrained_as_measurements_arrive(tmp_path, dataset):
    from autoconv.render import template_hash
    from autoconv.tuning.tuner import REFIT_GROWTH, CostModelTrainer

    with SQLiteStore(tmp_path / "t.db") as store:
        store.record_device(XEON)

        def measure(rows):
            for row in rows:
                store.record_layer(row.spec)
                store.record_measurement(XEON.fingerprint(), row.spec, row.algorithm, template_hash(), row.params, "ok",
                                         row.median_ms, 1e-6)

        measure(dataset[:100])
        trainer = CostModelTrainer(store, [], XEON)
        first = trainer.current()
        assert first.knows(BLOCKED_DIRECT) and first.rows[BLOCKED_DIRECT] == 100
        measure(dataset[100:100 + int(100 * REFIT_GROWTH) - 1])
        assert trainer.current() is first  # too few new rows to pay for a refit
        measure(dataset[200:210])
        second = trainer.current()
        assert second is not first and second.rows[BLOCKED_DIRECT] == 119
