"""One path abstraction for every file a run writes: local paths and `gs://` (any fsspec URL).

config.json, metrics.jsonl, TensorBoard, eval json, goodput.jsonl and the data position all
go through here; checkpoints go to orbax, which takes `gs://` natively (through tensorstore).
Remote paths use etils.epath over fsspec (gcsfs for `gs://`: `pip install 'mm_jax[gcs]'`).

Object stores have no append and no rename of a file being written, so:
- `write_text` is atomic on both: local files via a temporary file and `os.replace`; an
  object is put whole when it is closed, so a reader sees the old or the new one.
- `LineLog` (an append-only log of lines, such as metrics.jsonl) appends to a local file;
  for a remote path it appends to a local staging copy, seeded from the remote object, and
  uploads the whole copy at `sync()` (every write by default; these logs are kilobytes).
- `LocalMirror` gives TensorBoard a local directory and copies its files to the remote
  directory at `sync()`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

from etils import epath

from mm_jax.faults import WriteError


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _remote_hint(path: str, e: Exception) -> Exception:
  if isinstance(e, ImportError):
    return ImportError(f"{path}: a {str(path).split('://')[0]}:// path needs its fsspec "
                       f"filesystem ({e}); for gs:// install 'mm_jax[gcs]' (gcsfs)")
  return e


def path(p: str) -> epath.Path:
  return epath.Path(p)


def join(base: str, *parts: str) -> str:
  """`os.path.join` that keeps `gs://bucket/...` intact (and local paths absolute-free)."""
  return str(epath.Path(base).joinpath(*parts)) if is_remote(base) else os.path.join(base,
                                                                                       *parts)


def parent(p: str) -> str:
  return str(epath.Path(p).parent) if is_remote(p) else os.path.dirname(p)


def absolute(p: str) -> str:
  return p if is_remote(p) else os.path.abspath(p)


def _call(p: str, fn):
  try:
    return fn(epath.Path(p))
  except ImportError as e:
    raise _remote_hint(p, e) from None


def exists(p: str) -> bool:
  return os.path.exists(p) if not is_remote(p) else _call(p, lambda q: q.exists())


def isdir(p: str) -> bool:
  return os.path.isdir(p) if not is_remote(p) else _call(p, lambda q: q.is_dir())


def isfile(p: str) -> bool:
  return exists(p) and not isdir(p)


def listdir(p: str) -> list[str]:
  if not is_remote(p):
    return os.listdir(p)
  return _call(p, lambda q: [c.name for c in q.iterdir()])


def makedirs(p: str) -> None:
  if is_remote(p):
    _call(p, lambda q: q.mkdir(parents=True, exist_ok=True))
  else:
    os.makedirs(p, exist_ok=True)


def remove(p: str) -> None:
  os.remove(p) if not is_remote(p) else _call(p, lambda q: q.unlink())


def rmtree(p: str) -> None:
  if not is_remote(p):
    import shutil
    shutil.rmtree(p)
  else:
    _call(p, lambda q: q.rmtree())


def move(src: str, dst: str) -> None:
  """Moves a file or directory tree (on an object store: copies, then deletes)."""
  if not (is_remote(src) or is_remote(dst)):
    import shutil
    shutil.move(src, dst)
    return
  s = epath.Path(src)
  if s.is_dir():
    epath.Path(dst).mkdir(parents=True, exist_ok=True)
    for child in s.iterdir():  # one listing per folder (GCS refuses recursive globs)
      move(str(child), join(dst, child.name))
    if s.exists():
      s.rmtree()
  else:
    epath.Path(dst).write_bytes(s.read_bytes())
    s.unlink()


def read_text(p: str, *, errors: str = "strict") -> str:
  if not is_remote(p):
    with open(p, errors=errors) as f:
      return f.read()
  return _call(p, lambda q: q.read_bytes().decode("utf-8", errors=errors))


def write_text(p: str, text: str) -> None:
  """Writes `p` whole, atomically: a reader (or a crash) never sees half a file. A failure
  is WriteError naming `p` (an OSError)."""
  try:
    if is_remote(p):
      _call(p, lambda q: q.write_text(text))
      return
    tmp = f"{p}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, p)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except (WriteError, ImportError):
    raise
  except Exception as e:  # ENOSPC, EDQUOT, EACCES, a store's refusal: one line, the file
    raise WriteError.of(p, e) from None


class LineLog:
  """An append-only text log (one JSON record a line) at a local or remote path.

  `keep(lines) -> lines`, given the existing lines (a torn last line included, without its
  newline), chooses what stays before the first append: a resume drops the records it
  replays. `durable_sync` (local): fsync at each sync, for events that must survive a crash."""

  def __init__(self, p: str, *, keep=None):
    self.path, self.remote = p, is_remote(p)
    old = read_text(p, errors="replace") if exists(p) else ""
    lines = old.splitlines()
    kept = keep(lines) if keep is not None else lines
    if self.remote:
      fd, self._local = tempfile.mkstemp(prefix="mm_jax_log_", suffix=".jsonl")
      os.close(fd)
    else:
      self._local = p
    if self.remote or kept != lines or (old and not old.endswith("\n")):
      # Rewritten whole: a torn last line ends, replayed records go.
      text = "".join(line + "\n" for line in kept)
      if self.remote:
        with open(self._local, "w") as f:
          f.write(text)
      else:
        write_text(p, text)
    self._file = open(self._local, "a")  # noqa: SIM115 (held open for the run)
    if self.remote and kept != lines:
      self.sync()

  def write(self, line: str, *, sync: bool = True, durable: bool = False) -> None:
    """Appends one line; WriteError (naming the file) if it cannot be written."""
    try:
      self._file.write(line.rstrip("\n") + "\n")
    except Exception as e:
      raise WriteError.of(self.path, e) from None
    if sync:
      self.sync(durable=durable)

  def sync(self, *, durable: bool = False) -> None:
    try:
      self._file.flush()
      if self.remote:
        with open(self._local, "rb") as f:
          data = f.read()
        _call(self.path, lambda q: q.write_bytes(data))
      elif durable:
        os.fsync(self._file.fileno())
    except ImportError:
      raise
    except Exception as e:  # a full disk surfaces here (buffered writes) or in write()
      raise WriteError.of(self.path, e) from None

  def close(self) -> None:
    """Syncs and closes; WriteError if the last lines cannot be written. Closed either way."""
    if self._file is None:
      return
    try:
      self.sync()
    finally:
      file, self._file = self._file, None
      with contextlib.suppress(OSError):  # the failure sync() reports
        file.close()
      if self.remote and os.path.exists(self._local):
        os.remove(self._local)


class LocalMirror:
  """A local directory for writers that need one (TensorBoard): the directory itself when
  `p` is local; else a staging directory whose files `sync()` copies to `p`."""

  def __init__(self, p: str):
    self.path, self.remote = p, is_remote(p)
    self.local = tempfile.mkdtemp(prefix="mm_jax_mirror_") if self.remote else p
    if not self.remote:
      os.makedirs(p, exist_ok=True)

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        src = os.path.join(root, name)
        rel = os.path.relpath(src, self.local)
        with open(src, "rb") as f:
          data = f.read()
        target = epath.Path(self.path) / rel
        _call(self.path, lambda q, t=target: t.parent.mkdir(parents=True, exist_ok=True))
        target.write_bytes(data)
