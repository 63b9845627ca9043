"""Download COCO 2017 (images + instance annotations) into a folder, resumably.

``prepare coco --download`` calls this before validating the folder. The
archives are large (train2017.zip is 19 GB), so a download must survive
interruption: bytes go to ``<name>.part`` and a rerun asks the server for
the rest with an HTTP ``Range`` request (a server that ignores it makes the
download start over). A finished archive is checked against its published
size and MD5 before it is extracted; extraction goes to a temporary folder
that is moved into place, so a killed run never leaves a half-extracted
``train2017/`` that would later look complete.

The MD5 values are the ones published with the COCO 2017 archives and used
by the common download scripts (train2017.zip cced6f7f..., val2017.zip
442b8da7..., annotations_trainval2017.zip f4bbac64...).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from sim_core.errors import InputError


@dataclass(frozen=True)
class Archive:
    """One downloadable archive and the path (relative to root) that shows it is extracted."""

    file_name: str
    url: str
    md5: str | None
    size: int | None
    extracted: str


COCO_2017: dict[str, Archive] = {
    "train2017": Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
                         "cced6f7f71b7629ddf16f17bbcfab6b2", 19336861798, "train2017"),
    "val2017": Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
                       "442b8da7639aecaf257c1dceb8ba8c80", 815585330, "val2017"),
    "annotations": Archive("annotations_trainval2017.zip",
                           "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                           "f4bbac642086de4f52a3fdda2de5fa2c", 252907541,
                           "annotations/instances_val2017.json"),
}
DEFAULT_PARTS = ("train2017", "val2017", "annotations")
CHUNK = 1 << 20


def download_coco(
    root: Path,
    parts: Sequence[str] = DEFAULT_PARTS,
    archives: Mapping[str, Archive] | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Make ``root`` hold the extracted ``parts``; returns the extracted paths.

    Parts already extracted are skipped. ``archives`` replaces the official
    table (mirrors, tests). ``keep_archives`` keeps the zip files after
    extraction (they are deleted by default: 19 GB).
    """
    table = dict(COCO_2017 if archives is None else archives)
    unknown = [p for p in parts if p not in table]
    if unknown:
        raise InputError("--download", f"unknown COCO part(s) {unknown}; known: {sorted(table)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = []
    for part in parts:
        archive = table[part]
        target = root / archive.extracted
        if not target.exists():
            zip_path = fetch(archive, root, progress=progress)
            extract(zip_path, root)
            if not target.exists():
                raise InputError(zip_path, f"archive did not contain {archive.extracted}")
            if not keep_archives:
                zip_path.unlink()
        done.append(target)
    return done


def fetch(archive: Archive, root: Path, progress: bool = True) -> Path:
    """Download (or finish downloading) one archive and verify it; returns the zip path."""
    final = root / archive.file_name
    if final.exists():
        if _verified(archive, final):
            return final
        final.unlink()  # a corrupt complete file: fetch it again
    part = root / (archive.file_name + ".part")
    _download_to(archive, part, progress)
    if not _verified(archive, part):
        got = _md5(part)
        size = part.stat().st_size
        part.unlink()
        raise InputError(archive.url, f"downloaded file has md5 {got} and {size} bytes, expected md5 "
                                      f"{archive.md5} and {archive.size} bytes; removed it, run again")
    os.replace(part, final)
    return final


def _download_to(archive: Archive, part: Path, progress: bool) -> None:
    start = part.stat().st_size if part.exists() else 0
    if archive.size is not None and start >= archive.size:
        return  # nothing left to fetch; the checksum decides
    request = urllib.request.Request(archive.url)
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the part already holds the whole file
            return
        raise InputError(archive.url, f"download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(archive.url, f"download failed: {exc}") from None
    with response:
        status = response.getcode()
        resumed = start > 0 and status == 206
        total = archive.size
        with open(part, "ab" if resumed else "wb") as handle, tqdm(
            total=total, initial=start if resumed else 0, unit="B", unit_scale=True,
            desc=archive.file_name, disable=not progress, mininterval=1.0,
        ) as bar:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                handle.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(archive: Archive, path: Path) -> bool:
    if archive.size is not None and path.stat().st_size != archive.size:
        return False
    return archive.md5 is None or _md5(path) == archive.md5


def extract(zip_path: Path, root: Path) -> None:
    """Unzip into a temporary folder under ``root``, then move the top-level entries into place."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            tmp = Path(tempfile.mkdtemp(prefix=f".{zip_path.stem}.", suffix=".extract", dir=root))
            try:
                archive.extractall(tmp)  # extractall drops absolute and '..' parts of member names
                for entry in sorted(tmp.iterdir()):
                    _merge(entry, root / entry.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as exc:
        zip_path.unlink(missing_ok=True)  # a rerun fetches it again instead of failing the same way
        raise InputError(zip_path, f"not a valid zip archive ({exc}); removed it, run again") from None


def _merge(source: Path, dest: Path) -> None:
    """Move ``source`` to ``dest``; into an existing folder, move only what it lacks."""
    if not dest.exists():
        os.replace(source, dest)
        return
    if source.is_dir() and dest.is_dir():
        for child in sorted(source.iterdir()):
            _merge(child, dest / child.name)
