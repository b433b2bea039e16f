import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src.data import DataError
from src.data.binidx import write_binidx
from src.data.dataset import (MINI_EPOCH_SAMPLES, BinidxDataset, check_magic_prime, find_magic_prime, is_prime,
                         recipe_flags, sample_start)

MINIPILE_TOKENS, MINIPILE_PRIME = 1_498_226_207, 2_926_181


@pytest.mark.parametrize("epoch, idx, world_size, rank, start", [
    (0, 0, 1, 0, 925941248), (0, 1, 1, 0, 1414711296), (0, 2, 1, 0, 1029138944),
    (3, 100, 1, 0, 1342966272), (0, 5, 2, 1, 1442091520), (71, 40319, 1, 0, 783915008)])
def test_minipile_sample_starts(epoch, idx, world_size, rank, start):
    assert sample_start(MINIPILE_PRIME, 512, epoch, idx, world_size, rank) == start


def test_find_magic_prime():
    assert find_magic_prime(MINIPILE_TOKENS, 512) == MINIPILE_PRIME
    assert MINIPILE_PRIME // MINI_EPOCH_SAMPLES == 72
    for data_size in range(30_000, 3_000_000, 99_991):
        slots = data_size // 64
        naive = max(p for p in range(2, slots) if p % 3 == 2 and all(p % q for q in range(2, int(p ** 0.5) + 1)))
        assert find_magic_prime(data_size, 64) == naive


def test_is_prime():
    sieve = np.ones(20_000, bool)
    sieve[:2] = False
    for n in range(2, 142):
        sieve[n * n::n] = False
    assert [is_prime(n) for n in range(20_000)] == sieve.tolist()
    assert is_prime(2**61 - 1) and not is_prime(3215031751) and not is_prime(2**61 + 1)


def test_each_slot_once_per_magic_prime_samples():
    p, ctx_len = 1013, 8  # prime, 2 mod 3
    starts = {sample_start(p, ctx_len, 0, idx, 1, 0) for idx in range(p)}
    assert starts == set(range(0, p * ctx_len, ctx_len))


@pytest.mark.parametrize("magic_prime, problem", [
    (2926183, "is not prime"), (2926177, "is not 2 mod 3"), (2633597, "is out of range"),
    (2926271, "is out of range")])
def test_check_magic_prime(magic_prime, problem):
    check_magic_prime(MINIPILE_PRIME, MINIPILE_TOKENS, 512, "minipile")
    with pytest.raises(DataError, match=f"--magic_prime {magic_prime} {problem}.* for minipile .*"
                                        f"use --magic_prime {MINIPILE_PRIME}"):
        check_magic_prime(magic_prime, MINIPILE_TOKENS, 512, "minipile")


def test_magic_prime_leaves_room_for_the_last_sample():
    p = 1013  # prime, 2 mod 3; with exactly p slots the last sample needs one token more
    with pytest.raises(DataError, match="out of range.*use --magic_prime 983"):
        check_magic_prime(p, p * 8, 8, "d")
    check_magic_prime(p, p * 8 + 1, 8, "d")


def test_recipe_flags():
    assert recipe_flags(MINIPILE_TOKENS, 512) == f"--my_exit_tokens {MINIPILE_TOKENS} --magic_prime {MINIPILE_PRIME} --ctx_len 512"
    flags = recipe_flags(10_000_000, 512)
    assert "less than one mini-epoch" in flags and "--copies 3 " in flags
    assert find_magic_prime(2 * 10_000_000, 512) < MINI_EPOCH_SAMPLES <= find_magic_prime(3 * 10_000_000, 512)
    with pytest.raises(DataError, match="too few"):
        recipe_flags(100 * 512, 512)


def make_binidx(tmp_path, num_tokens, dtype=np.uint16):
    prefix = str(tmp_path / "d")
    write_binidx(prefix, [np.arange(num_tokens) % 65536], dtype=dtype)
    return prefix


CTX, MICRO = 16, 8


@pytest.fixture
def data_file(tmp_path):
    return make_binidx(tmp_path, 60_000)


def test_binidx_dataset_samples(data_file):
    magic_prime = find_magic_prime(60_000, CTX)
    dataset = BinidxDataset(data_file, CTX, magic_prime, MICRO, 2, 65536, MINI_EPOCH_SAMPLES // (2 * MICRO))
    assert len(dataset) == MINI_EPOCH_SAMPLES // 2
    dataset.real_epoch, dataset.global_rank = 3, 1
    x, y = dataset[7]
    start = sample_start(magic_prime, CTX, 3, 7, 2, 1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (CTX,)
    assert x.tolist() == list(range(start, start + CTX)) and y.tolist() == list(range(start + 1, start + CTX + 1))

    loader = DataLoader(dataset, batch_size=MICRO, shuffle=False, drop_last=True, num_workers=1,
                        persistent_workers=False)
    x, y = next(iter(loader))
    assert x.shape == (MICRO, CTX)
    assert x[:, 0].tolist() == [sample_start(magic_prime, CTX, 3, i, 2, 1) for i in range(MICRO)]


def test_binidx_dataset_bad_input(tmp_path, data_file):
    magic_prime = find_magic_prime(60_000, CTX)
    steps = MINI_EPOCH_SAMPLES // MICRO
    with pytest.raises(DataError, match=r"micro_bsz 11 x 1 GPUs = 11 does not divide.*\[1, 2, 3"):
        BinidxDataset(data_file, CTX, magic_prime, 11, 1, 65536, steps)
    with pytest.raises(DataError, match=f"needs --epoch_steps {steps}"):
        BinidxDataset(data_file, CTX, magic_prime, MICRO, 1, 65536, steps + 1)
    with pytest.raises(DataError, match=f"use --magic_prime {magic_prime}"):
        BinidxDataset(data_file, CTX, magic_prime + 2, MICRO, 1, 65536, steps)
    with pytest.raises(DataError, match="token id 50000"):
        BinidxDataset(data_file, CTX, magic_prime, MICRO, 1, 50000, steps)
    tiny = make_binidx(tmp_path, CTX)
    with pytest.raises(DataError, match="16 tokens, fewer than one sample"):
        BinidxDataset(tiny, CTX, 5, MICRO, 1, 65536, steps)
