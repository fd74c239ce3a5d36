"""launch/Dockerfile and .dockerignore, read the way docker reads them (no docker needed).

The Dockerfile parser handles what this Dockerfile uses: comments, `\\` continuations, `FROM
image AS name` stages that build on earlier ones, and exec-form (JSON) ENTRYPOINTs. The
.dockerignore matcher follows moby's patternmatcher: patterns are cleaned and relative to the
context root, `*` and `?` stop at `/`, `**` spans directories, a pattern that matches a
directory ignores everything under it, and the last matching line wins (`!` re-includes).
"""

import json
import posixpath
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "launch" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NEEDED = ("mm_jax", "configs", "launch", "main.py", "pyproject.toml", "README.md")
EXTRAS = {"gpu": {"gpu", "gcs"}, "tpu": {"tpu", "gcs"}}
# Not the bare target names: conftest skips a test with a `gpu` keyword on CPU-only machines.
TARGET_IDS = [f"target_{t}" for t in sorted(EXTRAS)]


@dataclass
class Stage:
  base: str
  name: str | None
  instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
  """The stages, each with its (INSTRUCTION, arguments) in order."""
  logical, pending = [], ""
  for raw in text.splitlines():
    if raw.strip().startswith("#"):
      continue  # docker drops comment lines, also between continuation lines
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1]
      continue
    line = (pending + raw).strip()
    pending = ""
    if line:
      logical.append(line)
  assert not pending.strip(), "the Dockerfile ends inside a continuation"
  stages = []
  for line in logical:
    word, _, rest = line.partition(" ")
    word, rest = word.upper(), rest.strip()
    if word == "FROM":
      m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
      assert m, f"FROM {rest}"
      stages.append(Stage(m[1], m[2] and m[2].lower()))
    else:
      assert stages, f"{word} before FROM"
      stages[-1].instructions.append((word, rest))
  return stages


def chain(stages: list[Stage], target: str) -> list[Stage]:
  """`target` and the stages it is built FROM, base first."""
  by_name = {s.name: s for s in stages if s.name}
  out, stage = [], by_name[target]
  while True:
    out.insert(0, stage)
    if stage.base.lower() not in by_name:
      return out
    stage = by_name[stage.base.lower()]


def instructions(stages: list[Stage], target: str) -> list[tuple[str, str]]:
  return [i for s in chain(stages, target) for i in s.instructions]


def copies(args: str) -> tuple[list[str], str]:
  """COPY's (sources, destination); --from copies (other stages) are not the context's."""
  if args.startswith("["):
    parts = json.loads(args)
  else:
    parts = shlex.split(args)
  parts = [p for p in parts if not p.startswith("--")]
  return parts[:-1], parts[-1]


def pip_installs(run: str) -> list[list[str]]:
  """The arguments of each `pip install` in a RUN (shell form, `&&`-joined)."""
  out = []
  for command in re.split(r"&&|;|\|\|", run):
    words = shlex.split(command)
    for i in range(len(words) - 1):
      if words[i].endswith("pip") and words[i + 1] == "install":
        out.append(words[i + 2:])
      elif words[i:i + 3] == ["-m", "pip", "install"]:
        out.append(words[i + 3:])
  return out


def extras(requirement: str) -> set[str] | None:
  """`.[gpu,gcs]` -> {"gpu", "gcs"}; None for anything but this project."""
  m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", requirement)
  return None if m is None else {e.strip() for e in (m[1] or "").split(",") if e.strip()}


# --- .dockerignore ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
  regex: re.Pattern
  exclusion: bool


def _clean(path: str) -> str:
  """Go's filepath.Clean for these paths, with the leading `/` docker strips."""
  path = posixpath.normpath(path)
  return path.lstrip("/") or "."


