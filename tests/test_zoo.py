"""The model zoo's downloader, end to end against a local HTTP server on 127.0.0.1 only."""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import segany
from segany.cli.main import main as cli_main
from segany.io import save_checkpoint, zoo
from segany.io.zoo import ChecksumError, DownloadError, ModelEntry, UnverifiedDownloadWarning


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files by name, honours Range unless told not to, and can drop a transfer."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        name = self.path.split("?")[0].lstrip("/")
        requested = self.headers.get("Range")
        server.log.append((name, requested))
        data = server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if requested and not server.ignore_range:
            start = int(requested.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops:  # announce the whole body, send only part of it, then hang up
            self.wfile.write(body[: server.drops.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.drops, httpd.ignore_range = {}, [], [], False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def payload(tiny_sam, tmp_path_factory) -> bytes:
    """A real (small) checkpoint: the tiny random SAM in float16."""
    path = save_checkpoint(tiny_sam, tmp_path_factory.mktemp("payload") / "tiny.pth", dtype=torch.float16)
    return path.read_bytes()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEGANY_MODEL_BASE_URL", raising=False)


def _entry(server, payload: bytes, name: str = "tiny", sha: bool = True, size: bool = True) -> ModelEntry:
    server.files[f"{name}.pth"] = payload
    return ModelEntry(
        name=name,
        filename=f"{name}.pth",
        url=f"{server.base}/{name}.pth",
        family="SAM",
        licence="test",
        size=len(payload) if size else None,
        sha256=hashlib.sha256(payload).hexdigest() if sha else None,
    )


def test_fresh_download(server, payload, tmp_path):
    entry = _entry(server, payload)
    path = zoo.download(entry, cache=tmp_path, progress=False)
    assert path == tmp_path / "tiny.pth" and path.read_bytes() == payload
    assert not (tmp_path / "tiny.pth.part").exists()
    assert zoo.is_cached(entry, tmp_path)
    requests = len(server.log)
    assert zoo.download(entry, cache=tmp_path, progress=False) == path
    assert len(server.log) == requests  # cached: no second request


def test_interrupted_download_resumes_on_the_next_call(server, payload, tmp_path):
    entry = _entry(server, payload)
    cut = len(payload) // 3
    server.drops = [cut]
    with pytest.raises(DownloadError, match="interrupted.*run the same command again to resume"):
        zoo.download(entry, cache=tmp_path, progress=False, retries=0)
    partial = tmp_path / "tiny.pth.part"
    assert partial.stat().st_size == cut
    assert not (tmp_path / "tiny.pth").exists()  # nothing published under the final name

    path = zoo.download(entry, cache=tmp_path, progress=False)
    assert server.log[-1] == ("tiny.pth", f"bytes={cut}-")
    assert path.read_bytes() == payload and not partial.exists()


def test_interruptions_are_resumed_within_one_call(server, payload, tmp_path):
    entry = _entry(server, payload)
    server.drops = [1000, 5000]
    path = zoo.download(entry, cache=tmp_path, progress=False, retries=2)
    assert path.read_bytes() == payload
    assert [r for _, r in server.log] == [None, "bytes=1000-", "bytes=6000-"]


def test_server_ignoring_range_restarts_from_scratch(server, payload, tmp_path):
    entry = _entry(server, payload)
    (tmp_path / "tiny.pth.part").write_bytes(payload[:777])
    server.ignore_range = True
    path = zoo.download(entry, cache=tmp_path, progress=False)
    assert server.log[-1] == ("tiny.pth", "bytes=777-")
    assert path.read_bytes() == payload


def test_complete_partial_file_is_verified_and_published(server, payload, tmp_path):
    entry = _entry(server, payload)
    (tmp_path / "tiny.pth.part").write_bytes(payload)  # e.g. killed between the last byte and the rename
    path = zoo.download(entry, cache=tmp_path, progress=False)
    assert server.log[-1] == ("tiny.pth", f"bytes={len(payload)}-")  # answered 416
    assert path.read_bytes() == payload


def test_corrupted_bytes_are_caught_and_the_partial_deleted(server, payload, tmp_path):
    entry = _entry(server, payload)
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.files["tiny.pth"] = bytes(corrupted)
    with pytest.raises(ChecksumError, match="checksum mismatch for tiny.pth.*deleted the partial download"):
        zoo.download(entry, cache=tmp_path, progress=False)
    assert not (tmp_path / "tiny.pth.part").exists() and not (tmp_path / "tiny.pth").exists()


def test_404_names_the_url(server, payload, tmp_path):
    entry = _entry(server, payload)
    del server.files["tiny.pth"]
    with pytest.raises(DownloadError, match=f"HTTP 404.*{entry.url}"):
        zoo.download(entry, cache=tmp_path, progress=False)
    assert not (tmp_path / "tiny.pth.part").exists()


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_server_gives_one_clear_message(tmp_path):
    url = f"http://127.0.0.1:{_free_loopback_port()}/tiny.pth"
    entry = ModelEntry("tiny", "tiny.pth", url, "SAM", "test", 10, "0" * 64)
    with pytest.raises(DownloadError) as info:
        zoo.download(entry, cache=tmp_path, progress=False)
    message = str(info.value)
    assert url in message and "pass the file instead" in message and "--checkpoint /path/to/tiny.pth" in message
    assert "\n" not in message


def test_unknown_checksum_is_reported_as_unverified(server, payload, tmp_path):
    entry = _entry(server, payload, sha=False, size=False)
    with pytest.warns(UnverifiedDownloadWarning, match="could not verify tiny.pth"):
        path = zoo.download(entry, cache=tmp_path, progress=False)
    assert path.read_bytes() == payload


def test_load_model_by_name_downloads_into_segany_home(server, payload, tiny_sam, monkeypatch, tmp_path):
    monkeypatch.setitem(zoo.REGISTRY, "tiny", _entry(server, payload))
    model = segany.load_model("tiny")
    assert Path(model.checkpoint_path) == tmp_path / "home" / "checkpoints" / "tiny.pth"
    for key, value in tiny_sam.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.half().float())


def test_base_url_override_for_a_released_entry(server, tmp_path, monkeypatch):
    """SEGANY_MODEL_BASE_URL redirects the registry (here to a server holding a wrong vit_b)."""
    monkeypatch.setenv("SEGANY_MODEL_BASE_URL", server.base + "/mirror/")
    server.files["mirror/sam_vit_b_01ec64.pth"] = b"not the released file"
    entry = zoo.get_entry("vit_b")
    assert zoo.entry_url(entry) == f"{server.base}/mirror/sam_vit_b_01ec64.pth"
    with pytest.raises(ChecksumError, match="expected 375042383"):
        zoo.download("vit_b", cache=tmp_path, progress=False)
    assert server.log == [("mirror/sam_vit_b_01ec64.pth", None)]
    assert not (tmp_path / "sam_vit_b_01ec64.pth.part").exists()


def test_registry_lookup_and_cache_dir(monkeypatch):
    assert zoo.get_entry("mobile_sam") is zoo.REGISTRY["vit_t"]
    assert zoo.get_entry("sam_vit_h_4b8939.pth") is zoo.REGISTRY["vit_h"]
    with pytest.raises(ValueError, match="unknown model 'vit_x'"):
        zoo.get_entry("vit_x")
    for entry in zoo.REGISTRY.values():
        assert entry.url.startswith("https://") and entry.url.endswith(entry.filename)
        assert entry.sha256 is None or len(entry.sha256) == 64
    monkeypatch.delenv("SEGANY_HOME")
    assert zoo.cache_dir().parts[-2:] == ("segany", "checkpoints")


def test_cli_models_and_download(server, payload, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(zoo.REGISTRY, "tiny", _entry(server, payload))
    cli_main(["models"])
    table = capsys.readouterr().out
    for name in ("vit_b", "vit_l", "vit_h", "vit_t", "hq_vit_b", "hq_vit_tiny", "tiny"):
        assert name in table
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in table
    tiny_row = next(line for line in table.splitlines() if line.startswith("tiny "))
    assert " no " in tiny_row

    cli_main(["download", "tiny", "-q"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "home" / "checkpoints" / "tiny.pth")

    cli_main(["models"])
    tiny_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
    assert " yes " in tiny_row

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["download", "vit_x"])
    assert exit_info.value.code == 2
    assert "unknown model 'vit_x'" in capsys.readouterr().err
