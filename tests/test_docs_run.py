"""The CPU commands of getting-started.md, data.md and hf.md, run as a user runs them.

Every ```sh block of those pages runs in order, in one scratch folder holding main.py and
configs/, with the virtual environment's `python` first on PATH (what `. .venv/bin/activate`
does) and one CPU device. By default on small settings (few steps, small exports):
every command must exit 0 with no traceback, every figure a "what to expect" table
names must be written where the table says, and every answer table's truth must be the
data's. With MM_JAX_DOCS_FULL=1 the commands run exactly as written (about 20 minutes on
2 cores) and each figure must lie in the range its page states, each generated answer
must be the one its table shows.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = ("getting-started.md", "data.md", "hf.md")  # in order: hf.md exports runs/tiny
FULL = os.environ.get("MM_JAX_DOCS_FULL") == "1"

# Small settings: a training command trains a few steps and evaluates one batch; an
# export writes fewer samples (enough for the images the pages name).
SMALL_TRAIN = ["--config.train.steps=6", "--config.train.log_every=3",
               "--config.train.batch_size=8", "--config.train.eval_batches=1",
               "--config.checkpoint.every=6"]
SMALL_EXPORT = {"--train": "64", "--eval": "24"}


def sh_commands(page: str) -> list[str]:
  """The commands of a page's ```sh blocks, continuation lines joined."""
  text = (DOCS / page).read_text()
  blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
  return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def small(command: str) -> str:
  """The command on small settings (identical under MM_JAX_DOCS_FULL=1)."""
  if FULL:
    return command
  argv = shlex.split(command)
  if argv[:2] == ["python", "main.py"] and not any(
      a.startswith("--mode=") and a != "--mode=train" for a in argv):
    argv += SMALL_TRAIN
  if argv[:3] == ["python", "-m", "mm_jax.data.export"]:
    argv = [f"{k}={SMALL_EXPORT[k]}" if k in SMALL_EXPORT else a
            for a, k in ((a, a.partition("=")[0]) for a in argv)]
  return shlex.join(argv)


def expectations(page: str) -> list[tuple[str, str, float, float]]:
  """Rows of the page's what-to-expect tables: (key, file, low, high), from cells such as
  "`eval/accuracy` in `runs/tiny/eval_1000.json`" and "0.80-0.88"."""
  rows = []
  for m in re.finditer(r"^\|.*\| `([\w/.]+)` in `([\w/.-]+)` \| ([\d.]+)-([\d.]+) \|$",
                       (DOCS / page).read_text(), flags=re.M):
    rows.append((m.group(1), m.group(2), float(m.group(3)), float(m.group(4))))
  return rows


def answer_rows(page: str) -> list[dict]:
  """Rows of the page's answer tables (| image or clip | prompt | truth | answer |)."""
  out = []
  for table in re.findall(r"^\| (image|clip) \| prompt \| truth \| answer \|\n\|[-|]+\|\n"
                          r"((?:\|.*\|\n)+)", (DOCS / page).read_text(), flags=re.M):
    for line in table[1].splitlines():
      cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
      out.append(dict(zip((table[0], "prompt", "truth", "answer"), cells, strict=True)))
  return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  """A folder laid out as the repository's root for the commands (main.py, configs/)."""
  folder = tmp_path_factory.mktemp("docs_run")
  for name in ("main.py", "configs"):
    (folder / name).symlink_to(ROOT / name)
  return folder


def run(folder: pathlib.Path, command: str) -> str:
  venv = os.path.dirname(sys.executable)
  env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}",
         "VIRTUAL_ENV": os.path.dirname(venv), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  r = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True,
                     text=True, timeout=3600 if FULL else 600)
  out = r.stdout + r.stderr
  assert r.returncode == 0, f"{command}\nexit {r.returncode}\n{out[-3000:]}"
  assert "Traceback" not in out, f"{command}\n{out[-3000:]}"
  return out


