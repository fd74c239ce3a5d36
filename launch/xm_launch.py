r"""XManager launcher for main.py: GPU nodes or one TPU slice on Vertex AI, or this machine.

  xmanager launch launch/xm_launch.py -- --config=configs/llava.py:7b \
      --workdir=gs://bucket/run --accelerator=h200x8 --nodes=2 --config.optim.lr=2e-5

It needs its own environment (launch/requirements-xm.txt: xmanager pins protobuf<7). What
reaches main.py, in this order: `--config`, `--workdir` (plus `/<n>` per trial of a sweep, so
trials never share checkpoints), every `--config.*` override as typed (the launcher parses
them against the real config first, so a typo fails here, not on the cluster; write them with
`=`), then main.py's other flags, which go after a second `--` (absl would reject them here),
then the trial's overrides with `--sweep` (one work unit per trial of the config file's
`get_sweep`, launch/sweep.py).

GPU: `<gpu>x<per node>` (h100x8, h200x8, a100x8, ...). xmanager 0.8.5's Vertex client picks a
machine type only for A100 and L4 and puts every other GPU on n1-standard-4, which Vertex
rejects once the image is built and pushed: `run()` makes it take the machine from
_VERTEX_MACHINES, and a count no Vertex machine has fails before anything is built. Vertex
launches also need $GOOGLE_CLOUD_BUCKET_NAME (xmanager's staging bucket). `--nodes=N` > 1 is
one JobGroup: a `chief` job and a `workers` job with N-1 replicas, since Vertex AI wants its
first worker pool to be one replica and xmanager maps each job of a group to one pool. Vertex
tells the replicas where the chief is only at run time (CLUSTER_SPEC); the image's entry point,
launch/vertex_env.py, turns that into the JAX_* variables mm_jax/distributed.py reads, and
the jobs carry JAX_NUM_PROCESSES (checked against it) and JAX_COORDINATOR_PORT.
TPU: `v5e-16`, `v5p-128`, `v6e-256` (Cloud TPU names: v5p counts TensorCores, two per chip)
as xm.JobRequirements with the slice's topology; jax finds its peers itself. xmanager
0.8.5's Vertex client maps only TPU v2/v3 to machine types, so `main()` refuses these on
Vertex (launch/gke.py runs TPU slices); the jobs are still built for other backends.
Local (`--platform=local`): one node, xm_local.Local with `local_gpu`.
Without `--docker_image` the image is built from this checkout's files as git lists them
(export_tracked), never its virtual environments, runs/ or .git.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  # `xmanager launch` imports this file with launch/ put first on the path, and pops index 0
  # afterwards: go second, so `launch` and `configs` (config files import it) stay importable.
  sys.path.insert(1, str(_ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from xmanager import xm, xm_local  # noqa: E402

from launch import sweep as sweep_lib  # noqa: E402
from launch import tpu  # noqa: E402

COORDINATOR_PORT = "8476"  # mm_jax/distributed.py's default

_GPUS = {"a100": "A100", "a100_80gib": "A100_80GIB", "h100": "H100", "h200": "H200",
         "b200": "B200", "l4": "L4_24TH"}
# xm GPU -> (aiplatform_v1.AcceleratorType name, {GPUs per node: Vertex machine type}). These
# machines come with a fixed GPU count, so any other count is refused before a build. H100 is
# a3-highgpu-8g only: its 1g/2g/4g shapes need Spot or Flex-start, which xmanager can't ask for.
_VERTEX_MACHINES = {
    "A100": ("NVIDIA_TESLA_A100", {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g",
                                   8: "a2-highgpu-8g", 16: "a2-megagpu-16g"}),
    "A100_80GIB": ("NVIDIA_A100_80GB", {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g",
                                        4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"}),
    "H100": ("NVIDIA_H100_80GB", {8: "a3-highgpu-8g"}),
    "H200": ("NVIDIA_H200_141GB", {8: "a3-ultragpu-8g"}),
    "B200": ("NVIDIA_B200", {8: "a4-highgpu-8g"}),
    "L4_24TH": ("NVIDIA_L4", {1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48",
                              8: "g2-standard-96"}),
}
_TPU_RESOURCES = {"v5e": "TPU_V5E", "v6e": "TPU_V6E", "v5p": "TPU_V5P"}  # launch/tpu.py's names


@dataclasses.dataclass(frozen=True)
class Accelerator:
  resource: xm.ResourceType
  count: int  # GPUs per node, or TPU chips in the slice
  topology: str | None = None  # TPU only

  @property
  def is_tpu(self) -> bool:
    return self.topology is not None


def parse_accelerator(name: str, platform: str = "vertex") -> Accelerator:
  """`h200x8` -> 8 H200 per node; `v5p-128` -> a 4x4x4 TPU v5p slice (64 chips)."""
  if m := re.fullmatch(r"([a-z0-9_]+)x(\d+)", name):
    if m[1] in _GPUS:
      machines = _VERTEX_MACHINES[_GPUS[m[1]]][1]
      if platform == "vertex" and int(m[2]) not in machines:
        raise ValueError(f"accelerator {name!r}: Vertex AI has no {m[1]} machine with {m[2]} "
                         f"GPUs; valid counts: {', '.join(map(str, machines))}")
      return Accelerator(xm.ResourceType[_GPUS[m[1]]], int(m[2]))
  if m := re.fullmatch(r"(v5e|v5p|v6e)-(\d+)", name):
    try:
      topology = tpu.default_topology(m[1], tpu.chips(m[1], int(m[2])))
    except ValueError as e:
      raise ValueError(f"accelerator {name!r}: {e}") from None
    return Accelerator(xm.ResourceType[_TPU_RESOURCES[m[1]]],
                       xm.Topology(topology).chip_count, topology)
  raise ValueError(f"accelerator {name!r}: want <gpu>x<count> with gpu in {sorted(_GPUS)}, "
                   "or v5e-<n>, v5p-<n>, v6e-<n>")


@dataclasses.dataclass(frozen=True)
class LaunchArgs:
  config: str  # main.py's --config, `path[:arg]`
  workdir: str
  accelerator: str
  nodes: int = 1
  platform: str = "vertex"  # vertex | local
  sweep: bool = False
  overrides: tuple[str, ...] = ()  # `--config.*` flags as typed, in order
  main_flags: tuple[str, ...] = ()  # main.py's other flags, in order
  image: str = ""  # a prebuilt image; empty: build one from this checkout
  base_image: str = "python:3.11"
  name: str = ""


def build_jobs(args: LaunchArgs, executable) -> list[tuple[dict, xm.JobGroup]]:
  """(work-unit args, jobs) per trial: pure, so a test can read what would be launched."""
  accel = parse_accelerator(args.accelerator, args.platform)
  if args.nodes < 1 or (args.nodes > 1 and (accel.is_tpu or args.platform == "local")):
    raise ValueError(f"--nodes={args.nodes}: multi-node is for GPUs on Vertex; a TPU "
                     "slice is one job (pick a larger slice), local is one machine")
  trials = sweep_lib.trials(args.config) if args.sweep else [{}]
  overridden = {t.split("=", 1)[0].lstrip("-").removeprefix("no") for t in args.overrides}
  units = []
  for i, trial in enumerate(trials, 1):
    clash = overridden & {f"config.{k}" for k in trial}
    if clash:
      raise ValueError(f"--sweep sets {sorted(clash)}, also given on the command line")
    workdir = f"{args.workdir}/{i}" if len(trials) > 1 else args.workdir
    argv = [f"--config={args.config}", f"--workdir={workdir}", *args.overrides,
            *args.main_flags]
    group = _job_group(args, accel, executable, argv)
    # xmanager appends these keyword args after the positional ones, and shows them as the
    # work unit's hyperparameters; sweep.flag_value keeps config_flags' spelling.
    trial_args = {f"config.{k}": sweep_lib.flag_value(v) for k, v in trial.items()}
    units.append(({name: {"args": trial_args} for name in group.jobs}, group))
  return units


def _job_group(args: LaunchArgs, accel: Accelerator, executable, argv) -> xm.JobGroup:
  if args.platform == "local":
    req = xm.JobRequirements() if accel.is_tpu else xm.JobRequirements(local_gpu=accel.count)
    return xm.JobGroup(main=xm.Job(executable, xm_local.Local(requirements=req), args=argv))
  if args.platform != "vertex":
    raise ValueError(f"--platform={args.platform!r}: want vertex or local")
  amount = xm.Topology(accel.topology) if accel.is_tpu else accel.count
  if args.nodes == 1:
    req = xm.JobRequirements({accel.resource: amount})
    return xm.JobGroup(main=xm.Job(executable, xm_local.Vertex(requirements=req), args=argv))
  env = {"JAX_NUM_PROCESSES": str(args.nodes), "JAX_COORDINATOR_PORT": COORDINATOR_PORT}
  chief = xm_local.Vertex(requirements=xm.JobRequirements({accel.resource: amount}))
  workers = xm_local.Vertex(
      requirements=xm.JobRequirements({accel.resource: amount}, replicas=args.nodes - 1))
  return xm.JobGroup(chief=xm.Job(executable, chief, args=argv, env_vars=env),
                     workers=xm.Job(executable, workers, args=argv, env_vars=env))


def export_tracked(root: Path, into: str) -> str:
  """Copies `root`'s files that git knows or would add into `<into>/<root's name>/`; its path.

  xmanager puts the whole folder it is given into the build context, with no ignore list:
  .venv*, runs/ and .git would be uploaded and baked into the image. These are the tracked
  files as they are in the working tree (uncommitted edits included, what a launch means) and
  the untracked ones .gitignore does not exclude. The folder keeps `root`'s name, which the
  image's `COPY <name>/` names. A root that is not a git checkout is refused: without git's
  list there is no telling sources from outputs.
  """
  try:
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", b"") or str(e).encode()
    raise RuntimeError(f"{root}: the image is built from git's list of files, and `git "
                       f"ls-files` failed: {detail.decode().strip()}") from None
  dest = Path(into) / root.name
  dest.mkdir(parents=True)
  for name in listed.decode().split("\0"):
    src = root / name
    if not name or not os.path.lexists(src):
      continue  # a tracked file deleted in the working tree stays out, as it would commit
    (dest / name).parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():  # a submodule: git lists only its folder
      shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    else:
      shutil.copy2(src, dest / name, follow_symlinks=False)
  return str(dest)


