"""Dataset parsers: a dataset root on disk -> image records per split (train, query, gallery).

Every format ends in the same `ParsedDataset`, which `shards.write_shards` packs. Parsers only read
directory listings and list files; they never decode images. Problems (missing folders, names that do
not parse, list entries pointing nowhere) raise `DatasetError` showing examples of what is wrong and
what the format expects, so a wrong `--root` or `--format` is obvious at once.

Conventions shared by all formats:
- pid -1 marks junk images and is dropped everywhere (the evaluation protocol ignores them anyway);
- in the Market-1501 layout (Market, DukeMTMC-reID, CUHK03-np) pid 0 marks distractors: kept in the
  gallery, dropped from train and query;
- camid is the camera number written in the file name (c3 -> 3), or the CSV's `camid` column.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MSMT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
              "gallery": ("list_gallery.txt",)}
MSMT_FOLDERS = {"train": "train", "query": "test", "gallery": "test"}
CUHK03_VARIANTS = ("detected", "labeled")
CSV_COLUMNS = ("path", "pid", "camid", "split")
# Market: 0002_c1s1_000451_03.jpg, Duke: 0005_c2_f0046985.jpg, CUHK03-np: 0001_c1_1.png; -1 = junk.
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s\d+)?(?:_[A-Za-z0-9]+)+\.(?:jpe?g|png)$", re.IGNORECASE)
# MSMT17: 0000_000_01_0303morning_0015_0.jpg (pid, index, camera, date+time, frame, ...).
MSMT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_[A-Za-z0-9_]+\.(?:jpe?g|png)$", re.IGNORECASE)
EXAMPLES = 5


class DatasetError(ValueError):
    """The dataset root does not match the format; the message shows examples and the expected layout."""


@dataclass(frozen=True)
class Record:
    path: Path      # the image file
    source: str     # path relative to the dataset root (stored in the shard's JSON)
    pid: int
    camid: int


@dataclass
class ParsedDataset:
    format: str
    root: Path
    splits: dict[str, list[Record]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, int]]:
        return {s: {"images": len(r), "identities": len({x.pid for x in r})} for s, r in self.splits.items()}


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    more = f" (and {len(items) - EXAMPLES} more)" if len(items) > EXAMPLES else ""
    return shown + more


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) if folder.is_dir() else []
    return _examples(names) if names else "nothing"


def _image_files(folder: Path) -> list[Path]:
    # Non-image files (Market ships Thumbs.db) are ignored; images are sorted for a stable order.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _keep(split: str, pid: int, distractors: bool) -> bool:
    if pid == -1:
        return False
    return not (distractors and pid == 0 and split != "gallery")


def _finish(ds: ParsedDataset) -> ParsedDataset:
    for split in SPLITS:
        if not ds.splits.get(split):
            raise DatasetError(f"{ds.root}: the {split} split is empty after dropping junk (pid -1)"
                               f"{' and distractors (pid 0)' if split != 'gallery' else ''}; "
                               f"check --format {ds.format} and --root")
    return ds


def _find_nested(root: Path, wanted: list[str]) -> Path | None:
    """A sub-folder of `root` that holds the wanted entries (archives often unpack one level deep)."""
    if not root.is_dir():
        return None
    for child in sorted(root.iterdir()):
        if child.is_dir() and all((child / w).exists() for w in wanted):
            return child
    return None


def _require_layout(root: Path, wanted: list[str], fmt: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"--root {root} is not a directory (format {fmt})")
    missing = [w for w in wanted if not (root / w).exists()]
    if not missing:
        return
    hint = ""
    nested = _find_nested(root, wanted)
    if nested is not None:
        hint = f" The folder {nested} has them: pass --root {nested}."
    raise DatasetError(f"{root} does not have the {fmt} layout: missing {', '.join(missing)} "
                       f"(expected {', '.join(wanted)}; found {_listing(root)}).{hint}")


# --------------------------------------------------------------------------------------------------
# Market-1501 layout (Market-1501, DukeMTMC-reID, CUHK03-np)
# --------------------------------------------------------------------------------------------------
def parse_market_name(name: str) -> tuple[int, int] | None:
    """(pid, camid) from a Market/Duke/CUHK03-np file name, or None when it does not parse."""
    m = MARKET_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_market1501(root: str | Path, fmt: str = "market1501") -> ParsedDataset:
    root = Path(root)
    _require_layout(root, list(MARKET_FOLDERS.values()), fmt)
    ds = ParsedDataset(fmt, root)
    for split, folder in MARKET_FOLDERS.items():
        records, bad = [], []
        for path in _image_files(root / folder):
            parsed = parse_market_name(path.name)
            if parsed is None:
                bad.append(f"{folder}/{path.name}")
                continue
            pid, camid = parsed
            if _keep(split, pid, distractors=True):
                records.append(Record(path, f"{folder}/{path.name}", pid, camid))
        if bad:
            raise DatasetError(f"{root / folder}: {len(bad)} image names do not parse: {_examples(bad)}. "
                               "Expected PPPP_cC..., e.g. 0002_c1s1_000451_03.jpg (Market-1501), "
                               "0005_c2_f0046985.jpg (DukeMTMC-reID) or 0001_c1_1.png (CUHK03-np); "
                               "pid -1 marks junk.")
        ds.splits[split] = records
    return _finish(ds)


def parse_cuhk03np(root: str | Path, variant: str = "detected") -> ParsedDataset:
    root = Path(root)
    if variant not in CUHK03_VARIANTS:
        raise DatasetError(f"--cuhk03-variant is {variant!r}; must be one of {list(CUHK03_VARIANTS)}")
    if not root.is_dir():
        raise DatasetError(f"--root {root} is not a directory (format cuhk03np)")
    if not (root / variant).is_dir():
        nested = _find_nested(root, [variant])
        hint = f" The folder {nested} has it: pass --root {nested}." if nested else ""
        present = [v for v in CUHK03_VARIANTS if (root / v).is_dir()]
        other = f" Found {present}: pass --cuhk03-variant {present[0]}." if present else ""
        raise DatasetError(f"{root} has no {variant}/ folder (CUHK03-np new protocol: detected/ and "
                           f"labeled/, each with {', '.join(MARKET_FOLDERS.values())}; found "
                           f"{_listing(root)}).{other}{hint}")
    ds = parse_market1501(root / variant, fmt="cuhk03np")
    ds.root = root
    ds.splits = {s: [Record(r.path, f"{variant}/{r.source}", r.pid, r.camid) for r in recs]
                 for s, recs in ds.splits.items()}
    return ds


# --------------------------------------------------------------------------------------------------
# MSMT17
# --------------------------------------------------------------------------------------------------
def parse_msmt17(root: str | Path) -> ParsedDataset:
    root = Path(root)
    lists = [name for names in MSMT_LISTS.values() for name in names]
    _require_layout(root, ["train", "test"] + lists, "msmt17")
    ds = ParsedDataset("msmt17", root)
    for split, names in MSMT_LISTS.items():
        folder = MSMT_FOLDERS[split]
        records, bad, missing = [], [], []
        for list_name in names:
            lines = (root / list_name).read_text().splitlines()
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{list_name}:{lineno}"
                parts = line.split()
                if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                    bad.append(f"{where} {line.strip()!r}")
                    continue
                rel, pid = parts[0], int(parts[1])
                name_match = MSMT_NAME.match(Path(rel).name)
                if name_match is None or Path(rel).is_absolute() or ".." in Path(rel).parts:
                    bad.append(f"{where} {rel!r}")
                    continue
                path = root / folder / rel
                if not path.is_file():
                    missing.append(f"{where} {folder}/{rel}")
                    continue
                if pid != -1:
                    records.append(Record(path, f"{folder}/{rel}", pid, int(name_match.group(3))))
        if bad:
            raise DatasetError(f"{root}: {len(bad)} {split} list entries do not parse: {_examples(bad)}. "
                               "Expected lines 'relative/path.jpg pid' with names like "
                               "0000_000_01_0303morning_0015_0.jpg (3rd field = camera).")
        if missing:
            raise DatasetError(f"{root}: {len(missing)} {split} list entries name missing files: "
                               f"{_examples(missing)} (paths are relative to {folder}/).")
        ds.splits[split] = sorted(records, key=lambda r: r.source)
    return _finish(ds)


# --------------------------------------------------------------------------------------------------
# CSV (any custom dataset)
# --------------------------------------------------------------------------------------------------
def _find_csv(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetError(f"--root {root} does not exist (format csv: a .csv file or a folder holding one)")
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise DatasetError(f"{root}: expected exactly one .csv file for --format csv, found "
                           f"{[p.name for p in found] or 'none'}; pass the file itself as --root")
    return found[0]


def parse_csv(root: str | Path) -> ParsedDataset:
    csv_path = _find_csv(Path(root))
    base = csv_path.parent
    ds = ParsedDataset("csv", base)
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    bad, missing, seen = [], [], set()
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        absent = [c for c in CSV_COLUMNS if c not in columns]
        if absent:
            raise DatasetError(f"{csv_path}: missing columns {absent}; the header must contain "
                               f"{','.join(CSV_COLUMNS)} (found {columns or 'no header'})")
        for lineno, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            where = f"{csv_path.name}:{lineno}"
            rel, split = row["path"], row["split"]
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except ValueError:
                bad.append(f"{where} pid={row['pid']!r} camid={row['camid']!r} (integers expected)")
                continue
            if split not in SPLITS:
                bad.append(f"{where} split={split!r} (one of {', '.join(SPLITS)})")
                continue
            if not rel or Path(rel).is_absolute() or Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
                bad.append(f"{where} path={rel!r} (a .jpg/.png path relative to {base})")
                continue
            if pid < -1:
                bad.append(f"{where} pid={pid} (pids are >= 0; -1 marks junk)")
                continue
            if (split, rel) in seen:
                bad.append(f"{where} path={rel!r} listed twice in {split}")
                continue
            seen.add((split, rel))
            path = base / rel
            if not path.is_file():
                missing.append(f"{where} {rel}")
                continue
            if _keep(split, pid, distractors=False):
                splits[split].append(Record(path, Path(rel).as_posix(), pid, camid))
    if bad:
        raise DatasetError(f"{csv_path}: {len(bad)} rows are invalid: {_examples(bad)}")
    if missing:
        raise DatasetError(f"{csv_path}: {len(missing)} rows name missing files: {_examples(missing)} "
                           f"(paths are relative to {base})")
    ds.splits = {s: sorted(r, key=lambda x: x.source) for s, r in splits.items()}
    return _finish(ds)


FORMATS = ("market1501", "dukemtmc", "msmt17", "cuhk03np", "csv")


def parse_dataset(fmt: str, root: str | Path, *, cuhk03_variant: str = "detected") -> ParsedDataset:
    """Dispatch on the format name (`dukemtmc` is the Market-1501 parser under its own name)."""
    if fmt in ("market1501", "dukemtmc"):
        return parse_market1501(root, fmt)
    if fmt == "msmt17":
        return parse_msmt17(root)
    if fmt == "cuhk03np":
        return parse_cuhk03np(root, cuhk03_variant)
    if fmt == "csv":
        return parse_csv(root)
    raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
