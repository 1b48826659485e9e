import logging

import torch

from cobra_scale.devices import pick_device, pick_precision


def test_auto_device_is_cpu_without_a_gpu():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_on_a_cpu_without_native_bf16_falls_back_to_fp32(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert pick_precision("bf16", "cpu") == "fp32"
    assert "no native bf16" in caplog.text
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert pick_precision("bf16", "cpu") == "bf16"


def test_other_precisions_and_gpus_are_left_alone():
    assert pick_precision("fp32", "cpu") == "fp32"
    assert pick_precision("bf16", "cuda") == "bf16"


def test_trim_host_memory_calls_malloc_trim(monkeypatch):
    import cobra_scale.devices as devices

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(devices, "_LIBC", FakeLibc())
    devices.trim_host_memory()
    assert calls == [0]
    monkeypatch.setattr(devices, "_LIBC", False)  # no glibc: a no-op
    devices.trim_host_memory()
    assert calls == [0]


# --- which device each pool picks, and the settings it refuses (session 40) ---

def test_serve_refuses_contradicting_device_settings():
    import pytest

    from cobra_scale.errors import ConfigError
    from cobra_scale.serve.configs import ServeConfig

    with pytest.raises(ConfigError, match="gpus_per_replica > 0"):
        ServeConfig(run="r", device="cuda", gpus_per_replica=0)
    with pytest.raises(ConfigError, match="reserve GPUs"):
        ServeConfig(run="r", device="cpu", gpus_per_replica=1)
    ServeConfig(run="r", device="cuda", gpus_per_replica=0.5)  # a share is fine


def test_replicas_share_the_clusters_gpus_and_cpu_replicas_reserve_none(monkeypatch):
    import pytest

    ray = pytest.importorskip("ray")  # a bare GPU machine (tools/gpu_check.sh) has no Ray

    from cobra_scale.serve.app import _gpus
    from cobra_scale.serve.configs import ServeConfig

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert _gpus(ServeConfig(run="r", replicas=2)) == 0.5  # one GPU, two replicas: half each, none left pending
    assert _gpus(ServeConfig(run="r", replicas=1)) == 1.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert _gpus(ServeConfig(run="r", replicas=2)) == 1.0  # at most one each
    assert _gpus(ServeConfig(run="r", replicas=2, device="cpu")) == 0.0
    assert _gpus(ServeConfig(run="r", replicas=2, gpus_per_replica=0.25)) == 0.25
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert _gpus(ServeConfig(run="r", replicas=2)) == 0.0


def test_a_replica_runs_on_cuda_only_with_a_gpu_of_its_own(monkeypatch):
    import pytest

    ray = pytest.importorskip("ray")  # a bare GPU machine (tools/gpu_check.sh) has no Ray

    from cobra_scale.serve.deployments import replica_device

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert replica_device("auto") == "cpu"  # Ray leaves the node's GPUs visible to an actor that reserved none
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert replica_device("auto") == "cuda"
    assert replica_device("cpu") == "cpu" and replica_device("cuda") == "cuda"


def test_eval_actor_pool_refuses_contradicting_device_settings():
    import pytest

    from cobra_scale.errors import ConfigError
    from cobra_scale.eval.batch import check_actor_device

    with pytest.raises(ConfigError, match="worker_gpus > 0"):
        check_actor_device("cuda", 0.0)
    with pytest.raises(ConfigError, match="reserve GPUs"):
        check_actor_device("cpu", 1.0)
    for device, gpus in (("auto", 0.0), ("auto", 0.5), ("cuda", 0.5), ("cpu", 0.0)):
        check_actor_device(device, gpus)


def test_ray_training_refuses_contradicting_device_settings():
    import pytest

    from cobra_scale.config import load_config
    from cobra_scale.errors import ConfigError
    from cobra_scale.train.configs import TrainConfig

    base = ["data=x", "ids=y", "out=z", "launcher=ray"]
    with pytest.raises(ConfigError, match="distributed.use_gpu=true"):
        load_config(TrainConfig, dotlist=[*base, "device=cuda"])
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(TrainConfig, dotlist=[*base, "device=cpu", "distributed.use_gpu=true"])
    assert load_config(TrainConfig, dotlist=[*base, "device=cuda", "distributed.use_gpu=true"]).distributed.use_gpu
    assert load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "device=cuda"]).device == "cuda"  # local: no Ray


