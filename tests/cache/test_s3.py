"""Object storage: a real S3 API server (moto's server mode) on loopback."""

import glob
import json
import os
import socket

import numpy as np
import pytest

from pipeline.cache import open_cache
from tests.support import run_cli, write_cache

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_env():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("kd-bucket")
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_cache_round_trip_on_s3(s3_env, tiny_logits, backend):
    url = f"s3://kd-bucket/unit-{backend}"
    write_cache(url, tiny_logits, backend=backend, modes=("full", "topk"), dtype="float32")
    r = open_cache(url)
    assert r.manifest.complete
    np.testing.assert_array_equal(r.logits.compute(), tiny_logits)
    r.verify()


def test_stage1_writes_to_s3_and_stages_2_3_read_it(s3_env, seeded):
    tmp_path = seeded
    url = "s3://kd-bucket/cli-cache"
    run_cli(tmp_path, "stage=1", f"cache.path={url}")
    import s3fs

    manifest = json.loads(s3fs.S3FileSystem().cat_file("kd-bucket/cli-cache/manifest.json"))
    assert manifest["complete"] and manifest["rows"] == 2100
    assert not glob.glob(str(tmp_path / "caches" / "*"))  # nothing cached locally
    proc = run_cli(tmp_path, "stage=2", f"cache.path={url}", "verify=true")
    assert "verified 5 shard checksums" in proc.stdout
    proc = run_cli(tmp_path, "stage=3", f"cache.path={url}", "student=linear")
    (results,) = glob.glob(str(tmp_path / "runs" / "*" / "results.json"))
    assert json.load(open(results))["cache"] == url


def test_a_lease_on_object_storage_excludes_a_second_holder_and_expires(s3_env, monkeypatch):
    from pipeline.cache.storage import Lease, Storage

    storage = Storage("s3://kd-bucket/leases")
    a = storage.lock("shard-00000", blocking=False)
    assert isinstance(a, Lease)
    assert storage.lock("shard-00000", blocking=False) is None  # held: a second process gets nothing
    other = storage.lock("shard-00001", blocking=False)
    assert other is not None  # other names are independent
    other.release()
    a.release()
    b = storage.lock("shard-00000", blocking=False)
    assert b is not None
    b._stop.set()  # its holder "dies": no more renewals, the lease runs out
    monkeypatch.setattr(Lease, "ttl_s", 0.5)
    storage.fs.pipe_file(b.key, json.dumps({"owner": b.owner, "expires": 0.0}).encode())
    c = storage.lock("shard-00000", blocking=False)
    assert c is not None and c.owner != b.owner
    c.release()
