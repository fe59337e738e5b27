"""Writing what leanml produces without ever losing what the user owns.

Every folder leanml writes carries a marker file (:data:`MARKER`: its kind, leanml's version, the
writer's pid, and whether it is complete). ``--force`` replaces only folders that carry it, never one
that holds other files, and never the current folder, one of its ancestors, the home folder or ``/``.

A folder output is built in a hidden temporary folder beside the target (same file system) and swapped
into place at the end with one atomic rename exchange, so a reader (or a ``kill -9``) sees the old output
or the complete new one, never a mixture. The target is locked for the whole run: a second run writing
the same place is refused at once, and a folder that appears at the target while a run works (without
``--force``) is refused at the final swap instead of being replaced. File outputs go through a temporary
file and a rename, and without ``--force`` a hard link, which fails if the name appeared meanwhile.

Leftovers of killed runs (temporary folders and files whose writer is dead) are removed by the next run
that writes the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LeanmlError

MARKER = ".leanml-output.json"
LEGACY_META = "leanml.json"  # artifact folders written before the marker existed


# ----------------------------------------------------------------------------------------------------
# fault injection: deterministic crash points for the tests of kill -9
# ----------------------------------------------------------------------------------------------------


def fault_point(name: str) -> None:
    """SIGKILL this process at a named moment when ``LEANML_KILL_AT`` names it (``name`` or ``name:N``,
    the N-th time the point is reached); or, when ``LEANML_PAUSE_AT`` names it, hold the process there the
    first time until the file ``LEANML_PAUSE_FILE`` (which it creates) is removed. Used by the tests that
    prove a killed run loses nothing and that concurrent runs cannot overwrite each other."""
    if os.environ.get("LEANML_PAUSE_AT") == name and os.environ.get("LEANML_PAUSE_FILE") and "pause" not in _FAULT_COUNTS:
        _FAULT_COUNTS["pause"] = 1  # once per process
        flag = Path(os.environ["LEANML_PAUSE_FILE"])  # a test holds the run here until it removes the file
        flag.write_text(str(os.getpid()))
        while flag.exists():
            time.sleep(0.05)
    wanted = os.environ.get("LEANML_KILL_AT")
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    count = _FAULT_COUNTS.get(name, 0) + 1
    _FAULT_COUNTS[name] = count
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    return 0o777 & ~_umask()


def file_mode() -> int:
    return 0o666 & ~_umask()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_writer(name: str, prefix: str) -> bool:
    """Whether ``name`` is ``prefix`` + ``<pid>-…`` (or ``<pid>``) for a process that no longer runs."""
    pid = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
    return pid.isdigit() and not pid_alive(int(pid))


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder leanml wrote (``None`` when it has none or it is unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("writer") == "leanml":
        return data
    try:  # an artifact folder from before the marker: its leanml.json says format leanml
        legacy = json.loads((folder / LEGACY_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(legacy, dict) and legacy.get("format") == "leanml":
        return {"writer": "leanml", "kind": "artifact", "complete": True, "legacy": True}
    return None


def write_marker(folder: Path, kind: str, complete: bool, **extra) -> None:
    from . import __version__

    data = {
        "writer": "leanml",
        "kind": kind,
        "version": __version__,
        "pid": os.getpid(),
        "complete": complete,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    write_file(folder / MARKER, json.dumps(data, indent=2) + "\n", force=True, check=False)


def _protected(resolved: Path) -> str | None:
    """Why ``resolved`` may never be an output location, or ``None``."""
    if resolved == Path(resolved.anchor):
        return "the root folder"
    home = Path.home().resolve()
    if resolved == home:
        return "your home folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "the current folder"
    if resolved in cwd.parents:
        return "an ancestor of the current folder"
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link: its target's folder is where the write would land
            break
        p = p.parent
    return p


def check_parent(path: Path, flag: str) -> None:
    """The folder that will hold ``path`` exists or can be created, and is writable."""
    base = _nearest_existing(path.parent)
    if base.exists() and not base.is_dir():
        raise LeanmlError(f"{flag} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise LeanmlError(f"{flag} {str(path)!r} cannot be written: the folder {str(base)!r} is not writable")


def check_folder_target(out: str | os.PathLike, force: bool, flag: str = "--out") -> Path:
    """Refuse an output folder leanml must not write: an empty name, a protected place, a file, a folder
    that exists and is not empty (without ``force``), or one that leanml did not write (even with it)."""
    if out is None or str(out).strip() == "":
        raise LeanmlError(f"{flag} is empty (an unset shell variable?); give the path of a new folder")
    path = Path(out).expanduser()
    resolved = path.resolve()
    why = _protected(resolved)
    if why:
        hint = " (an empty value or an unset shell variable gives '.')" if str(out) == "." else ""
        raise LeanmlError(f"{flag} {str(out)!r} is {why}{hint}; leanml writes only into a folder of its own")
    if path.name in ("", ".", ".."):
        raise LeanmlError(f"{flag} {str(out)!r} is not accepted: give the path of a new folder (not ending in {path.name!r})")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise LeanmlError(f"{flag} {str(out)!r} is a file; give the path of a folder")
        if any(path.iterdir()):
            if not force:
                raise LeanmlError(f"{flag} {str(out)!r} exists and is not empty; pass --force to replace it")
            if read_marker(path) is None:
                raise LeanmlError(
                    f"{flag} {str(out)!r} holds files leanml did not write (no {MARKER}); "
                    "refusing to replace it, even with --force: choose another folder"
                )
    check_parent(path, flag)
    return path


def check_file_target(path: str | os.PathLike, force: bool, flag: str = "--out") -> Path:
    """Refuse an output file path that is empty, a folder, or (without ``force``) an existing file."""
    if path is None or str(path).strip() == "":
        raise LeanmlError(f"{flag} is empty (an unset shell variable?); give the path of a file")
    p = Path(path).expanduser()
    if p.is_dir() or str(path).endswith(os.sep):
        raise LeanmlError(f"{flag} {str(path)!r} is a folder; give the path of a file (such as {str(p / 'out')!r})")
    if p.exists() and not force:
        raise LeanmlError(f"{flag} {str(path)!r} exists; pass --force to replace it")
    check_parent(p, flag)
    return p


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse early when the file system of ``folder`` has less free space than ``need_bytes``."""
    base = _nearest_existing(folder)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    if need_bytes > free:
        raise LeanmlError(
            f"not enough free disk space in {str(base)!r} for {what}: about {need_bytes / 1e6:.0f} MB needed, "
            f"{free / 1e6:.0f} MB free"
        )


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def write_file(path: str | os.PathLike, data: str | bytes, force: bool = False, check: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; without ``force`` an existing
    file (also one that appeared while the caller worked) is refused."""
    path = Path(path)
    if check:
        check_file_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_file(path, force) as tmp:
        mode = "w" if isinstance(data, str) else "wb"
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


@contextlib.contextmanager
def new_file(path: Path, force: bool) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block ends normally it becomes ``path`` (atomically)."""
    path = Path(path)
    clean_leftovers(path)
    fd, tmp_s = tempfile.mkstemp(dir=path.parent, prefix=_tmp_name(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_s)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; outputs follow the umask like any file
        publish_file(tmp, path, force)
    finally:
        tmp.unlink(missing_ok=True)


def publish_file(tmp: Path, path: Path, force: bool) -> None:
    if path.is_dir():
        raise LeanmlError(f"{str(path)!r} became a folder while leanml worked; nothing was written")
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name exists: no silent replacement of a file that appeared
    except FileExistsError:
        raise LeanmlError(f"{str(path)!r} appeared while leanml worked; it was kept (pass --force to replace it)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise LeanmlError(f"{str(path)!r} appeared while leanml worked; it was kept (pass --force to replace it)") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def clean_leftovers(path: Path) -> None:
    """Remove the temporary files and folders that killed runs left beside ``path``."""
    parent = path.parent
    if not parent.is_dir():
        return
    for prefix in (f".{path.name}.tmp-", f".{path.name}.old-"):
        for p in parent.glob(prefix + "*"):
            if not dead_writer(p.name, prefix):
                continue
            if p.is_dir():
                if read_marker(p) is None:
                    continue  # not ours after all: never delete what leanml did not write
                if prefix.endswith(".old-") and not path.exists():
                    os.rename(p, path)  # a swap interrupted between its two renames: the old output comes back
                    continue
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class _Lock:
    """An exclusive lock on an output path, held for a whole run (a hidden lock file beside it)."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LeanmlError(
                    f"another leanml run (pid {holder}) is writing {str(self.target)!r}; wait for it or choose another --out"
                ) from None
            try:  # the file may have been unlinked by a previous holder between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class FolderOutput:
    """Build an output folder safely::

    with FolderOutput(out, "artifact", force) as w:
        write files into w.tmp
        w.commit()          # swaps the new folder into place; without it nothing is published
    """

    def __init__(self, out: str | os.PathLike, kind: str, force: bool = False, flag: str = "--out"):
        self.out = check_folder_target(out, force, flag)
        self.kind, self.force, self.flag = kind, force, flag
        self.tmp: Path | None = None
        self._lock = _Lock(self.out)
        self.committed = False

    def __enter__(self) -> FolderOutput:
        self._lock.acquire()
        try:
            clean_leftovers(self.out)
            self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=_tmp_name(self.out)))
            os.chmod(self.tmp, dir_mode())
            write_marker(self.tmp, self.kind, complete=False)
        except BaseException:
            self._cleanup()
            raise
        return self

    def commit(self) -> Path:
        """Publish the new folder at ``out`` (checking again that this replaces nothing it may not)."""
        assert self.tmp is not None
        fault_point("before-commit")
        write_marker(self.tmp, self.kind, complete=True)
        present = self.out.exists() or self.out.is_symlink()
        if present:
            if not self.out.is_dir() or self.out.is_symlink():
                raise LeanmlError(f"{self.flag} {str(self.out)!r} became a file while leanml worked; it was kept")
            nonempty = any(self.out.iterdir())
            if nonempty and not self.force:
                raise LeanmlError(
                    f"{self.flag} {str(self.out)!r} appeared while leanml worked; it was kept (pass --force to replace it)"
                )
            if nonempty and read_marker(self.out) is None:
                raise LeanmlError(
                    f"{self.flag} {str(self.out)!r} now holds files leanml did not write; it was kept, nothing was replaced"
                )
            if _exchange(self.tmp, self.out):
                fault_point("after-swap")
                shutil.rmtree(self.tmp, ignore_errors=True)  # the old output, now under the temporary name
            else:
                aside = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.old-{os.getpid()}-"))
                os.rmdir(aside)
                os.rename(self.out, aside)
                fault_point("between-renames")
                os.rename(self.tmp, self.out)
                fault_point("after-swap")
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        self.tmp = None
        self.committed = True
        return self.out

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._lock.release()

    def __exit__(self, *exc) -> None:
        self._cleanup()


def replace_owned_folder(path: Path) -> Path | None:
    """Move a folder leanml wrote out of the way in one rename (for outputs built in place, like an
    ``optimize`` study); returns where it went, for :func:`drop_aside` once the new output is complete."""
    if not path.exists():
        return None
    aside = path.parent / f".{path.name}.old-{os.getpid()}-{int(time.time())}"
    os.rename(path, aside)
    return aside


def drop_aside(aside: Path | None, path: Path | None = None) -> None:
    """Remove the old output moved aside by this run, and (given ``path``) those of killed runs that the
    now complete output at ``path`` replaces."""
    if aside is not None and read_marker(aside) is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if path is None:
        return
    prefix = f".{path.name}.old-"
    for p in path.parent.glob(prefix + "*"):
        if dead_writer(p.name, prefix) and read_marker(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
