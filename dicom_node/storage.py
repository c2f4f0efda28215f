"""Durable file store for received instances.

Layout under ``data_dir``::

    instances/<study_uid>/<series_uid>/<sop_uid>.dcm          the instance as received
    instances/<study_uid>/<series_uid>/<sop_uid>.<sha16>.dcm  a keep_newest replacement
    instances/.incoming/                                      temporary files being received

Every UID is validated (:func:`dicom_node.uids.check_uid`) before it becomes a path
component, so ``../`` or ``/`` can never reach the file system. A file enters its final
place only through :meth:`InstanceStore.commit`: fsync the temporary file, create the
directories (fsync'ing their parents), rename atomically (same file system), fsync the
directory (when that fails, the renamed file is removed again and the commit fails). A
crash at any moment leaves either the temporary file (removed at start-up) or the
complete file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from dicom_node.errors import StorageError
from dicom_node.uids import check_uid

LOG = logging.getLogger(__name__)

INSTANCES_DIR = "instances"
INCOMING_DIR = ".incoming"
TEMP_SUFFIX = ".partial"
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_fd(fd: int) -> None:
    """Flush a file's data (and the metadata needed to read it back, e.g. its size) to
    disk: ``fdatasync``. Enough for a temporary file that is then renamed and whose
    directory is fsync'd (its timestamps are not worth a second journal write)."""
    os.fdatasync(fd)


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait

    return start


_sync_file_range = _load_sync_file_range() if hasattr(os, "fdatasync") else None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to disk now,
    without waiting (Linux ``sync_file_range``; a no-op elsewhere). Durability still comes
    from :func:`sync_fd`; this only lets the disk work while the rest still arrives."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes)


