"""Restore from a bucket on this machine: moto's S3 server and the GCS emulator on 127.0.0.1
(tests/servers.py), CKPT uploaded to both, then `jaxaccel bench restore CKPT --source s3://...
--orbax-source gs://...` under the shared bench lock.

    python scripts/bench_remote_restore.py CKPT [--repeats 3] [--json out.json] [--mesh M]
"""

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import servers  # noqa: E402  (tests/servers.py: the same servers the tests start)

BUCKET = "jaxaccel-bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=pathlib.Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh", default="data=2,model=4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")
    s3, gcs = servers.MotoS3(), servers.GcsEmulator(BUCKET)
    try:
        os.environ.update(AWS_ENDPOINT_URL=s3.url, TENSORSTORE_GCS_HTTP_URL=gcs.url,
                          STORAGE_EMULATOR_HOST=gcs.url)
        s3.upload_dir(args.ckpt, BUCKET, "ckpt")
        gcs.upload_dir(args.ckpt, BUCKET, "ckpt")
        marker = args.ckpt / "params" / "commit_success.txt"  # orbax's marker on gs://
        if not marker.exists():
            gcs_marker(gcs)
        command = [sys.executable, "-m", "jaxaccel.cli.main", "bench", "restore", str(args.ckpt),
                   "--source", f"s3://{BUCKET}/ckpt", "--orbax-source", f"gs://{BUCKET}/ckpt",
                   "--mesh", args.mesh, "--repeats", str(args.repeats)]
        if args.json:
            command += ["--json", args.json]
        return subprocess.call(["flock", "/tmp/jaxaccel-bench.lock", *command], cwd=ROOT)
    finally:
        s3.stop()
        gcs.stop()


def gcs_marker(gcs) -> None:
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": "ckpt/params/"}).result()
    store.write("commit_success.txt", b"uploaded for the benchmark").result()


if __name__ == "__main__":
    sys.exit(main())
