"""The path layer against local disk and the GCS emulator: the same calls work on both, and bad cloud input
(a missing bucket or object, no credentials, a protocol without a client) gets one clear line."""

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from qwen2vl_jax import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket") + "/run"


def test_same_calls_locally_and_in_a_bucket(root):
    storage.makedirs(storage.join(root, "a"))
    storage.write_text(storage.join(root, "a", "x.txt"), "hello\n")
    with storage.open(storage.join(root, "a", "y.jsonl"), "w") as f:
        f.write('{"k": 1}\n')
    assert storage.exists(storage.join(root, "a", "x.txt")) and storage.isdir(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "nope.txt"))
    assert storage.listdir(storage.join(root, "a")) == ["x.txt", "y.jsonl"]
    assert storage.listdir(storage.join(root, "empty")) == [] if storage.is_url(root) else True
    assert storage.glob(storage.join(root, "a", "*.txt")) == [storage.join(root, "a", "x.txt")]
    with storage.open(storage.join(root, "a", "y.jsonl")) as f:
        assert json.loads(f.readline()) == {"k": 1}
    assert storage.read_range(storage.join(root, "a", "x.txt"), 1, 4) == b"ell"
    assert storage.read_ranges(storage.join(root, "a", "x.txt"), [(0, 2), (3, 5)]) == [b"he", b"lo"]
    assert storage.size(storage.join(root, "a", "x.txt")) == 6
    x, y, nope = (storage.join(root, "a", n) for n in ("x.txt", "y.jsonl", "nope.png"))
    assert storage.read_many([x, y, nope]) == ({x: b"hello\n", y: b'{"k": 1}\n'} if storage.is_url(root) else {})
    assert storage.dirname(storage.join(root, "a", "x.txt")) == storage.join(root, "a")
    with pytest.raises(ValueError, match="'\\*\\*' is not supported"):
        storage.glob(storage.join(root, "**", "*.txt"))
    storage.remove(storage.join(root, "a", "x.txt"))
    assert not storage.exists(storage.join(root, "a", "x.txt"))


def test_no_append_to_objects(bucket):
    with pytest.raises(ValueError, match="cannot be appended to"):
        storage.open(f"{bucket}/m.jsonl", "a")


def test_missing_bucket_and_object_are_one_clear_line(bucket):
    with pytest.raises(storage.BucketNotFound) as e:
        storage.read_bytes("gs://no-such-bucket-here/train.jsonl")
    assert str(e.value) == ("gs://no-such-bucket-here/train.jsonl: the bucket gs://no-such-bucket-here does not "
                            "exist (or this account cannot see it); create it or fix the path")
    with pytest.raises(storage.BucketNotFound):
        storage.open("gs://no-such-bucket-here/out.json", "w")
    with pytest.raises(storage.BucketNotFound):
        storage.require_bucket("gs://no-such-bucket-here/run")
    storage.require_bucket(f"{bucket}/run")
    with pytest.raises(storage.ObjectNotFound) as e:
        storage.open(f"{bucket}/missing.jsonl")
    assert str(e.value) == f"{bucket}/missing.jsonl: no such object"
    with pytest.raises(FileNotFoundError):   # still a FileNotFoundError for callers that catch that
        storage.read_range(f"{bucket}/missing.jsonl", 0, 8)
    from qwen2vl_jax.data import DataError, read_jsonl
    with pytest.raises(DataError) as e:
        next(read_jsonl(f"{bucket}/missing.jsonl"))
    assert str(e.value) == f"{bucket}/missing.jsonl: cannot open the data file (no such object)"


def test_protocol_without_a_client_names_the_package():
    with pytest.raises(storage.MissingClient, match=r"no client for abfs:// paths is installed .*pip install adlfs$"):
        storage.exists("abfs://container/x.jsonl")
    with pytest.raises(storage.MissingClient, match="install the fsspec client for it"):
        storage.exists("nosuchproto://x/y")


class _Refuses(http.server.BaseHTTPRequestHandler):
    """What GCS answers an anonymous caller on a private bucket."""

    def _refuse(self):
        body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                     "storage.objects.get access to the Google Cloud Storage object."}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def test_missing_credentials_say_what_to_set():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR"))}
    env.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{server.server_address[1]}", NO_GCE_CHECK="true",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", HOME=env.get("HOME", "/tmp"),
               CLOUDSDK_CONFIG="/nonexistent")   # no gcloud credentials either: gcsfs falls back to anonymous
    code = "from qwen2vl_jax import storage\nstorage.read_bytes('gs://private-bucket/train.jsonl')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    server.shutdown()
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last == (
        "qwen2vl_jax.storage.NoCredentials: gs://private-bucket/train.jsonl: access refused and no credentials "
        "were found; set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run `gcloud auth "
        "application-default login` (a TPU/GCE VM uses its service account)"), r.stderr[-2000:]


def test_train_py_names_a_missing_bucket_in_one_line(gcs, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "workdir=gs://no-such-bucket/run",
                        "steps=1"], env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "train.py: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist (or this account "
        "cannot see it); create it or fix the path"), r.stderr[-2000:]
    assert os.listdir(tmp_path) == []   # no local folder named gs:
