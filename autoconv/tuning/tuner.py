"""The autotuner: per layer, every registered algorithm that supports it, the algorithm a tuning
dimension as in cuDNN's and MIOpen's find mode.

Per layer: each supporting algorithm's default is measured first (untunable ones, such as direct
loops and the library baseline, are measured afresh by every run); then the trial budget goes,
one trial at a time in turn, to the tunable algorithms whose best is within 2x of the best so far
(re-judged after every trial), each in its own Optuna study. Every trial: constraints -> render ->
compile -> verify against the float64 reference on a NaN-poisoned output -> time. Failures are
outcomes with a status and an infinite time, never exceptions. Every measurement and every new
best goes to the store as it is made; the studies live in a journal file beside it, so a killed
run loses nothing and the next run resumes."""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from autoconv.algorithms import BASELINE, Params, get_algorithm, list_algorithms
from autoconv.backends.base import Backend, Timing
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError, KernelCompileError, KernelLaunchError, ResourceLimitError, TuningDBError
from autoconv.plan import Plan
from autoconv.render import template_hash
from autoconv.spec import ConvSpec
from autoconv.store import (
    STATUS_COMPILE_FAILED,
    STATUS_LAUNCH_FAILED,
    STATUS_OK,
    STATUS_TOO_LARGE,
    STATUS_WRONG_RESULT,
    ResultStore,
    TimedConfig,
    TunedResult,
    fastest,
)
from autoconv.tuning.build_pool import BuildPool, Warm, builder_processes, process_warm
from autoconv.tuning.study import (
    INF,
    AlgorithmStudy,
    Heartbeat,
    Proposal,
    journal_path,
    journal_storage,
    open_storage,
    without_password,
)
from autoconv.serve.lookup import DatabaseContents
from autoconv.store.base import UNSTEADY_SPREAD
from autoconv.tuning.cost_model import CostModel, training_data
from autoconv.tuning.warm_start import warm_start_configs
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

# A time is stored for an untuned config only when its spread (IQR / median) is below this: a
# measurement taken while something else loaded the cores must not decide which plan is served.
MAX_SPREAD = UNSTEADY_SPREAD
MEASURE_ROUNDS = 3
REMEASURE_SETTLE_S = 0.3  # the pause before measuring an unsteady time again
# Each timing sample lasts at least this long (back-to-back runs of a tiny kernel, averaged).
MIN_SAMPLE_MS = 1.0
# After the host BLAS is timed on a machine whose cores a CPU device shares: longer than
# OpenBLAS's idle threads spin (2^28 cycles by default, about 0.1 s), so the next device kernel
# is not timed beside them (in a one-off check, not a committed benchmark, a PoCL kernel right
# after a 2-thread OpenBLAS call took 1.18x as long).
BLAS_SETTLE_S = 0.15
# Trials go to the tunable algorithms within this factor of the best time so far.
CANDIDATE_FACTOR = 2.0
# Early stopping: an algorithm whose best improved by at most EARLY_STOP_GAIN over its last
# EARLY_STOP_TRIALS trials gets no more; a layer whose algorithms all stalled ends, and a time
# budget flows to the layers still improving. Chosen by scripts/bench_tuning.py as it was in
# November 2026 (git history; replayed on 200-trial runs: the shortest window whose worst loss
# stays within 10% of the best found; TPE's improvements on PoCL come in steps after long
# plateaus, so shorter windows stop early at 1.3-2x the best).
EARLY_STOP_TRIALS = 30
EARLY_STOP_GAIN = 0.05
# At the end of a layer, each contending algorithm's RETIME_TOP fastest configs and its default
# are timed again, RETIME_ROUNDS interleaved rounds (ABCABC...), and a candidate replaces the
# default only when faster beyond the noise (winner_beyond_noise). Contenders: within
# RETIME_FACTOR of the layer's best time.
RETIME_TOP = 2
RETIME_ROUNDS = 3
# Racing: a search candidate is first timed RACE_REPEATS times (one warm-up); it gets the full
# repeats only if its fastest sample, less the noise (its own spread, at least RACE_NOISE), could
# still beat the layer's best time. Most candidates are clearly slower after one short sample.
RACE_REPEATS = 3
RACE_NOISE = 0.10
RETIME_FACTOR = 1.25
# The cost model's predicted best configs a layer's search measures first (after the defaults).
RANKED_FIRST = 4
# The cost model is retrained once its training rows have grown by this fraction.
REFIT_GROWTH = 0.10
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_QUANTILE = 0.05


@dataclass(frozen=True)
class Outcome:
    """What measuring one config gave: status ok with a median time, or a failure with inf."""

    status: str
    median_ms: float
    rel_error: float = INF
    message: str = ""
    spread: float | None = None
    repeats: int | None = None
    raced: bool = False  # timed by the short sample only: clearly slower than the layer's best

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def steady(self) -> bool:
        return self.ok and (self.spread is None or self.spread <= MAX_SPREAD)


