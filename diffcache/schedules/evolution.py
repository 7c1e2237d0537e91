"""ECAD: multi-objective evolutionary search over the schedule's bits (NSGA-II with ``deap``).

The genome is the schedule's recompute bits for steps ``1..T-1`` over the slots that exist (step 0 always
recomputes). Each candidate generates the calibration images (the same seeds for every candidate: common random
numbers) and gets two objectives: quality against the full model (PSNR by default, or classifier accuracy /
Fréchet distance on the digits models, or any callable) and predicted cost from the cost model. Following ECAD
(specs/algorithms.md section 4): a seeded population (presets, DP solutions, their mutations), binary tournament
on rank and crowding, k-point crossover, mutation, NSGA-II survival; duplicate genomes are never evaluated
twice. A mutation flips bits, or (``shift_prob``) rolls a random stretch of one slot's steps by one step: every
key step in it moves one step later or earlier at the same cost. Moving the key steps of a good schedule takes
two flips each, the first of which changes the cost and is usually selected away; a shift does it in one move.
Given the budget, a key-step search then polishes its pick: a hill climb over moves that shift a run of
consecutive key steps one step earlier or later (the cost stays, the gaps around the run change by one), best
move first, for up to ``polish`` more candidates.
Every generation and polish round is checkpointed (JSON, atomic) and a run resumes exactly where it stopped.
Under ``accelerate launch`` the candidates of a generation are split over the processes.

On a UNet a step's bits must be a shell prefix (``1..10..0``); the genome keeps one bit per unit and a step
recomputes as many shells as it has ones, so every genome is valid and one flip moves the cache branch by one.

``Genome(..., key_steps=True)`` searches only *where the key steps are*: one bit per step, every slot follows it
(a UNet reuses from ``branch`` down). That is ``T - 1`` bits instead of ``(T - 1)`` x slots, small enough for a
CPU-sized run to explore, and it is the space where uniform, DeepCache, TaylorSeer and DP schedules live.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..adapters import BLOCK, denoiser_of, resolve_adapter
from ..data import CalibrationData
from ..errors import MissingExtraError, SearchError
from ..eval.quality import QualityFn, quality_function
from ..files import write_atomic
from ..optional import require
from ..runtime import planned, suspended
from ..schedule import Schedule
from .budget import Budget, CostModel
from .dp import dp_schedule
from .methods import SearchJob, register_search
from .presets import branch_unit, build_from_tag, search_branch

logger = logging.getLogger(__name__)

"""``quality(images, full_images, conditions) -> score``, higher is better."""

_CHECKPOINT_FORMAT = "diffcache.ecad-checkpoint/1"


@dataclass(frozen=True)
class EvolutionConfig:
    """NSGA-II settings (ECAD's released run: population 72, 4-point crossover p=0.9, sparse bit flips).

    ``mutation_prob`` is per offspring; a mutated offspring is shifted with ``shift_prob`` (see the module doc),
    else flips each bit with ``bit_flip_prob`` (default ``2 / genome length``). CPU-sized defaults: a smaller
    population and stronger mutation than ECAD's GPU runs. ``polish``: candidates a key-step search may spend
    improving its pick for the budget (0: none).
    """

    population: int = 16
    generations: int = 10
    crossover_prob: float = 0.9
    crossover_points: int = 4
    mutation_prob: float = 0.5
    bit_flip_prob: float | None = None
    shift_prob: float = 0.5
    polish: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 4 or self.population % 4:
            raise SearchError(f"population must be a multiple of 4 (NSGA-II tournament pairs), got {self.population}")
        if self.generations < 0:
            raise SearchError(f"generations must be >= 0, got {self.generations}")
        if self.polish < 0:
            raise SearchError(f"polish must be >= 0 candidates, got {self.polish}")

    def mutation(self, genome: Genome) -> _Mutation:
        """The mutation operator for ``genome``."""
        flip = self.bit_flip_prob or min(0.5, 2.0 / max(genome.length, 1))
        return _Mutation(flip, self.shift_prob, genome.stride)


@functools.cache
def _fitness_type() -> type:
    """deap's Fitness with ECAD's weights, made on first use (deap is the ``search`` extra)."""
    base = require("deap.base", "search", "ECAD schedule search")

    class _Fitness(base.Fitness):
        weights = (1.0, -1.0)  # maximize quality, minimize cost

    return _Fitness


class _Individual(list):
    def __init__(self, bits: Sequence[int]) -> None:
        super().__init__(int(b) for b in bits)
        self.fitness = _fitness_type()()


@dataclass
class EvolutionResult:
    """The Pareto front over every evaluated schedule (cheapest first) and per-generation progress."""

    front: list[Schedule]
    history: list[dict[str, float]] = field(default_factory=list)

    def pick(self, budget: Budget) -> Schedule:
        """The best-quality front schedule whose predicted cost fits ``budget``."""
        fitting = [s for s in self.front if s.meta["cost"] <= budget.fraction + 1e-9]
        if not fitting:
            cheapest = self.front[0].meta["cost"] if self.front else float("nan")
            raise SearchError(f"no schedule on the ECAD front fits budget {budget} (cheapest costs {cheapest:.1%}); "
                              "raise the budget or run more generations")
        return max(fitting, key=lambda s: s.meta["quality"])


class Genome:
    """Bits <-> `Schedule` for one model layout (``template`` gives units, components, present, model).

    ``key_steps``: one bit per step 1..T-1 (1 = recompute everything); a reuse step reuses every slot, on a UNet
    every unit of DeepCache branch ``branch`` down (-1: the whole body)."""

    def __init__(self, template: Schedule, nested: bool, key_steps: bool = False, branch: int = 0) -> None:
        self.template, self.nested, self.key_steps = template, nested, key_steps
        self.mask = np.broadcast_to(template.present_mask, template.recompute.shape).copy()
        self.mask[0] = False
        self.reuse = template.present_mask.copy()  # what a reuse step reuses (key-step genomes)
        if nested:
            self.reuse[:branch_unit(branch)] = False
        self.length = template.num_steps - 1 if key_steps else int(self.mask.sum())
        # bits from a slot at one step to the same slot at the next (every step has the same slots)
        self.stride = self.length // (template.num_steps - 1) if template.num_steps > 1 else 1

    def encode(self, schedule: Schedule) -> list[int]:
        if self.key_steps:
            return schedule.recompute[1:].all(axis=(1, 2)).astype(int).tolist()
        return schedule.recompute[self.mask].astype(int).tolist()

    def decode(self, bits: Sequence[int], **meta: Any) -> Schedule:
        grid = np.ones_like(self.mask)
        if self.key_steps:
            grid[1:][~np.asarray(bits, dtype=bool)] = ~self.reuse
        else:
            grid[self.mask] = np.asarray(bits, dtype=bool)
        if self.nested:  # as many shells as ones, shallowest first
            grid = (-np.sort(-grid.astype(int), axis=1)).astype(bool)
        t = self.template
        return Schedule(grid, t.units, t.components, "ecad", {}, t.model, meta, t.present, t.forecast)


def evolve(
    pipe: Any,
    data: CalibrationData,
    genome: Genome,
    cost_model: CostModel,
    quality: QualityFn,
    seeds: Sequence[Schedule],
    config: EvolutionConfig = EvolutionConfig(),
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    key: str = "",
    progress: bool = True,
    extra: Sequence[tuple[Any, Any]] = (),
    budget: Budget | None = None,
) -> EvolutionResult:
    """Run NSGA-II; returns the Pareto front of everything evaluated.

    Args:
        seeds: schedules for the initial population, most wanted first (deduplicated; with more than
            ``population``, the first half of it and an even spread over the rest; with fewer, the rest are their
            mutations).
        checkpoint: JSON file written after every generation. With ``resume=True`` an existing checkpoint is
            continued (it must come from the same ``key``: model, data and settings); without it an existing
            checkpoint is an error, so a finished search is never overwritten by accident.
        key: identifies the search setting, checked on resume.
        extra: hooks every candidate runs with (quantized layers); the reference stays the full float model.
        budget: where a key-step genome's pick is polished (``config.polish``); ``None``: no polish.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    tools = require("deap.tools", "search", "ECAD schedule search")
    state = PartialState()
    adapter = resolve_adapter(denoiser_of(pipe))
    path = Path(checkpoint) if checkpoint is not None else None
    settings = {k: v for k, v in asdict(config).items() if k != "generations"}  # a resume may run longer
    setting = hashlib.sha1(json.dumps([key, settings, genome.length]).encode()).hexdigest()[:16]
    with suspended(adapter.denoiser):
        reference = [data.generate(pipe, kwargs) for kwargs in data.batches(pipe)]
    cache: dict[str, tuple[float, float]] = {}

    def evaluate(population: list[_Individual]) -> None:
        todo = sorted({_key(ind) for ind in population} - cache.keys())
        mine = todo[state.process_index :: state.num_processes]
        results = []
        for bits in tqdm(mine, desc="candidates", leave=False, disable=not progress or not state.is_main_process):
            schedule = genome.decode([int(b) for b in bits])
            with planned(pipe, adapter, schedule, extra):
                images = [data.generate(pipe, kwargs) for kwargs in data.batches(pipe)]
            score = quality(np.concatenate(images), np.concatenate(reference), data.conditions)
            results.append((bits, (float(score), cost_model.fraction(schedule))))
        for bits, fitness in gather_object(results) if state.num_processes > 1 else results:
            cache[bits] = tuple(fitness)
        for ind in population:
            ind.fitness.values = cache[_key(ind)]

    rng = random.Random(config.seed)
    if path is not None and path.exists():
        if not resume:
            raise SearchError(f"checkpoint {path} exists; pass resume=True (--resume) to continue it, or choose "
                              "another output folder")
        population, start, history = _load(path, setting, cache, rng)
    else:
        population = _seed_population(genome, seeds, config, rng)
        evaluate(population)
        population = tools.selNSGA2(population, config.population)
        start, history = 0, [_progress(0, cache)]
        _save(path, setting, population, 0, cache, rng, history, state.is_main_process)
    mutate = config.mutation(genome)
    for generation in tqdm(range(start + 1, config.generations + 1), desc="ECAD generations",
                           initial=start, total=config.generations, disable=not progress):
        offspring = _offspring(population, config, mutate, rng)
        evaluate(offspring)
        population = tools.selNSGA2(population + offspring, config.population)
        history.append(_progress(generation, cache))
        _save(path, setting, population, generation, cache, rng, history, state.is_main_process)
        logger.info("ECAD generation %d: %d schedules evaluated, hypervolume %.4f", generation,
                    len(cache), history[-1]["hypervolume"])
    if budget is not None and genome.key_steps and config.polish:
        for _ in _polish(cache, evaluate, budget, config.polish):
            _save(path, setting, population, config.generations, cache, rng, history, state.is_main_process)
    front = [genome.decode([int(b) for b in bits], quality=q, cost=c) for bits, (q, c) in _front(cache)]
    return EvolutionResult(front, history)


def _polish(cache: dict[str, tuple[float, float]], evaluate: Callable[[list[_Individual]], None], budget: Budget,
            limit: int) -> Iterator[None]:
    """Hill-climb from the best evaluated key-step genome within ``budget`` by `_shifts`, best move first, over at
    most ``limit`` neighbours (evaluated ones count too, so a resumed run climbs the same path); yields after
    every round."""
    fitting = [(bits, q) for bits, (q, c) in _front(cache) if c <= budget.fraction + 1e-9]
    if not fitting:
        return
    current, best = max(fitting, key=lambda item: item[1])
    while limit > 0:
        neighbours = _shifts(current)[:limit]
        limit -= len(neighbours)
        evaluate([_Individual(int(b) for b in bits) for bits in neighbours])
        yield
        scored = [(cache[bits][0], bits) for bits in neighbours if cache[bits][1] <= budget.fraction + 1e-9]
        if not scored or max(scored)[0] <= best:
            return
        best, current = max(scored)


def _shifts(bits: str) -> list[str]:
    """Key-step genomes with one run of consecutive key steps moved one step earlier or later (in order)."""
    keys = [i for i, b in enumerate(bits) if b == "1"]
    moves = []
    for first in range(len(keys)):
        for last in range(first, len(keys)):
            for step in (-1, 1):
                moved = [*keys[:first], *(k + step for k in keys[first : last + 1]), *keys[last + 1 :]]
                chosen = set(moved)
                if 0 <= moved[first] and moved[last] < len(bits) and len(chosen) == len(moved):
                    moves.append("".join("1" if i in chosen else "0" for i in range(len(bits))))
    return list(dict.fromkeys(moves))


def _key(individual: Sequence[int]) -> str:
    return "".join(str(int(b)) for b in individual)


def _seed_population(genome: Genome, seeds: Sequence[Schedule], config: EvolutionConfig, rng: random.Random
                     ) -> list[_Individual]:
    unique: dict[str, list[int]] = {}
    for schedule in seeds:
        bits = genome.encode(schedule)
        if any(b == 0 for b in bits):  # the no-cache schedule is the reference, not a candidate
            unique.setdefault(_key(bits), bits)
    if not unique:
        raise SearchError("ECAD needs at least one seed schedule that reuses something")
    chosen = list(unique.values())
    if len(chosen) > config.population:  # the most wanted half, and an even spread over the rest for the front
        half = config.population // 2
        picks = np.linspace(half, len(chosen) - 1, config.population - half).round().astype(int)
        chosen = chosen[:half] + [chosen[i] for i in picks]
    population = [_Individual(bits) for bits in chosen]
    mutate = config.mutation(genome)
    seen = set(unique)
    while len(population) < config.population:
        child = _Individual(rng.choice(chosen))
        mutate(child, rng)
        if _key(child) not in seen:
            seen.add(_key(child))
            population.append(child)
    return population


@dataclass(frozen=True)
class _Mutation:
    """Changes at least one bit: a shift with probability ``shift``, else bit flips with probability ``flip``
    each. A shift rolls steps ``a..b`` of one slot (bits ``stride`` apart) by one step, so it keeps the count."""

    flip: float
    shift: float
    stride: int

    def __call__(self, individual: _Individual, rng: random.Random) -> None:
        before = list(individual)
        if rng.random() < self.shift:
            lane = rng.randrange(self.stride)
            steps = list(range(lane, len(individual), self.stride))
            if len(steps) > 1:
                a, b = sorted(rng.sample(range(len(steps)), 2))
                stretch = [individual[i] for i in steps[a : b + 1]]
                stretch = stretch[-1:] + stretch[:-1] if rng.random() < 0.5 else stretch[1:] + stretch[:1]
                for i, bit in zip(steps[a : b + 1], stretch):
                    individual[i] = bit
        else:
            for i in range(len(individual)):
                if rng.random() < self.flip:
                    individual[i] = 1 - individual[i]
        if list(individual) == before:  # nothing moved (a stretch of equal bits, or no flip drawn)
            i = rng.randrange(len(individual))
            individual[i] = 1 - individual[i]


def _crossover(a: _Individual, b: _Individual, points: int, rng: random.Random) -> None:
    """k-point crossover in place."""
    cuts = sorted(rng.sample(range(1, len(a)), min(points, len(a) - 1)))
    for start, stop in zip(cuts[::2], [*cuts[1::2], len(a)]):
        a[start:stop], b[start:stop] = b[start:stop], a[start:stop]


def _offspring(population: list[_Individual], config: EvolutionConfig, mutate: _Mutation, rng: random.Random
               ) -> list[_Individual]:
    tools = require("deap.tools", "search", "ECAD schedule search")
    state = random.getstate()  # deap's tournament draws from the global generator: run it on ours
    random.setstate(rng.getstate())
    try:
        parents = tools.selTournamentDCD(population, len(population))
        rng.setstate(random.getstate())
    finally:
        random.setstate(state)
    children = [_Individual(p) for p in parents]
    for a, b in zip(children[::2], children[1::2]):
        if rng.random() < config.crossover_prob and len(a) > 1:
            _crossover(a, b, config.crossover_points, rng)
        for child in (a, b):
            if rng.random() < config.mutation_prob:
                mutate(child, rng)
    seen = {_key(p) for p in population}
    for child in children:  # duplicates waste an evaluation slot: nudge them
        for _ in range(3):
            if _key(child) not in seen:
                break
            mutate(child, rng)
        seen.add(_key(child))
    return children


def _front(cache: dict[str, tuple[float, float]]) -> list[tuple[str, tuple[float, float]]]:
    """Non-dominated (quality up, cost down) evaluated genomes, cheapest first; the all-recompute genome excluded."""
    items = sorted(((k, v) for k, v in cache.items() if "0" in k), key=lambda kv: (kv[1][1], -kv[1][0], kv[0]))
    front, best = [], -np.inf
    for bits, (q, c) in items:
        if q > best:
            front.append((bits, (q, c)))
            best = q
    return front


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``(quality, cost)`` points (quality up, cost down) above the reference (worst) point."""
    area, best = 0.0, reference[0]
    for q, c in sorted(points, key=lambda p: (p[1], -p[0])):
        if c < reference[1] and q > best:
            area += (q - best) * (reference[1] - c)
            best = q
    return area


def _progress(generation: int, cache: dict[str, tuple[float, float]]) -> dict[str, float]:
    front = [fitness for _, fitness in _front(cache)]
    worst = min((q for q, _ in cache.values()), default=0.0)
    return {"generation": generation, "evaluated": len(cache), "front": len(front),
            "hypervolume": hypervolume(front, (worst, 1.0))}


def _save(path: Path | None, setting: str, population: list[_Individual], generation: int,
          cache: dict[str, tuple[float, float]], rng: random.Random, history: list[dict[str, float]],
          main: bool) -> None:
    if path is None or not main:
        return
    version, internal, gauss = rng.getstate()
    data = {
        "format": _CHECKPOINT_FORMAT, "setting": setting, "generation": generation,
        "population": [[_key(ind), list(ind.fitness.values), ind.fitness.crowding_dist] for ind in population],
        "evaluated": {k: list(v) for k, v in cache.items()},
        "random_state": [version, list(internal), gauss], "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data))


def _load(path: Path, setting: str, cache: dict[str, tuple[float, float]], rng: random.Random
          ) -> tuple[list[_Individual], int, list[dict[str, float]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        if data["setting"] != setting:
            raise SearchError(f"checkpoint {path} belongs to another search (model, prompts, budget measure or "
                              "settings differ); use another output folder or delete it")
        population = []
        for bits, values, crowding in data["population"]:
            individual = _Individual(int(b) for b in bits)
            individual.fitness.values = tuple(values)
            individual.fitness.crowding_dist = crowding
            population.append(individual)
        cache.update({k: tuple(v) for k, v in data["evaluated"].items()})
        version, internal, gauss = data["random_state"]
        rng.setstate((version, tuple(internal), gauss))
        return population, int(data["generation"]), data["history"]
    except SearchError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SearchError(f"checkpoint {path} is unreadable ({err}); delete it to start the search over") from None


_DP_SEED_SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


@register_search("ecad")
def _ecad(job: SearchJob, options: dict[str, Any]) -> Schedule:
    require("deap.tools", "search", "ECAD schedule search")  # before the seeds' calibration, not after it
    options = dict(options)
    key_steps, branch = bool(options.pop("key_steps", False)), int(options.pop("branch", 0))
    search_branch(job.adapter.layout(), branch)
    try:
        config = EvolutionConfig(**options)
    except TypeError as err:
        raise SearchError(f"ecad options: {err}; see diffcache.schedules.evolution.EvolutionConfig "
                          "(and key_steps=1, branch=B for the key-step genome)") from None
    steps, adapter = job.data.steps(job.pipe), job.adapter
    layout = adapter.layout(job.granularity)
    template = Schedule(np.ones((steps, len(layout.units), len(layout.components)), dtype=bool), layout.units,
                        layout.components, "none", {}, adapter.model_info, present=layout.present,
                        forecast=job.forecast)
    genome = Genome(template, layout.nested, key_steps, branch)
    # Candidates are judged as they will run: with the search's forecast setting.
    seeds = [replace(seed, forecast=job.forecast) for seed in _seed_schedules(job, steps)]
    score = job.quality if callable(job.quality) else quality_function(job.quality)
    genome_kind = [("key_steps", branch)] if key_steps else []  # (the full genome's keys predate this option)
    key = repr([adapter.model_info, job.data.key(), job.granularity, job.budget.measure, job.forecast,
                getattr(score, "__name__", "custom"), *genome_kind, *([job.extra_key] if job.extra_key else [])])
    result = evolve(job.pipe, job.data, genome, job.cost_model, score, seeds, config, key=key,
                    progress=job.progress, resume=job.resume, extra=job.extra, budget=job.budget,
                    checkpoint=job.out / "ecad-checkpoint.json" if job.out is not None else None)
    if job.out is not None:
        name = job.quality if isinstance(job.quality, str) else "quality"
        _write_front(result.front, job.out, name, job.cost_model.measure)
    chosen = result.pick(job.budget)
    job.front = list(result.front)
    meta = {"quality": chosen.meta["quality"], "front_size": len(result.front),
            "evaluated": result.history[-1]["evaluated"]}
    params = _config_params(config) | ({"key_steps": 1, "branch": branch} if key_steps else {})
    return replace(chosen, params=params, meta=meta)


def _config_params(config: EvolutionConfig) -> dict[str, Any]:
    return {"population": config.population, "generations": config.generations, "seed": config.seed}


def _seed_schedules(job: SearchJob, steps: int) -> list[Schedule]:
    """ECAD's seed population: uniform presets at several intervals (DeepCache branches on UNets, FORA on
    transformers; with a forecast also after two warm-up steps, and TaylorSeer's key steps), and DP schedules at
    several budgets; those whose predicted cost is closest to the budget first, since the pick is made there."""
    adapter, cost_model = job.adapter, job.cost_model
    intervals = range(2, min(steps, 8) + 1)
    warmups = (1, 2) if job.forecast else (1,)  # a forecast wants its two points early (TaylorSeer's warm-up)
    if adapter.layout().nested:
        deepest = len(adapter.unit_names) - 2  # DeepCache's deepest branch id: the mid block alone
        tags = [f"deepcache:interval={n},branch={b},warmup={w}"
                for n in intervals for b in sorted({-1, 0, deepest // 2}) for w in warmups]
    elif job.granularity == BLOCK:
        tags = [f"uniform:interval={n},warmup={w}" for n in intervals for w in warmups]
    else:
        tags = [f"fora:interval={n},warmup={w}" for n in intervals for w in warmups]
    seeds = [build_from_tag(tag, adapter, steps) for tag in tags]
    if job.forecast:
        seeds += [with_key_steps(seeds[0], taylorseer_key_steps(steps, n)) for n in intervals]
    calibration = job.calibration()
    for speedup in _DP_SEED_SPEEDUPS:
        try:
            seeds.append(dp_schedule(calibration, cost_model, Budget(cost_model.measure, 1 / speedup)))
        except SearchError:
            break
    return sorted(seeds, key=lambda s: abs(cost_model.fraction(s) - job.budget.fraction))


def taylorseer_key_steps(steps: int, interval: int, warmup: int = 2) -> np.ndarray:
    """The steps diffusers' TaylorSeerCache computes (``cache_interval``, ``disable_cache_before_step``): the
    warm-up, then one step after it and every ``interval`` from there."""
    k = np.arange(steps)
    return (k < warmup) | ((k - warmup - 1) % interval == 0)


def with_key_steps(schedule: Schedule, key: np.ndarray) -> Schedule:
    """``schedule``'s reuse pattern (what a non-key step reuses: its first reuse row) on other key steps."""
    reuse_row = schedule.recompute[~schedule.recompute.all(axis=(1, 2))][0]
    grid = np.where(key[:, None, None], True, reuse_row[None])
    return replace(schedule, recompute=grid, method="taylorseer", params={})


def _write_front(front: list[Schedule], out: Path, quality_name: str, measure: str) -> None:
    """``ecad-front.json`` (every front schedule with its quality and predicted cost) and ``ecad-pareto.png``."""
    import json

    from ..eval.plots import pareto_plot

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ecad-front.json", json.dumps([s.to_dict() for s in front], indent=1))
    points = [("", 1 / s.meta["cost"], s.meta["quality"]) for s in front]  # values are on the axes
    try:
        require("matplotlib", "eval", "the ECAD Pareto plot")
    except MissingExtraError as err:  # the front's JSON is written; the picture is optional
        logger.warning("%s; ecad-pareto.png is not drawn", err)
        return
    pareto_plot({"ECAD front": points}, out / "ecad-pareto.png", quality_name, lower_is_better=False,
                speedup_label=f"predicted speedup ({measure} cost model, x)")


__all__ = ["EvolutionConfig", "EvolutionResult", "Genome", "QualityFn", "evolve", "hypervolume"]
