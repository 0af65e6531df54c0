"""`python -m distill_jax.download pann` against a local fake of the Zenodo API (tests stay offline):
checked against the record's MD5 and our pinned one, SHA-256 written, reruns check the file on disk."""
import hashlib
import http.server
import json
import os
import threading
import urllib.parse

import pytest

from distill_jax import download


@pytest.fixture
def zenodo(monkeypatch):
    """A Zenodo record at http://127.0.0.1:<port>: `state["files"]` is what it serves,
    `state["md5"]` what its JSON publishes, `state["requests"]` the paths asked for."""
    for var in ("no_proxy", "NO_PROXY"):  # a machine's HTTP proxy must not see the local server
        monkeypatch.setenv(var, "*")
    state = {"files": {}, "md5": {}, "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = urllib.parse.unquote(self.path)
            state["requests"].append(path)
            record = f"/api/records/{download.ZENODO_RECORD}"
            if path == record:
                body = json.dumps({"files": [{"key": k, "checksum": f"md5:{v}"} for k, v in state["md5"].items()]})
                body = body.encode()
            elif path.startswith(record + "/files/") and path.endswith("/content"):
                body = state["files"][path[len(record + "/files/"):-len("/content")]]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()


def _publish(zenodo, name, data, md5=None):
    zenodo["files"][name] = data
    zenodo["md5"][name] = md5 or hashlib.md5(data).hexdigest()


def test_pann_files_are_checked_named_and_not_fetched_twice(zenodo, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "KNOWN_MD5", {})
    files = {name: os.urandom(3 * download.CHUNK + 17) for name in download.PANN_FILES}
    for name, data in files.items():
        _publish(zenodo, name, data)
    out = str(tmp_path / "ckpt")
    paths = download.fetch_pann(out, base_url=zenodo["url"])
    assert [os.path.basename(p) for p in paths] == list(download.PANN_FILES)
    for path in paths:
        data = files[os.path.basename(path)]
        assert open(path, "rb").read() == data
        assert open(path + ".sha256").read() == f"{hashlib.sha256(data).hexdigest()}  {os.path.basename(path)}\n"
    assert sorted(os.listdir(out)) == sorted([*download.PANN_FILES, *(n + ".sha256" for n in download.PANN_FILES)])

    zenodo["requests"].clear()
    download.fetch_pann(out, base_url=zenodo["url"])  # both present and intact: only the record is read
    assert zenodo["requests"] == [f"/api/records/{download.ZENODO_RECORD}"]

    damaged = paths[0]
    with open(damaged, "r+b") as f:
        f.seek(5)
        f.write(b"\x00\x01")
    download.fetch_pann(out, base_url=zenodo["url"])  # the damaged one is fetched again
    assert open(damaged, "rb").read() == files[os.path.basename(damaged)]
    assert len([r for r in zenodo["requests"] if r.endswith("/content")]) == 1


def test_a_download_that_does_not_match_is_removed_and_named(zenodo, tmp_path, monkeypatch):
    name = download.PANN_FILES[0]
    _publish(zenodo, name, b"what the server sends", md5=hashlib.md5(b"what the record describes").hexdigest())
    monkeypatch.setattr(download, "KNOWN_MD5", {})
    with pytest.raises(download.ChecksumError, match=r"Cnn14_16k_mAP=0.438.pth .*MD5 .* but the Zenodo record says"):
        download.fetch_pann(str(tmp_path), [name], base_url=zenodo["url"])
    assert os.listdir(tmp_path) == []  # neither the file nor its .part

    _publish(zenodo, name, b"a changed record")  # consistent with itself, not with what we pinned
    monkeypatch.setattr(download, "KNOWN_MD5", {name: hashlib.md5(b"the original").hexdigest()})
    with pytest.raises(download.ChecksumError, match="KNOWN_MD5 says"):
        download.fetch_pann(str(tmp_path), [name], base_url=zenodo["url"])
    assert os.listdir(tmp_path) == []


def test_a_record_without_the_file_is_named(zenodo, tmp_path):
    with pytest.raises(download.ChecksumError, match="lists no checksum for"):
        download.fetch_pann(str(tmp_path), base_url=zenodo["url"])