class Evaluator(Protocol):
    """Measures configs of one layer on one device (replaced by a fake in the tuner's tests)."""

    algorithms: tuple[str, ...]  # what it can measure

    def __call__(self, algorithm: str, params: Params, bound_ms: float | None = None) -> Outcome:
        """Verify and time a config; with `bound_ms` (the layer's best so far) a config that
        races out (raced_out) is timed by the short sample only."""
        ...


def raced_out(samples_ms: Sequence[float], spread: float, best_ms: float | None) -> bool:
    """Whether a candidate's short sample shows it cannot beat the layer's best: even its fastest
    sample, less the noise (its spread, at least RACE_NOISE), is slower than `best_ms`."""
    if best_ms is None or not math.isfinite(best_ms) or not samples_ms:
        return False
    return min(samples_ms) * (1 - max(RACE_NOISE, spread)) > best_ms


def winner_beyond_noise(samples: dict[Params, list[float]], default: Params, seed: int = 0) -> Params:
    """The default, unless a candidate is faster beyond the noise: the 5th percentile of the
    bootstrap distribution of median(default) / median(candidate), resampling each one's round
    times, is above 1. Among such candidates the fastest by median wins."""
    rng = random.Random(seed)
    base = samples.get(default) or []
    if not base:
        return default
    beating = []
    for params, times in samples.items():
        if params == default or not times:
            continue
        ratios = sorted(statistics.median(rng.choices(base, k=len(base))) / statistics.median(rng.choices(times, k=len(times)))
                        for _ in range(BOOTSTRAP_RESAMPLES))
        if ratios[int(BOOTSTRAP_QUANTILE * len(ratios))] > 1.0:
            beating.append((statistics.median(times), params.describe(), params))
    return min(beating)[2] if beating else default


def host_threads_for(backend: Backend) -> Any:
    """The BLAS thread pools while one backend is timed: one thread while a device kernel runs
    (OpenBLAS's idle threads spin for a while after a call and would take the cores a CPU device
    like PoCL runs on), every core while the host BLAS itself is timed. Every method of a study
    is timed under the same rule."""
    import os

    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=(os.cpu_count() or 1) if backend.name == "numpy" else 1, user_api="blas")


class DeviceEvaluator:
    """Measures configs on a real backend against the float64 reference; algorithms with host code
    only (the library baseline on OpenCL) run on the host."""

    def __init__(self, backend: Backend, spec: ConvSpec, *, repeats: int = 7, warmup: int = 2, seed: int = 0) -> None:
        from autoconv.backends import create_backend

        self.backend, self.spec, self.repeats, self.warmup = backend, spec, repeats, warmup
        self._host = create_backend("numpy") if backend.name != "numpy" else backend
        self.algorithms = tuple(dict.fromkeys((*backend.algorithms, *self._host.algorithms)))
        self.operands = random_operands(spec, seed)
        self.reference = reference_output(spec, self.operands)
        # A CPU device computes on the cores the host BLAS just used, and OpenBLAS's idle threads
        # spin on them for about 0.1 s after a call: the next kernel would be timed under load.
        self._shares_cores = backend is not self._host and backend.device.device_type == "cpu"

    def __call__(self, algorithm: str, params: Params, bound_ms: float | None = None) -> Outcome:
        backend = self.backend if algorithm in self.backend.algorithms else self._host
        try:
            conv = backend.prepare(self.spec, Plan(algorithm, params, "tuning"))
        except KernelCompileError as exc:
            return Outcome(STATUS_COMPILE_FAILED, INF, INF, str(exc))
        except ResourceLimitError as exc:
            return Outcome(STATUS_TOO_LARGE, INF, INF, str(exc))
        try:
            error = relative_error(conv.run(*self.operands, poison=True), self.reference)
            if not error < TOLERANCE:
                return Outcome(STATUS_WRONG_RESULT, INF, error, f"relative error {error:.2e} >= {TOLERANCE:.0e}")
            if bound_ms is not None:
                with host_threads_for(backend):
                    quick = conv.time(*self.operands, warmup=1, repeats=RACE_REPEATS, min_sample_ms=MIN_SAMPLE_MS)
                if raced_out(quick.samples_ms, quick.spread, bound_ms):
                    return Outcome(STATUS_OK, quick.median_ms, error, spread=quick.spread,
                                   repeats=len(quick.samples_ms), raced=True)
            best: Timing | None = None
            # Up to MEASURE_ROUNDS rounds until one is steady: a busy core shows as a wide spread.
            for round_index in range(MEASURE_ROUNDS):
                if round_index:
                    time.sleep(REMEASURE_SETTLE_S)  # let whatever loaded the cores pass
                with host_threads_for(backend):
                    timing = conv.time(*self.operands, warmup=self.warmup, repeats=max(self.repeats, 5),
                                       min_sample_ms=MIN_SAMPLE_MS)
                if best is None or timing.spread < best.spread:
                    best = timing
                if timing.spread <= MAX_SPREAD:
                    break
            assert best is not None  # MEASURE_ROUNDS >= 1
        except KernelLaunchError as exc:
            return Outcome(STATUS_LAUNCH_FAILED, INF, INF, str(exc))
        except ResourceLimitError as exc:
            return Outcome(STATUS_TOO_LARGE, INF, INF, str(exc))
        finally:
            if backend is self._host and self._shares_cores:
                time.sleep(BLAS_SETTLE_S)
        return Outcome(STATUS_OK, best.median_ms, error, spread=best.spread, repeats=len(best.samples_ms))