def value(folder: pathlib.Path, key: str, file: str) -> float:
  """`key` in a run's eval_<step>.json (small settings: its newest one) or in the last
  metrics.jsonl record that has it."""
  path = folder / file
  if path.name.startswith("eval_") and not FULL:
    evals = sorted(path.parent.glob("eval_*.json"),
                   key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    assert evals, f"no eval_<step>.json in {path.parent}"
    path = evals[-1]
  if path.suffix == ".jsonl":
    records = [json.loads(line) for line in path.read_text().splitlines()]
    found = [r[key] for r in records if r.get(key) is not None]
    assert found, f"{key} not in {file}"
    return float(found[-1])
  return float(json.loads(path.read_text())[key])


def answer(out: str) -> str:
  """The answer of `--mode=generate` (its line ends "'<prompt>' -> <answer>")."""
  return re.findall(r"' -> (.*)$", out, flags=re.M)[-1].strip()


def generate(folder, row: dict) -> str:
  if "image" in row:
    media = f"--workdir=runs/tiny --image=runs/shapes/images/{row['image']}"
  else:
    media = (f"--workdir=runs/mimo --video=runs/clips/{row['clip']}.avi "
             f"--audio=runs/clips/{row['clip']}.wav")
  return answer(run(folder, f"python main.py --mode=generate {media} "
                            f"--prompt={shlex.quote(row['prompt'])}"))


def truth(folder, row: dict) -> tuple[str, str]:
  """(question, answer) of the image's record in runs/shapes/eval.json, or of the clip as
  the export wrote it (the same generator, so written again here)."""
  if "image" in row:
    records = json.loads((folder / "runs/shapes/eval.json").read_text())
    rec = next(r for r in records if r["image"] == f"images/{row['image']}")
    conv = rec["conversations"]
    return conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"]
  from mm_jax.data import synthetic_av

  i = int(row["clip"].rsplit("_", 1)[1])
  ex = synthetic_av.example(i, split="eval", seed=0, frame_size=32, num_frames=2)
  return (" ".join(w for w in ex["prompt"] if not w.startswith("<")), " ".join(ex["answer"]))


def _norm(s: str) -> str:
  """Lower case, words only: "what shape is it ?" and "what shape is it?" are one prompt."""
  return " ".join(re.sub(r"[^a-z ]", " ", s.lower()).split())


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_cpu_commands_run_as_written(page, scratch):
  commands = sh_commands(page)
  assert commands, f"{page}: no ```sh block"
  outputs = {c: run(scratch, small(c)) for c in commands}

  for key, file, low, high in expectations(page):
    v = value(scratch, key, file)
    assert math.isfinite(v), (key, file, v)
    if FULL:
      assert low <= v <= high, f"{page}: {key} in {file} is {v}, the page says {low}-{high}"

  for row in answer_rows(page):
    question, truth_ = truth(scratch, row)
    assert _norm(row["truth"]) == _norm(truth_), (page, row, truth_)
    assert _norm(row["prompt"]) == _norm(question), (page, row, question)
    if FULL:
      assert _norm(generate(scratch, row)) == _norm(row["answer"]), (page, row)

  if page == "getting-started.md":
    assert len(expectations(page)) >= 6 and len(answer_rows(page)) >= 4
    train = next(o for c, o in outputs.items() if "configs/llava.py:tiny" in c)
    assert re.search(r"step \d+/\d+ loss [\d.]+ \(mean of \d+\)", train), train[-2000:]
    assert "final eval at step" in train and "outputs in runs/tiny" in train
  if page == "data.md":
    assert expectations(page), "data.md: no what-to-expect figures"
  if page == "hf.md":
    # The export answers as the checkpoint it came from.
    ask = next(c for c in commands if "llava_from_hf=runs/tiny_hf" in c)
    from_checkpoint = run(scratch, re.sub(r"--config=\S+ --config\.init\.llava_from_hf=\S+",
                                          "--workdir=runs/tiny", ask))
    assert answer(outputs[ask]) == answer(from_checkpoint), (outputs[ask], from_checkpoint)