def packageable(args: LaunchArgs, spec, build_dir: str) -> xm.Packageable:
  """The image: `--image` as is, or this checkout (export_tracked into `build_dir`, which
  must outlive the packaging) on `--base_image` with the right jax."""
  if args.image:
    return xm.container(spec, image_path=args.image)
  # The image's extras, as launch/Dockerfile's targets: gcsfs for the gs:// workdir.
  extras = "tpu,gcs" if parse_accelerator(args.accelerator, args.platform).is_tpu else "gpu,gcs"
  return xm.python_container(
      spec, path=export_tracked(_ROOT, build_dir), base_image=args.base_image,
      entrypoint=xm.ModuleName("launch.vertex_env"),
      docker_instructions=[f"COPY {_ROOT.name}/ /workdir", "WORKDIR /workdir",
                           f"RUN python -m pip install -e '.[{extras}]'"])


def vertex_machine_spec(job: xm.Job, xm_machine_spec) -> dict:
  """`job`'s Vertex machine spec: ours for the GPUs in _VERTEX_MACHINES, else xmanager's."""
  req = job.executor.requirements
  if req.accelerator is None or req.accelerator.name not in _VERTEX_MACHINES:
    return xm_machine_spec(job)  # CPU or TPU: xmanager's own answer
  from google.cloud import aiplatform_v1  # xmanager's Vertex client's dependency

  accelerator, machines = _VERTEX_MACHINES[req.accelerator.name]
  count = int(req.task_requirements[req.accelerator])
  if count not in machines:  # parse_accelerator refuses these first; this guards other callers
    raise ValueError(f"{req.accelerator.name} x{count}: no Vertex AI machine; valid counts: "
                     f"{', '.join(map(str, machines))}")
  return {"machine_type": machines[count], "accelerator_count": count,
          "accelerator_type": aiplatform_v1.AcceleratorType[accelerator]}


