"""The plain model as a Lightning module: its loss as the training step, and the optimizer of docs/RECIPE.md
section 4. The model is `self.model`; checkpoints are its state dict."""
import pytorch_lightning as pl
import torch

from src.config import OptimConfig
from src.model.rwkv7 import RWKV


def param_groups(model: RWKV, optim: OptimConfig):
    """Section 4: the names trained at lr x1, at lr x2 (att.w0) and with weight decay."""
    wd, layerwise = optim.weight_decay, optim.layerwise_lr > 0
    lr_1x, lr_2x, decay = [], [], []
    for name, p in model.named_parameters():
        if "att.w0" in name and layerwise:
            lr_2x.append(name)
        elif wd > 0 and ".weight" in name and p.squeeze().dim() >= 2:
            decay.append(name)
        else:
            lr_1x.append(name)
    return lr_1x, lr_2x, decay


class TrainingModule(pl.LightningModule):
    def __init__(self, model: RWKV, optim: OptimConfig):
        super().__init__()
        self.model, self.optim = model, optim

    def on_train_batch_start(self, batch, batch_idx):
        # the LR schedule ends the run before a step once its progress reaches 1 (docs/RECIPE.md section 6)
        return -1 if self.trainer.should_stop else None

    def training_step(self, batch, batch_idx):
        idx, targets = batch[:2]   # the jsonl stream adds its reader positions (src/data/dataset.py)
        return self.model.loss(idx, targets)

    def configure_optimizers(self):
        o = self.optim
        params = dict(self.model.named_parameters())
        lr_1x, lr_2x, decay = param_groups(self.model, o)
        groups = [
            {"params": [params[n] for n in lr_1x], "weight_decay": 0.0, "my_lr_scale": 1.0},
            {"params": [params[n] for n in lr_2x], "weight_decay": 0.0, "my_lr_scale": 2.0},
        ]
        if o.weight_decay > 0:
            groups.append({"params": [params[n] for n in decay], "weight_decay": o.weight_decay, "my_lr_scale": 1.0})
        groups = [g for g in groups if g["params"]]
        betas, decoupled = (o.beta1, o.beta2), o.weight_decay > 0
        if o.optimizer == "fused":
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps, bias_correction=True,
                             adam_w_mode=decoupled, amsgrad=False)
        if o.optimizer == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps, bias_correction=True,
                                    adamw_mode=decoupled, amsgrad=False)
        optimizer_class = torch.optim.AdamW if decoupled else torch.optim.Adam
        return optimizer_class(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps)
