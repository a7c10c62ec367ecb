"""What an experiment runs: the pipeline once per (round, training seed), each a normal run directory.

``DIR/round-R/seed-S/`` is an ordinary run (``cai-bootstrap run``/``status``/``report`` work on it).

* **Shared data.** By default every training seed uses one data seed (the config's ``seed``): one
  instruction split and one set of SFT data. The first seed's run makes them; the other seeds'
  runs *adopt* those steps (:meth:`~cai_bootstrap.run.Run.adopt`: the same files, the manifest
  entry with ``adopted_from``), so nothing is regenerated and the sharing is checked by hash.
  ``data_seeds`` gives each training seed its own data seed (and so its own split and SFT data).
* **Rounds.** Round r+1 of seed S adopts round r's baseline and instructions (the same held-out set)
  and gets ``rounds.previous`` = round r's run of seed S: its ``rounds.writer`` model (dpo by
  default) writes the new SFT data and samples the pairs (steps/common.py: ``writer_adapters``).
  Each seed is a lineage of rounds, so seeds stay independent replicates of the whole curriculum.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, PipelineConfig

# Steps the other training seeds of round 1 take from the first seed's run (shared data).
SHARED_DATA: tuple[str, ...] = ("baseline", "instructions", "sft-data")
# Steps round r+1 takes from round r of the same seed: the same split and held-out set.
LINEAGE_DATA: tuple[str, ...] = ("baseline", "instructions")


@dataclass(frozen=True)
class PlannedRun:
    round: int
    seed: int  # training seed
    data_seed: int
    adopt_from: str | None  # the run (name) whose finished steps `adopts` this run takes
    adopts: tuple[str, ...]
    previous: str | None  # round r-1's run of this seed, whose writer model writes this run's data

    @property
    def name(self) -> str:
        return run_name(self.round, self.seed)


def run_name(round_: int, seed: int) -> str:
    return f"round-{round_}/seed-{seed}"


def plan_runs(base_seed: int, seeds: int, rounds: int, data_seeds: bool) -> list[PlannedRun]:
    """Every run, round by round (all seeds of round 1 first), training seeds base_seed + k."""
    if seeds < 1 or rounds < 1:
        raise ValueError(f"need at least one seed and one round (got seeds={seeds}, rounds={rounds})")
    training = [base_seed + k for k in range(seeds)]
    planned = []
    for r in range(1, rounds + 1):
        for s in training:
            data_seed = s if data_seeds else base_seed
            if r > 1:
                before = run_name(r - 1, s)
                planned.append(PlannedRun(r, s, data_seed, before, LINEAGE_DATA, before))
            elif data_seeds or s == training[0]:
                planned.append(PlannedRun(r, s, data_seed, None, (), None))
            else:
                planned.append(PlannedRun(r, s, data_seed, run_name(1, training[0]), SHARED_DATA, None))
    return planned


def check_base_config(config: PipelineConfig) -> None:
    """The experiment sets the seeds and the rounds of each run itself."""
    if config.rounds.round != 1 or config.rounds.previous is not None:
        raise ConfigError("rounds.round and rounds.previous are set by `experiment` for each run; leave them "
                          "at their defaults in the experiment's config (rounds.writer is yours to choose)")
    if config.data_seed is not None and config.data_seed != config.seed:
        raise ConfigError("data_seed is set by `experiment` (the config's seed, or each training seed with "
                          "--data-seeds); leave it unset")


def run_config(config: PipelineConfig, planned: PlannedRun) -> PipelineConfig:
    """The config of one run: its training seed, data seed and round (the previous round's run
    given relative to this run's directory, so that the experiment folder can move)."""
    previous = f"../../{planned.previous}" if planned.previous else None
    rounds = config.rounds.model_copy(update={"round": planned.round, "previous": previous})
    data = config.model_dump(mode="json")
    data.update(seed=planned.seed, data_seed=planned.data_seed, rounds=rounds.model_dump(mode="json"))
    return PipelineConfig.model_validate(data)
