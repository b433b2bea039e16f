"""Training throughput of the real train.py step (Lightning + DeepSpeed, bf16) on random tokens; one JSON line.

    python tools/benchmark.py --preset minipile --grad_cp 1
    python tools/benchmark.py --preset pile --grad_cp 1 --devices 2

MFU = 6 x (parameters of every matrix multiply, head included, embedding excluded) x tokens/s / 989e12
(the H100's dense bf16 rate).
"""
import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (first: importing src sets its warning filters before Lightning is imported)
from src.config import build_config  # noqa: E402
from src.model import RWKV  # noqa: E402
from src.train.callbacks import TrainCallback  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

PRESETS = {
    "minipile": dict(n_layer=12, n_embd=768, ctx_len=512, micro_bsz=16),
    "pile": dict(n_layer=18, n_embd=1024, ctx_len=4096, micro_bsz=24),
    "tiny": dict(n_layer=2, n_embd=128, ctx_len=64, micro_bsz=2),   # a smoke test of the tool itself
}
PEAK_FLOPS = 989e12


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, num_samples, ctx_len, vocab_size):
        self.num_samples, self.ctx_len, self.vocab_size = num_samples, ctx_len, vocab_size

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        tokens = torch.randint(0, self.vocab_size, (self.ctx_len + 1,), generator=torch.Generator().manual_seed(idx))
        return tokens[:-1], tokens[1:]


class StepTimer(pl.Callback):
    """Wall time between step ends; TrainCallback reads the loss every step, so each end is a finished step."""

    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


class HostProfiler(pl.Callback):
    """cProfile over a few steps after warm-up; prints where the host's (Python's) time goes."""

    def __init__(self, first, count=3):
        import cProfile
        self.first, self.count, self.profiler = first, count, cProfile.Profile()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            self.profiler.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.first + self.count - 1:
            import pstats
            self.profiler.disable()
            if trainer.is_global_zero:
                stats = pstats.Stats(self.profiler, stream=sys.stdout)
                for order in ("tottime", "cumulative"):
                    print(f"host profile of {self.count} steps, by {order}:")
                    stats.sort_stats(order).print_stats(30)


class StepProfiler(pl.Callback):
    """torch.profiler over a few steps after warm-up; prints where the GPU time goes."""

    def __init__(self, first, count=3):
        self.first, self.count, self.profiler = first, count, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None and batch_idx == self.first + self.count - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            if trainer.is_global_zero:
                events = self.profiler.key_averages()
                print(f"profile of {self.count} steps:\n" + events.table(
                    sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=30, max_name_column_width=60))
                # kernels only: NCCL's calls also appear as GPU annotations spanning their kernels
                kernels = [e for e in self.profiler.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
                syncs = {e.key: e.count // self.count for e in events
                         if "Synchronize" in e.key or e.key in ("aten::_local_scalar_dense", "cudaMemcpyAsync")}
                print(f"per step: {len(kernels) // self.count} GPU kernels, "
                      f"{sum(e.device_time for e in kernels) / 1000 / self.count:.1f} ms of kernel time; host syncs {syncs}")
            self.profiler = None


class SyncReporter(pl.Callback):
    """Lists the calls that make the host wait for the GPU during one step (torch's sync debug mode), each with
    the last Python frames outside torch that led to it."""

    def __init__(self, step):
        self.step, self.calls, self.show = step, collections.Counter(), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.step and pl_module.device.type == "cuda":
            self.show, warnings.showwarning = warnings.showwarning, self.record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self.show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-3:]
        self.calls[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.step and self.show is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self.show
            if trainer.is_global_zero:
                print(f"host waits for the GPU in step {self.step}: {sum(self.calls.values())}")
                for where, count in self.calls.most_common():
                    print(f"  {count} x {where}")


def matmul_params(model: RWKV):
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "emb.weight" and "r_k" not in n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="minipile")
    parser.add_argument("--grad_cp", type=int, default=1)
    parser.add_argument("--micro_bsz", type=int, default=0, help="0: the preset's")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--strategy", default="deepspeed_stage_2")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--fused", type=int, default=1, help="0: the plain path (sequential kernel, eager, full logits)")
    parser.add_argument("--compile_blocks", type=int, default=0, help="1: compile whole blocks (train.py's flag)")
    parser.add_argument("--cuda_graph", type=int, default=1, help="0: the blocks run eagerly (train.py's flag)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile and torch.profiler tables of 3 steps each and the host's waits for the GPU "
                             "in one step (their steps are slower)")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    if args.micro_bsz:
        preset["micro_bsz"] = args.micro_bsz
    with tempfile.TemporaryDirectory() as proj_dir:
        # jsonl: a mini-epoch of --epoch_steps steps (binidx would derive it from --magic_prime); the data is random
        cfg = build_config(dict(**preset, proj_dir=proj_dir, grad_cp=args.grad_cp, devices=args.devices,
                                accelerator=args.accelerator, strategy=args.strategy, precision=args.precision,
                                ds_bucket_mb=200, vocab_size=65536, data_type="jsonl", epoch_steps=args.steps,
                                epoch_count=1000, warmup_steps=10, lr_init=6e-4, lr_final=6e-5, weight_decay=0.001,
                                enable_progress_bar=False, random_seed=0, fused=args.fused,
                                compile_blocks=args.compile_blocks, cuda_graph=args.cuda_graph))
        model = RWKV(cfg.model)
        model.init_weights()
        module = train.training_module(cfg, model)
        dataset = RandomTokens(args.steps * cfg.data.micro_bsz, cfg.data.ctx_len, cfg.model.vocab_size)
        timer = StepTimer()
        profilers = [HostProfiler(args.steps - 8), StepProfiler(args.steps - 4), SyncReporter(args.steps - 10)]
        callbacks = [TrainCallback(cfg, dataset), timer] + (profilers if args.profile else [])
        trainer = train.fit(cfg, module, dataset, callbacks, max_steps=args.steps)
    if not trainer.is_global_zero:
        return
    step_s = statistics.median(b - a for a, b in zip(timer.times[args.warmup:], timer.times[args.warmup + 1:]))
    tokens_per_s = cfg.tokens_per_step / step_s
    gpu = torch.cuda.is_available() and args.accelerator != "cpu"
    result = dict(preset=args.preset, n_layer=cfg.model.n_layer, n_embd=cfg.model.n_embd, ctx_len=cfg.data.ctx_len,
                  micro_bsz=cfg.data.micro_bsz, devices=args.devices, grad_cp=args.grad_cp, fused=args.fused,
                  compile_blocks=cfg.perf.compile_blocks, cuda_graph=getattr(model.trunk, "graphed", None) is not None,
                  strategy=args.strategy,
                  precision=args.precision, steps=args.steps, step_ms=round(step_s * 1000, 2),
                  tokens_per_s=round(tokens_per_s),
                  mfu=round(6 * matmul_params(model) * tokens_per_s / (PEAK_FLOPS * args.devices), 4),
                  peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else None,
                  # what the allocator holds besides: a CUDA graph's memory pool serves only its own replays
                  peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if gpu else None,
                  device=torch.cuda.get_device_name() if gpu else "cpu")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