@dataclass
class LayerReport:
    """How tuning one layer went; `bests` is what the store now holds for it, per algorithm."""

    label: str
    spec: ConvSpec
    bests: dict[str, TunedResult] = field(default_factory=dict)
    trials: int = 0
    trials_by_algorithm: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    measured_now: int = 0
    skipped_invalid: int = 0
    skipped_duplicate: int = 0  # configs another worker sharing the study was measuring
    failures: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    resumed: bool = False
    seeded: int = 0  # warm-start configs enqueued from similar layers
    ranked: int = 0  # the cost model's predicted best configs enqueued
    raced: int = 0  # search candidates timed by their short sample only (clearly slower)
    carried_from: str = ""  # the label of the layer (same convolution, another epilogue) whose winners it took
    retimed: dict[str, tuple[bool, int]] = field(default_factory=dict)  # algorithm -> (default kept, configs)

    @property
    def best(self) -> TunedResult | None:
        """The fastest verified algorithm of the layer."""
        return fastest(list(self.bests.values()))

    @property
    def baseline(self) -> TunedResult | None:
        return self.bests.get(BASELINE)

    @property
    def best_generated(self) -> TunedResult | None:
        return fastest([r for name, r in self.bests.items() if get_algorithm(name).space.params])


ProgressCallback = Callable[[LayerReport, int], None]


def tunable(algorithm: str) -> bool:
    return bool(get_algorithm(algorithm).space.params)