# --- the faiss index follows the model onto the GPU (session 41) ---

def test_index_search_device_follows_the_models_device():
    import pytest

    from cobra_scale.errors import ConfigError
    from cobra_scale.retrieve.build import index_search_device

    assert index_search_device("follow", "cuda") == "auto"  # GPU faiss when the build has one, else CPU
    assert index_search_device("follow", "cuda:1") == "auto"
    assert index_search_device("follow", "cpu") == "cpu"
    for explicit in ("auto", "cpu", "cuda"):
        assert index_search_device(explicit, "cpu") == explicit
    with pytest.raises(ConfigError, match="index_device"):
        index_search_device("gpu", "cpu")


def test_eval_config_refuses_an_unknown_index_device():
    import pytest

    from cobra_scale.errors import ConfigError
    from cobra_scale.train.configs import EvalConfig

    assert EvalConfig(run="r").index_device == "follow"
    with pytest.raises(ConfigError, match="index_device"):
        EvalConfig(run="r", index_device="gpu0")


def test_load_recommender_puts_the_index_where_the_model_runs(tmp_path, monkeypatch):
    """The device the model resolves to decides the index's: ``follow`` asks IdIvfIndex.load for ``auto`` on CUDA."""
    import pytest

    pytest.importorskip("faiss")
    import cobra_scale.retrieve.build as build
    from cobra_scale.retrieve.faiss_index import IdIvfIndex
    from tests.retrieve.fixtures import tiny_run

    run = tiny_run(tmp_path / "run")
    out = tmp_path / "index"
    from cobra_scale.cli import main

    assert main(["index", "--run", str(run), "--out", str(out)]) == 0
    asked = []
    real_load = IdIvfIndex.load.__func__

    def spy(cls, folder, device="cpu"):
        asked.append(device)
        return real_load(cls, folder, device)

    monkeypatch.setattr(IdIvfIndex, "load", classmethod(spy))
    rec, *_ = build.load_recommender(run, out, "cpu")
    assert asked == ["cpu"] and rec.index.device == "cpu"
    rec, *_ = build.load_recommender(run, out, "cpu", "auto")  # faiss-cpu: auto stays on the CPU, no error
    assert asked[-1] == "auto" and rec.index.device == ("cuda" if _faiss_gpus() else "cpu")
    if not _faiss_gpus():
        from cobra_scale.errors import CobraError

        with pytest.raises(CobraError, match="no GPU"):
            build.load_recommender(run, out, "cpu", "cuda")


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def test_tf32_is_set_on_cuda_only(monkeypatch):
    from cobra_scale.devices import set_tf32
    from cobra_scale.train.configs import TrainConfig

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    assert TrainConfig(data="d", ids="i", out="o").tf32 is True
    assert set_tf32(True, "cpu") is False and calls == []  # the CPU keeps torch's "highest"
    assert set_tf32(False, "cuda") is False and calls == []
    assert set_tf32(True, "cuda") is True and calls == ["high"]


def test_eval_driver_keeps_its_copy_on_the_cpu_when_ray_workers_search(monkeypatch, tmp_path):
    """With workers > 0 the driver loads the run only to check it and sample users: its model and index stay on the
    CPU whatever ``device`` / ``index_device`` say (the workers get those); with workers = 0 the driver searches."""
    import pytest

    import cobra_scale.retrieve.build as build
    from cobra_scale.eval import run_eval
    from cobra_scale.train.configs import EvalConfig

    seen = []

    class Stop(Exception):
        pass

    def fake_load(run, index=None, device="auto", index_device="follow"):
        seen.append((device, index_device))
        raise Stop

    monkeypatch.setattr(build, "load_recommender", fake_load)
    for workers in (2, 0):
        with pytest.raises(Stop):
            run_eval.run(EvalConfig(run=str(tmp_path), device="cuda", index_device="cuda", workers=workers))
    assert seen == [("cpu", "cpu"), ("cuda", "cuda")]
