"""One place that turns a location (a local folder or `s3://bucket/prefix`) into a filesystem.

Everything that reads or writes run files goes through `Location`, so local folders and buckets
behave the same: whole-object writes that a reader never sees half-done, and one answer to every
failure (`job.storage.retry`): only "not found" is absent, transient errors are retried within
bounds, and the rest fails with one line naming the location.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import StorageRefused, UsageError
from job.storage.retry import retried
from job.storage.ray_filesystem import retrying_s3_filesystem
from job.storage.s3 import s3_filesystem

if TYPE_CHECKING:
    import pyarrow.fs  # lazy: pyarrow is heavy and only storage work needs it


def is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("s3://")


# Buckets seen to exist, per filesystem (kept alive here so that its id is not reused): pyarrow reports a key
# of a missing bucket as absent, so "absent" on S3 is believed once the bucket is known to be there.
_buckets_seen: dict[tuple[int, str], object] = {}

BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's (and MinIO's) naming rules


def split_s3_uri(uri: str, flag: str = "location") -> tuple[str, str]:
    """`s3://bucket/a/b` → (`bucket`, `a/b`); an URL without a valid bucket name is bad input."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")  # `s3:///x` has no bucket (x is not one)
    if not bucket:
        raise UsageError(f"{flag} {uri!r} names no bucket; write it as s3://BUCKET/PREFIX")
    if not BUCKET_NAME.fullmatch(bucket):
        raise UsageError(
            f"{flag} {uri!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' and '-'); "
            "write it as s3://BUCKET/PREFIX"
        )
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class Location:
    """A folder-like place: `uri` as a person writes it, `fs` and `path` as pyarrow needs them.

    It pickles as its URI and endpoint, and the process that receives it makes its own filesystem: a pickled
    pyarrow S3 filesystem loses its one-attempt retry strategy (pyarrow leaves it out), and then its attempts
    would multiply under `job.storage.retry`'s loop.
    """

    uri: str
    fs: "pyarrow.fs.FileSystem"
    path: str  # absolute folder for local, "bucket/prefix" for S3
    endpoint: str | None = None  # the S3 endpoint it was resolved with (None: AWS_ENDPOINT_URL, or local)

    def __reduce__(self):
        return resolve_location, (self.uri, self.endpoint)

    @property
    def is_local(self) -> bool:
        return not is_s3(self.uri)

    def child(self, *parts: str) -> Location:
        suffix = "/".join(p.strip("/") for p in parts if p)
        return dataclasses.replace(
            self, uri=f"{self.uri.rstrip('/')}/{suffix}", path=f"{self.path.rstrip('/')}/{suffix}"
        )

    @property
    def bucket(self) -> str | None:
        return None if self.is_local else self.path.split("/", 1)[0]

    def exists(self) -> bool:
        import pyarrow.fs

        info = retried(lambda: self.fs.get_file_info(self.path), f"reading {self.uri}")
        if info.type == pyarrow.fs.FileType.NotFound:
            self.confirm_bucket()
            return False
        return True

    def is_file(self) -> bool:
        """Whether this is one object (a file), not a folder or nothing."""
        import pyarrow.fs

        info = retried(lambda: self.fs.get_file_info(self.path), f"reading {self.uri}")
        if info.type == pyarrow.fs.FileType.NotFound:
            self.confirm_bucket()
        return info.type == pyarrow.fs.FileType.File

    def read_bytes(self) -> bytes:
        """The whole object; FileNotFoundError when there is none (and only then)."""

        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()

        return retried(read, f"reading {self.uri}", confirm_absent=self.confirm_bucket)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Replace the object whole: a temporary file renamed into place locally, one PUT on S3."""
        retried(lambda: self._write_once(data), f"writing {self.uri}")

    def _write_once(self, data: bytes) -> None:
        if self.is_local:
            folder = os.path.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temp, self.path)
            except BaseException:
                if os.path.exists(temp):
                    os.unlink(temp)
                raise
        else:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def list_names(self, folders_only: bool = False) -> list[str]:
        """Names of the entries directly under this folder (empty when it does not exist)."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, allow_not_found=True, recursive=False)
        infos = retried(lambda: self.fs.get_file_info(selector), f"listing {self.uri}")
        if not infos:
            self.confirm_bucket()
        return sorted(
            os.path.basename(info.path.rstrip("/"))
            for info in infos
            if not folders_only or info.type == pyarrow.fs.FileType.Directory
        )

    def delete(self) -> None:
        retried(lambda: self.fs.delete_file(self.path), f"deleting {self.uri}")

    def delete_folder(self) -> None:
        retried(lambda: self.fs.delete_dir(self.path), f"deleting {self.uri}")

    def confirm_bucket(self) -> None:
        """Refuse, once per bucket and filesystem, a location whose bucket does not exist (local folders pass)."""
        import pyarrow.fs

        if self.is_local or (id(self.fs), self.bucket) in _buckets_seen:
            return
        bucket = self.bucket
        info = retried(lambda: self.fs.get_file_info(bucket), f"reading bucket s3://{bucket}")
        if info.type == pyarrow.fs.FileType.NotFound:
            raise StorageRefused(
                f"reading {self.uri} was refused: bucket {bucket!r} does not exist; "
                "check the bucket name and the S3 endpoint"
            )
        _buckets_seen[(id(self.fs), bucket)] = self.fs


def resolve_location(uri: str, s3_endpoint: str | None = None, flag: str = "--storage") -> Location:
    """A `Location` for a local folder (made absolute) or an `s3://bucket/prefix`."""
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri, flag)
        path = f"{bucket}/{prefix}" if prefix else bucket
        return Location(f"s3://{path}", s3_filesystem(s3_endpoint), path, s3_endpoint)
    if "://" in uri:
        raise UsageError(f"{flag} {uri!r}: only local folders and s3://BUCKET/PREFIX are supported")
    import pyarrow.fs

    path = str(Path(uri).expanduser().resolve())
    return Location(path, pyarrow.fs.LocalFileSystem(), path)


def ray_filesystem(location: Location, s3_endpoint: str | None = None) -> "pyarrow.fs.FileSystem":
    """The filesystem for Ray Train's `RunConfig`: Ray's own calls retry within the same bounds as ours."""
    if location.is_local:
        return location.fs
    return retrying_s3_filesystem(s3_endpoint)
