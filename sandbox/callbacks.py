"""Lightning callbacks of the sandbox: throughput and plain progress lines."""

import sys
import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Logs `train/tokens_per_s` once per training epoch (all tokens of the batch, labelled or not)."""

    def on_train_start(self, trainer, pl_module):
        # A run resumed in the middle of an epoch starts counting here (no on_train_epoch_start for that epoch).
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._tokens, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch[0].numel()

    def on_train_epoch_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and self._tokens:
            pl_module.log("train/tokens_per_s", self._tokens * trainer.world_size / elapsed)


class EpochLines(L.Callback):
    """One plain line per validation, for logs that are not a terminal (no progress-bar redraws)."""

    KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "train/tokens_per_s")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4g}" for k in self.KEYS if k in metrics)
        print(f"epoch {trainer.current_epoch}  step {trainer.global_step}  {shown}", file=sys.stdout, flush=True)
