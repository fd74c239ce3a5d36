"""launch/gke.py renders the reviewed manifests exactly, and launch/validate.py's three checks
pass on them and fail, naming the field, on each kind of breakage a cluster would not catch
until a run (or its first preemption) went wrong."""

import copy

import pytest
import yaml

from launch import gke, validate

ARGS = ("--config=configs/llava.py:tiny",)
REGENERATE = "regenerate with: .venv/bin/python -m launch.gke --write_goldens (then review)"


def _spec(**overrides) -> gke.JobSpec:
  kw = dict(name="run", image="img", workdir="gs://b/run", accelerator="v5p-128", args=ARGS)
  return gke.JobSpec(**{**kw, **overrides})


@pytest.fixture(params=sorted(gke.GOLDENS))
def golden(request):
  filename = request.param
  return filename, gke.GOLDENS[filename], yaml.safe_load((gke.GOLDEN_DIR / filename).read_text())


def test_goldens_are_what_the_renderer_writes(golden):
  filename, spec, _ = golden
  assert (gke.GOLDEN_DIR / filename).read_text() == gke.render(spec), f"{filename}: {REGENERATE}"


def test_goldens_pass_all_three_validations(golden):
  _, spec, m = golden
  validate.kubernetes(m)
  validate.jobset(m)
  validate.semantics(m, spec)


def test_hardware_of_the_goldens():
  v5p = gke.GOLDENS["tpu-v5p-128.yaml"].hardware  # 128 TensorCores = 64 chips = 4x4x4
  assert (v5p.topology, v5p.chips_per_host, v5p.hosts) == ("4x4x4", 4, 16)
  v6e = gke.GOLDENS["tpu-v6e-256-2slices.yaml"]
  assert (v6e.hardware.topology, v6e.hardware.hosts, v6e.num_processes) == ("16x16", 64, 128)
  gpu = gke.GOLDENS["gpu-a3ultra-2nodes.yaml"].hardware
  assert gpu.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
  assert (gpu.chips_per_host, gpu.hosts) == (8, 2)
  assert _spec(accelerator="v5e-16").hardware.node_selector == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "4x4"}


def test_env_for_resolves_the_field_refs():
  gpu = _spec(accelerator="a3-highgpu-8g", nodes=3, name="g")
  assert gke.env_for(gpu, 2) == {"JAX_COORDINATOR_ADDRESS": "g-node-0-0.g",
                                 "JAX_COORDINATOR_PORT": "8476", "JAX_NUM_PROCESSES": "3",
                                 "JAX_PROCESS_ID": "2"}
  tpu = gke.GOLDENS["tpu-v6e-256-2slices.yaml"]
  assert gke.env_for(tpu, 64)["MEGASCALE_SLICE_ID"] == "1"
  assert gke.env_for(tpu, 63)["MEGASCALE_SLICE_ID"] == "0"
  assert gke.env_for(gke.GOLDENS["tpu-v5p-128.yaml"], 5) == {}  # GKE sets the TPU_* env


def test_env_for_is_what_mm_jax_distributed_reads():
  from mm_jax import distributed

  spec = _spec(accelerator="a3-ultragpu-8g", nodes=2)
  cluster = distributed.detect(gke.env_for(spec, 1))
  assert (cluster.source, cluster.num_processes, cluster.process_id) == ("env", 2, 1)
  assert cluster.coordinator == "run-node-0-0.run:8476"


def test_cli_writes_the_same_yaml(tmp_path, capsys):
  out = tmp_path / "m.yaml"
  argv = ["--accelerator=v5p-128", "--workdir=gs://b/run", "--image=img", "--name=run"]
  assert gke.main([*argv, f"--out={out}", "--", *ARGS]) == 0
  assert out.read_text() == gke.render(_spec())
  assert gke.main([*argv, "--slices=0", "--", *ARGS]) == 2
  assert capsys.readouterr().err == "launch.gke: slices: 0 must be at least 1\n"


@pytest.mark.parametrize("overrides, field", [
  (dict(accelerator="v5p-127"), "accelerator"),
  (dict(accelerator="v9-8"), "accelerator"),
  (dict(accelerator="v5p-128", topology="4x4x8"), "topology"),
  (dict(accelerator="v6e-256", topology="16x16x1"), "topology"),
  (dict(accelerator="v5p-128", nodes=4), "nodes"),
  (dict(accelerator="a3-highgpu-8g", slices=2), "slices"),
  (dict(accelerator="a3-highgpu-8g", topology="2x2"), "topology"),
  (dict(name="Run_1"), "name"),
  (dict(image=""), "image"),
  (dict(args=()), "args"),
  (dict(args=(*ARGS, "--workdir=/tmp/x")), "args"),
  (dict(grace_period_s=5), "grace_period_s"),
])
def test_bad_spec_values_fail_in_one_line_naming_the_field(overrides, field):
  with pytest.raises(ValueError) as e:
    _spec(**overrides)
  message = str(e.value)
  assert message.startswith(f"{field}: ") and "\n" not in message, message