def use_vertex_machines() -> None:
  """Makes xmanager's Vertex client, which builds the CustomJob, use vertex_machine_spec."""
  from xmanager.cloud import vertex  # imports google-cloud-aiplatform: Vertex only

  if getattr(vertex.get_machine_spec, "xm_machine_spec", None):
    return  # already installed
  xm_machine_spec = vertex.get_machine_spec

  def get_machine_spec(job: xm.Job) -> dict:
    return vertex_machine_spec(job, xm_machine_spec)

  get_machine_spec.xm_machine_spec = xm_machine_spec
  # Client.launch looks the function up in its module at each launch.
  vertex.get_machine_spec = get_machine_spec


def run(experiment, args: LaunchArgs) -> None:
  """The experiment body: package once, one work unit per trial."""
  if args.platform == "vertex":
    use_vertex_machines()
  spec = xm_local.Local.Spec() if args.platform == "local" else xm_local.Vertex.Spec()
  # package() builds (and pushes) the image before it returns: the export can go then.
  with tempfile.TemporaryDirectory(prefix="mm_jax-build-") as build_dir:
    [executable] = experiment.package([packageable(args, spec, build_dir)])
  for unit_args, group in build_jobs(args, executable):
    experiment.add(group, args=unit_args)


def check_launchable(args: LaunchArgs) -> None:
  """What xmanager 0.8.5 itself would reject only after building and uploading the image."""
  accel = parse_accelerator(args.accelerator, args.platform)
  if args.platform != "vertex":
    return
  if accel.is_tpu:
    raise app.UsageError(f"--accelerator={args.accelerator}: xmanager 0.8.5's Vertex client "
                         "maps only TPU v2/v3 (xmanager/cloud/vertex.py); use launch/gke.py")
  if not os.environ.get("GOOGLE_CLOUD_BUCKET_NAME"):
    # Every Vertex launch reads it, prebuilt image or not: xmanager gives CustomJob
    # staging_bucket=gs://$GOOGLE_CLOUD_BUCKET_NAME; Cloud Build (no local docker) uploads there.
    raise app.UsageError("$GOOGLE_CLOUD_BUCKET_NAME is unset: xmanager's Vertex client needs "
                         "a GCS bucket name there (staging bucket, no gs://)")