def fsync_file(path: Path) -> None:
    """fsync a file's data and metadata (works on a file another handle wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Create / read / remove instance files; never overwrites a committed instance.

    Parameters
    ----------
    data_dir:
        The node's data directory; files go under ``data_dir/instances``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()  # index paths are absolute
        self.root = self.data_dir / INSTANCES_DIR
        self.incoming_dir = self.root / INCOMING_DIR
        self._root_prefix = os.path.normpath(str(self.root)) + os.sep
        self._root_resolved: Path | None = None
        try:
            self.incoming_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create {self.incoming_dir}: {exc}; check that the data directory is writable"
            ) from exc

    # -- paths -----------------------------------------------------------------------
    def final_path(self, study_uid: str, series_uid: str, sop_uid: str, variant: str = "") -> Path:
        """The final path of an instance (UIDs validated; ``variant`` is a hex tag)."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        if variant and not all(c in "0123456789abcdef" for c in variant):
            raise StorageError(f"file variant {variant!r} must be lowercase hex")
        name = f"{sop}.{variant}.dcm" if variant else f"{sop}.dcm"
        return self.root / study / series / name

    def is_inside(self, path: Path) -> bool:
        """True when ``path`` resolves (symbolic links followed) to a place under the store."""
        if self._root_resolved is None:
            self._root_resolved = self.root.resolve()
        try:
            Path(path).resolve().relative_to(self._root_resolved)
        except ValueError:
            return False
        return True

    def _is_under_root(self, path: Path) -> bool:
        """Lexical check (no file-system calls): the normalised path lies under the store
        root. Used for paths this store built itself from validated UIDs
        (:meth:`final_path`), where no ``..`` or separator can come from input; anything
        that fails it gets the full :meth:`is_inside` check."""
        p = str(path)
        return (p.startswith(self._root_prefix) and os.path.normpath(p) == p) or self.is_inside(path)

    # -- temporary files -------------------------------------------------------------
    def new_temp_file(self) -> tuple[Path, BinaryIO]:
        """A new temporary file in the incoming directory, open for binary writing."""
        fd, name = tempfile.mkstemp(suffix=TEMP_SUFFIX, dir=self.incoming_dir)
        return Path(name), os.fdopen(fd, "wb")

    def new_temp_fd(self) -> tuple[Path, int]:
        """A new temporary file in the incoming directory as a raw descriptor (O_WRONLY)."""
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=TEMP_SUFFIX, dir=self.incoming_dir)
        return Path(name), fd

    def discard(self, tmp_path: Path) -> None:
        """Remove a temporary file (missing is fine)."""
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOG.warning("could not remove temporary file %s: %s", tmp_path, exc)

    def clean_temp_files(self) -> int:
        """Remove temporary files left by a crash (incoming dir and ``*.partial`` beside
        final places). Call only while nothing is receiving. Returns how many."""
        removed = 0
        for path in list(self.incoming_dir.iterdir()):
            if path.is_file():
                self.discard(path)
                removed += 1
        for dirpath, _dirs, files in os.walk(self.root):
            if Path(dirpath) == self.incoming_dir:
                continue
            for name in files:
                if name.endswith(TEMP_SUFFIX):
                    self.discard(Path(dirpath) / name)
                    removed += 1
        if removed:
            LOG.warning("removed %d orphaned temporary file(s) under %s", removed, self.root)
        return removed

    # -- commit ----------------------------------------------------------------------
    def commit(self, tmp_path: Path, final_path: Path, *, overwrite: bool = False,
               synced: bool = False) -> Path:
        """Move a complete temporary file durably to ``final_path``.

        fsync the file (``synced``: the caller already flushed its data with
        :func:`sync_fd` after the last write), create missing directories (fsync'ing each
        parent), rename atomically, fsync the directory. When the directory fsync fails,
        the renamed file is removed before the error is raised: a failed commit leaves
        nothing at ``final_path``.

        Raises
        ------
        StorageError
            ``final_path`` exists and ``overwrite`` is False, the path is outside the
            store, or an OS error (e.g. disk full: ``errno`` is kept in ``__cause__``).
        """
        final_path = Path(final_path)
        if not self._is_under_root(final_path):
            raise StorageError(f"refusing to write {final_path}: outside {self.root}")
        try:
            if not synced:
                fsync_file(tmp_path)
            self._make_dirs(final_path.parent)
            if not overwrite and final_path.exists():
                raise StorageError(
                    f"{final_path} already exists; the store never overwrites an instance"
                )
            os.replace(tmp_path, final_path)
            try:
                fsync_dir(final_path.parent)
            except OSError:
                self._take_back(final_path)
                raise
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot store {final_path.name}: {exc}") from exc
        return final_path

    def _take_back(self, final_path: Path) -> None:
        """Remove (:meth:`remove`) a file just renamed into place whose directory could not
        be fsync'd: the commit fails, so the file must not stay (a restart would index it).
        Best effort: the commit's own error is the one raised."""
        try:
            self.remove(final_path)
        except (OSError, StorageError) as exc:
            LOG.error("cannot take back %s after its directory failed to sync: %s", final_path, exc)

    def _make_dirs(self, directory: Path) -> None:
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            fsync_dir(d.parent)

    def write_bytes(self, data: bytes, final_path: Path) -> Path:
        """Write ``data`` durably to ``final_path`` through a temporary file beside it."""
        final_path = Path(final_path)
        self._make_dirs(final_path.parent)
        fd, name = tempfile.mkstemp(suffix=TEMP_SUFFIX, dir=final_path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return self.commit(Path(name), final_path)
        except BaseException:
            self.discard(Path(name))
            raise

    # -- read / remove ---------------------------------------------------------------
    def remove(self, path: Path) -> None:
        """Remove a committed instance file (used by keep_newest and reconciliation)."""
        path = Path(path)
        if not self.is_inside(path):
            raise StorageError(f"refusing to remove {path}: outside {self.root}")
        try:
            os.unlink(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass

    def iter_instance_files(self) -> Iterator[Path]:
        """Every committed ``*.dcm`` under the store (not temporary files)."""
        for dirpath, dirs, files in os.walk(self.root):
            if Path(dirpath) == self.root and INCOMING_DIR in dirs:
                dirs.remove(INCOMING_DIR)
            for name in files:
                if name.endswith(".dcm"):
                    yield Path(dirpath) / name

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


def sha256_file(path: Path, offset: int = 0) -> str:
    """sha256 of a file's bytes from ``offset`` to the end."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
