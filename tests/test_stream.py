import json
import os
import shutil

import pytest
import torch
import zstandard
from torch.utils.data import DataLoader

import src.data.dataset
from src.data import DataError
from src.data.dataset import JsonlStreamDataset, find_shards
from src.data.tokenizer import RWKVTokenizer
from tests.data_helpers import (GUTENBERG, documents, passes_cover_every_document_once, write_numbered_shards,
                                served_by_readers, windows, write_shard)

CTX, MICRO, STEPS = 16, 2, 20  # per mini-epoch and rank: 20 batches of 2 samples
RANKS, WORKERS = 2, 2
LINES = 12  # per shard; with 4 shards and 2 x 2 readers, 3 lines of each shard per reader


@pytest.fixture(scope="module")
def tokenizer():
    return RWKVTokenizer()


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    return str(folder), write_numbered_shards(folder, LINES)


def make_dataset(paths, state_dir, seed=0, ctx_len=CTX, micro_bsz=MICRO, epoch_steps=STEPS):
    return JsonlStreamDataset(paths, ctx_len, micro_bsz, epoch_steps, seed, str(state_dir))


def serve(dataset, epoch, rank=0, world_size=1, num_workers=WORKERS, positions=False):
    """One mini-epoch of one rank as the trainer reads it: a fresh DataLoader after setting the attributes; with
    positions, each batch's reader positions too."""
    dataset.real_epoch, dataset.global_rank, dataset.world_size = epoch, rank, world_size
    loader = DataLoader(dataset, batch_size=dataset.micro_bsz, shuffle=False, drop_last=True,
                        num_workers=num_workers, persistent_workers=False)
    return [(x.clone(), y.clone(), *([p] if positions else [])) for x, y, p in loader]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_resume_inside_a_mini_epoch_at_the_exact_document_and_window(tmp_path, shards, workers):
    """A full state saved after any batch S of a mini-epoch holds each reader's position after its last batch (the
    third element of the batch); a new loader given S and those positions serves exactly batches S, S + 1, ... of
    the uninterrupted mini-epoch, whose end positions it saves as the uninterrupted loader did."""
    folder, _ = shards
    dataset = make_dataset(folder, tmp_path / "state")
    serve(dataset, 0, 1, RANKS, workers)
    continuous = serve(dataset, 1, 1, RANKS, workers, positions=True)   # starts from mini-epoch 0's saved end
    ends = {name: open(tmp_path / "state" / name).read() for name in os.listdir(tmp_path / "state")}
    for start in (1, 2, 5, STEPS - 1):
        state = tmp_path / f"state{start}"
        shutil.copytree(tmp_path / "state", state)
        for name in os.listdir(state):
            if name.endswith("-after-1.json"):
                os.remove(state / name)   # the crash came inside mini-epoch 1
        positions = {}
        for _, _, batch_positions in continuous[:start]:
            position = json.loads(batch_positions[-1])
            positions[position.pop("reader")] = position
        resumed = make_dataset(folder, state)
        resumed.resume_at(start, positions)
        batches = serve(resumed, 1, 1, RANKS, workers, positions=True)
        assert len(batches) == STEPS - start
        assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(batches, continuous[start:]))
        assert {name: open(state / name).read() for name in os.listdir(state)} == ends


def test_two_ranks_two_workers_no_overlap_full_coverage(tmp_path, shards, tokenizer):
    folder, texts = shards
    dataset = make_dataset(folder, tmp_path / "state")
    rank_batches = [[] for _ in range(RANKS)]
    for epoch in range(3):
        for rank in range(RANKS):
            batches = serve(dataset, epoch, rank, RANKS)
            assert len(batches) == STEPS and all(x.shape == (MICRO, CTX) for x, _ in batches)
            rank_batches[rank] += batches
    served = served_by_readers(rank_batches, WORKERS, tokenizer)
    first_pass, second_pass = passes_cover_every_document_once(served, texts, passes=2)
    assert first_pass != second_pass  # a new pass visits the shards in a new order


def test_exact_resume_and_replay(tmp_path, shards, capsys):
    folder, _ = shards
    state = tmp_path / "state"
    dataset = make_dataset(folder, state)
    continuous = [serve(dataset, epoch, 1, RANKS) for epoch in range(3)]

    restarted_state = tmp_path / "restarted"  # a crash during mini-epoch 2: its end was never saved
    shutil.copytree(state, restarted_state)
    for name in os.listdir(restarted_state):
        if name.endswith("-after-2.json"):
            os.remove(restarted_state / name)
    restarted = make_dataset(folder, restarted_state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serve(restarted, 2, 1, RANKS), continuous[2]))

    replayed = make_dataset(folder, tmp_path / "empty")  # no saved positions at all
    replayed.real_epoch, replayed.global_rank, replayed.world_size = 2, 1, RANKS
    samples = list(replayed.samples(1, WORKERS))
    assert "no stream position of rank1of2-worker1of2 after mini-epoch 1" in capsys.readouterr().out
    expected = [x for k, (x, _) in enumerate(continuous[2]) if k % WORKERS == 1]
    assert torch.equal(torch.stack([x for x, *_ in samples]), torch.cat(expected))


def test_resume_reads_only_from_the_saved_position(tmp_path, shards, monkeypatch):
    folder, _ = shards
    dataset = make_dataset(folder, tmp_path / "state")
    for epoch in range(3):
        serve(dataset, epoch, num_workers=0)
    opened = []
    read_lines = src.data.dataset.iter_shard_lines
    monkeypatch.setattr(src.data.dataset, "iter_shard_lines", lambda path, problems: opened.append(path) or read_lines(path, problems))
    dataset.real_epoch = 3
    list(dataset.samples(0, 1))
    resumed = len(opened)
    replay = make_dataset(folder, tmp_path / "empty")
    replay.real_epoch = 3
    list(replay.samples(0, 1))
    assert resumed <= 3 < len(opened) - resumed