def define_flags(fv: flags.FlagValues) -> None:
  """The launcher's flags; --config is main.py's own, so its overrides are checked here."""
  config_flags.DEFINE_config_file("config", None, "main.py's --config (path:arg).",
                                  flag_values=fv)
  flags.DEFINE_string("workdir", None, "main.py's --workdir (gs://...).", flag_values=fv)
  flags.DEFINE_string("accelerator", None, "h200x8, h100x8, a100x8, v5e-16, v5p-128, ...",
                      flag_values=fv)
  flags.DEFINE_integer("nodes", 1, "GPU nodes, one JobGroup.", flag_values=fv)
  flags.DEFINE_enum("platform", "vertex", ["vertex", "local"], "Where to run.",
                    flag_values=fv)
  flags.DEFINE_bool("sweep", False, "One work unit per trial of the config's get_sweep.",
                    flag_values=fv)
  flags.DEFINE_string("docker_image", "", "A prebuilt image (its entry point: python -m "
                      "launch.vertex_env); empty: build this checkout.", flag_values=fv)
  flags.DEFINE_string("base_image", "python:3.11", "Base of the built image.", flag_values=fv)
  flags.DEFINE_string("xm_title", "", "Experiment title.", flag_values=fv)
  for name in ("config", "workdir", "accelerator"):
    flags.mark_flag_as_required(name, flag_values=fv)


def args_from_flags(fv: flags.FlagValues, raw_argv, rest) -> LaunchArgs:
  """LaunchArgs from parsed flags; the overrides come verbatim from `raw_argv`, in order."""
  rest = list(rest)
  overrides = tuple(t for t in raw_argv if re.match(r"--(no)?config\.", t) and t not in rest)
  return LaunchArgs(config=fv["config"].config_filename, workdir=fv.workdir,
                    accelerator=fv.accelerator, nodes=fv.nodes, platform=fv.platform,
                    sweep=fv.sweep, overrides=overrides, main_flags=tuple(rest),
                    image=fv.docker_image, base_image=fv.base_image, name=fv.xm_title)


define_flags(flags.FLAGS)


def main(argv) -> None:
  args = args_from_flags(flags.FLAGS, sys.argv, argv[1:])
  check_launchable(args)
  title = args.name or f"mm_jax {args.config} {args.accelerator} x{args.nodes}"
  with xm_local.create_experiment(experiment_title=title) as experiment:
    run(experiment, args)


if __name__ == "__main__":
  app.run(main)
