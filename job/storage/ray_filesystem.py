"""The filesystem handed to Ray Train's `RunConfig`, so that Ray's own storage calls retry as ours do.

Each call goes through `job.storage.retry`'s loop; the handler pickles as its endpoint alone.
Why: docs/architecture.md#storage-retries
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from job.storage.retry import retried
from job.storage.s3 import s3_filesystem

if TYPE_CHECKING:
    import pyarrow.fs  # lazy: pyarrow is heavy, and `gan-job --help` must not load it

T = TypeVar("T")


def retrying_s3_filesystem(endpoint: str | None) -> "pyarrow.fs.FileSystem":
    """An S3 filesystem for Ray Train whose every call retries within `job.storage.retry`'s bounds."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(rebuild_handler(endpoint))


def rebuild_handler(endpoint: str | None) -> Any:
    """The handler for `endpoint`: what a pickled one becomes in Ray's processes."""
    return _handler_class()(endpoint)


@functools.cache
def _handler_class() -> type:
    """The handler class, made on first use: it subclasses pyarrow's, which loads only where a run is handed to Ray."""
    import pyarrow.fs

    class RetryingS3Handler(pyarrow.fs.FileSystemHandler):
        """Every call to an S3 filesystem that makes one attempt per call, inside `retried`."""

        def __init__(self, endpoint: str | None) -> None:
            self.endpoint = endpoint
            self.inner = s3_filesystem(endpoint)

        def __reduce__(self):
            return rebuild_handler, (self.endpoint,)

        def _retried(self, what: str, operation: Callable[[], T]) -> T:
            return retried(operation, what)

        def get_type_name(self) -> str:
            return "gan-job-retrying-s3"

        def equals(self, other) -> bool:
            return type(other) is type(self) and other.endpoint == self.endpoint

        def normalize_path(self, path: str) -> str:
            return self.inner.normalize_path(path)

        def get_file_info(self, paths: list[str]) -> list:
            return self._retried(f"reading s3://{paths[0] if paths else ''}", lambda: self.inner.get_file_info(paths))

        def get_file_info_selector(self, selector) -> list:
            return self._retried(f"listing s3://{selector.base_dir}", lambda: self.inner.get_file_info(selector))

        def create_dir(self, path: str, recursive: bool) -> None:
            self._retried(f"creating s3://{path}", lambda: self.inner.create_dir(path, recursive=recursive))

        def delete_dir(self, path: str) -> None:
            self._retried(f"deleting s3://{path}", lambda: self.inner.delete_dir(path))

        def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
            self._retried(
                f"deleting s3://{path}", lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)
            )

        def delete_root_dir_contents(self) -> None:
            raise PermissionError("gan-job never empties a whole bucket")

        def delete_file(self, path: str) -> None:
            self._retried(f"deleting s3://{path}", lambda: self.inner.delete_file(path))

        def move(self, src: str, dest: str) -> None:
            self._retried(f"moving s3://{src}", lambda: self.inner.move(src, dest))

        def copy_file(self, src: str, dest: str) -> None:
            self._retried(f"copying s3://{src}", lambda: self.inner.copy_file(src, dest))

        def open_input_stream(self, path: str):
            return self._retried(f"reading s3://{path}", lambda: self.inner.open_input_stream(path))

        def open_input_file(self, path: str):
            return self._retried(f"reading s3://{path}", lambda: self.inner.open_input_file(path))

        def open_output_stream(self, path: str, metadata):
            return self._retried(f"writing s3://{path}", lambda: self.inner.open_output_stream(path, metadata=metadata))

        def open_append_stream(self, path: str, metadata):
            return self._retried(f"writing s3://{path}", lambda: self.inner.open_append_stream(path, metadata=metadata))

    return RetryingS3Handler
