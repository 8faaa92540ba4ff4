"""How sphrun writes files: whole or not at all, with the user's umask, one writer at a time.

Every file but the appended tables (metrics.csv, a connect's unfinished points) is written to a temporary
name (.tmp-<name>-XXXXXXXX) and renamed, so a crash never leaves half a file; files that belong together
(a table, its record and its figure) are renamed only once all are written. A write that fails (a full
disk, a quota) leaves the old file as it was and raises CannotWrite, one line naming the file. Locks are
advisory (flock) files beside what they guard; the holder writes its name in them.
"""

import contextlib
import os
import re
import socket
import tempfile

from sphrun import SphrunError

# A temporary of atomic_write: .tmp-<the file it becomes>-<8 random characters>; older versions wrote
# .tmp-<8 random characters>, hence the optional target.
TEMPORARY_NAME = re.compile(r"\.tmp-(?:(.+)-)?[a-z0-9_]{8}$")


class CannotWrite(SphrunError):
    """A write failed while a command worked (a full disk, a quota): a failure at run time, exit 1."""
    exit_code = 1


def cannot_write(path, error):
    return CannotWrite(f"cannot write {path}: {error.strerror or error}")


# Within written_together: [(temporary, path)] written, whose renames wait for the block's end, and the
# list of the paths renamed, which the block's caller reads after it.
_waiting_renames = _written = None


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place (at the end of the
    block, within written_together). When that fails the temporary is removed and `path` left as it was;
    an OSError (a full disk) becomes CannotWrite."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.path.basename(path)}-")
    except OSError as e:
        raise cannot_write(path, e) from e
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 600; other files follow the umask
        finally:
            os.close(fd)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if _waiting_renames is not None:
            _waiting_renames.append((tmp, path))
            return
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise cannot_write(path, e) from e
        raise


@contextlib.contextmanager
def written_together():
    """The files written (atomic_write) inside the block change together: each waits under its temporary
    name, all written before any is renamed into place, so that a failure (a full disk, an error while
    drawing, a second Ctrl-C) removes the temporaries and leaves every file as it was. Only a kill during
    the renames, which take no space, could still split them. Yields a list that then holds the paths
    written, in order. Nested blocks join the outer one (and yield its list)."""
    global _waiting_renames, _written
    if _waiting_renames is not None:
        yield _written
        return
    waiting, written = _waiting_renames, _written = [], []
    try:
        yield written
    except BaseException:
        remove_files(tmp for tmp, _ in waiting)
        raise
    finally:
        _waiting_renames = _written = None
    try:
        for tmp, path in waiting:
            os.replace(tmp, path)
            written.append(path)
    except BaseException as e:
        remove_files(tmp for tmp, _ in waiting[len(written):])
        if isinstance(e, OSError):
            raise cannot_write(waiting[len(written)][1], e) from e
        raise


def remove_files(paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def append_line(path, line):
    """Append one line (text ending in a newline) to `path`; a write that fails is cut off again, so the
    file keeps whole lines only."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "ab") as f:
            f.write(line.encode())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise cannot_write(path, e) from e


def remove_temporaries(folder, targets=None):
    """Delete the temporaries that killed writers left in `folder`: those of the files named in `targets`
    (and of older versions, which did not name them), or all with None. The caller holds the lock of
    every writer of those files, so none of them is alive."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        match = TEMPORARY_NAME.match(name)
        if match and (targets is None or match.group(1) in (None, *targets)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


def current_umask():
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def held_lock(path, wait=False, shared=False, refusal=lambda holder: f"{holder} holds it"):
    """Hold the lock file `path` (made, with its folder, when missing). Exclusive by default, its holder's
    name written in it; `shared` for readers, who share it with each other. Another holder makes it a
    SphrunError with refusal(holder's name), unless `wait`."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: go on unlocked
        yield
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise cannot_write(path, e) from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process reading it"
            raise SphrunError(refusal(holder))
        if not shared:
            with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk may refuse it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def outermost_missing(path):
    """The outermost folder of `path` (itself included) that does not exist yet, or None when it exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def check_output_file(path):
    """Refuse a file a command is to write (a figure) that cannot be: a folder in its place, a folder
    that does not exist or cannot be written."""
    if os.path.isdir(path):
        raise SphrunError(f"{path} is a folder: give a file name, such as {os.path.join(path, 'figure.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise SphrunError(f"cannot write {path}: {folder} {what}")
    check_writable(path)


def check_writable(path):
    """Refuse, before any work, a path in a folder that cannot be written (read-only, /proc): its nearest
    existing folder is tried with a temporary file, since permission bits say nothing to root or of a
    read-only mount."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing != os.path.abspath(path):
            raise SphrunError(f"cannot make {path}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)  # a file to replace, such as a figure
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-probe-")
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    except OSError as e:
        raise SphrunError(f"cannot write {path}: {existing} cannot be written ({e.strerror}); "
                          f"give --out a folder you can write") from e


def format_value(value):
    if isinstance(value, int):
        return str(value)
    return f"{value:.9g}"
