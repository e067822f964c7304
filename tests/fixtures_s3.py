"""A real S3 API on loopback for tests: moto's standalone server (it stands in for AWS S3 or MinIO).

Import the fixtures into a test module (or a conftest) to use them:

    from tests.fixtures_s3 import s3_bucket, s3_server  # noqa: F401 (pytest fixtures)

`s3_server` (session) starts `moto.server.ThreadedMotoServer` on 127.0.0.1 with a port the OS picks and
yields an `S3Endpoint`; `s3_bucket` (per test) creates a fresh bucket on it and points boto3's environment
variables at the server (fake credentials, a region, `AWS_ENDPOINT_URL`), with anything from the developer's
real AWS configuration masked. `S3Endpoint.env()` gives the same variables for a subprocess.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
# AWS settings on the developer's machine that would otherwise leak into the tests (real profiles, roles).
MASKED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
          "AWS_ENDPOINT_URL_S3", "AWS_REGION")  # fmt: skip
_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Endpoint:
    url: str  # http://127.0.0.1:<port>

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 (in this process or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def subprocess_env(self) -> dict[str, str]:
        """`os.environ` without the masked variables, plus `env()`: for `subprocess.Popen(env=...)`."""
        base = {k: v for k, v in os.environ.items() if k not in MASKED}
        return {**base, **self.env()}

    def client(self) -> Any:
        """A plain boto3 client on the server, to look at the bucket behind the code under test."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )


@dataclass(frozen=True)
class S3Bucket:
    endpoint: S3Endpoint
    name: str

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def object_keys(self) -> list[str]:
        listing = self.endpoint.client().list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def read(self, key: str) -> tuple[bytes, str]:
        """(bytes, stored Content-Type) of one object."""
        response = self.endpoint.client().get_object(Bucket=self.name, Key=key)
        return response["Body"].read(), response["ContentType"]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new, empty bucket; boto3's environment points at the server for the duration of the test."""
    for name in MASKED:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = S3Bucket(s3_server, f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}")
    s3_server.client().create_bucket(Bucket=bucket.name)
    return bucket
