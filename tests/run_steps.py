"""Train for a fixed number of steps through train.py's own path and write the per-step losses (mean over
ranks) as JSON: the GPU parity checks compare such runs.

    python tests/run_steps.py --steps 300 --out losses.json [--batches_out DIR] -- <train.py flags>

--batches_out: every rank also writes the (x, y) batches it trained on, in step order, to DIR/rank<r>.pt.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (first: importing src sets its warning filters before Lightning is imported)
from src.train.callbacks import TrainCallback  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class BatchRecorder(pl.Callback):
    def __init__(self, folder):
        self.folder, self.batches = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(tuple(t.cpu() for t in batch[:2]))   # the stream's third: positions

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.folder, exist_ok=True)
        torch.save(self.batches, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(loss.item())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches_out")
    args, train_argv = parser.parse_known_args()
    flags = train.parse_flags([a for a in train_argv if a != "--"])
    from src.engine.threads import use_cpu_threads
    use_cpu_threads(flags["accelerator"], max(flags["threads"], 0), flags["devices"])   # as train.main: same sums
    cfg, dataset, val_tokens, start = train.prepare(flags)
    model = train.build_model(cfg, start.path, start.state_dict)
    module = train.training_module(cfg, model)
    recorder = LossRecorder()
    callbacks = [TrainCallback(cfg, dataset, val_tokens, start.resume), recorder]
    if args.batches_out:
        callbacks.append(BatchRecorder(args.batches_out))
    trainer = train.fit(cfg, module, dataset, callbacks, max_steps=args.steps)
    if trainer.is_global_zero:
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        with open(args.out, "w") as f:
            # logged_loss: what the progress bar last showed (the mini-epoch's running mean, as TrainCallback logs it)
            json.dump({"losses": recorder.losses, "logged_loss": callbacks[0].shown["loss"],
                       "peak_mem_gb": peak, "world_size": trainer.world_size,
                       "cuda_graph": getattr(model.trunk, "graphed", None) is not None}, f)


if __name__ == "__main__":
    main()