class LayerTuning:
    """One layer's tuning run, one method per job: choose the algorithms, measure the untunable
    ones, give each tunable one its default, share the budget out, store the bests. Trials flow
    through a pipeline: proposed, built ahead by the build pool's builders (`warm`), then built
    again here (a kernel-cache hit), verified and timed one at a time in the order proposed."""

    def __init__(self, spec: ConvSpec, device: DeviceInfo, evaluate: Evaluator, db: ResultStore, *,
                 storage: Any, trials: int | None, deadline: float | None, label: str, seed: int,
                 algorithms: tuple[str, ...] | None, progress: ProgressCallback | None,
                 records: Sequence[DatabaseContents] | None = None, early_stop: tuple[int, float] | None = None,
                 jobs: int = 1, warm: Warm | None = None, heartbeat: Heartbeat | None = None,
                 sampler: str = "tpe", racing: bool = True, cost_model: CostModel | None = None,
                 carried: Mapping[str, Sequence[Params]] | None = None) -> None:
        self.spec, self.device, self.evaluate, self.db = spec, device, evaluate, db
        # A CPU device computes on the cores the builders compile on: they never overlap.
        self.pool = BuildPool(warm, jobs=jobs, pause_builds=device.device_type != "gpu")
        self.pipeline: deque[tuple[str, Proposal, Any]] = deque()
        self.trials, self.deadline, self.progress, self.early_stop = trials, deadline, progress, early_stop
        self.racing = racing
        self.templates = template_hash()
        self.fingerprint = device.fingerprint()
        self.report = LayerReport(label or str(spec), spec)
        self.times: dict[str, float] = {}  # the untunable algorithms' fresh times
        db.record_device(device)
        db.record_layer(spec)
        chosen = self._supported(algorithms or list_algorithms())
        self.studies = {}
        self.records, self.cost_model, self.carried, self.seed = records, cost_model, carried, seed
        for name in chosen:
            if tunable(name):
                default = get_algorithm(name).heuristic(spec, device)
                self.studies[name] = AlgorithmStudy(storage, device, spec, name, self.templates, default, seed=seed,
                                                    heartbeat=heartbeat, sampler=sampler)
        self.untunable = [name for name in chosen if not tunable(name)]
        self.report.resumed = any(study.resumed for study in self.studies.values())

    def _supported(self, names: tuple[str, ...]) -> list[str]:
        chosen = []
        for name in names:
            runnable = name in self.evaluate.algorithms
            reason = get_algorithm(name).supports(self.spec, self.device) if runnable else "the backend cannot run it"
            if reason is None:
                chosen.append(name)
            else:
                self.report.unsupported[name] = reason
        return chosen

    def _record(self, name: str, params: Params, outcome: Outcome) -> None:
        self.report.measured_now += 1
        self.db.record_measurement(self.fingerprint, self.spec, name, self.templates, params, outcome.status,
                                   outcome.median_ms, outcome.rel_error, outcome.message, spread=outcome.spread,
                                   repeats=outcome.repeats)
        if not outcome.ok:
            self.report.failures[outcome.status] = self.report.failures.get(outcome.status, 0) + 1

    def _save(self, name: str, params: Params, ms: float, error: float, default_ms: float | None, count: int,
              *, spread: float | None = None, repeats: int | None = None, replace: bool = False) -> None:
        result = TunedResult(device=self.fingerprint, spec=self.spec, algorithm=name, template_hash=self.templates,
                             params=params, median_ms=ms, gflops=self.spec.flops / (ms * 1e6), rel_error=error,
                             default_ms=default_ms, trials=count, spread=spread, repeats=repeats)
        self.db.save_result(result, refresh_default=True, replace=replace)

    def measure_untunable(self) -> None:
        """One fresh measurement per run, stored only when steady."""
        for name in self.untunable:
            params = get_algorithm(name).heuristic(self.spec, self.device)
            outcome = self.evaluate(name, params)
            self._record(name, params, outcome)
            if outcome.steady:
                self._save(name, params, outcome.median_ms, outcome.rel_error, None, 1, spread=outcome.spread,
                           repeats=outcome.repeats, replace=True)
            elif outcome.ok:
                stored = [r for r in self.db.results(device=self.fingerprint, template_hash=self.templates,
                                                     layers=(self.spec.key(),))
                          if r.algorithm == name and r.spec == self.spec]
                # Stored (and so compared) unless a steady measurement is: a layer is never left to
                # the reference loops alone.
                keep_steady = bool(stored) and not stored[0].unsteady
                warnings.warn(f"autoconv: {name} on {self.spec} varied by {outcome.spread:.0%} over its repeats "
                              "(busy cores?); " + ("it is not stored: the steady measurement stays" if keep_steady
                                                   else "it is stored flagged as unsteady"), RuntimeWarning, stacklevel=3)
                if not keep_steady:
                    self._save(name, params, outcome.median_ms, outcome.rel_error, None, 1, spread=outcome.spread,
                               repeats=outcome.repeats, replace=True)
            if outcome.ok:
                self.times[name] = outcome.median_ms

    def spent(self, deadline: bool = True) -> bool:
        """The budget is used up: trials measured and in flight reach it, or (`deadline`) the
        deadline passed."""
        in_flight = len(self.pipeline)
        if self.trials is not None and sum(s.completed for s in self.studies.values()) + in_flight >= self.trials:
            return True
        return deadline and self.past_deadline()

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _start(self, name: str) -> bool:
        """Propose the algorithm's next config and start building it; False when its sampler
        finds no valid config."""
        proposal = self.studies[name].propose()
        if proposal is None:
            return False
        build = None if proposal.known is not None else self.pool.submit(name, proposal.params)
        self.pipeline.append((name, proposal, build))
        return True

    def _finish_oldest(self, race: bool) -> None:
        """Measure the oldest trial in flight (or reuse its known outcome), tell its study, store
        a new best."""
        name, proposal, build = self.pipeline.popleft()
        study = self.studies[name]
        before = study.best()
        outcome = None
        if proposal.known is not None:
            status, ms, error = proposal.known
        else:
            self.pool.ready(build)
            outcome = self.evaluate(name, proposal.params, bound_ms=self.layer_best_ms() if race else None)
            self._record(name, proposal.params, outcome)
            self.report.raced += outcome.raced
            status, ms, error = outcome.status, outcome.median_ms, outcome.rel_error
        study.conclude(proposal, status, ms, error, measured=proposal.known is None)
        best = study.best()
        if best is not None and (before is None or best[1] < before[1]):
            measured_now = outcome if outcome is not None and best[0] == proposal.params else None
            self._save(name, best[0], best[1], best[2], study.default_ms(), study.completed,
                       spread=measured_now.spread if measured_now else None,
                       repeats=measured_now.repeats if measured_now else None)
        if self.progress is not None:
            self.report.trials = sum(s.completed for s in self.studies.values())
            self.progress(self.report, self.trials or 0)

    def _run(self, choose: Callable[[set[str]], str | None], deadline: bool = True, race: bool = False) -> None:
        """Keep the pipeline full with the trials `choose` names (None: no more), measuring the
        oldest in turn (on a CPU device a new batch starts only when the last one is measured);
        at the deadline (unless `deadline` is off) the trials still waiting are abandoned, unmeasured;
        with `race`, each candidate races against the layer's best (DeviceEvaluator, raced_out)."""
        exhausted: set[str] = set()
        while True:
            if not (self.pool.batched and self.pipeline):
                while len(self.pipeline) < self.pool.depth and not self.spent(deadline):
                    name = choose(exhausted)
                    if name is None:
                        break
                    if not self._start(name):
                        exhausted.add(name)
            if not self.pipeline:
                return
            if deadline and self.past_deadline():
                while self.pipeline:
                    name, proposal, build = self.pipeline.popleft()
                    if build is not None:
                        build.cancel()
                    self.studies[name].abandon(proposal)
                return
            self._finish_oldest(race)

    def layer_best_ms(self) -> float | None:
        """The layer's best time so far over every algorithm (what a search candidate races against)."""
        bests = [found[1] for found in (study.best() for study in self.studies.values()) if found is not None]
        best = min([*bests, *self.times.values()], default=INF)
        return best if math.isfinite(best) else None

    def _in_flight(self, name: str) -> int:
        return sum(1 for entry in self.pipeline if entry[0] == name)

    def measure_defaults(self) -> None:
        """Each tunable algorithm's default first (a resumed study has it already), even past the
        deadline: a layer whose share of a time budget ran out still gets every algorithm's
        default, never only the untunable ones (the time budget may run over by them)."""
        todo = [name for name, study in self.studies.items() if study.default not in study.known]
        self._run(lambda exhausted: todo.pop(0) if todo else None, deadline=False)

    def queue_first(self) -> None:
        """Before the search: queue in each study the cost model's picks (predicted fastest first),
        then the warm-start seeds, each unless measured already (a study made by a run's defaults
        pass, or by an earlier run, gets them too)."""
        for name, study in self.studies.items():
            seeds = warm_start_configs(self.records, self.device, self.spec, name, study.default) \
                if self.records is not None else []
            exclude = [study.default, *study.known, *seeds]
            picks = self.cost_model.propose(self.spec, self.device, name, RANKED_FIRST, exclude=exclude,
                                            seed=self.seed) if self.cost_model is not None else []
            self.report.ranked += study.enqueue_first(picks, "cost_model")
            self.report.seeded += study.enqueue_first(seeds, "warm_start")

    def share_budget(self) -> None:
        """One trial at a time to the tunable algorithms within CANDIDATE_FACTOR of the best time
        so far, the one with the fewest trials (measured and in flight) first, until the budget
        is spent or none is close."""
        def choose(exhausted: set[str]) -> str | None:
            bests = {name: best[1] for name, s in self.studies.items() if (best := s.best()) is not None}
            overall = min([*bests.values(), *self.times.values()], default=INF)
            candidates = [name for name in self.studies if name not in exhausted
                          and (name not in bests or bests[name] <= CANDIDATE_FACTOR * overall)
                          and not (self.early_stop and self.studies[name].stalled(*self.early_stop))]
            return min(candidates, key=lambda n: (self.studies[n].completed + self._in_flight(n), n), default=None)

        self._run(choose, race=self.racing)  # the search races: never the defaults, carried winners or re-timing

    def measure_carried(self) -> None:
        """The configs carried over from the same convolution with another epilogue (after each
        study's default), and nothing else: that convolution's search serves this one."""
        todo = [name for name, study in self.studies.items()
                for _ in range(study.enqueue_first((self.carried or {}).get(name, ()), "carried"))]
        self._run(lambda exhausted: todo.pop(0) if todo else None, deadline=False)

    def retime(self) -> None:
        """Time the contending algorithms' top configs and defaults again, interleaved, and store
        each one's winner by the beyond-the-noise rule with its re-measured time."""
        bests = {name: best[1] for name, study in self.studies.items() if (best := study.best()) is not None}
        overall = min([*bests.values(), *self.times.values()], default=INF)
        for name, study in self.studies.items():
            if name not in bests or bests[name] > RETIME_FACTOR * overall or study.default_ms() is None:
                continue
            ranked = sorted((ms, params.describe(), params) for params, (status, ms, _) in study.known.items()
                            if status == STATUS_OK and ms < INF)
            candidates = [params for _, _, params in ranked[:RETIME_TOP] if params != study.default]
            if not candidates:
                continue
            configs = [study.default, *candidates]
            rounds: dict[Params, list[float]] = {params: [] for params in configs}
            outcomes: dict[Params, Outcome] = {}
            for _ in range(RETIME_ROUNDS):
                for params in configs:  # interleaved, so drift hits every config alike
                    outcome = self.evaluate(name, params)
                    self._record(name, params, outcome)
                    if outcome.ok:
                        rounds[params].append(outcome.median_ms)
                        outcomes[params] = outcome
            winner = winner_beyond_noise(rounds, study.default)
            if not rounds[winner]:
                continue
            self.report.retimed[name] = (winner == study.default, len(configs))
            default_ms = statistics.median(rounds[study.default]) if rounds[study.default] else study.default_ms()
            self._save(name, winner, statistics.median(rounds[winner]), outcomes[winner].rel_error, default_ms,
                       study.completed, spread=outcomes[winner].spread, repeats=outcomes[winner].repeats, replace=True)

    def finish(self, started: float, retime: bool = True) -> LayerReport:
        report = self.report
        for name, study in self.studies.items():
            best = study.best()
            if best is not None:  # refreshes the trial count and the default time beside the winner
                self._save(name, best[0], best[1], best[2], study.default_ms(), study.completed)
        if retime:
            self.retime()
        for name, study in self.studies.items():
            report.trials_by_algorithm[name] = study.completed
            report.skipped_invalid += study.skipped_invalid
            report.skipped_duplicate += study.skipped_duplicate
        report.trials = sum(report.trials_by_algorithm.values())
        report.bests = {r.algorithm: r for r in self.db.results(device=self.fingerprint, template_hash=self.templates)
                        if r.spec == self.spec}
        report.wall_s = time.monotonic() - started
        return report


