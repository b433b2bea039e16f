"""Train for a fixed number of steps through train.py's own path and write the per-step losses (mean over
ranks) as JSON: the GPU parity checks compare such runs.

    python tests/run_steps.py --steps 300 --out losses.json -- <train.py flags>
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402
from src.trainer import TrainCallback  # noqa: E402


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
    args, train_argv = parser.parse_known_args()
    cfg = train.parse_args([a for a in train_argv if a != "--"])
    dataset, val_tokens, start_path, state_dict = train.prepare(cfg)
    model = train.build_model(cfg, start_path, state_dict)
    recorder = LossRecorder()
    trainer = train.fit(cfg, model, dataset, [TrainCallback(cfg, dataset, val_tokens), recorder], max_steps=args.steps)
    if trainer.is_global_zero:
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "peak_mem_gb": peak, "world_size": trainer.world_size}, f)


if __name__ == "__main__":
    main()
