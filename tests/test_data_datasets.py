"""Format parsers on small fixtures written in each format's exact layout, and their error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.datasets import DatasetError, parse_dataset, parse_market_name

ROOT = Path(__file__).resolve().parents[1]


def jpeg(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (shade, 255 - shade, 60)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def market(root: Path, names: dict[str, list[str]]) -> Path:
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(files):
            jpeg(root / folder / name, 10 * i)
    return root


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c3s1_000551_01.jpg", "0007_c2s3_070952_01.jpg",
                           "-1_c1s1_000401_03.jpg", "0000_c1s1_000001_01.jpg"],
    "query": ["0003_c1s1_001051_00.jpg", "0000_c4s1_000002_00.jpg"],
    "bounding_box_test": ["0003_c2s1_001151_01.jpg", "0000_c6s4_000003_01.jpg", "-1_c5s1_000004_02.jpg",
                          "0004_c3s2_000101_02.jpg"],
}


def by_split(ds):
    return {s: sorted((r.pid, r.camid, r.source) for r in recs) for s, recs in ds.splits.items()}


def test_market1501_layout_drops_junk_and_keeps_distractors_in_the_gallery_only(tmp_path):
    root = market(tmp_path / "market", MARKET)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"ignored")
    ds = parse_dataset("market1501", root)
    got = by_split(ds)
    assert got["train"] == [(2, 1, "bounding_box_train/0002_c1s1_000451_03.jpg"),
                            (2, 3, "bounding_box_train/0002_c3s1_000551_01.jpg"),
                            (7, 2, "bounding_box_train/0007_c2s3_070952_01.jpg")]
    assert got["query"] == [(3, 1, "query/0003_c1s1_001051_00.jpg")]
    assert got["gallery"] == [(0, 6, "bounding_box_test/0000_c6s4_000003_01.jpg"),
                              (3, 2, "bounding_box_test/0003_c2s1_001151_01.jpg"),
                              (4, 3, "bounding_box_test/0004_c3s2_000101_02.jpg")]
    assert all(r.path.is_file() for recs in ds.splits.values() for r in recs)


def test_duke_names_parse_with_the_market_parser(tmp_path):
    assert parse_market_name("0005_c2_f0046985.jpg") == (5, 2)
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_000001_00.jpg") == (-1, 3)
    assert parse_market_name("0001_c1_1.png") == (1, 1)
    for bad in ("0005.jpg", "abc_c1_f1.jpg", "0005_2_f0046985.jpg", "0005_c2.jpg", "0005_c2_f004.txt"):
        assert parse_market_name(bad) is None, bad
    root = market(tmp_path / "duke", {"bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c5_f0051341.jpg"],
                                      "query": ["0006_c1_f0057706.jpg"],
                                      "bounding_box_test": ["0006_c3_f0059000.jpg", "0019_c8_f0020000.jpg"]})
    ds = parse_dataset("dukemtmc", root)
    assert ds.format == "dukemtmc"
    assert by_split(ds)["train"] == [(5, 2, "bounding_box_train/0005_c2_f0046985.jpg"),
                                     (5, 5, "bounding_box_train/0005_c5_f0051341.jpg")]
    assert [r.camid for r in ds.splits["gallery"]] == [3, 8]


def test_msmt17_lists_camera_from_the_name_and_train_includes_val(tmp_path):
    root = tmp_path / "msmt"
    rows = {
        "list_train.txt": ("train", ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                                     "0000/0000_001_05_0303morning_0016_0.jpg 0"]),
        "list_val.txt": ("train", ["0001/0001_000_12_0303noon_0100_1.jpg 1"]),
        "list_query.txt": ("test", ["0000/0000_000_03_0303afternoon_0001_0.jpg 0"]),
        "list_gallery.txt": ("test", ["0000/0000_003_15_0303afternoon_0009_0.jpg 0",
                                      "0002/0002_000_07_0304morning_0001_0.jpg 2"]),
    }
    for list_name, (folder, lines) in rows.items():
        for line in lines:
            jpeg(root / folder / line.split()[0])
        (root / list_name).write_text("\n".join(lines) + "\n")
    ds = parse_dataset("msmt17", root)
    got = by_split(ds)
    assert got["train"] == [(0, 1, "train/0000/0000_000_01_0303morning_0015_0.jpg"),
                            (0, 5, "train/0000/0000_001_05_0303morning_0016_0.jpg"),
                            (1, 12, "train/0001/0001_000_12_0303noon_0100_1.jpg")]
    # pid 0 is a real identity in MSMT17 (no distractor convention): it stays in the query
    assert got["query"] == [(0, 3, "test/0000/0000_000_03_0303afternoon_0001_0.jpg")]
    assert [(pid, cam) for pid, cam, _ in got["gallery"]] == [(0, 15), (2, 7)]

    (root / "list_query.txt").write_text("0000/0000_000_03_0303afternoon_0001_0.jpg\n0000/nope.jpg 0\n")
    with pytest.raises(DatasetError, match=r"2 query list entries do not parse: list_query.txt:1 .*list_query.txt:2"):
        parse_dataset("msmt17", root)
    (root / "list_query.txt").write_text("0009/0009_000_03_0303afternoon_0001_0.jpg 9\n")
    with pytest.raises(DatasetError, match=r"missing files: list_query.txt:1 test/0009/0009_000_03"):
        parse_dataset("msmt17", root)


def test_cuhk03np_variants(tmp_path):
    root = tmp_path / "cuhk03-np"
    for variant, shade in (("detected", 0), ("labeled", 1)):
        market(root / variant, {"bounding_box_train": [f"0001_c1_{shade}.png", f"0001_c2_{shade}.png"],
                                "query": [f"0002_c1_{shade}.png"], "bounding_box_test": [f"0002_c2_{shade}.png"]})
    detected = parse_dataset("cuhk03np", root)
    labeled = parse_dataset("cuhk03np", root, cuhk03_variant="labeled")
    assert [r.source for r in detected.splits["train"]] == ["detected/bounding_box_train/0001_c1_0.png",
                                                           "detected/bounding_box_train/0001_c2_0.png"]
    assert [r.source for r in labeled.splits["query"]] == ["labeled/query/0002_c1_1.png"]
    assert detected.format == "cuhk03np"
    only = tmp_path / "only-labeled"
    only.mkdir()
    (root / "labeled").rename(only / "labeled")
    with pytest.raises(DatasetError, match="no detected/ folder.*--cuhk03-variant labeled"):
        parse_dataset("cuhk03np", only)
    with pytest.raises(DatasetError, match="--cuhk03-variant"):
        parse_dataset("cuhk03np", root, cuhk03_variant="both")


def test_csv_any_custom_dataset(tmp_path):
    root = tmp_path / "custom"
    for rel in ("imgs/a.jpg", "imgs/b.jpg", "imgs/c.png", "imgs/d.jpg", "imgs/e.jpg"):
        jpeg(root / rel)
    csv_path = root / "list.csv"
    csv_path.write_text("path,pid,camid,split\nimgs/a.jpg,10,0,train\nimgs/b.jpg,10,1,train\n"
                        "imgs/c.png,11,0,query\nimgs/d.jpg,11,2,gallery\nimgs/e.jpg,-1,2,gallery\n"
                        "imgs/a.jpg,0,3,gallery\n")
    for given in (csv_path, root):
        ds = parse_dataset("csv", given)
        assert by_split(ds) == {"train": [(10, 0, "imgs/a.jpg"), (10, 1, "imgs/b.jpg")],
                                "query": [(11, 0, "imgs/c.png")],
                                "gallery": [(0, 3, "imgs/a.jpg"), (11, 2, "imgs/d.jpg")]}

    csv_path.write_text("path,pid,camid,split\nimgs/a.jpg,10,0,train\nimgs/b.jpg,x,1,train\n"
                        "imgs/c.png,11,0,test\n/abs/d.jpg,11,2,gallery\nimgs/a.jpg,10,0,train\n")
    with pytest.raises(DatasetError) as err:
        parse_dataset("csv", csv_path)
    message = str(err.value)
    for expected in ("4 rows are invalid", "list.csv:3 pid='x'", "list.csv:4 split='test'",
                     "list.csv:5 path='/abs/d.jpg'", "list.csv:6 path='imgs/a.jpg' listed twice"):
        assert expected in message

    csv_path.write_text("path,pid,split\nimgs/a.jpg,10,train\n")
    with pytest.raises(DatasetError, match=r"missing columns \['camid'\]"):
        parse_dataset("csv", csv_path)
    csv_path.write_text("path,pid,camid,split\nimgs/zzz.jpg,10,0,train\n")
    with pytest.raises(DatasetError, match="missing files: list.csv:2 imgs/zzz.jpg"):
        parse_dataset("csv", csv_path)
    (root / "second.csv").write_text("path,pid,camid,split\n")
    with pytest.raises(DatasetError, match="exactly one .csv"):
        parse_dataset("csv", root)


def test_wrong_layout_errors_show_what_is_there_and_the_fix(tmp_path):
    root = market(tmp_path / "download", {})
    nested = market(root / "Market-1501-v15.09.15", MARKET)
    with pytest.raises(DatasetError) as err:
        parse_dataset("market1501", root)
    message = str(err.value)
    assert "missing bounding_box_train, query, bounding_box_test" in message
    assert "Market-1501-v15.09.15/" in message and f"pass --root {nested}" in message
    assert parse_dataset("market1501", nested).splits["train"]

    with pytest.raises(DatasetError, match="missing train, test, list_train.txt, list_val.txt"):
        parse_dataset("msmt17", nested)
    with pytest.raises(DatasetError, match="is not a directory"):
        parse_dataset("market1501", tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown format 'market'"):
        parse_dataset("market", nested)


def test_names_that_do_not_parse_are_errors_with_examples(tmp_path):
    root = market(tmp_path / "m", {**MARKET, "query": ["0003_c1s1_001051_00.jpg", "img_001.jpg",
                                                       "person7.jpg", "0003-c1.jpg"]})
    with pytest.raises(DatasetError) as err:
        parse_dataset("market1501", root)
    message = str(err.value)
    assert "3 image names do not parse" in message
    assert "query/img_001.jpg" in message and "query/person7.jpg" in message
    assert "0002_c1s1_000451_03.jpg" in message      # shows what a good name looks like


def test_a_split_left_empty_is_an_error(tmp_path):
    root = market(tmp_path / "m", {**MARKET, "query": ["0000_c1s1_000001_00.jpg", "-1_c1s1_000002_00.jpg"]})
    with pytest.raises(DatasetError, match="the query split is empty after dropping junk"):
        parse_dataset("market1501", root)


def test_prepare_data_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "launch" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root = market(tmp_path / "market", MARKET)
    out = tmp_path / "shards"
    assert cli.main(["--format", "market1501", "--root", str(root), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "gallery" in printed and "num_classes (train labels 0..C-1): 2" in printed
    assert (out / "manifest.json").is_file() and (out / "train-000000.tar").is_file()
    assert cli.main(["--format", "msmt17", "--root", str(root), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "does not have the msmt17 layout" in capsys.readouterr().err
