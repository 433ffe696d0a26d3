"""The signature ablations of `eldr fit`: --weighting raw, --layers all (and their meta)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.calibrate import FitConfig, fit_partition, fit_transform
from eldr.cli import main
from eldr.errors import InvalidInputError
from eldr.layermask import select_layers
from eldr.partition import Partition
from eldr.synthetic import SyntheticCounts


def fit(synthetic: SyntheticCounts, **settings: object) -> Partition:
    config = FitConfig(num_workers=4, **settings)  # type: ignore[arg-type]
    return fit_partition(synthetic.prefill_counts, config, decode_counts=synthetic.decode_counts, top_k=2)


def test_defaults_are_the_paper_and_recorded(partition: Partition) -> None:
    assert FitConfig(num_workers=2).weighting == "idf"
    assert FitConfig(num_workers=2).layer_selection == "greedy"
    assert partition.meta["weighting"] == "idf" and partition.meta["layer_selection"] == "greedy"
    assert not np.allclose(partition.transform.idf, 1.0)


def test_raw_weighting_is_idf_of_ones_and_plain_normalised_counts(synthetic: SyntheticCounts) -> None:
    part = fit(synthetic, weighting="raw")
    assert part.transform.idf.shape == synthetic.prefill_counts.shape[1:]
    assert part.transform.idf.dtype == np.float32 and (part.transform.idf == 1.0).all()
    assert part.meta["weighting"] == "raw" and part.meta["layer_selection"] == "greedy"
    kept = sorted(part.transform.layers)
    flat = synthetic.prefill_counts[:, kept, :].reshape(len(synthetic.prefill_counts), -1).astype(np.float64)
    expected = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    np.testing.assert_allclose(part.transform.apply(synthetic.prefill_counts), expected, rtol=1e-5, atol=1e-6)


def test_raw_weighting_masks_layers_on_unweighted_counts(synthetic: SyntheticCounts) -> None:
    transform, curve = fit_transform(
        synthetic.prefill_counts, synthetic.decode_counts, weighting="raw", num_pairs=2_000
    )
    mask = select_layers(
        synthetic.prefill_counts.astype(np.float32), synthetic.decode_counts, num_pairs=2_000, seed=1
    )
    assert transform.layers == mask.layers and curve == mask.rho_curve
    _, idf_curve = fit_transform(synthetic.prefill_counts, synthetic.decode_counts, num_pairs=2_000)
    assert curve != idf_curve  # the raw mask really ranked different (unweighted) signatures


def test_all_layers_keeps_every_layer_without_rho(synthetic: SyntheticCounts, partition: Partition) -> None:
    num_layers = synthetic.prefill_counts.shape[1]
    assert len(partition.transform.layers) < num_layers  # the greedy mask drops layers here
    part = fit(synthetic, layer_selection="all")
    assert part.transform.layers == tuple(range(num_layers))
    assert part.meta["rho"] is None and part.meta["rho_curve"] == []
    assert part.meta["layer_selection"] == "all" and part.meta["weighting"] == "idf"
    np.testing.assert_array_equal(part.transform.idf, partition.transform.idf)


def test_both_ablations_together(synthetic: SyntheticCounts) -> None:
    part = fit(synthetic, weighting="raw", layer_selection="all", is_balanced=False)
    assert (part.transform.idf == 1.0).all() and len(part.transform.layers) == part.num_layers
    assert (part.meta["weighting"], part.meta["layer_selection"], part.meta["kmeans"]) == (
        "raw",
        "all",
        "plain",
    )


def test_meta_survives_save_and_old_files_still_load(synthetic: SyntheticCounts, tmp_path: Path) -> None:
    part = fit(synthetic, weighting="raw", layer_selection="all")
    path = tmp_path / "p.npz"
    part.save(path)
    loaded = Partition.load(path)
    assert loaded.meta["weighting"] == "raw" and loaded.meta["layer_selection"] == "all"
    assert (loaded.transform.idf == 1.0).all()
    # a partition written before these keys existed
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["weighting"], meta["layer_selection"]
    arrays["meta"] = np.asarray(json.dumps(meta))
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    loaded_old = Partition.load(old)
    assert "weighting" not in loaded_old.meta
    np.testing.assert_array_equal(loaded_old.centroids, loaded.centroids)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weighting": "tfidf"}, "weighting must be one of idf, raw, got 'tfidf'"),
        ({"layer_selection": "some"}, "layer selection must be one of greedy, all, got 'some'"),
    ],
)
def test_unknown_settings_are_rejected(
    synthetic: SyntheticCounts, settings: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        FitConfig(num_workers=4, **settings)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=message):
        fit_transform(synthetic.prefill_counts, None, **settings)


@pytest.fixture
def cal_file(tmp_path: Path, synthetic: SyntheticCounts) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, prefill_counts=synthetic.prefill_counts, decode_counts=synthetic.decode_counts, top_k=2)
    return path


def test_cli_options_reach_the_partition(
    cal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.npz"
    argv = ["fit", "--calibration", str(cal_file), "--workers", "4", "--out", str(out)]
    assert main([*argv, "--weighting", "raw", "--layers", "all", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weighting"] == "raw" and summary["layer_selection"] == "all"
    assert summary["rho"] is None and summary["kept_layers"] == list(range(6))
    part = Partition.load(out)
    assert (part.transform.idf == 1.0).all() and part.meta["layer_selection"] == "all"

    assert main([*argv, "--layers", "all"]) == 0
    text = capsys.readouterr().out
    assert "n/a (--layers all: all layers kept)" in text and "weighting     : idf" in text

    assert main(argv) == 0  # defaults: idf and the greedy mask
    part = Partition.load(out)
    assert part.meta["weighting"] == "idf" and part.meta["layer_selection"] == "greedy"
    assert part.meta["rho"] is not None


@pytest.mark.parametrize("flag", ["--weighting", "--layers"])
def test_cli_rejects_unknown_values_with_exit_2(
    cal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    argv = ["fit", "--calibration", str(cal_file), "--workers", "4", "--out", str(tmp_path / "p.npz")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, flag, "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: 'bogus'" in err
    assert not (tmp_path / "p.npz").exists()
