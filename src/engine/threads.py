"""How many threads torch computes with on CPU. torch's default, one per core, stalls as soon as anything else
runs: every operation ends when its slowest thread does, and a thread whose core is taken (by the data loader's
workers, another process) holds up all the others for a scheduler slice, at every operation. Measured on a 2-core
machine, s/step of train.py with 1 against 2 threads: the offline demo (L2-D128, 8 x 128 tokens) 1.9 against 1.2
idle but 14 with 2 threads while another process ran; L4-D256 at 8 x 256 tokens 8.1 against 5.0 idle, 10.1 against
41.2 beside other processes: a core left idle costs up to 1.6 times the time, a core shared 2 to 12 times.
"""
import os

import torch


def cpu_threads(requested=0, processes=1):
    """Threads for each of `processes` training processes on this machine: `requested` if > 0, else OMP_NUM_THREADS
    if set, else the process's share of the cores it may use less one, left to its data loader's workers and
    whatever else runs (at least 1: on 2 cores, 1)."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, len(os.sched_getaffinity(0)) // processes - 1)


def use_cpu_threads(device, requested=0, processes=1):
    """On CPU, set torch's threads (cpu_threads) before the heavy work and return their count; on another device,
    leave them and return None. The data loader's worker processes compute with one thread (torch sets it there)."""
    if device != "cpu":
        return None
    torch.set_num_threads(cpu_threads(requested, processes))
    return torch.get_num_threads()
