"""``NormWatch``: the training loop's side of norm telemetry (``normcore.telemetry``).

The loop calls :meth:`NormWatch.start` once before the first step, :meth:`NormWatch.after_step`
after every optimizer step and :meth:`NormWatch.at_eval` after each evaluation. It sends
:class:`~normcore.engine.callbacks.NormRecord` s, the gap metric rows (split "gap") and warnings
to the callbacks, and raises :class:`~normcore.engine.callbacks.NormStatsNonFinite` when a
running statistic or gamma becomes non-finite.

Cost: the per-step check sums each running_mean/running_var/gamma (one small reduction each) and
on CPU reads the flag at once, so a non-finite value fails the run at the step it appears; on
CUDA the flags are and-ed on the device and read every ``check_every`` steps (like the loss),
so the run fails up to that many steps late. The records and the probe run at evaluations only
(and every ``spec.telemetry.every_steps`` steps when asked): benchmarks/telemetry_cost.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from normcore.data.loader import to_device
from normcore.engine.callbacks import CallbackList, MetricRow, NormRecord, NormStatsNonFinite
from normcore.engine.precision import Precision
from normcore.spec import JobSpec
from normcore.telemetry import (
    ACT_PROBE_SAMPLES,
    GAP_PROBE_SAMPLES,
    GAP_PROBE_SAMPLES_LARGE,
    SMALL_BATCH,
    FiniteCheck,
    NormTelemetry,
    collapsed_layers,
    gap_probe,
    gap_warning,
)

__all__ = ["NormWatch"]


class NormWatch:
    """Norm telemetry, the train/eval gap probe and the non-finite check for one run.

    ``bundle`` is the run's data (``val_batches``, ``val_x``, ``train_x``); ``check_every`` is
    how many steps the device flag is and-ed before it is read (1 on CPU).
    """

    def __init__(
        self,
        spec: JobSpec,
        bundle: Any,
        model: nn.Module,
        prec: Precision,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        cbs: CallbackList,
        steps_per_epoch: int,
        check_every: int = 1,
    ) -> None:
        self.spec, self.model, self.prec, self.loss_fn, self.cbs = spec, model, prec, loss_fn, cbs
        self.check_every = max(1, check_every)
        self.every_steps = spec.telemetry.every_steps
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = spec.data.batch_size
        source = bundle.val_x if bundle.num_val > 0 else bundle.train_x
        probe = prec.inputs(to_device(source[:ACT_PROBE_SAMPLES], prec.device))
        self.telemetry = NormTelemetry(model, probe)
        self.finite = FiniteCheck(model)
        self._flag: Tensor | None = None
        # the gap probe's fixed validation batches: whole training batches only (BatchNorm in
        # train mode needs more than one sample, and every batch is then the training size)
        samples = GAP_PROBE_SAMPLES if self.batch_size < SMALL_BATCH else GAP_PROBE_SAMPLES_LARGE
        wanted = max(1, samples // self.batch_size)
        self.gap_batches: list[tuple[Tensor, Tensor]] = []
        for x, y in bundle.val_batches(self.batch_size, prec.device):
            if len(self.gap_batches) >= wanted:
                break
            if int(y.shape[0]) == self.batch_size:
                self.gap_batches.append((x, y))
        self.last: list[dict[str, Any]] = []
        self._collapsed: set[str] = set()

    def _record(self, step: int, epoch: int, trigger: str) -> list[dict[str, Any]]:
        layers = self.telemetry.record()
        self.last = layers
        if layers:
            self.cbs.norms(NormRecord(step, epoch, trigger, layers, time.time()))
            collapsed = set(collapsed_layers(layers)) - self._collapsed
            if collapsed:
                self._collapsed |= collapsed
                self.cbs.warning(
                    {
                        "code": "variance_collapse",
                        "message": (
                            f"variance collapse at step {step}: every channel's variance is "
                            f"below eps in {', '.join(sorted(self._collapsed))}; these layers "
                            "now divide by ~sqrt(eps). Lower optim.lr or the weight decay, "
                            "or check for constant inputs."
                        ),
                        "source": "telemetry",
                    }
                )
        return layers

    def start(self, step: int, epoch: int) -> None:
        """The baseline record (drift is measured from here), before the first step."""
        self._record(step, epoch, "start")

    def after_step(self, step: int, epoch: int) -> None:
        """The non-finite check (raises NormStatsNonFinite naming the layers) and, when due,
        a record every ``spec.telemetry.every_steps`` steps."""
        flag = self.finite.flag()
        if flag is not None:
            self._flag = flag if self._flag is None else self._flag & flag
            if step % self.check_every == 0:
                self.check(step, epoch)
        # an epoch's last step gets its record at the evaluation instead
        if self.every_steps and step % self.every_steps == 0 and step % self.steps_per_epoch:
            self._record(step, epoch, "steps")

    def check(self, step: int, epoch: int) -> None:
        """Read the pending flag (a host sync); raise NormStatsNonFinite if a layer is bad."""
        flag, self._flag = self._flag, None
        if flag is None or bool(flag):
            return
        bad = self.finite.bad_layers()
        if bad:
            raise NormStatsNonFinite(step, epoch, bad)

    def at_eval(self, step: int, epoch: int) -> None:
        """The gap probe (a "gap" metric row) and a record; a warning when the gap is large
        at a small per-device batch (``normcore.telemetry.gap_warning``)."""
        self.check(step, epoch)
        with self.prec.autocast():
            gap = gap_probe(
                self.model,
                self.gap_batches,
                self.loss_fn,
                classification=self.spec.task == "classification",
                inputs=self.prec.inputs,
            )
        if gap is not None:
            self.cbs.metrics(MetricRow(step, epoch, "gap", gap, time.time()))
        layers = self._record(step, epoch, "eval")
        warning = gap_warning(gap, self.batch_size, layers)
        if warning is not None:
            self.cbs.warning(warning)
