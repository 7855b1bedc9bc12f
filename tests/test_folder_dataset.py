"""``--dataset folder:PATH``: a user's image folder (train/<class>/, test/<class>/), decoded once with PIL,
resized, cached; its errors, each one line before any training; ``--set folder.FIELD``; a dataset from the
``bdbench.datasets`` entry-point group; and a whole run through the CLI.

The folders are written by the tests: three classes of 40x36 PNGs (60 train + 20 test each), each class a
square of its own colour at a random place on a noisy grey background, a few files in other formats and modes.
"""

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data as bdata
from bench.data import DATASETS, Augmentation, Dataset, ImageSet, built_in
from bench.registry import BenchError, slug

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230)}  # sorted: blue, green, red
W, H = 40, 36


def write_folder(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, colour in COLOURS.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(100, 156, (H, W, 3), dtype=np.uint8)
                y, x = rng.integers(0, H - 16), rng.integers(0, W - 16)
                img[y:y + 16, x:x + 16] = colour
                im = Image.fromarray(img)
                if i == 0:  # other formats and modes: converted to RGB like the rest
                    im.save(folder / f"{i:03d}.jpg", quality=95)
                elif i == 1:
                    im.convert("RGBA").save(folder / f"{i:03d}.PNG")
                elif i == 2:
                    im.convert("P").save(folder / f"{i:03d}.bmp")
                else:
                    im.save(folder / f"{i:03d}.png")
    (root / "train" / "red" / "notes.txt").write_text("not an image: skipped")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder") / "shapes")


def fresh_load(ds, data_dir=None):
    bdata._LOADED.clear()  # a new process: the per-process memo is empty
    return ds.load(data_dir)


def test_a_folder_loads_resized_with_its_class_names(folder):
    cls = DATASETS.get(f"folder:{folder}")
    assert cls.name == f"folder:{folder}" and cls.num_classes == 3 and cls.classes == ("blue", "green", "red")
    ds = cls()
    train, test = fresh_load(ds)
    assert train.x.shape == (180, 3, 32, 32) and test.x.shape == (60, 3, 32, 32) and train.x.dtype == torch.uint8
    assert torch.bincount(train.y).tolist() == [60, 60, 60] and torch.bincount(test.y).tolist() == [20, 20, 20]
    # Each label's images show its colour: the label follows the sorted folder names, channels are not swapped.
    mean_rgb = train.x.double().mean((2, 3))
    for label, name in enumerate(cls.classes):
        dominant = COLOURS[name].index(max(COLOURS[name]))
        assert int(mean_rgb[train.y == label].mean(0).argmax()) == dominant, name
    # One file, decoded independently: the same pixels (PIL's antialiased bilinear resize of the RGB image).
    ref = Image.open(folder / "train" / "blue" / "005.png").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    assert torch.equal(train.x[5], torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    prov = ds.provenance()
    assert prov["classes"] == ["blue", "green", "red"]
    assert prov["source"]["path"] == str(folder.resolve()) and prov["source"]["files"] == 241  # + notes.txt
    want = train.x.double().mean((0, 2, 3)) / 255
    assert ds.mean == pytest.approx(want.tolist(), abs=1e-4) and len(ds.std) == 3 and min(ds.std) > 0.05
    assert ds.channels == 3 and ds.augmentation == Augmentation(pad=4, flip=False)
    # Other sizes and grayscale are fields; --data-dir does not move a folder dataset.
    small = cls(size=16, mode="L")
    tr16, _ = fresh_load(small, data_dir=str(folder.parent / "elsewhere"))
    assert tr16.x.shape == (180, 1, 16, 16) and small.channels == 1 and len(small.mean) == 1
    assert small.augmentation == Augmentation(pad=2, flip=False)
    with pytest.raises(BenchError, match=r"folder:.*\.mode='RGBA' is not allowed; choose one of: RGB, L"):
        cls(mode="RGBA")


def test_the_decoded_folder_is_cached_and_a_changed_file_decodes_anew(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", n_train=4, n_test=2)
    ds = DATASETS.get(f"folder:{root}")()
    entries = lambda: set((bdata.cache_dir() / "datasets").glob("folder-RGB32-*.safetensors"))  # noqa: E731
    before = entries()  # the decoded-datasets folder is shared between tests
    train, _ = fresh_load(ds)
    assert len(entries() - before) == 1
    # A second load (a new process) reads the cache: no image is opened.
    import PIL.Image

    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("an image was decoded again"))
    again, _ = fresh_load(ds)
    assert torch.equal(again.x, train.x) and ds.provenance()["classes"] == ["blue", "green", "red"]
    monkeypatch.setattr(PIL.Image, "open", real_open)
    # One file replaced: decoded anew, and the new pixels are there.
    target = root / "train" / "blue" / "003.png"
    Image.new("RGB", (W, H), (7, 8, 9)).save(target)
    os.utime(target, ns=(1, 1))
    changed, _ = fresh_load(ds)
    assert changed.x[3, :, 0, 0].tolist() == [7, 8, 9] and not torch.equal(changed.x, train.x)
    assert ds.provenance()["digest"] != bdata.digest(train, _)
    assert len(entries() - before) == 2


ERRORS = {
    "missing": (lambda r: r / "nowhere", r"folder:.*nowhere: .*nowhere does not exist; expected .*/train/<class>/\*\.png"),
    "no test": (lambda r: (r / "train" / "a").mkdir(parents=True) or r, r"has no test/ folder; expected"),
    "no splits": (lambda r: r.mkdir() or r, r"has no train/ or test/ folder"),
    "no images": (lambda r: [(r / s / c).mkdir(parents=True) for s in ("train", "test") for c in "ab"] and r,
                  r"no images at all under .*/train or .*/test \(looked for \.jpg, \.jpeg, \.png"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_bad_folder_fails_on_one_line_when_named(tmp_path, case):
    make, pattern = ERRORS[case]
    root = make(tmp_path / "data")
    with pytest.raises(BenchError, match=pattern) as err:
        DATASETS.get(f"folder:{root}")
    assert "\n" not in str(err.value)
    assert f"folder:{root}" not in DATASETS.names(), "a failed name is not remembered"


def test_classes_that_differ_or_are_empty_are_named(tmp_path):
    root = write_folder(tmp_path / "a", n_train=2, n_test=1)
    (root / "test" / "red").rename(root / "test" / "rouge")
    (root / "train" / "cyan").mkdir()
    with pytest.raises(BenchError, match=r"train and test have different classes: only in train: cyan, red; "
                                         r"only in test: rouge; give both the same class folders$"):
        DATASETS.get(f"folder:{root}")
    root = write_folder(tmp_path / "b", n_train=2, n_test=1)
    for f in (root / "test" / "green").iterdir():
        f.unlink()
    (root / "test" / "green" / "readme.txt").write_text("no image here")
    with pytest.raises(BenchError, match=r"class folder\(s\) without images under .*: test/green \(images: \.jpg"):
        DATASETS.get(f"folder:{root}")
    root = tmp_path / "c"
    for s in ("train", "test"):
        (root / s / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / s / "only" / "x.png")
    with pytest.raises(BenchError, match=r"has 1 class \(only\); a classifier needs at least 2"):
        DATASETS.get(f"folder:{root}")


def test_a_corrupt_image_is_named_before_any_training(tmp_path):
    from bench.run.plan import GridSpec

    root = write_folder(tmp_path / "data", n_train=3, n_test=2)
    bad = root / "train" / "green" / "004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    bdata._LOADED.clear()
    with pytest.raises(BenchError) as err:  # planning checks models on the dataset's statistics: it decodes
        GridSpec(attacks=["badnets"], defenses=["none"], datasets=[f"folder:{root}"], preset="demo").plan()
    msg = str(err.value)
    assert msg.startswith(f"folder:{root}: cannot read image {bad} (UnidentifiedImageError: ") and "\n" not in msg
    assert msg.endswith("replace or remove the file")


def test_set_folder_field_applies_to_every_folder_dataset(folder):
    from bench.run.plan import GridSpec

    name = f"folder:{folder}"
    spec = lambda ov: GridSpec(attacks=["badnets"], defenses=["none"], datasets=[name], preset="demo",  # noqa: E731
                               overrides=ov)
    (cell,) = spec({"folder": {"size": "16", "flip": "true"}}).plan().defense_cells
    assert (cell.job.dataset.size, cell.job.dataset.flip) == (16, True) and cell.job.dataset.name == name
    assert "/" not in cell.id and cell.id.startswith(slug(name) + "-")
    (default,) = spec({}).plan().defense_cells
    assert default.job.dataset.size == 32 and default.job.key != cell.job.key
    with pytest.raises(BenchError, match=r"folder:.* has no field 'sise'; fields: flip, mode, size, train_subset"):
        spec({"folder": {"sise": "16"}}).plan()
    with pytest.raises(BenchError, match=r"\.size=4 is out of range; allowed: \[8, 1024\]"):
        spec({"folder": {"size": "4"}}).plan()
    # A worker process receives the dataset by name and fields (the class itself is made at run time).
    ds = cell.job.dataset
    assert pickle.loads(pickle.dumps(ds)) == ds


@dataclass(frozen=True)
class Stripes(Dataset):
    """A plugin's dataset: horizontal (0) or vertical (1) stripes."""

    num_classes: ClassVar[int] = 2
    channels: ClassVar[int] = 1
    size: ClassVar[int] = 8
    mean: ClassVar[tuple[float, ...]] = (0.5,)
    std: ClassVar[tuple[float, ...]] = (0.5,)
    augmentation: ClassVar[Augmentation] = Augmentation(pad=1, flip=False)
    description: ClassVar[str] = "a plugin's stripes"

    n: int = 20

    def _load(self, root: Path):
        y = torch.arange(self.n) % 2
        line = (torch.arange(8) % 2 * 255).to(torch.uint8)
        x = torch.where(y[:, None, None, None] == 0, line[None, None, :, None].expand(-1, 1, 8, 8),
                        line[None, None, None, :].expand(-1, 1, 8, 8))
        return built_in(ImageSet(x.contiguous(), y), ImageSet(x.contiguous(), y))


def test_a_dataset_from_the_entry_point_group_plans_and_loads(monkeypatch):
    from importlib import metadata

    from bench.run.plan import GridSpec

    class EP:
        name = "stripes"

        def load(self):
            return Stripes

    groups = []
    monkeypatch.setattr(metadata, "entry_points", lambda group: groups.append(group) or [EP()])
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # restored after the test
    monkeypatch.setattr(DATASETS, "_plugins_loaded", False)
    assert "stripes" in DATASETS.names() and groups == ["bdbench.datasets"]
    assert DATASETS.get("stripes") is Stripes and Stripes.name == "stripes"
    (cell,) = GridSpec(attacks=["badnets"], defenses=["none"], datasets=["stripes"], preset="demo",
                       overrides={"stripes": {"n": "30"}}).plan().defense_cells
    assert cell.job.dataset == Stripes(n=30)
    train, _ = fresh_load(cell.job.dataset)
    assert train.x.shape == (30, 1, 8, 8) and train.y.tolist()[:4] == [0, 1, 0, 1]


def test_bench_run_on_a_folder_through_the_cli(folder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bench.cli import main

    monkeypatch.chdir(tmp_path)  # the default run folder, results/<preset>-<dataset>-..., is made here
    name = f"folder:{folder}"
    res = CliRunner().invoke(main, ["run", "--dataset", name, "--attack", "badnets", "--defense", "none",
                                    "--preset", "demo", "--set", "smallcnn.width=4", "--set", "train.epochs=1",
                                    "--set", "run.defense_data=12", "--jobs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "results").iterdir()  # one folder: no path separator of the dataset's name in it
    assert run_dir.name.startswith("demo-" + slug(name) + "-smallcnn-")
    recs = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["status"] == "ok", recs
    rec = recs[0]
    assert rec["dataset"] == name and rec["config"]["dataset"]["name"] == name
    assert "/" not in rec["cell"] and rec["cell"].startswith(slug(name))
    assert rec["data"]["classes"] == ["blue", "green", "red"] and rec["data"]["source"]["path"] == str(folder.resolve())
    assert 0.0 <= rec["metrics"]["ca"] <= 1.0 and rec["metrics"]["asr"] is not None
    assert (run_dir / "cells" / f"{rec['cell']}.json").is_file()


def test_bench_list_datasets_shows_cifar100_and_the_folder_family():
    from click.testing import CliRunner

    from bench.cli import main

    out = CliRunner().invoke(main, ["list", "datasets", "--fields"]).output
    assert "cifar100 " in out and "100 fine classes" in out
    assert "folder:PATH      your images: PATH/train/<class>/" in out
    assert "folder.size (int) = 32" in out and "folder.mode (choice of RGB, L) = 'RGB'" in out
