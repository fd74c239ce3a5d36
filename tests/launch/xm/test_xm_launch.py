"""launch/xm_launch.py through xmanager's own mock: the jobs, accelerators, args and env.

Run in .venv-xm only: .venv-xm/bin/python -m pytest -q --noconftest tests/launch/xm
"""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from xmanager import xm, xm_local, xm_mock
from xmanager.xm import utils as xm_utils

from launch import xm_launch

OVERRIDES = ("--config.optim.lr=2e-5", "--noconfig.checkpoint.async_save",
             "--config.model.modalities=('image', 'video')")


def _launch(**kw) -> xm_mock.MockExperiment:
  args = xm_launch.LaunchArgs(**{"config": "configs/llava.py:7b",
                                 "workdir": "gs://bucket/run", **kw})
  experiment = xm_mock.MockExperiment()
  with experiment:
    xm_launch.run(experiment, args)
  return experiment


def _argv(job: xm.Job) -> list[str]:
  return job.args.to_list(xm_utils.ARGV_ESCAPER)  # what Vertex and xm_local pass


def test_two_h200_nodes_are_one_job_group():
  experiment = _launch(accelerator="h200x8", nodes=2, overrides=OVERRIDES,
                       main_flags=("--distributed_timeout_s=600",))
  assert experiment.work_unit_count == 1
  chief, workers = experiment.launched_jobs
  assert (chief.name, workers.name) == ("chief", "workers")
  for job, replicas in ((chief, 1), (workers, 1)):
    assert isinstance(job.executor, xm_local.Vertex)
    req = job.executor.requirements
    assert req.accelerator == xm.ResourceType.H200
    assert req.task_requirements[xm.ResourceType.H200] == 8
    assert req.replicas == replicas
    assert _argv(job) == ["--config=configs/llava.py:7b", "--workdir=gs://bucket/run",
                          *OVERRIDES, "--distributed_timeout_s=600"]
    assert job.env_vars == {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_PORT": "8476"}


def test_four_nodes_are_a_chief_and_three_workers():
  chief, workers = _launch(accelerator="a100x8", nodes=4).launched_jobs
  assert (chief.executor.requirements.replicas, workers.executor.requirements.replicas) == (1, 3)
  assert chief.executor.requirements.accelerator == xm.ResourceType.A100
  assert workers.env_vars["JAX_NUM_PROCESSES"] == "4"


def test_one_tpu_v5p_128_slice():
  experiment = _launch(accelerator="v5p-128", overrides=OVERRIDES[:1])
  [job] = experiment.launched_jobs
  req = job.executor.requirements
  assert req.accelerator == xm.ResourceType.TPU_V5P
  assert req.topology == xm.Topology("4x4x4")
  assert req.task_requirements[xm.ResourceType.TPU_V5P] == 64  # 128 TensorCores
  assert req.replicas == 1 and job.env_vars == {}
  assert _argv(job) == ["--config=configs/llava.py:7b", "--workdir=gs://bucket/run",
                        "--config.optim.lr=2e-5"]


@pytest.mark.parametrize("name,resource,topology", [
    ("v5e-16", xm.ResourceType.TPU_V5E, "4x4"), ("v6e-256", xm.ResourceType.TPU_V6E, "16x16"),
    ("v5p-8", xm.ResourceType.TPU_V5P, "2x2x1")])
def test_tpu_topologies(name, resource, topology):
  accel = xm_launch.parse_accelerator(name)
  assert (accel.resource, accel.topology) == (resource, topology)


def test_sweep_is_one_work_unit_per_trial():
  experiment = _launch(config="configs/llava.py:7b,stage=finetune", accelerator="h100x8",
                       sweep=True, overrides=("--config.train.steps=10",))
  assert experiment.work_unit_count == 3
  lrs = ["1e-05", "2e-05", "4e-05"]
  assert experiment.launched_jobs_args == [{"main": {"args": {"config.optim.lr": lr}}}
                                           for lr in lrs]
  for i, (job, lr) in enumerate(zip(experiment.launched_jobs, lrs, strict=True), 1):
    assert job.executor.requirements.task_requirements[xm.ResourceType.H100] == 8
    assert _argv(job) == ["--config=configs/llava.py:7b,stage=finetune",
                          f"--workdir=gs://bucket/run/{i}", "--config.train.steps=10",
                          f"--config.optim.lr={lr}"]


def test_trial_values_keep_config_flags_spelling():
  group = xm.JobGroup(main=xm.Job(xm_mock.MockExecutable(), xm_mock.MockExecutor(),
                                  args=["--config=c"]))
  unit_args = {"main": {"args": {"config.eval.generate": xm_launch.sweep_lib.flag_value(False),
                                 "config.optim.freeze": xm_launch.sweep_lib.flag_value(())}}}
  experiment = xm_mock.MockExperiment()
  with experiment:
    experiment.add(group, args=unit_args)
  assert _argv(experiment.launched_jobs[0]) == ["--config=c", "--noconfig.eval.generate",
                                                     "--config.optim.freeze=()"]


def test_local_platform():
  [job] = _launch(accelerator="h200x8", platform="local").launched_jobs
  assert isinstance(job.executor, xm_local.Local)
  assert job.executor.requirements.task_requirements[xm.ResourceType.LOCAL_GPU] == 8


def test_flags_keep_overrides_verbatim_and_check_them(monkeypatch):
  argv = ["xm_launch.py", "--config=configs/llava.py:7b", "--workdir=gs://b/r",
          "--accelerator=h200x8", "--nodes=2", *OVERRIDES, "--sweep", "--", "--mode=eval"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the overrides there
  fv = flags.FlagValues()
  xm_launch.define_flags(fv)
  rest = fv(argv)
  args = xm_launch.args_from_flags(fv, argv, rest[1:])
  assert args == xm_launch.LaunchArgs(
      config="configs/llava.py:7b", workdir="gs://b/r", accelerator="h200x8", nodes=2,
      sweep=True, overrides=OVERRIDES, main_flags=("--mode=eval",))
  assert fv.config.model.modalities == ("image", "video")
  bad = [*argv[:5], "--config.optim.learning_rate=1"]
  monkeypatch.setattr(sys, "argv", bad)
  fv = flags.FlagValues()
  xm_launch.define_flags(fv)
  with pytest.raises(AttributeError, match="learning_rate"):  # as main.py would, but here
    fv(bad)


def test_errors():
  with pytest.raises(ValueError, match="v5p: 50 chips has no standard topology"):
    xm_launch.parse_accelerator("v5p-100")
  with pytest.raises(ValueError, match="want <gpu>x<count>"):
    xm_launch.parse_accelerator("h300x8")
  for kw in ({"accelerator": "v5p-128", "nodes": 2},
             {"accelerator": "h200x8", "nodes": 2, "platform": "local"}):
    with pytest.raises(ValueError, match="multi-node"):
      _launch(**kw)
  with pytest.raises(ValueError, match="also given on the command line"):
    _launch(accelerator="h200x8", sweep=True, overrides=("--config.optim.lr=1e-4",))
  with pytest.raises(Exception, match="maps only TPU v2/v3"):
    xm_launch.check_launchable(xm_launch.LaunchArgs("c", "w", "v5e-16"))


@pytest.fixture
def vertex_requests(monkeypatch):
  """CustomJobs that xmanager's real Vertex client sends, caught at the one network call."""
  from google.auth import credentials as ga_credentials
  from google.cloud.aiplatform import initializer
  from google.cloud.aiplatform_v1.services.job_service import JobServiceClient
  from xmanager.cloud import vertex

  sent = []

  def create_custom_job(self, *, parent, custom_job, **kw):
    sent.append(custom_job)
    return type(custom_job)(custom_job, name=f"{parent}/customJobs/{len(sent)}")

  monkeypatch.setenv("GOOGLE_CLOUD_BUCKET_NAME", "bucket")
  monkeypatch.setattr(JobServiceClient, "create_custom_job", create_custom_job)
  monkeypatch.setattr(vertex.auth, "get_service_account", lambda: "sa@p.iam.gserviceaccount.com")
  for name, value in (("_project", None), ("_location", None),
                      ("_credentials", ga_credentials.AnonymousCredentials())):
    monkeypatch.setattr(initializer.global_config, name, value)  # undone after the test
  monkeypatch.setattr(vertex, "_default_client", vertex.Client(project="p"))
  monkeypatch.setattr(vertex, "get_machine_spec", vertex.get_machine_spec)
  xm_launch.use_vertex_machines()
  return sent


def _vertex_pools(sent, **kw) -> list:
  """Launches `kw`'s jobs with xmanager's Vertex launch; the worker pools it sent."""
  from xmanager.cloud import vertex
  from xmanager.xm_local import executables

  args = xm_launch.LaunchArgs(**{"config": "configs/llava.py:7b", "workdir": "gs://b/r", **kw})
  xm_launch.check_launchable(args)
  image = executables.GoogleContainerRegistryImage(name="mm_jax", image_path="gcr.io/p/mm:1")
  [(_, group)] = xm_launch.build_jobs(args, image)
  vertex.launch("mm_jax", "1", group)
  [job] = sent
  assert job.job_spec.base_output_directory.output_uri_prefix.startswith("gs://bucket/")
  return list(job.job_spec.worker_pool_specs)


@pytest.mark.parametrize("name,machine,accelerator", [
    ("h100x8", "a3-highgpu-8g", "NVIDIA_H100_80GB"),
    ("h200x8", "a3-ultragpu-8g", "NVIDIA_H200_141GB"),
    ("b200x8", "a4-highgpu-8g", "NVIDIA_B200"),
    ("a100_80gibx8", "a2-ultragpu-8g", "NVIDIA_A100_80GB"),
    ("a100x16", "a2-megagpu-16g", "NVIDIA_TESLA_A100"),
    ("l4x2", "g2-standard-24", "NVIDIA_L4")])
def test_vertex_request_has_the_gpu_machine(vertex_requests, name, machine, accelerator):
  [pool] = _vertex_pools(vertex_requests, accelerator=name)
  spec = pool.machine_spec
  assert (spec.machine_type, spec.accelerator_type.name, spec.accelerator_count) == (
      machine, accelerator, int(name.rsplit("x", 1)[1]))
  assert pool.replica_count == 1
  assert pool.container_spec.image_uri == "gcr.io/p/mm:1"


@pytest.mark.parametrize("nodes", [2, 3])
def test_vertex_request_for_h200_nodes(vertex_requests, nodes):
  chief, workers = _vertex_pools(vertex_requests, accelerator="h200x8", nodes=nodes)
  for pool, replicas in ((chief, 1), (workers, nodes - 1)):
    spec = pool.machine_spec
    assert (spec.machine_type, spec.accelerator_type.name, spec.accelerator_count) == (
        "a3-ultragpu-8g", "NVIDIA_H200_141GB", 8)
    assert pool.replica_count == replicas
    assert {e.name: e.value for e in pool.container_spec.env}["JAX_NUM_PROCESSES"] == str(nodes)


def test_vertex_machines_agree_with_xmanager():
  """Where xmanager maps a GPU right (A100, L4), and in the accelerator names, we agree."""
  from xmanager.cloud import vertex

  xm_spec = getattr(vertex.get_machine_spec, "xm_machine_spec", vertex.get_machine_spec)
  for gpu, (accelerator, machines) in xm_launch._VERTEX_MACHINES.items():
    assert vertex.aip_v1_gpu_accelerator_type_str(xm.ResourceType[gpu]) == accelerator
    for count in machines:
      job = xm.Job(xm_mock.MockExecutable(), xm_local.Vertex(
          requirements=xm.JobRequirements({xm.ResourceType[gpu]: count})))
      ours = xm_launch.vertex_machine_spec(job, xm_spec)
      if gpu in ("A100", "L4_24TH"):
        assert ours == xm_spec(job)
      else:
        assert xm_spec(job)["machine_type"] == "n1-standard-4"  # what this fixes


def test_unmappable_gpu_counts_fail_at_parse_time():
  with pytest.raises(ValueError, match=r"^accelerator 'h200x4': Vertex AI has no h200 machine "
                                       r"with 4 GPUs; valid counts: 8$"):
    xm_launch.check_launchable(xm_launch.LaunchArgs("c", "w", "h200x4"))
  with pytest.raises(ValueError, match="valid counts: 1, 2, 4, 8, 16$"):
    xm_launch.parse_accelerator("a100x3")
  with pytest.raises(ValueError, match="want <gpu>x<count>"):
    xm_launch.parse_accelerator("v100x8")
  assert xm_launch.parse_accelerator("h200x4", "local").count == 4  # this machine's GPUs


def test_vertex_needs_a_bucket_before_any_build(monkeypatch):
  monkeypatch.delenv("GOOGLE_CLOUD_BUCKET_NAME", raising=False)
  for image in ("", "gcr.io/p/mm:1"):  # xmanager's CustomJob takes it either way
    with pytest.raises(Exception, match=r"^\$GOOGLE_CLOUD_BUCKET_NAME is unset"):
      xm_launch.check_launchable(xm_launch.LaunchArgs("c", "w", "h200x8", image=image))
  xm_launch.check_launchable(xm_launch.LaunchArgs("c", "w", "h200x8", platform="local"))


def _git(root, *argv):
  subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                 check=True, capture_output=True)


def test_build_context_is_the_checkouts_files_only(tmp_path):
  """xmanager uploads the whole folder it is given: the virtual environments, runs and .git
  must not be in it."""
  root = tmp_path / "repo"
  files = {"main.py": "old", "mm_jax/__init__.py": "", "configs/llava.py": "",
           "launch/xm_launch.py": "", "gone.py": "", ".gitignore": ".venv*/\nruns/\n",
           ".venv/bin/python": "", ".venv-xm/x": "", ".venv-targets/x": "",
           "runs/x/checkpoints/1": ""}
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  _git(root, "init", "-q")
  _git(root, "add", ".")
  _git(root, "commit", "-q", "-m", "c")
  (root / "main.py").write_text("edited")  # what the user launches, committed or not
  (root / "new.py").write_text("")  # untracked, not ignored
  (root / "gone.py").unlink()
  out = xm_launch.export_tracked(root, str(tmp_path / "ctx"))
  assert out == str(tmp_path / "ctx" / "repo")  # the name the image's COPY uses
  got = {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()}
  assert got == {"main.py", "mm_jax/__init__.py", "configs/llava.py", "launch/xm_launch.py",
                 ".gitignore", "new.py"}
  assert (Path(out) / "main.py").read_text() == "edited"


def test_not_a_checkout_is_refused(tmp_path):
  (tmp_path / "src").mkdir()
  with pytest.raises(RuntimeError, match="git ls-files"):
    xm_launch.export_tracked(tmp_path / "src", str(tmp_path / "ctx"))


def test_image_is_built_from_the_export(tmp_path):
  args = xm_launch.LaunchArgs("configs/llava.py:7b", "gs://b/r", "h200x8")
  spec = xm_launch.packageable(args, xm_local.Vertex.Spec(), str(tmp_path)).executable_spec
  path = Path(spec.path)
  assert path.parent == tmp_path and path.name == xm_launch._ROOT.name
  assert spec.docker_instructions[0] == f"COPY {path.name}/ /workdir"
  for name in ("main.py", "pyproject.toml", "README.md", "mm_jax/__init__.py",
               "configs/llava.py", "launch/vertex_env.py"):
    assert (path / name).is_file(), name
  assert not {".git", ".venv", ".venv-xm", ".venv-targets", "runs", "mm_jax.egg-info",
              ".pytest_cache"} & {p.name for p in path.iterdir()}
  prebuilt = xm_launch.LaunchArgs("c", "w", "h200x8", image="gcr.io/p/mm:1")
  xm_launch.packageable(prebuilt, xm_local.Vertex.Spec(), str(tmp_path / "unused"))
  assert not (tmp_path / "unused").exists()  # a prebuilt image exports nothing