def tune_layer(
    spec: ConvSpec,
    device: DeviceInfo,
    evaluate: Evaluator,
    db: ResultStore,
    *,
    trials: int | None = 60,
    deadline: float | None = None,
    label: str = "",
    seed: int = 0,
    storage: Any = None,
    algorithms: tuple[str, ...] | None = None,
    progress: ProgressCallback | None = None,
    records: Sequence[DatabaseContents] | None = None,
    early_stop: tuple[int, float] | None = (EARLY_STOP_TRIALS, EARLY_STOP_GAIN),
    retime: bool = True,
    jobs: int = 1,
    warm: Warm | None = None,
    heartbeat: Heartbeat | None = None,
    sampler: str = "tpe",
    defaults_only: bool = False,
    racing: bool = True,
    cost_model: CostModel | None = None,
    carried: Mapping[str, Sequence[Params]] | None = None,
) -> LayerReport:
    """Tune (or resume tuning) one layer over every algorithm that supports it until the tunable
    algorithms' studies hold `trials` measured trials together, the monotonic `deadline` passes,
    or every study has stalled (`early_stop`: (trials, gain), None to spend the whole budget);
    new studies are seeded with the winners in `records` of similar layers (warm start); with
    `warm` (a candidate's build on a builder: build_pool.process_warm), `jobs` candidates are
    built ahead; `sampler` is "tpe" or "random" (new
    studies only: a resumed one keeps how it was sampled in its trials). The studies live in `storage` (default:
    the journal beside the database), which other workers may share. Returns the report and
    leaves each algorithm's best in the store. `defaults_only`: just each tunable algorithm's
    default (a resumed study has it already), no references, no search, no re-timing. `racing`:
    search candidates clearly slower than the layer's best after a short sample get no full
    timing. `cost_model`: its predicted best configs are the search's first trials, before the
    warm-start seeds and the sampler's own. `carried`: per algorithm, configs that won on the same convolution with another
    epilogue: they are measured after the defaults instead of a search (then re-timed)."""
    if trials is None and deadline is None:
        raise InvalidParamsError("tuning needs a budget: a trial count or a time limit")
    started = time.monotonic()
    own_heartbeat = heartbeat is None  # a trial in flight must stay alive to other workers
    heartbeat = heartbeat or Heartbeat()
    tuning = LayerTuning(spec, device, evaluate, db,
                         storage=storage if storage is not None else journal_storage(Path(db.path)), trials=trials,
                         deadline=deadline, label=label, seed=seed, algorithms=algorithms, progress=progress,
                         records=records, early_stop=early_stop, jobs=jobs, warm=warm, heartbeat=heartbeat,
                         sampler=sampler, racing=racing, cost_model=cost_model, carried=carried)
    try:
        if not defaults_only:
            tuning.measure_untunable()
        tuning.measure_defaults()
        if carried is not None and not defaults_only:
            tuning.measure_carried()
        elif not defaults_only:
            tuning.queue_first()
            tuning.share_budget()
    finally:
        tuning.pool.close()
        if own_heartbeat:
            heartbeat.stop()
    return tuning.finish(started, retime=retime and not defaults_only)