def compile_pattern(pattern: str) -> Pattern:
  """moby patternmatcher's regex for one (cleaned) pattern."""
  exclusion = pattern.startswith("!")
  pattern = _clean(pattern[1:].strip() if exclusion else pattern)
  regex, i = "^", 0
  while i < len(pattern):
    ch = pattern[i]
    if pattern.startswith("**", i):
      i += 2
      if pattern.startswith("/", i):
        i += 1  # `**/` is `**`: any number of directories, also none
      regex += ".*" if i == len(pattern) else "(.*/)?"
      continue
    if ch == "*":
      regex += "[^/]*"
    elif ch == "?":
      regex += "[^/]"
    elif ch == "\\" and i + 1 < len(pattern):
      i += 1
      regex += re.escape(pattern[i])
    elif ch == "[":
      # A class, `^` negating as in Go's filepath.Match: docker passes it on as is.
      end = pattern.find("]", i + 2)
      end = len(pattern) - 1 if end < 0 else end
      regex += pattern[i:end + 1]
      i = end
    else:
      regex += re.escape(ch)
    i += 1
  return Pattern(re.compile(regex + "$", re.DOTALL), exclusion)


def read_dockerignore(text: str) -> list[Pattern]:
  lines = (line.strip() for line in text.splitlines())
  return [compile_pattern(line) for line in lines if line and not line.startswith("#")]


def ignored(patterns: list[Pattern], path: str) -> bool:
  """moby's MatchesOrParentMatches: the path or one of its parent directories matches."""
  path = _clean(path)
  parts = path.split("/")
  prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
  matched = False
  for p in patterns:
    if p.exclusion != matched:
      continue  # an exception only matters once excluded, an exclusion only before
    if any(p.regex.match(prefix) for prefix in prefixes):
      matched = not p.exclusion
  return matched


# --- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
  return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def patterns() -> list[Pattern]:
  return read_dockerignore(DOCKERIGNORE.read_text())


def test_parser_reads_continuations_comments_and_stages():
  stages = parse_dockerfile("# c\nFROM a:1 AS one\nRUN x \\\n# inside\n  && y\n"
                            "from one as Two\nENTRYPOINT [\"p\"]\n")
  assert [(s.base, s.name) for s in stages] == [("a:1", "one"), ("one", "two")]
  assert stages[0].instructions == [("RUN", "x   && y")]
  assert instructions(stages, "two") == [("RUN", "x   && y"), ("ENTRYPOINT", '["p"]')]


@pytest.mark.parametrize("target", sorted(EXTRAS), ids=TARGET_IDS)
def test_target_installs_its_extras_on_python_3_11_plus(stages, target):
  base = chain(stages, target)[0].base
  m = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?(?:-\S+)?", base)
  assert m and (int(m[1]), int(m[2])) >= (3, 11), base
  installs = [args for word, rest in instructions(stages, target) if word == "RUN"
              for args in pip_installs(rest)]
  project = [extras(a) for args in installs for a in args if extras(a) is not None]
  assert project and all(e == EXTRAS[target] for e in project), (target, installs)


@pytest.mark.parametrize("target", sorted(EXTRAS), ids=TARGET_IDS)
def test_dependencies_are_installed_before_the_source_is_copied(stages, target):
  """The dependency layer is cached unless pyproject.toml changes: only it is copied first."""
  steps = instructions(stages, target)
  first_install = next(i for i, (word, rest) in enumerate(steps)
                       if word == "RUN" and pip_installs(rest))
  copied = [src for word, rest in steps[:first_install] if word == "COPY"
            for src in copies(rest)[0]]
  assert copied == ["pyproject.toml"]


def image_files(steps: list[tuple[str, str]], context: list[str]) -> tuple[str, set[str]]:
  """(the final WORKDIR, the image's paths from the context) after `steps`' COPYs."""
  workdir, image = "/", set()
  for word, rest in steps:
    if word == "WORKDIR":
      workdir = posixpath.join(workdir, rest)
    elif word == "COPY" and "--from" not in rest:
      sources, dest = copies(rest)
      into_dir = dest.endswith("/") or _clean(dest) == "." or len(sources) > 1
      dest = posixpath.join(workdir, dest)
      for src in map(_clean, sources):
        if src == "." or (ROOT / src).is_dir():  # a directory's contents go into dest
          image |= {posixpath.join(dest, posixpath.relpath(f, src)) for f in context
                    if src == "." or f.startswith(src + "/")}
        elif src in context:
          image.add(posixpath.join(dest, posixpath.basename(src)) if into_dir else dest)
  return workdir, {posixpath.normpath(f) for f in image}


