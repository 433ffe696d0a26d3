from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.calibrate import FitConfig, fit_partition
from eldr.errors import InputFileError, InvalidInputError, PartitionMismatchError
from eldr.partition import Partition
from eldr.synthetic import SyntheticCounts


def test_round_trip_keeps_everything(partition: Partition, tmp_path: Path) -> None:
    path = tmp_path / "part.npz"
    partition.save(path)
    loaded = Partition.load(path)
    np.testing.assert_array_equal(loaded.centroids, partition.centroids)
    np.testing.assert_array_equal(loaded.transform.idf, partition.transform.idf)
    assert loaded.transform.layers == partition.transform.layers
    assert loaded.worker_of == partition.worker_of
    assert loaded.top_k == 2
    assert loaded.meta["cluster_sizes"] == partition.meta["cluster_sizes"]
    assert loaded.meta["format"] == "eldr-partition" and loaded.meta["version"] == 1
    assert loaded.meta["eldr_version"]


def test_fit_metadata_is_complete(partition: Partition, synthetic: SyntheticCounts) -> None:
    meta = partition.meta
    assert meta["num_requests"] == synthetic.prefill_counts.shape[0]
    assert meta["seed"] == 1 and meta["kmeans"] == "balanced"
    assert len(meta["rho_curve"]) == 6 and meta["rho"] == max(meta["rho_curve"])
    assert sum(meta["cluster_sizes"]) == 240 and max(meta["cluster_sizes"]) <= 60
    assert meta["fit_seconds"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 5}, "fitted for 4 decode workers, this setup has 5"),
        ({"num_layers": 7}, "fitted for 6 MoE layers \\(L\\), this setup has 7"),
        ({"num_experts": 8}, "fitted for 16 experts per layer \\(E\\), this setup has 8"),
    ],
    ids=["workers", "layers", "experts"],
)
def test_mismatch_names_both_values(partition: Partition, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(PartitionMismatchError, match=message):
        partition.check_fits(**kwargs)
    partition.check_fits(num_workers=4, num_layers=6, num_experts=16)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(InputFileError, match="cannot read partition"):
        Partition.load(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="cannot read partition"):
        Partition.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.ones(3))
    with pytest.raises(InputFileError, match="not an eldr partition"):
        Partition.load(other)


def test_load_rejects_a_newer_format_version(partition: Partition, tmp_path: Path) -> None:
    path = tmp_path / "part.npz"
    partition.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.asarray(json.dumps({**meta, "version": 99}))
    np.savez(path, **arrays)
    with pytest.raises(InputFileError, match="format version 99"):
        Partition.load(path)


def test_fit_rejects_more_workers_than_requests(synthetic: SyntheticCounts) -> None:
    with pytest.raises(InvalidInputError, match="K=300 workers from N=240"):
        fit_partition(synthetic.prefill_counts, FitConfig(num_workers=300))


def test_fit_without_decode_counts_keeps_all_layers(synthetic: SyntheticCounts) -> None:
    part = fit_partition(synthetic.prefill_counts, FitConfig(num_workers=4))
    assert part.transform.layers == tuple(range(6))
    assert part.meta["rho"] is None


def test_worker_centroids_follow_the_mapping(partition: Partition) -> None:
    remapped = Partition(partition.transform, partition.centroids, partition.top_k, worker_of=(3, 2, 1, 0))
    np.testing.assert_array_equal(remapped.worker_centroids()[3], partition.centroids[0])
    with pytest.raises(PartitionMismatchError, match="permutation"):
        Partition(partition.transform, partition.centroids, 2, worker_of=(0, 0, 1, 2))


def test_load_rejects_broken_metadata(partition: Partition, tmp_path: Path) -> None:
    path = tmp_path / "part.npz"
    partition.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(path, **{**arrays, "meta": np.asarray("{not json")})
    with pytest.raises(InputFileError, match="meta is not a JSON string"):
        Partition.load(path)
