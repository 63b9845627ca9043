"""COCO download: resume, checksum, extraction; only local files and a 127.0.0.1 server."""
from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sim_core.data.coco_download import COCO_2017, Archive, download_coco
from sim_core.errors import InputError


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


VAL_ZIP = _zip({"val2017/000000000139.jpg": b"\xff\xd8 fake jpeg bytes " * 500,
                "val2017/000000000285.jpg": b"\xff\xd8 other" * 300})
ANN_ZIP = _zip({"annotations/instances_val2017.json": json.dumps({"images": []}).encode(),
                "annotations/captions_val2017.json": b"{}"})


def _archive(name: str, data: bytes, url: str, extracted: str, md5: str | None = "auto") -> Archive:
    digest = hashlib.md5(data).hexdigest() if md5 == "auto" else md5
    return Archive(name, url, digest, len(data), extracted)


class _Server:
    """Serves ``files`` on 127.0.0.1, honouring ``Range: bytes=N-`` unless told not to."""

    def __init__(self, files: dict[str, bytes], honour_range: bool = True):
        self.files, self.honour_range = files, honour_range
        self.ranges: list[str | None] = []
        self.bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                data = outer.files.get(self.path.lstrip("/"))
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(header.split("=")[1].rstrip("-")) if header and outer.honour_range else 0
                if start >= len(data) and header and outer.honour_range:
                    self.send_response(416)
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_official_table_has_published_checksums():
    assert COCO_2017["train2017"].md5 == "cced6f7f71b7629ddf16f17bbcfab6b2"
    assert COCO_2017["val2017"].md5 == "442b8da7639aecaf257c1dceb8ba8c80"
    assert COCO_2017["annotations"].md5 == "f4bbac642086de4f52a3fdda2de5fa2c"


def test_file_urls_download_verify_extract_and_skip_when_done(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "val2017.zip").write_bytes(VAL_ZIP)
    (mirror / "ann.zip").write_bytes(ANN_ZIP)
    archives = {
        "val2017": _archive("val2017.zip", VAL_ZIP, (mirror / "val2017.zip").as_uri(), "val2017"),
        "annotations": _archive("ann.zip", ANN_ZIP, (mirror / "ann.zip").as_uri(),
                                "annotations/instances_val2017.json"),
    }
    root = tmp_path / "coco"
    paths = download_coco(root, ["val2017", "annotations"], archives, progress=False)
    assert paths == [root / "val2017", root / "annotations" / "instances_val2017.json"]
    assert sorted(p.name for p in (root / "val2017").iterdir()) == ["000000000139.jpg", "000000000285.jpg"]
    assert json.loads(paths[1].read_text()) == {"images": []}
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "val2017"]  # zips and temp dirs gone
    (mirror / "val2017.zip").unlink()  # a second run must not need the archive again
    assert download_coco(root, ["val2017"], archives, progress=False) == [root / "val2017"]


def test_http_resume_fetches_only_the_rest(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    half = len(VAL_ZIP) // 2
    (root / "val2017.zip.part").write_bytes(VAL_ZIP[:half])
    with _Server({"val2017.zip": VAL_ZIP}) as server:
        archives = {"val2017": _archive("val2017.zip", VAL_ZIP, server.url("val2017.zip"), "val2017")}
        download_coco(root, ["val2017"], archives, keep_archives=True, progress=False)
    assert server.ranges == [f"bytes={half}-"] and server.bytes_sent == len(VAL_ZIP) - half
    assert (root / "val2017.zip").read_bytes() == VAL_ZIP
    assert (root / "val2017" / "000000000139.jpg").is_file()


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "val2017.zip.part").write_bytes(b"stale bytes from elsewhere")
    with _Server({"val2017.zip": VAL_ZIP}, honour_range=False) as server:
        archives = {"val2017": _archive("val2017.zip", VAL_ZIP, server.url("val2017.zip"), "val2017")}
        download_coco(root, ["val2017"], archives, keep_archives=True, progress=False)
    assert (root / "val2017.zip").read_bytes() == VAL_ZIP


def test_checksum_mismatch_removes_part_and_extracts_nothing(tmp_path):
    root = tmp_path / "coco"
    with _Server({"val2017.zip": VAL_ZIP}) as server:
        archives = {"val2017": _archive("val2017.zip", VAL_ZIP, server.url("val2017.zip"), "val2017", md5="0" * 32)}
        with pytest.raises(InputError, match=r"val2017.zip: downloaded file has md5 [0-9a-f]{32} .* expected md5 0{32}"):
            download_coco(root, ["val2017"], archives, progress=False)
    assert list(root.iterdir()) == []


def test_corrupt_complete_archive_is_fetched_again(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "val2017.zip").write_bytes(b"x" * len(VAL_ZIP))  # right size, wrong content
    with _Server({"val2017.zip": VAL_ZIP}) as server:
        archives = {"val2017": _archive("val2017.zip", VAL_ZIP, server.url("val2017.zip"), "val2017")}
        download_coco(root, ["val2017"], archives, progress=False)
    assert server.ranges == [None] and (root / "val2017" / "000000000285.jpg").is_file()


def test_http_errors_and_bad_zip_name_the_url_or_file(tmp_path):
    with _Server({"junk.zip": b"not a zip"}) as server:
        missing = {"val2017": _archive("val2017.zip", VAL_ZIP, server.url("nothing.zip"), "val2017")}
        with pytest.raises(InputError, match=r"nothing.zip: download failed: HTTP 404"):
            download_coco(tmp_path / "a", ["val2017"], missing, progress=False)
        junk = {"val2017": Archive("val2017.zip", server.url("junk.zip"), None, None, "val2017")}
        with pytest.raises(InputError, match=r"val2017.zip: not a valid zip archive"):
            download_coco(tmp_path / "b", ["val2017"], junk, progress=False)
    with pytest.raises(InputError, match="unknown COCO part"):
        download_coco(tmp_path / "c", ["test2017"], progress=False)
