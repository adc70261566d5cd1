"""The log writer publishes whole rounds atomically and never damages an existing file."""
import h5py
import numpy as np
import pytest

from florist_mpi import storage


def header():
    return storage.RunHeader(config_yaml="run: {}\n", method="florist", tau=0.9, num_clients=2, world_size=1,
                             created="2026-01-01T00:00:00+00:00", versions={"x": "1"}, modules=["m.q"],
                             module_shapes=[(4, 3)])


def record(index, rank=2):
    g = np.random.default_rng(index)
    return storage.RoundRecord(
        index=index, attrs={"eval_loss": 1.0 / (index + 1), "bytes_up": 10, "bytes_down": 20},
        clients={"id": np.array([0, 1]), "num_samples": np.array([5, 7])}, excluded=[(1, "non-finite factors")],
        global_factors={"m.q": (g.standard_normal((4, rank)), g.standard_normal((rank, 3)), np.arange(3.0), rank, 0.9)},
        client_adapters={0: {"m.q": (np.ones((4, 1)), np.ones((1, 3)))}},
    )


def test_create_then_append_rounds(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    storage.append_round(path, record(1))
    with storage.open_log(path) as handle:
        assert storage.completed_rounds(handle) == [0, 1]
        assert storage.read_modules(handle) == ["m.q"]
        B, A = storage.read_global_factors(handle, 1)["m.q"]
        assert B.dtype == np.float32 and B.shape == (4, 2) and A.shape == (2, 3)
        group = handle["rounds/00001"]
        assert group["clients/excluded"][()].tolist() == [1]
        assert group["clients/excluded_reason"][()][0].decode() == "non-finite factors"
        assert group["global/m.q"].attrs["rank"] == 2
    assert not (tmp_path / "log.h5.tmp").exists()


def test_existing_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "log.h5"
    path.write_bytes(b"precious")
    with pytest.raises(storage.LogError, match="already exists"):
        storage.create_log(path, header(), first_round=record(0))
    assert path.read_bytes() == b"precious"


def test_failed_write_leaves_the_published_log_intact(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    before = path.read_bytes()

    def explode():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        storage.append_round(path, record(1), before_publish=explode)
    assert path.read_bytes() == before and not (tmp_path / "log.h5.tmp").exists()
    with pytest.raises(storage.LogError, match="already holds round 0"):
        storage.append_round(path, record(0))
    assert path.read_bytes() == before


def test_stale_shadow_from_a_killed_writer_is_discarded(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    (tmp_path / "log.h5.tmp").write_bytes(b"half-written garbage")
    storage.append_round(path, record(1))
    with storage.open_log(path) as handle:
        assert storage.completed_rounds(handle) == [0, 1]


def test_replace_swaps_only_when_the_new_log_is_complete(tmp_path):
    path = tmp_path / "log.h5"
    path.write_bytes(b"old run")
    with pytest.raises(RuntimeError):
        storage.create_log(path, header(), replace=True, first_round=record(0),
                           before_publish=lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    assert path.read_bytes() == b"old run"
    storage.create_log(path, header(), replace=True, first_round=record(0))
    with storage.open_log(path) as handle:
        assert storage.completed_rounds(handle) == [0]


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "foreign", "future"])
def test_open_log_rejects_what_is_not_a_log(tmp_path, kind):
    path = tmp_path / "x.h5"
    if kind == "text":
        path.write_text("not hdf5")
    elif kind in ("truncated", "future"):
        storage.create_log(path, header(), first_round=record(0))
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:1500])
        else:
            with h5py.File(path, "a") as handle:
                handle.attrs["format_version"] = 99
    elif kind == "foreign":
        with h5py.File(path, "w") as handle:
            handle["x"] = 1
    with pytest.raises(storage.LogError) as info:
        with storage.open_log(path):
            pass
    assert "\n" not in str(info.value)


def test_append_can_update_root_attributes_in_the_same_atomic_step(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    storage.append_round(path, record(1), root_attrs={"world_size": 3, "config": "run: {rounds: 4}\n"})
    with storage.open_log(path) as handle:
        assert handle.attrs["world_size"] == 3 and "rounds: 4" in handle.attrs["config"]
        assert storage.completed_rounds(handle) == [0, 1]


def test_log_copy_is_byte_exact(tmp_path):
    source, target = tmp_path / "a.bin", tmp_path / "b.bin"
    payload = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    source.write_bytes(payload)
    storage._copy_file(source, target)
    assert target.read_bytes() == payload