def _broken(golden_name: str, edit) -> dict:
  m = copy.deepcopy(yaml.safe_load((gke.GOLDEN_DIR / golden_name).read_text()))
  edit(m)
  return m


def _job(m):
  return m["spec"]["replicatedJobs"][0]["template"]["spec"]


def _pod(m):
  return _job(m)["template"]["spec"]


def test_kubernetes_schema_rejects_a_wrong_field_name():
  def rename(m):
    _pod(m)["terminationGracePeriod"] = _pod(m).pop("terminationGracePeriodSeconds")

  with pytest.raises(validate.ManifestError, match=r"^spec\.replicatedJobs\.0\.template\.spec"
                     r"\.template\.spec: .*'terminationGracePeriod' was unexpected"):
    validate.kubernetes(_broken("tpu-v5p-128.yaml", rename))

  def bad_policy(m):
    _job(m)["podFailurePolicy"]["rules"][0]["onExitCode"] = (
      _job(m)["podFailurePolicy"]["rules"][0].pop("onExitCodes"))

  with pytest.raises(validate.ManifestError, match=r"podFailurePolicy\.rules\.0: .*'onExitCode'"):
    validate.kubernetes(_broken("gpu-a3ultra-2nodes.yaml", bad_policy))


def test_jobset_schema_rejects_a_wrong_field_name_and_a_bad_action():
  def rename(m):
    m["spec"]["network"]["enableDnsHostnames"] = m["spec"]["network"].pop("enableDNSHostnames")

  with pytest.raises(validate.ManifestError, match=r"^spec\.network: .*'enableDnsHostnames'"):
    validate.jobset(_broken("gpu-a3ultra-2nodes.yaml", rename))

  def bad_action(m):
    m["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartJobSetIgnoringMaxRestarts"

  with pytest.raises(validate.ManifestError, match=r"^spec\.failurePolicy\.rules\.0\.action: "):
    validate.jobset(_broken("tpu-v6e-256-2slices.yaml", bad_action))


@pytest.mark.parametrize("name, edit, match", [
  ("tpu-v5p-128.yaml", lambda m: _job(m).update(parallelism=8, completions=8),
   r"^spec\.replicatedJobs\.0\.template\.spec\.parallelism: 8 hosts x 4 chips != topology"),
  ("tpu-v5p-128.yaml", lambda m: _job(m).update(completions=15), r"\.completions: 15"),
  ("gpu-a3ultra-2nodes.yaml",
   lambda m: _pod(m)["containers"][0]["env"].pop(2), r"\.env\.JAX_NUM_PROCESSES: missing"),
  ("tpu-v6e-256-2slices.yaml",
   lambda m: _pod(m)["containers"][0]["env"].pop(2), r"\.env\.MEGASCALE_SLICE_ID: missing"),
  ("tpu-v6e-256-2slices.yaml", lambda m: m["spec"]["replicatedJobs"][0].update(replicas=3),
   r"\.env\.MEGASCALE_NUM_SLICES: '2', want '3'"),
  ("gpu-a3ultra-2nodes.yaml", lambda m: _pod(m).update(terminationGracePeriodSeconds=30),
   r"terminationGracePeriodSeconds: 30 s"),
  ("gpu-a3ultra-2nodes.yaml", lambda m: _job(m).update(backoffLimit=3), r"\.backoffLimit: 3"),
  ("tpu-v5p-128.yaml",
   lambda m: _job(m)["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"].append(1),
   r"podFailurePolicy\.rules: FailJob exit codes \[1, 42, 43\]"),
  ("tpu-v5p-128.yaml", lambda m: _job(m)["podFailurePolicy"]["rules"].pop(1),
   r"podFailurePolicy\.rules: no FailJob rule on pod condition DisruptionTarget"),
  ("tpu-v5p-128.yaml",
   lambda m: m["spec"]["failurePolicy"]["rules"][0].update(action="RestartJobSet"),
   r"^spec\.failurePolicy\.rules: "),
  ("tpu-v5p-128.yaml", lambda m: m["spec"]["failurePolicy"]["rules"].pop(),
   r"^spec\.failurePolicy\.rules: "),
])
def test_semantic_checks_name_the_broken_field(name, edit, match):
  m = _broken(name, edit)
  with pytest.raises(validate.ManifestError, match=match) as e:
    validate.semantics(m)
  assert "\n" not in str(e.value)
