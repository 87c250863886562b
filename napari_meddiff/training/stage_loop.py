"""What the two training stages (autoencoder, diffusion) share around their own training step: seeding, the
progress a checkpoint carries across resumes, and the loop that keeps to the time budget, stops cleanly on a
signal, keeps the running loss, the loss history and the progress bar, and writes timed checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_meddiff.training.checkpoints import set_rng_state
from napari_meddiff.training.distributed import Dist, stop_agreed
from napari_meddiff.training.reporting import progress_bar
from napari_meddiff.training.stopping import STOP, Budget, stopped


def seeded_generator(seed: int, rank: int, stream: int) -> torch.Generator:
    """Seed torch's global RNG (network initialisation, dropout) for this rank and return the stage's own
    generator of batches, crops and noise (``stream`` keeps the stages' generators apart)."""
    torch.manual_seed(seed + 1000 * rank)
    return torch.Generator().manual_seed(seed * 7919 + 17 * rank + stream)


@dataclass
class Progress:
    """How far a stage has got: what its checkpoint carries over to a resumed run."""

    step: int = 0
    minutes: float = 0.0
    cpu_minutes: float = 0.0
    history: dict[str, list] = field(default_factory=dict)

    @classmethod
    def resumed(cls, st: dict[str, Any], gen: torch.Generator) -> Progress:
        """The progress of checkpoint ``st``; its RNG states go back into torch and ``gen``."""
        set_rng_state(gen, st["rng"])
        return cls(int(st["step"]), float(st["minutes"]), float(st.get("cpu_minutes", 0.0)), st["history"])


class StageLoop:
    """The step loop of a training stage, around the stage's own training step::

        loop = StageLoop("diffusion", cfg["name"], tc, dist, progress, max_minutes=..., checkpoint_path=...,
                         save=..., show_progress=..., log=log)
        loop.open_bar()
        with STOP:
            while loop.goes_on():
                ...  # one optimiser step
                loop.step += 1
                if loop.logs_now():
                    loop.add_to_history(loss=dist.mean(value))
                loop.step_done("loss", value)
                ...  # validation when loop.validates_now()
                loop.checkpoint_if_due()
        loop.end()  # a stop on any rank: checkpoint, then raise `TrainingStopped`

    ``save`` writes the stage's checkpoint (on the main rank) from ``progress_fields()`` and its own state.
    """

    def __init__(
        self,
        stage: str,
        title: str,
        tc: dict[str, Any],
        dist: Dist,
        progress: Progress,
        *,
        max_minutes: float | None,
        checkpoint_path: Path,
        save: Callable[[], None],
        show_progress: bool,
        log: logging.Logger,
    ) -> None:
        self.stage, self.title, self.dist = stage, title, dist
        self.total = int(tc["steps"])
        self.log_every, self.val_every = int(tc["log_every"]), tc["val_every"]
        self.checkpoint_minutes = float(tc["checkpoint_minutes"])
        self.step, self.history = progress.step, progress.history
        self.budget = Budget(max_minutes, progress.minutes, progress.cpu_minutes)
        self.checkpoint_path, self.save = checkpoint_path, save
        self.show_progress, self._log = show_progress, log
        self.running: float | None = None  # the smoothed loss shown by the bar and the checkpoint log lines
        self.last_checkpoint = self.budget.minutes
        self.bar: Any = None

    def open_bar(self) -> None:
        """The progress bar (the main rank's, when progress is shown), from the step reached."""
        self.bar = progress_bar(
            self.total, self.step, f"{self.title} {self.stage}", self.dist.main and self.show_progress
        )

    def goes_on(self) -> bool:
        """Whether to take another step: steps and minutes left, and no rank asked to stop (every rank calls it)."""
        return self.step < self.total and not self.dist.any(self.budget.exhausted() or STOP.requested)

    def logs_now(self) -> bool:
        """Whether this step goes into the loss history (every ``log_every`` steps, and the first)."""
        return self.step % self.log_every == 0 or self.step == 1

    def validates_now(self) -> bool:
        """Whether the main rank validates (or previews) after this step."""
        return bool(self.dist.main and self.val_every and self.step % int(self.val_every) == 0)

    def add_to_history(self, **values: float) -> None:
        """Add this step's ``values`` to the loss history."""
        for name, value in values.items():
            self.history[name].append((self.step, value))

    def step_done(self, name: str, value: float) -> None:
        """Fold the step's loss ``value`` into the running loss and show it on the progress bar as ``name``."""
        self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
        self.bar.update(1)
        self.bar.set_postfix(**{name: f"{self.running:.4f}"}, min=f"{self.budget.minutes:.1f}", refresh=False)

    def checkpoint_if_due(self) -> None:
        """A checkpoint every ``checkpoint_minutes``; without a progress bar, a log line with each."""
        if self.budget.minutes - self.last_checkpoint >= self.checkpoint_minutes:
            self.save()
            self.last_checkpoint = self.budget.minutes
            if self.dist.main and not self.show_progress:  # no bar: one line per checkpoint instead
                self._log.info(
                    "%s: step %d/%d, loss %.4f, %.1f min",
                    self.stage,
                    self.step,
                    self.total,
                    self.running,
                    self.budget.minutes,
                )

    def end(self) -> None:
        """After the loop: when some rank was asked to stop, write the checkpoint and raise `TrainingStopped`."""
        self.bar.close()
        if stop_agreed(self.dist):
            self.save()
            raise stopped(f"{self.stage} training", self.step, self.checkpoint_path, self.dist.main)

    def progress_fields(self) -> dict[str, Any]:
        """The progress entries of a checkpoint (they come first in it)."""
        return {
            "step": self.step,
            "minutes": self.budget.minutes,
            "cpu_minutes": self.budget.cpu_minutes,
            "history": self.history,
        }

    def time_spent(self) -> dict[str, Any]:
        """The first entries of a stage's summary: steps taken and minutes spent, across resumes."""
        return {
            "steps": self.step,
            "minutes": round(self.budget.minutes, 2),
            "cpu_minutes": round(self.budget.cpu_minutes, 2),
        }


def tail_mean(points: list[tuple[int, float]]) -> float:
    """The mean of the last tenth (at least one) of a loss history's values, rounded to 5 places (nan when empty)."""
    values = [v for _, v in points]
    tail = values[-max(1, len(values) // 10) :] if values else [float("nan")]
    return round(sum(tail) / len(tail), 5)
