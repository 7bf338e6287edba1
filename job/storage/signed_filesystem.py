"""The filesystem handed to Ray Tune: every file it writes is sealed with this project's key, and every file it
reads is handed over only once its seal checks (`job.storage.signing`), so a planted pickle never reaches Tune.

The files this project reads itself, without unpickling (a checkpoint's `state.pt`, loaded weights-only, its
digest, a segment's JSON), stay plain, so that `--init-from` and the sweep's outcome read them as any run's.
Why: docs/operations.md#what-storage-is-trusted-with
"""

from __future__ import annotations

import functools
import io
import posixpath
from typing import TYPE_CHECKING, Any

from job.console import warn
from job.storage.location import Location
from job.storage.ray_filesystem import retrying_s3_filesystem
from job.storage.retry import reason_of, retried
from job.storage.s3 import s3_filesystem
from job.storage.signing import SignatureError, key_source, load_key, seal, unseal

if TYPE_CHECKING:
    import pyarrow.fs  # lazy: pyarrow is heavy, and `gan-job --help` must not load it


def signed_filesystem(location: Location, s3_endpoint: str | None, plain: tuple[str, ...]) -> "pyarrow.fs.FileSystem":
    """A filesystem over the store of `location` that seals what is written and checks what is read; files named
    in `plain` pass as they are. It pickles as its endpoint and key source, never the key."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(rebuild_handler(location.is_local, s3_endpoint, key_source(), plain))


def check_signed(folder: Location, plain: tuple[str, ...]) -> None:
    """Raise SignatureError naming the first file under `folder` (recursively) that is neither plain nor sealed
    with this project's key; nothing is unpickled or written."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(folder.path, recursive=True, allow_not_found=True)
    infos = retried(lambda: folder.fs.get_file_info(selector), f"listing {folder.uri}")
    sealed = sorted(
        info.path
        for info in infos
        if info.type == pyarrow.fs.FileType.File and posixpath.basename(info.path) not in plain
    )
    if not sealed:
        return
    key = load_key(key_source(create=False))  # state signed before needs the key it was signed with
    for path in sealed:
        child = folder.child(posixpath.relpath(path, folder.path.rstrip("/")))
        unseal(key, child.read_bytes(), child.uri)


def rebuild_handler(local: bool, endpoint: str | None, source: str, plain: tuple[str, ...]) -> Any:
    """The handler for a local store or an S3 one at `endpoint`: what a pickled one becomes in Ray's processes,
    which load the key from its source there."""
    return _handler_class()(local, endpoint, source, plain)


class _SealingSink(io.BytesIO):
    """What Tune writes into, in memory; sealed and stored whole when Tune closes it."""

    def __init__(self, store: Any, path: str) -> None:  # store: the handler
        super().__init__()
        self.store, self.path = store, path

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()
        try:
            self.store.write_whole(self.path, data)
        except Exception as err:
            # pyarrow's copy_files, through which Tune uploads, drops an error raised when a stream closes: say it.
            warn(f"storing {self.path} for Ray Tune failed ({reason_of(err)}); Tune's next save writes it again")
            raise


class _Sealed:
    """A pyarrow filesystem handler's calls (`_handler_class` makes it one) that seal on write and check on read,
    around a local filesystem or S3, each call within the retry bounds."""

    def __init__(self, local: bool, endpoint: str | None, source: str, plain: tuple[str, ...]) -> None:
        import pyarrow.fs

        self.local, self.endpoint, self.source, self.plain = local, endpoint, source, tuple(plain)
        # Whole-object reads and writes go through `Location` (one attempt a call, inside the retry loop);
        # listings, folders and moves through a filesystem whose every call is retried the same way.
        self.objects = pyarrow.fs.LocalFileSystem() if local else s3_filesystem(endpoint)
        self.inner = self.objects if local else retrying_s3_filesystem(endpoint)

    @functools.cached_property
    def key(self) -> bytes:
        # Loaded at first use: the handler pickled inside tuner.pkl is rebuilt on a restore and then replaced by
        # the restoring command's own, whose key source may differ.
        return load_key(self.source)

    def __reduce__(self):
        return rebuild_handler, (self.local, self.endpoint, self.source, self.plain)

    def _object(self, path: str) -> Location:
        return Location(path if self.local else f"s3://{path}", self.objects, path, self.endpoint)

    def _is_plain(self, path: str) -> bool:
        return posixpath.basename(path) in self.plain

    def read_whole(self, path: str) -> bytes:
        where = self._object(path)
        raw = where.read_bytes()
        return raw if self._is_plain(path) else unseal(self.key, raw, where.uri)

    def write_whole(self, path: str, data: bytes) -> None:
        self._object(path).write_bytes(data if self._is_plain(path) else seal(self.key, data))

    def get_type_name(self) -> str:
        return "gan-job-signed"

    def equals(self, other) -> bool:
        if type(other) is not type(self):
            return False
        return (self.local, self.endpoint, self.source) == (other.local, other.endpoint, other.source)

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector) -> list:
        return self.inner.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("gan-job never empties a whole store")

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.inner.move(src, dest)  # a seal covers the bytes, not the name: it moves with them

    def copy_file(self, src: str, dest: str) -> None:
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path: str):
        import pyarrow

        return pyarrow.BufferReader(self.read_whole(path))

    def open_input_file(self, path: str):
        return self.open_input_stream(path)

    def open_output_stream(self, path: str, metadata):
        import pyarrow

        return pyarrow.PythonFile(_SealingSink(self, path), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise SignatureError(f"{path}: a sealed file is written whole, never appended to")


@functools.cache
def _handler_class() -> type:
    """The handler class, made on first use: it is a pyarrow FileSystemHandler, and pyarrow loads only where Tune
    runs."""
    import pyarrow.fs

    return type("SignedHandler", (_Sealed, pyarrow.fs.FileSystemHandler), {})