class ModelBudget:
    """A time budget shared over a model's distinct layers by stake: each layer's count in the
    model times its best time measured so far, what the model spends in it, so that the trials go
    where the model's time is (Ansor's task scheduler weighs its tasks the same way). Layers are
    tuned in order of stake, largest first, and each gets its stake's share of the time left when
    it starts: time a layer leaves unused (its search stopped early, stalled) goes to the layers
    after it. A layer with no time measured counts the median of the others'."""

    def __init__(self, counts: Sequence[int], best_ms: Sequence[float | None]) -> None:
        if len(counts) != len(best_ms):
            raise ValueError("counts and best_ms: one of each per layer")
        known = sorted(ms for ms in best_ms if ms is not None and math.isfinite(ms))
        typical = known[len(known) // 2] if known else 1.0
        self.stakes = [count * (typical if ms is None or not math.isfinite(ms) else ms)
                       for count, ms in zip(counts, best_ms)]
        # Largest stake first; ties in the given order.
        self.order = sorted(range(len(self.stakes)), key=lambda i: (-self.stakes[i], i))

    def share_s(self, position: int, remaining_s: float) -> float:
        """Seconds for the layer tuned `position`-th (of `order`) when `remaining_s` are left."""
        left = [self.stakes[i] for i in self.order[position:]]
        total = sum(left)
        if total <= 0:
            return remaining_s / len(left)
        return remaining_s * left[0] / total


def tune_layers(
    layers: list[tuple[str, ConvSpec]],
    backend: Backend,
    db: ResultStore,
    *,
    trials: int | None = 60,
    time_budget_s: float | None = None,
    seed: int = 0,
    repeats: int = 7,
    algorithms: tuple[str, ...] | None = None,
    progress: ProgressCallback | None = None,
    on_layer_start: Callable[[str, ConvSpec], None] | None = None,
    on_layer_end: Callable[[LayerReport], None] | None = None,
    warm_start: bool = True,
    early_stop: tuple[int, float] | None = (EARLY_STOP_TRIALS, EARLY_STOP_GAIN),
    jobs: int = 1,
    storage: str | None = None,
    on_defaults: Callable[[int, int], None] | None = None,
    counts: Sequence[int] | None = None,
    on_estimate: Callable[[float], None] | None = None,
    racing: bool = True,
    cost_model: bool = True,
    sampler: str = "tpe",
) -> list[LayerReport]:
    """Tune layers one after another; a time budget is shared out evenly over the layers left,
    after every layer's tunable algorithms have had their defaults measured (so no layer ends a
    budget with nothing but the reference loops; `on_defaults(done, total)` reports that pass).
    With warm_start, each new study is seeded from this database's and the shipped databases'
    winners on similar layers (read again before each layer: earlier layers of the run count).
    With cost_model, a cost model trained on every verified measurement of those databases
    (retrained as they grow) picks each layer search's first configs.
    `storage` (an Optuna storage URL or journal path) holds the studies when several workers
    share them; each worker still writes its measurements and bests to its own `db`. With
    jobs > 1, `jobs` builder processes are started (spawned: a script calling this needs the
    `if __name__ == "__main__":` guard). `counts`, how many times each layer occurs in a model:
    the layers of one convolution with different epilogues are then searched once (the one the
    model spends most in) and the others measure its winners (`carried`); with a time budget, the
    budget follows the model (ModelBudget) instead of an even share, and `on_estimate(ms)` hears
    the model's estimated convolution time (the sum of count x best time over its layers) after
    the defaults pass and after each layer."""
    from autoconv.serve.session import default_session

    session = default_session()
    where = (f"Optuna storage {without_password(storage)}" if storage is not None
             else f"Optuna journal {journal_path(Path(db.path))}")
    studies = open_storage(storage) if storage is not None else journal_storage(Path(db.path))
    heartbeat = Heartbeat()
    # The numpy backend has nothing to build; a device's builders live as long as the run.
    builders = builder_processes(jobs) if backend.name != "numpy" else None
    device_index = getattr(backend, "index", None)
    reports = []
    end = None if time_budget_s is None else time.monotonic() + time_budget_s
    if counts is not None and len(counts) != len(layers):
        raise ValueError(f"counts: expected one per layer ({len(layers)}), got {len(counts)}")
    trainer = CostModelTrainer(db, session.database_paths(db.path)[1:], backend.device, seed) if cost_model else None

    def tune(label: str, spec: ConvSpec, **budget: Any) -> LayerReport:
        # The database being tuned into, then the shipped ones (each re-read only when it changed):
        # new studies are seeded from them (warm start).
        records = [session.contents(p) for p in session.database_paths(db.path)] if warm_start else None
        model = trainer.current() if trainer is not None and not budget.get("defaults_only") \
            and budget.get("carried") is None else None
        try:
            return tune_layer(spec, backend.device, DeviceEvaluator(backend, spec, repeats=repeats, seed=seed), db,
                              label=label, seed=seed, storage=studies, algorithms=algorithms, records=records,
                              jobs=jobs, heartbeat=heartbeat, racing=racing, cost_model=model, sampler=sampler,
                              warm=None if builders is None else process_warm(builders, backend.name, device_index,
                                                                              spec), **budget)
        except OSError as exc:  # the journal became unwritable (read-only, disk full) mid-run
            raise TuningDBError(f"the {where} cannot be written: {exc.strerror or exc}") from None

    try:
        if end is not None and len(layers) > 1:
            for index, (label, spec) in enumerate(layers):
                if on_defaults is not None:
                    on_defaults(index, len(layers))
                tune(label, spec, trials=None, deadline=time.monotonic(), early_stop=None, defaults_only=True)
            if on_defaults is not None:
                on_defaults(len(layers), len(layers))

        def estimate(best_ms: list[float | None] | None = None) -> None:
            if on_estimate is not None and counts is not None:
                on_estimate(model_estimate_ms(counts, best_ms or [_best_ms(db, backend, spec) for _, spec in layers]))

        best_now: list[float | None] = [_best_ms(db, backend, spec) for _, spec in layers] if end is not None \
            else [None] * len(layers)
        searched, variants = epilogue_groups([spec for _, spec in layers], counts, best_now)
        budget = None
        if end is not None and counts is not None:
            budget = ModelBudget([sum(counts[i] for i in (leader, *variants[leader])) for leader in searched],
                                 [best_now[leader] for leader in searched])
            estimate(best_now)
        order = [searched[i] for i in budget.order] if budget is not None else searched
        for position, index in enumerate(order):
            label, spec = layers[index]
            if on_layer_start is not None:
                on_layer_start(label, spec)
            deadline = None
            if end is not None:
                remaining = max(0.0, end - time.monotonic())
                deadline = time.monotonic() + (budget.share_s(position, remaining) if budget is not None
                                               else remaining / (len(order) - position))
            reports.append(tune(label, spec, trials=trials, deadline=deadline, progress=progress,
                                early_stop=early_stop))
            if on_layer_end is not None:
                on_layer_end(reports[-1])
            winners = {name: [result.params] for name, result in reports[-1].bests.items() if tunable(name)}
            for variant in variants[index]:
                variant_label, variant_spec = layers[variant]
                if on_layer_start is not None:
                    on_layer_start(variant_label, variant_spec)
                report = tune(variant_label, variant_spec, trials=None, deadline=time.monotonic(), early_stop=None,
                              progress=progress, carried=winners)
                report.carried_from = label
                reports.append(report)
                if on_layer_end is not None:
                    on_layer_end(report)
            estimate()
    finally:
        heartbeat.stop()
        if builders is not None:
            builders.shutdown(wait=True, cancel_futures=True)
    return reports


def epilogue_groups(specs: Sequence[ConvSpec], counts: Sequence[int] | None,
                    best_ms: Sequence[float | None]) -> tuple[list[int], dict[int, list[int]]]:
    """Which layers are searched and which take a searched layer's winners: with `counts` (a
    model), the layers of one convolution (the same shape, layout and bias) with different
    activations or residuals form a group whose member with the largest count x time (else the
    largest count, then the first) is searched; without, every layer is searched. Returns the
    searched layers' indices in the given order and, per searched layer, its group's others."""
    groups: dict[object, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(spec.unfused() if counts is not None else index, []).append(index)

    def weight(i: int) -> tuple[float, int, int]:
        count = counts[i] if counts is not None else 1
        ms = best_ms[i]
        return (count * ms if ms is not None and math.isfinite(ms) else 0.0, count, -i)

    variants: dict[int, list[int]] = {}
    for members in groups.values():
        leader = max(members, key=weight)
        variants[leader] = [i for i in members if i != leader]
    return sorted(variants), variants


def model_estimate_ms(counts: Sequence[int], best_ms: Sequence[float | None]) -> float:
    """A model's convolution time as its tuning stands: each layer's count times its best time
    (layers not measured yet count nothing)."""
    return sum(count * ms for count, ms in zip(counts, best_ms) if ms is not None and math.isfinite(ms))


class CostModelTrainer:
    """The tuning run's cost model, retrained before a layer once the databases hold at least
    REFIT_GROWTH more training rows than when it was last trained (each fit takes a fraction of a
    second that a time budget pays for)."""

    def __init__(self, db: ResultStore, shipped: Sequence[Path], device: DeviceInfo, seed: int = 0) -> None:
        self.db, self.shipped, self.device, self.seed = db, list(shipped), device, seed
        self.rows = 0
        self.model: CostModel | None = None

    def current(self) -> CostModel:
        measured, devices = training_rows(self.db, self.shipped)
        if self.model is None or len(measured) >= self.rows * (1 + REFIT_GROWTH):
            self.model = CostModel.fit(measured, devices, self.device, seed=self.seed)
            self.rows = len(measured)
        return self.model


def training_rows(db: ResultStore, shipped: Sequence[Path]) -> tuple[list[TimedConfig], dict[str, dict[str, Any]]]:
    """The current templates' verified measurements and results of the database being tuned into
    and the shipped ones, with their devices rows."""
    from autoconv.store import SQLiteStore

    stores: list[ResultStore] = [db]
    opened = []
    try:
        for path in shipped:
            try:
                opened.append(SQLiteStore(path, readonly=True))
            except TuningDBError:
                continue  # a damaged shipped file: the lookup says so; the model learns without it
        stores += opened
        return training_data(stores, template_hash())
    finally:
        for store in opened:
            store.close()


def _best_ms(db: ResultStore, backend: Backend, spec: ConvSpec) -> float | None:
    """The layer's fastest stored time on the backend's device with the current templates."""
    best = fastest([r for r in db.results(device=backend.device.fingerprint(), template_hash=template_hash(),
                                          layers=[spec.key()]) if r.spec == spec])
    return None if best is None else best.median_ms


__all__ = ["DeviceEvaluator", "ModelBudget", "model_estimate_ms", "Evaluator", "LayerReport", "Outcome", "tune_layer", "tune_layers"]