@pytest.mark.parametrize("target", sorted(EXTRAS), ids=TARGET_IDS)
def test_workdir_holds_main_py_and_entrypoint_is_vertex_env(stages, patterns, target):
  context = [f for f in tracked_files() if not ignored(patterns, f)]
  steps = instructions(stages, target)
  workdir, image = image_files(steps, context)
  for f in ("main.py", "configs/llava.py", "launch/vertex_env.py", "mm_jax/__init__.py",
            "pyproject.toml", "README.md"):
    assert posixpath.join(workdir, f) in image, (target, workdir, f)
  entrypoints = [rest for word, rest in steps if word == "ENTRYPOINT"]
  assert entrypoints and json.loads(entrypoints[-1]) == ["python", "-m", "launch.vertex_env"]
  assert not [rest for word, rest in steps if word == "CMD"]  # no default args to main.py


def test_every_copied_file_exists(stages):
  for stage in stages:
    for word, rest in stage.instructions:
      if word in ("COPY", "ADD") and "--from" not in rest:
        for src in copies(rest)[0]:
          assert (ROOT / src).exists(), f"{word} {src}: not in the repository"


@pytest.mark.parametrize("lines,path,want", [
    (["__pycache__"], "__pycache__/a.pyc", True),
    (["__pycache__"], "mm_jax/__pycache__/a.pyc", False),  # only the root's, as in docker
    (["**/__pycache__"], "mm_jax/x/__pycache__/a.pyc", True),
    (["**/*.pyc"], "a.pyc", True),
    (["*.pyc"], "mm_jax/a.pyc", False),
    (["/runs/"], "runs/x/checkpoints/1", True),
    ([".venv*"], ".venv-xm/bin/python", True),
    ([".venv*"], "mm_jax/.venv", False),
    (["docs", "!docs/keep.md"], "docs/keep.md", False),
    (["docs/*", "!docs/keep.md"], "docs/keep.md", False),
    (["*.md", "!README.md"], "README.md", False),
    (["a?c"], "a/c", False),
    (["[^a]b"], "cb", True),
    (["[^a]b"], "ab", False),
    (["x/**"], "x/y/z", True),
    (["**"], "anything/at/all", True),
])
def test_matcher_follows_docker(lines, path, want):
  assert ignored(read_dockerignore("\n".join(lines)), path) is want


def tracked_files() -> list[str]:
  """Tracked and untracked-but-not-ignored files: what a checkout would build from."""
  if shutil.which("git") is None or not (ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], check=True, capture_output=True).stdout
  return [f for f in out.decode().split("\0") if f]


def test_dockerignore_keeps_what_the_image_needs(patterns):
  needed = [f for f in tracked_files()
            if f in NEEDED or f.split("/", 1)[0] in NEEDED and (ROOT / f).exists()]
  assert {f.split("/", 1)[0] for f in needed} == set(NEEDED)
  assert [f for f in needed if ignored(patterns, f)] == []
  assert not ignored(patterns, "launch/Dockerfile")


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv-xm/x", ".venv-targets/x", "runs/x/checkpoints/1", ".git/HEAD",
    "mm_jax/__pycache__/a.pyc", "mm_jax/models/x.pyc", "mm_jax.egg-info/PKG-INFO",
    ".pytest_cache/v", ".ruff_cache/x", "tests/test_main.py", "bench/out/x.json",
    "workdir1/ckpt", "shared/x"])
def test_dockerignore_keeps_out(patterns, path):
  assert ignored(patterns, path)


def test_nothing_at_run_time_imports_what_is_ignored(patterns):
  """tests/, bench/ and docs/ stay out of the image: main.py and the packages never import
  them."""
  sources = [ROOT / "main.py", *[p for d in ("mm_jax", "configs", "launch")
                                 for p in (ROOT / d).rglob("*.py")]]
  pattern = re.compile(r"^\s*(?:from|import)\s+(tests|bench|docs)\b", re.MULTILINE)
  assert [str(p) for p in sources if pattern.search(p.read_text())] == []
  assert all(ignored(patterns, d + "/x") for d in ("tests", "bench", "docs"))
