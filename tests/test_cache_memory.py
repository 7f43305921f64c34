"""The feature cache's memory: "auto" follows the memory free when a cache is made (split between
the workers), a number is MB, bad values are one-line errors, run directories that stored the
old ``cache_budget_mb`` load and resume, and an accelerator keeps one table per fold."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data

from biotune import features
from biotune.blocks import partition_blocks
from biotune.cli import build_parser
from biotune.data import DatasetSplits
from biotune.errors import BioTuneError
from biotune.features import (
    AUTO_SHARE,
    FeatureCache,
    batch_sizes_for,
    block_chain,
    cache_budget,
    host_available_bytes,
    table_batch_sizes,
)
from biotune.models import LoadedModel
from biotune.runner import _start
from biotune.runner.config import SearchConfig
from biotune.runner.fitness import Evaluator, SearchProtocol
from biotune.runner.rundir import CONFIG, RunDirectory
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig

GIB = 2**30
TRAIN = TrainConfig(epochs=1, batch_size=16, eval_batch_size=32)


def _splits() -> DatasetSplits:
    val = make_tiny_data(24, seed=1)
    return DatasetSplits("tiny", ["a", "b", "c"], make_tiny_data(40), val, val, 8)


def _fake_host(monkeypatch, nbytes: int | None) -> None:
    monkeypatch.setattr(features, "host_available_bytes", lambda: nbytes)


# ------------------------------------------------------------------------------------ the budget


def test_auto_budget_is_a_share_of_the_available_memory_split_between_workers(monkeypatch):
    _fake_host(monkeypatch, 8 * GIB)
    alone, origin = cache_budget("auto", "cpu")
    assert alone == int(AUTO_SHARE * 8 * GIB) and origin == "auto: 50% of 8.0 GiB available"
    shared, origin = cache_budget("auto", "cpu", workers=2)
    assert shared == alone // 2 and origin == "auto: 50% of 8.0 GiB available / 2 workers"
    _fake_host(monkeypatch, 3 * GIB)  # follows the reading, whatever it is
    assert cache_budget("auto", "cpu")[0] == int(AUTO_SHARE * 3 * GIB)


def test_auto_budget_of_this_machine_is_positive():
    budget, origin = cache_budget("auto")
    assert budget > 0 and origin.startswith("auto: ")


def test_auto_budget_without_a_memory_reading_falls_back_to_a_fixed_size(monkeypatch):
    _fake_host(monkeypatch, None)
    budget, origin = cache_budget("auto", "cpu", workers=4)
    assert budget == 1024 * 2**20 and "unknown" in origin


def test_a_cuda_cache_takes_a_share_of_its_gpu_capped_by_the_hosts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 16 * GIB))
    _fake_host(monkeypatch, 64 * GIB)
    budget, origin = cache_budget("auto", "cuda", workers=2)  # each worker has its own GPU
    assert budget == 5 * GIB and origin == "auto: 50% of 10.0 GiB free on cuda"
    _fake_host(monkeypatch, 8 * GIB)  # tables too large for the GPU live in host memory
    budget, origin = cache_budget("auto", "cuda", workers=2)
    assert budget == 2 * GIB and origin.startswith("auto: 50% of 8.0 GiB available / 2 workers")


def test_workers_sharing_a_gpu_split_its_share(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 16 * GIB))
    _fake_host(monkeypatch, 64 * GIB)
    budget, origin = cache_budget("auto", "cuda", workers=4, per_gpu=2)
    assert budget == int(2.5 * GIB)
    assert origin == "auto: 50% of 10.0 GiB free on cuda / 2 workers per GPU"
    assert cache_budget("auto", "cuda", workers=4, per_gpu=1)[0] == 5 * GIB
    _fake_host(monkeypatch, 8 * GIB)  # the host's share (8 GiB / 2 / 4 workers) still caps it
    budget, origin = cache_budget("auto", "cuda", workers=4, per_gpu=2)
    assert budget == 1 * GIB and "/ 4 workers (host memory, less than" in origin
    assert cache_budget(512, "cuda", workers=4, per_gpu=2)[0] == 512 * 2**20  # MB as given


def test_a_number_is_megabytes():
    assert cache_budget(512) == (512 * 2**20, "as given")
    assert cache_budget(0.5)[0] == 2**19
    assert cache_budget(0)[0] == 0
    assert SearchProtocol(cache_memory=512).cache_memory == 512


def test_available_memory_reads_meminfo_and_a_containers_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683664 kB\nMemAvailable:    2097152 kB\n")
    monkeypatch.setattr(features, "_cgroup_headroom", lambda: None)
    assert host_available_bytes(meminfo) == 2 * GIB
    monkeypatch.setattr(features, "_cgroup_headroom", lambda: GIB)  # a container's limit
    assert host_available_bytes(meminfo) == GIB


def test_a_cgroup_limit_leaves_its_limit_less_what_cannot_be_dropped(tmp_path):
    job = tmp_path / "sys" / "job"
    job.mkdir(parents=True)
    (tmp_path / "sys" / "memory.max").write_text("max\n")
    (tmp_path / "sys" / "memory.current").write_text("700\n")
    (job / "memory.max").write_text("1000\n")
    (job / "memory.current").write_text("600\n")
    (job / "memory.stat").write_text("anon 400\ninactive_file 100\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    assert features._cgroup_headroom(proc, tmp_path / "sys") == 1000 - 600 + 100
    proc.write_text("0::/\n")  # the root has no limit
    assert features._cgroup_headroom(proc, tmp_path / "sys") is None


# -------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("value", ["lots", "512", -1, float("nan"), float("inf"), True, None])
def test_bad_cache_memory_is_a_one_line_error_naming_the_option(value):
    with pytest.raises(BioTuneError, match="cache_memory must be 'auto' or a number") as info:
        SearchProtocol(cache_memory=value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["lots", "-5", "nan"])
def test_bad_cache_memory_on_the_command_line_names_the_flag(text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--cache-memory", text])
    err = capsys.readouterr().err
    assert "--cache-memory" in err and "expected 'auto' or a number of MB" in err


def test_the_command_line_takes_auto_or_megabytes():
    parse = build_parser().parse_args
    assert parse(["search", "--cache-memory", "auto"]).cache_memory == "auto"
    assert parse(["search", "--cache-memory", "AUTO"]).cache_memory == "auto"
    assert parse(["search", "--cache-memory", "300"]).cache_memory == 300.0
    assert isinstance(parse(["search"]), argparse.Namespace)


# ----------------------------------------------------------------------- old run directories


def _old_search_dict(budget: float = 1024.0) -> dict:
    """A configuration as run directories stored it before ``cache_memory``."""
    stored = SearchConfig().to_dict()
    assert "cache_memory" not in stored["protocol"]  # "auto", the default, is not stored
    stored["protocol"]["cache_budget_mb"] = budget
    return stored


def test_an_old_configuration_with_cache_budget_mb_loads_as_that_many_mb():
    config = SearchConfig.from_dict(_old_search_dict(256.0))
    assert config.protocol.cache_memory == 256.0
    assert config.protocol.to_dict()["cache_memory"] == 256.0
    assert "cache_budget_mb" not in config.protocol.to_dict()
    assert SearchProtocol.from_dict(config.protocol.to_dict()) == config.protocol
    both = {**config.protocol.to_dict(), "cache_budget_mb": 256.0}
    with pytest.raises(BioTuneError, match="old name of 'cache_memory'"):
        SearchProtocol.from_dict(both)
    with pytest.raises(BioTuneError, match="cache_budget_mb must be"):
        SearchProtocol.from_dict({**SearchProtocol().to_dict(), "cache_budget_mb": -1})


def test_an_old_run_directory_resumes_under_any_cache_memory(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    run.write(CONFIG, {"biotune": "0.2.0", "search": _old_search_dict()})
    for memory in ("auto", 1024.0, 64.0):  # the budget changes no score
        protocol = SearchProtocol(cache_memory=memory)
        assert _start.check_config(run, SearchConfig(protocol=protocol), resume=True) is False
    other = SearchConfig(protocol=SearchProtocol(seeds=(7,)))  # a setting that does count
    with pytest.raises(BioTuneError, match="different configuration.*protocol.seeds"):
        _start.check_config(run, other, resume=True)


# ----------------------------------------------------------------- what the cache says and holds


def test_the_summary_says_the_budget_and_where_it_came_from(monkeypatch):
    _fake_host(monkeypatch, 8 * GIB)
    model = make_tiny_cnn()
    protocol = SearchProtocol(data_fraction=0.5, seeds=(0,), train=TRAIN, cache_features=True)
    evaluator = Evaluator(model, partition_blocks(model), _splits(), protocol, workers=2)
    assert evaluator.cache is not None and evaluator.cache.budget_bytes == 2 * GIB
    summary = evaluator.cache.summary()
    assert "of a 2048 MiB budget (auto: 50% of 8.0 GiB available / 2 workers" in summary


def test_the_user_guides_cache_line_is_what_a_search_logs(monkeypatch):
    _fake_host(monkeypatch, 22 * GIB)
    model = make_tiny_cnn()
    budget, origin = cache_budget("auto", "cpu", workers=2)
    stages = block_chain(model, partition_blocks(model))
    cache = FeatureCache(model, stages, budget, 32, budget_origin=origin)
    cache.features("train", make_tiny_data(40), 1)
    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    documented = next(x for x in guide.splitlines() if x.startswith("feature cache:"))

    def shape(line: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "N", line)

    assert shape(cache.summary()) == shape(documented)


def test_final_trainings_cache_follows_the_auto_rule(monkeypatch):
    _fake_host(monkeypatch, 6 * GIB)
    model = make_tiny_cnn()
    loaded = LoadedModel(model, "tiny", 8, (0.5,) * 3, (0.5,) * 3, "random")
    cache = Workbench(loaded, partition_blocks(model), _splits()).feature_cache(TRAIN)
    assert cache is not None and cache.budget_bytes == 3 * GIB
    assert cache.budget_origin == "auto: 50% of 6.0 GiB available"


def test_evaluation_workers_are_the_executors_workers_or_this_process_alone(tmp_path):
    from biotune.runner.search import Search

    assert _start.evaluation_workers(Search(SearchConfig(), tmp_path, workers=3)) == 1
    pool = Search(SearchConfig(), tmp_path, executor="process", workers=3)
    assert _start.evaluation_workers(pool) == 3


def test_workers_per_gpu_reach_every_evaluator_and_split_its_gpus_cache(monkeypatch, tmp_path):
    from biotune.runner.search import Search

    alone = Search(SearchConfig(), tmp_path, workers=3, per_gpu=2)
    assert _start.workers_per_gpu(alone) == 1  # in-process: nothing shares its GPU
    pool = Search(SearchConfig(), tmp_path, executor="process", workers=3, per_gpu=2)
    assert _start.workers_per_gpu(pool) == 2
    few = Search(SearchConfig(), tmp_path, executor="ray", workers=3, per_gpu=4)
    assert _start.workers_per_gpu(few) == 3  # no more on one GPU than there are workers
    factory = _start.evaluator_factory(pool)  # what each worker builds its evaluator with
    assert factory.args[-2:] == (3, 2)
    # An evaluator on a (faked) GPU shared by two workers takes half of the GPU's share.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * GIB, 16 * GIB))
    _fake_host(monkeypatch, 64 * GIB)
    model = make_tiny_cnn()
    protocol = SearchProtocol(data_fraction=0.5, seeds=(0,), train=TRAIN, cache_features=True)
    args = (model, partition_blocks(model), _splits(), protocol)
    cuda = torch.device("cuda")
    shared = Evaluator(*args, device=cuda, workers=3, per_gpu=2)
    assert shared.cache is not None and shared.cache.budget_bytes == 2 * GIB
    assert Evaluator(*args, device=cuda, workers=3).cache.budget_bytes == 4 * GIB


def test_one_table_per_batch_size_on_the_cpu_and_one_per_fold_on_an_accelerator():
    sizes = batch_sizes_for(40, 16)
    assert sizes == (16, 8)
    assert table_batch_sizes("cpu", sizes, 32) == (16, 8)  # bit-identical to uncached
    assert table_batch_sizes(torch.device("cpu"), sizes, 32) == (16, 8)
    assert table_batch_sizes("cuda", sizes, 32) == (32,)
    assert table_batch_sizes(torch.device("cuda:1"), sizes, 32) == (32,)
    assert table_batch_sizes("mps", sizes, 32) == (32,)
    model = make_tiny_cnn()
    stages = block_chain(model, partition_blocks(model))
    gpu = FeatureCache(model, stages, 10**9, 32, device=torch.device("cuda"))
    assert gpu.table_sizes(sizes) == (32,) and gpu.table_sizes() == (32,)


def test_a_cpu_entry_holds_a_table_per_batch_size_and_counts_them_all():
    model = make_tiny_cnn()
    stages = block_chain(model, partition_blocks(model))
    cache = FeatureCache(model, stages, 10**9, 32)
    data = make_tiny_data(40)
    sizes = batch_sizes_for(len(data), 16)
    entry = cache.features("train", data, 1, sizes)
    assert set(entry.by_batch_size) == {16, 8}
    assert cache.entry_bytes(data, 1, sizes) == 2 * cache.entry_bytes(data, 1)
    assert cache.used_bytes == cache.entry_bytes(data, 1, sizes)
