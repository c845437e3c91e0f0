"""Outputs the user names (``--json PATH`` of every command, a script's ``--out``): one gate, one writer.

* ``check_output_file(path, flag)``: LFTError (one line, naming the flag) unless ``path`` is an existing regular
  file that is not read-only, or a new name in an existing folder, and lies outside the cache
  (``paths.cache_owned``: the cache folder, its sub-folders ``flows``, ``activations``, ``grids``, ``jobs`` ...,
  its own top-level files). Refused, and left exactly as they are: an empty name, a name ending in '/', a
  folder, a symbolic link (dangling or not: an output is never written through a link), a FIFO, a character or
  block device (``/dev/null`` too), a socket. The one file of the cache a command may be told to write is its
  own job's ``jobs/<id>/result.json`` (not written yet, and named as ``--json`` in that job's ``job.json``).
  Called before any work, so an hour of evaluation never ends in a refusal.
* ``write_output(path, data, flag)`` / ``write_output_json``: the write, atomic and bound to the folder that was
  checked. The folder is opened once and every later step is relative to that descriptor: its real location is
  checked again (a link swapped into the path since the check cannot lead into the cache), the temporary is
  created there with ``O_CREAT | O_EXCL | O_NOFOLLOW``, the target's kind is looked at once more, and the
  temporary is renamed onto it within the folder. ``rename(2)`` never follows a link at its target, so a link
  swapped in after the check is replaced, never written through (the file it points to is untouched); the only
  window left is the microseconds between that last look and the rename, in which something swapped in would be
  replaced, never followed.
* ``open_output_append(path, flag)``: the same gate for an output that grows line by line (a killed run keeps
  its rows): opened with ``O_APPEND | O_NOFOLLOW | O_NONBLOCK`` and checked, on the open descriptor, to be a
  regular file.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO

from lft_core.atomic import DamagedRecord, read_record
from lft_core.errors import LFTError
from lft_core.paths import cache_owned

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _is_job_result(path: Path, given: str) -> bool:
    """``path`` is a job's own ``jobs/<id>/result.json`` (``run.jobs.start_job``), not written yet, that the
    job's ``job.json`` names as its ``--json``."""
    owned = cache_owned(path)
    if owned is None:
        return False
    root, rel = owned
    if len(rel.parts) != 3 or rel.parts[0] != "jobs" or rel.parts[2] != "result.json" or os.path.lexists(path):
        return False
    try:
        args = read_record(root / "jobs" / rel.parts[1] / "job.json", {"args": list})["args"]
    except DamagedRecord:
        return False
    return any(a == "--json" and b in (given, str(path)) for a, b in zip(args, args[1:]))


def check_output_file(path: str | os.PathLike | None, flag: str = "--json", probe: bool = True) -> Path:
    """``path`` as a Path when an output may be written there; LFTError (one line, naming ``flag``) otherwise
    (see the module's notes). ``probe`` also creates and removes a temporary file in the folder, so that a
    folder that cannot be written to is refused before the work, not after it."""
    given = "" if path is None else os.fspath(path)
    if not given.strip():
        raise LFTError(f"{flag} needs a file name, got an empty one")
    if "\0" in given:
        raise LFTError(f"{flag} {given!r}: a file name cannot hold a NUL byte")
    if given.endswith(("/", os.sep)):
        raise LFTError(f"{flag} {given} ends with '/': give a file name")
    p = Path(given).expanduser()
    owned = cache_owned(p)
    if owned is not None and not _is_job_result(p, given):
        root, rel = owned
        where = "the cache folder itself" if not rel.parts else f"{rel.as_posix()} in it"
        raise LFTError(f"{flag} {given} is inside LFT Explorer's cache folder {root} ({where}), which holds the "
                       f"project's own records (flows, activations, grids, jobs, ...): write the output elsewhere")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise LFTError(f"{flag} {given}: {p.parent} is not a folder") from None
    except OSError as e:
        raise LFTError(f"{flag} {given} cannot be checked ({e.strerror or e})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        dangling = "" if os.path.exists(p) else ", which does not exist"
        raise LFTError(f"{flag} {given} is a symbolic link (to {target}{dangling}); outputs are never written "
                       f"through a link: give the real file's path or a new name")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise LFTError(f"{flag} {given} is a folder: give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise LFTError(f"{flag} {given} is {_kind(st.st_mode)}, not a regular file; outputs are written to "
                       f"regular files only, and it was left as it is")
    if st is not None and not st.st_mode & 0o222:
        raise LFTError(f"{flag} {given} is read-only, and it was left as it is: give another name")
    if not p.parent.is_dir():
        raise LFTError(f"{flag} {given}: the folder {p.parent} does not exist")
    if probe:
        try:
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name[:100]}.", suffix=".check"):
                pass
        except OSError as e:
            raise LFTError(f"{flag} {given} cannot be written ({e.strerror or e})") from None
    return p


def write_output(path: str | os.PathLike, data: bytes, flag: str = "--json") -> None:
    """``path`` holds exactly ``data``: checked by ``check_output_file``, then written atomically inside the folder
    that was checked (see the module's notes on what is swapped in after the check)."""
    given = os.fspath(path)
    p = check_output_file(given, flag, probe=False)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:  # where the opened folder really is (Linux): a link swapped into its path cannot lead into the cache
            opened = Path(os.readlink(f"/proc/self/fd/{dfd}")) / p.name
        except OSError:
            opened = None
        if opened is not None and cache_owned(opened) is not None and not _is_job_result(p, given):
            raise LFTError(f"{flag} {given} leads into LFT Explorer's cache folder ({opened.parent}); nothing was "
                           f"written")
        tmp = f".{p.name[:100]}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=dfd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:  # the last look, inside the folder that was checked
                st = os.lstat(p.name, dir_fd=dfd)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise LFTError(f"{flag} {given} became {_kind(st.st_mode)} while the result was being written; it "
                               f"was left as it is and nothing was written")
            os.replace(tmp, p.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dfd)
        except OSError:
            pass
    finally:
        os.close(dfd)


def write_output_json(path: str | os.PathLike, data: Any, flag: str = "--json", indent: int | None = 2,
                      default: Callable | None = None) -> None:
    """``write_output`` of ``data`` as JSON (encoded first: a value JSON cannot hold raises before any write)."""
    write_output(path, json.dumps(data, indent=indent, default=default).encode("utf-8"), flag)


def open_output_append(path: str | os.PathLike, flag: str = "--out") -> TextIO:
    """A text file open for appending at ``path`` (created if new), through the same gate as ``write_output``."""
    given = os.fspath(path)
    p = check_output_file(given, flag)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        raise LFTError(f"{flag} {given} cannot be opened ({e.strerror or e}); it was left as it is") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LFTError(f"{flag} {given} is not a regular file; it was left as it is")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")
