"""Checkpoints from the Hugging Face Hub (`hf://OWNER/REPO/FILE.pth`), served by a loopback
endpoint (HF_ENDPOINT) that speaks the part of the Hub's protocol a file download uses: never
the real Hub. Downloaded once into the cache (HF_HOME), converted once beside the cached file;
offline (HF_HUB_OFFLINE=1) the cache is used, and a file not in it is one error line."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub", reason="the hub extra: pip install 'losatok-jax[hub]'")

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = REPO_ROOT / "tests" / "data" / "golden" / "tiny_chunk40"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(http.server.BaseHTTPRequestHandler):
    """HEAD and GET of /OWNER/REPO/resolve/REVISION/FILE for the files in `FILES`."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def _file(self):
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.files.get("/".join(parts[:2] + parts[4:]))
        return None

    def _headers(self, body: bytes | None):
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._headers(self._file())

    def do_GET(self):  # noqa: N802
        body = self._file()
        self._headers(body)
        if body is not None:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    _Hub.files = {"owner/losatok/losatok.pth": (GOLDEN / "losatok.pth").read_bytes()}
    _Hub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


SNIPPET = textwrap.dedent("""
    import sys
    import numpy as np
    from losatok_jax import load_losatok, encode, decode
    model = load_losatok(config_path=sys.argv[1], model_path=sys.argv[2], device="cpu")
    features = encode(model, np.load(sys.argv[3]))
    np.savez(sys.argv[4], z=features["z"], recon=decode(model, features["z"]))
""")


def _run(args, home: Path, endpoint: str, offline: bool = False):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HOME": str(home / "hf"),
           "HF_ENDPOINT": endpoint, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=home, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_hub_checkpoint_downloads_once_converts_once_and_matches_upstream(hub, tmp_path):
    golden = np.load(GOLDEN / "vectors.npz")
    np.save(tmp_path / "audio.npy", golden["audio"][:1])
    snippet = ["-c", SNIPPET, str(GOLDEN / "config.yml"), "hf://owner/losatok/losatok.pth",
               str(tmp_path / "audio.npy"), str(tmp_path / "out.npz")]
    first = _run(snippet, tmp_path, hub)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "converted" in first.stdout
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["z"][0], golden["z"][0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["recon"][0], golden["recon_audio"][0], rtol=0, atol=1e-5)
    [cached] = (tmp_path / "hf").rglob("losatok.pth")
    assert (cached.parent / "losatok.orbax").is_dir()  # converted beside the cache entry
    downloads = [r for r in _Hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert len(downloads) == 1

    # Offline, with the endpoint gone as well: the cache and the converted folder serve.
    (tmp_path / "out.npz").unlink()
    offline = _run(snippet, tmp_path, "http://127.0.0.1:9", offline=True)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "converted" not in offline.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["z"], out["z"])


def test_missing_and_uncached_hub_files_are_one_error_line(hub, tmp_path):
    for reference, offline, message in (
            ("hf://owner/losatok/other.pth", False, "cannot download it"),
            ("hf://owner/losatok/losatok.pth", True,
             "not in the Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE is "
             "set, or no network): download it where there is a network (hf download "
             "owner/losatok losatok.pth)"),
            ("hf://owner/losatok", False, "a Hub reference names upstream's checkpoint file"),
            ("hf://owner/losatok.pth", False, "a Hub file is hf://OWNER/REPO[@REVISION]/FILE")):
        result = _run(["-m", "losatok_jax.reconstruct", "--input_path",
                       str(REPO_ROOT / "examples" / "speech.wav"), "--output_path",
                       str(tmp_path / "recon.wav"), "--config_path", str(GOLDEN / "config.yml"),
                       "--model_path", reference], tmp_path, hub, offline)
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: --model_path ") and message in last, last
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "recon.wav").exists()
