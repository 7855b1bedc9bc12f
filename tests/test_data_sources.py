"""Where decoded images come from: the cache follows the data folder and its files, models follow
the decoded images, and CIFAR's pickled batches are read without running anything.

Small fake copies of GTSRB and CIFAR-10 in the real layouts, written by the tests themselves.
"""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data as bdata
from bench.data import DATASETS
from bench.presets import PRESETS
from bench.registry import BenchError


def fake_gtsrb(root: Path, value: int) -> Path:
    """A GTSRB folder as torchvision reads it: two training classes of two images, two test images;
    every pixel ``value`` (the test images ``value + 1``)."""
    for cls in ("00000", "00001"):
        folder = root / "gtsrb" / "GTSRB" / "Training" / cls
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (value,) * 3).save(folder / f"{i:05d}_0000{i}.ppm")
    test = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(2):
        Image.new("RGB", (32, 32), (value + 1,) * 3).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;32;32;0;0;31;31;{i}")
    (root / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


def fresh_load(ds, root):
    bdata._LOADED.clear()  # a new process: the per-process memo is empty
    return ds.load(str(root))


def test_the_decoded_cache_follows_the_data_folder_and_its_files(tmp_path):
    ds = DATASETS.get("gtsrb")()
    a, b = fake_gtsrb(tmp_path / "a", 10), fake_gtsrb(tmp_path / "b", 200)
    train_a, _ = fresh_load(ds, a)
    assert int(train_a.x[0, 0, 0, 0]) == 10 and len(train_a) == 4
    train_b, test_b = fresh_load(ds, b)  # another copy: decoded anew, not the first copy's cache
    assert int(train_b.x[0, 0, 0, 0]) == 200 and int(test_b.x[0, 0, 0, 0]) == 201
    assert ds.provenance(str(b))["source"]["path"] == str(b.resolve())
    assert ds.provenance(str(a))["digest"] != ds.provenance(str(b))["digest"]
    # A file of the first copy replaced in place (a corrected download): decoded anew.
    target = next((a / "gtsrb" / "GTSRB" / "Training" / "00000").iterdir())
    Image.new("RGB", (32, 32), (77,) * 3).save(target)
    os.utime(target, ns=(1, 1))
    train_a2, _ = fresh_load(ds, a)
    assert 77 in train_a2.x[:, 0, 0, 0].tolist()
    # A folder without the data fails on one line, however many decoded copies the cache holds.
    with pytest.raises(BenchError, match=f"GTSRB not found under {tmp_path / 'empty'}"):
        fresh_load(ds, tmp_path / "empty")


def test_models_are_keyed_by_the_decoded_images_not_by_the_folder(tmp_path):
    import shutil

    from bench.run.plan import GridSpec

    a, b = fake_gtsrb(tmp_path / "a", 10), fake_gtsrb(tmp_path / "b", 200)
    shutil.copytree(a, tmp_path / "copy")  # the same files elsewhere

    def key(root):
        bdata._LOADED.clear()
        (cell,) = GridSpec(attacks=["badnets"], defenses=["none"], preset="quick", data_dir=str(root)).plan().defense_cells
        return cell.job.key

    assert key(a) != key(b), "other images, another model"
    assert key(a) == key(tmp_path / "copy"), "the same images moved elsewhere: the same model"


def test_the_missing_dataset_error_holds_whatever_the_cache_holds(tmp_path):
    """The CLI's missing-data message does not depend on which decoded copies earlier runs cached."""
    from click.testing import CliRunner

    from bench.cli import main

    fresh_load(DATASETS.get("gtsrb")(), fake_gtsrb(tmp_path / "a", 10))  # a decoded GTSRB is in the cache
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["run", "--preset", "quick", "--attack", "badnets", "--data-dir", str(empty),
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and f"GTSRB not found under {empty}" in res.output, res.output


def test_records_and_model_sidecars_name_the_data(tmp_path):
    from bench.run.plan import GridSpec, model_dir
    from bench.run.execute import run_grid
    from bench.store import read_json

    tiny = {"synthetic": {"n_train": "200", "n_test": "50"}, "smallcnn": {"width": "4"},
            "train": {"epochs": "1", "batch_size": "64"}, "run": {"defense_data": "20"}}
    cells = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", overrides=tiny).plan().defense_cells
    (rec,) = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    train, test = DATASETS.get("synthetic")(n_train=200, n_test=50, noise=PRESETS["demo"].fields["synthetic"]["noise"]).load()
    assert rec["data"] == {"source": "built-in", "digest": bdata.digest(train, test)}
    assert read_json(model_dir(cells[0].job) / "meta.json")["data"] == rec["data"]


# ---------------------------------------------------------------- CIFAR: pickled batches, read safely


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious batch file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def batch(n: int, value: int, labels_key: bytes = b"labels", protocol: int = 2) -> bytes:
    """A CIFAR-style batch: N images of 3 x 1024 bytes (R plane, G plane, B plane) and their labels."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, :1024], data[:, 1024:2048], data[:, 2048:] = value, value + 1, value + 2
    return pickle.dumps({b"batch_label": b"fake", labels_key: list(range(n)), b"data": data,
                         b"filenames": [b"x.png"] * n}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_cifar_batch_reads_as_planes_without_running_anything(tmp_path, protocol):
    path = tmp_path / "data_batch_1"
    path.write_bytes(batch(3, 40, protocol=protocol))
    x, y = bdata.read_cifar_batch(path, b"labels")
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2]
    assert [int(x[0, c].unique()) for c in range(3)] == [40, 41, 42]  # channel planes, not interleaved


def test_a_cifar_batch_that_would_run_code_is_refused_on_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload(str(marker)), b"labels": []}))
    with pytest.raises(BenchError) as err:
        bdata.read_cifar_batch(path, b"labels")
    assert "refused to load pathlib" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_cifar10_loads_from_its_batches_and_checks_them_against_the_official_md5(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(batch(2, 10 * i))
    (folder / "test_batch").write_bytes(batch(4, 100))
    ds = DATASETS.get("cifar10")()
    with pytest.raises(BenchError, match="data_batch_1 is missing or is not the official file"):
        fresh_load(ds, tmp_path)  # the fakes are not the official files
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "check_integrity", lambda path, md5=None: True)
    train, test = fresh_load(ds, tmp_path)
    assert len(train) == 10 and len(test) == 4 and train.x.shape[1:] == (3, 32, 32)
    assert train.x[:, 0, 0, 0].tolist() == [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]
    assert ds.provenance(str(tmp_path))["source"]["files"] == 6
