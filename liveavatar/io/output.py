"""Output files that never destroy anything.

An `OutputFile` is where one run writes one result (a video, a state file) without ever losing a
file that exists:

- nothing is created until the first bytes are ready (`begin`): no empty or unplayable file, and no
  folder, is left behind by a run that fails or is killed before its first output;
- the run's work-in-progress file `<stem>.partial<suffix>` is created exclusively (an existing partial
  file, such as the one a killed run left to be resumed, is never truncated: the next free name
  `<stem>.partial-2<suffix>`, ... is taken), and it becomes visible only once it holds its first
  complete piece (written to a hidden temporary file, then linked into place);
- `finish()` publishes it under the requested name without replacing a file that is not ours to
  replace: a file that appeared there after the run started (another run), or one that existed
  before without `overwrite`, is kept, and the result takes the next free name `<stem>-2<suffix>`;
- the destination may never be one of the run's inputs (the same file, or a link to it);
- a run holds an exclusive lock on its partial file while it writes it, and `resume()` takes over a
  partial file left by a killed run (checked against the hash of the part to keep, then cut there)
  only when no other process holds it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from liveavatar.errors import UserError


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (through links too); False if either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


class OutputFile:
    def __init__(self, path: str | os.PathLike, *, what: str = "output", overwrite: bool = False,
                 inputs: tuple[str | os.PathLike, ...] = (), rename_if_taken: bool = False,
                 flag: str = "--save_file"):
        """`what` names the file in messages, `flag` the option that sets it; `overwrite` lets
        `finish()` replace a file that exists now;
        `rename_if_taken` chooses another name instead of refusing one that exists (default names).
        Checks everything that can be checked without creating anything."""
        self.path, self.what, self.flag = Path(path), what, flag
        if self.path.is_dir():
            raise UserError(f"{what} {str(self.path)!r} is a directory; pass a file name such as out.mp4")
        for src in inputs:
            if src is not None and (same_file(self.path, src) or self.path.resolve() == Path(src).resolve()):
                raise UserError(f"{what} {str(self.path)!r} is the input {str(src)!r}; writing it would destroy "
                                f"the input: choose another {flag}")
        base = _nearest_existing(self.path)
        if not base.is_dir():
            raise UserError(f"cannot write the {what} {str(self.path)!r}: {str(base)!r} is not a folder; "
                            f"choose a writable location with {flag}")
        try:  # a real probe: permission bits say nothing for root or on special file systems
            fd, probe = tempfile.mkstemp(prefix=".liveavatar-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"cannot write the {what} {str(self.path)!r}: the folder {str(base)!r} is not writable "
                            f"({e.strerror or e}); choose a writable location with {flag}") from None
        self.overwrite, self.rename_if_taken = overwrite, rename_if_taken
        self.existing = _identity(self.path)
        if self.existing is not None and not (overwrite or rename_if_taken):
            raise UserError(f"{what} {str(self.path)!r} already exists; pass --overwrite to replace it once the "
                            f"new one is complete, or choose another {flag}")
        self.partial_path: Path | None = None
        self.file = None
        self.sha = None  # resume(): the hash of the kept bytes, to be continued by the writer
        self._made_dirs: list[Path] = []
        self.state = "new"

    def begin(self, first: bytes):
        """Create the partial file holding `first` (made visible only once complete); returns the open
        binary file, positioned at its end, for the rest."""
        parent = self.path.parent
        try:
            missing = []
            p = parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                d.mkdir()
                self._made_dirs.append(d)
            tmp = parent / f".{self.path.name}.{os.getpid()}-{id(self):x}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            self._remove_dirs()
            raise UserError(f"cannot write the {self.what} {str(self.path)!r} ({e.strerror or e}); "
                            f"choose a writable location with {self.flag}") from None
        f = os.fdopen(fd, "wb")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new inode: free; held until this process ends
            f.write(first)
            f.flush()
            stem, suffix = self.path.stem, self.path.suffix
            for k in range(1, 10_000):
                candidate = parent / (f"{stem}.partial{suffix}" if k == 1 else f"{stem}.partial-{k}{suffix}")
                try:
                    os.link(tmp, candidate)
                    break
                except FileExistsError:
                    continue
            else:
                raise UserError(f"too many partial files beside {str(self.path)!r}; remove old ones")
            self.partial_path = candidate
        except OSError as e:
            f.close()
            self._remove_dirs()
            why = "the disk is full" if is_disk_full(e) else (e.strerror or str(e))
            raise UserError(f"cannot write the {self.what} {str(self.path)!r} ({why}); "
                            f"free some space or choose another location with {self.flag}") from None
        except BaseException:
            f.close()
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self.file, self.state = f, "open"
        return f

    def resume(self, partial: str | os.PathLike, size: int, sha256: str):
        """Take over the partial file `partial` left by an earlier run of this output: lock it, check
        that its first `size` bytes hash to `sha256`, and cut it there. Returns the file, open for
        writing at its end; `self.sha` holds the hash of those bytes, to be continued."""
        partial = Path(partial)
        try:
            fd = os.open(partial, os.O_RDWR)
        except OSError as e:
            raise UserError(f"cannot resume: the partial video {str(partial)!r} cannot be opened "
                            f"({e.strerror or e}); run without --resume to start anew") from None
        f = os.fdopen(fd, "r+b")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another running process is writing {str(partial)!r}; wait for it to end "
                                "(or stop it) before resuming") from None
            sha, left = hashlib.sha256(), size
            while left > 0 and (block := f.read(min(left, 1 << 24))):
                sha.update(block)
                left -= len(block)
            if left > 0 or sha.hexdigest() != sha256:
                why = "is shorter than" if left > 0 else "differs from"
                raise UserError(f"cannot resume: the partial video {str(partial)!r} {why} the one the saved state "
                                "was made with; run without --resume to start anew (the file is kept)")
            f.truncate(size)
            f.seek(size)
        except BaseException:
            f.close()
            raise
        self.partial_path, self.file, self.sha, self.state = partial, f, sha, "open"
        return f

    def check_alive(self) -> None:
        """Raise UserError if the partial file was removed or its folder vanished while writing."""
        if self.partial_path is not None and not self.partial_path.exists():
            raise UserError(f"the {self.what} {str(self.partial_path)!r} was removed while it was written "
                            "(its folder deleted?); nothing more can be saved there")

    def finish(self) -> Path:
        """Publish the partial file under the requested name (or the next free one); returns the name."""
        self.file.flush()
        os.fsync(self.file.fileno())  # the published file must not be shorter than the partial one
        self.file.close()
        self.check_alive()
        target = self.path
        now = _identity(target)
        if now is not None and self.overwrite and now == self.existing and not self.rename_if_taken:
            os.replace(self.partial_path, target)  # the file the user asked to replace, unchanged since
        else:
            stem, suffix = self.path.stem, self.path.suffix
            for k in range(1, 10_000):
                target = self.path if k == 1 else self.path.with_name(f"{stem}-{k}{suffix}")
                try:
                    os.link(self.partial_path, target)
                    break
                except FileExistsError:
                    continue
            self.partial_path.unlink()
        self.state = "done"
        return target

    def keep(self) -> None:
        """Stop, keeping the partial file as it is (playable up to its last complete piece)."""
        if self.file is not None and not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass
        if self.partial_path is None:
            self._remove_dirs()
        self.state = "kept"

    def _remove_dirs(self) -> None:
        """Remove the folders this run created, if they are still empty."""
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                break
        self._made_dirs = []


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


__all__ = ["OutputFile", "is_disk_full", "same_file"]