def test_deterministic_and_seeded(tmp_path, shards):
    folder, _ = shards
    first = serve(make_dataset(folder, tmp_path / "a", seed=7), 0, num_workers=0)
    again = serve(make_dataset(folder, tmp_path / "b", seed=7), 0, num_workers=0)
    other = serve(make_dataset(folder, tmp_path / "c", seed=8), 0, num_workers=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_exact_sample_count_for_any_worker_count(tmp_path, shards, num_workers):
    folder, _ = shards
    dataset = make_dataset(folder, tmp_path / "state", epoch_steps=7)
    for epoch in range(2):
        assert len(serve(dataset, epoch, num_workers=num_workers)) == 7 == len(dataset) // MICRO


def test_saved_state_of_other_data_is_refused(tmp_path, shards):
    folder, _ = shards
    serve(make_dataset(folder, tmp_path / "state", seed=1), 0, num_workers=0)
    with pytest.raises(DataError, match="saved for other data or seed.*new state dir"):
        serve(make_dataset(folder, tmp_path / "state", seed=2), 1, num_workers=0)


def test_data_smaller_than_one_sample_per_reader(tmp_path):
    shard = write_shard(str(tmp_path / "00.jsonl"), [{"text": "one"}, {"text": "two"}])
    dataset = make_dataset(shard, tmp_path / "state", ctx_len=4, epoch_steps=4)
    dataset.world_size, dataset.global_rank = 2, 1
    with pytest.raises(DataError, match="reader 3 of 4 .* got 0 tokens in a whole pass"):
        list(dataset.samples(1, 2))
    dataset = make_dataset(shard, tmp_path / "state", ctx_len=16, epoch_steps=4)
    with pytest.raises(DataError, match="reader 0 of 1 .* got 4 tokens .* less than one sample"):
        list(dataset.samples(0, 1))


def test_bad_lines_are_skipped_counted_and_reported(tmp_path, tokenizer, capsys):
    lines = [{"text": "good one"}, "not json", "", {"meta": {}}, {"text": 5}, '{"text": "partial last li',
             {"text": "word " * 200}]
    shard = write_shard(str(tmp_path / "00.jsonl"), lines)
    dataset = make_dataset(shard, tmp_path / "state", ctx_len=4, micro_bsz=1, epoch_steps=20)
    served = documents(tokenizer, list(windows(serve(dataset, 0, num_workers=0))))
    assert served == ["good one"]
    assert "mini-epoch 0: skipped 4 lines that are not JSON or have no string \"text\"" in capsys.readouterr().out


def test_truncated_and_corrupt_shards_do_not_stop_the_run(tmp_path, tokenizer, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    with open(GUTENBERG, "rb") as f:
        real = f.read()
    (folder / "01.jsonl.zst").write_bytes(real[:len(real) // 2])  # a real shard, cut short
    (folder / "02.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4)  # corrupt
    dataset = make_dataset(str(folder), tmp_path / "state", ctx_len=64, micro_bsz=8, epoch_steps=200)
    served = documents(tokenizer, list(windows(serve(dataset, 0, num_workers=0))))
    report = capsys.readouterr().out
    assert "01.jsonl.zst is truncated or corrupt (truncated" in report
    assert "02.jsonl.zst is truncated or corrupt" in report

    text = zstandard.ZstdDecompressor().decompressobj().decompress((folder / "01.jsonl.zst").read_bytes())
    *complete, partial = text.split(b"\n")
    assert complete and partial  # the cut falls inside a line
    assert set(served) == {json.loads(line)["text"] for line in complete}  # the partial line is dropped


def test_find_shards(tmp_path, shards):
    folder, _ = shards
    assert [os.path.basename(s) for s in find_shards(folder)] == ["00.jsonl.zst", "01.jsonl.zst", "02.jsonl", "03.jsonl.zst"]
    assert find_shards([os.path.join(folder, "0[13]*"), os.path.join(folder, "01.jsonl.zst")]) == [
        os.path.join(folder, "01.jsonl.zst"), os.path.join(folder, "03.jsonl.zst")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.jsonl.zst").write_bytes(b"{}\n")
    (tmp_path / "y.jsonl").write_bytes(b"")
    (tmp_path / "z.json").write_bytes(b"{}\n")
    for paths, message in [(str(tmp_path / "empty"), "empty holds no .jsonl.zst / .jsonl files"),
                           (str(tmp_path / "nope*"), "nope\\*: no such file or folder"),
                           (str(tmp_path / "x.jsonl.zst"), "x.jsonl.zst is not zstd-compressed"),
                           (str(tmp_path / "y.jsonl"), "y.jsonl is empty"),
                           (str(tmp_path / "z.json"), "z.json: unknown file type")]:
        with pytest.raises(DataError, match=message):
            make_dataset(paths, tmp_path / "state")


def test_multi_frame_zstd_shard(tmp_path, tokenizer):
    frames = [zstandard.ZstdCompressor().compress(f'{{"text": "frame {k}"}}\n'.encode()) for k in range(3)]
    shard = tmp_path / "00.jsonl.zst"
    shard.write_bytes(b"".join(frames))
    dataset = make_dataset(str(shard), tmp_path / "state", ctx_len=4, micro_bsz=1, epoch_steps=3)
    served = documents(tokenizer, list(windows(serve(dataset, 0, num_workers=0))))
    assert served[:4] == ["frame 0", "frame 1", "frame 2", "frame 0"]
