"""launch/gke.py renders the reviewed manifests exactly, and launch/validate.py's three checks
pass on them and fail, naming the field, on each kind of breakage a cluster would not catch
until a run (or its first preemption) went wrong."""

import copy
import json

import pytest
import yaml

from launch import gke, gke_gpu, validate

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


# --- What xpk renders for each machine, written down from its sources (AI-Hypercomputer/xpk:
# src/xpk/core/system_characteristics.py, commands/workload.py, core/scheduling.py,
# core/workload_decorators/tcpxo_decorator.py and rdma_decorator.py), independently of
# launch/gke_gpu.py: the rendered pods must carry the same.
XPK_GPU = {
  "a3-highgpu-8g": dict(label="nvidia-h100-80gb"),
  "a3-megagpu-8g": dict(
    label="nvidia-h100-mega-80gb", nics=9, sidecar="tcpxo-daemon",
    sidecar_image="us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpxo/tcpgpudmarxd-dev:v1.0.12",
    hostpaths={"/home/kubernetes/bin/nvidia", "/sys", "/proc/sys", "/dev/aperture_devices"},
    mounts={"/dev/aperture_devices", "/usr/local/nvidia", "/dev/shm"},
    env={"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
         "NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY": "/dev/aperture_devices"}),
  "a3-ultragpu-8g": dict(
    label="nvidia-h200-141gb", nics=10,
    hostpaths={"/home/kubernetes/bin/nvidia", "/home/kubernetes/bin/gib"},
    mounts={"/usr/local/nvidia", "/usr/local/gib", "/dev/shm"},
    env={"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"}),
  "a4-highgpu-8g": dict(
    label="nvidia-b200", nics=10,
    hostpaths={"/home/kubernetes/bin/nvidia", "/home/kubernetes/bin/gib"},
    mounts={"/usr/local/nvidia", "/usr/local/gib", "/dev/shm"},
    env={"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"}),
}
# name -> (hosts, chips per host) as xpk's system_characteristics has them (v5e/v6e 2x4: two
# 4-chip VMs), and the 8-chip one-host pools GKE also offers.
XPK_TPU = {("v5e-8", None): (2, 4), ("v6e-8", None): (2, 4), ("v6e-4", None): (1, 4),
           ("v5e-16", None): (4, 4), ("v5p-8", None): (1, 4), ("v5p-128", None): (16, 4),
           ("v5e-8", "ct5lp-hightpu-8t"): (1, 8), ("v6e-8", "ct6e-standard-8t"): (1, 8),
           ("v6e-1", None): (1, 1)}


def _every_topology():
  for machine in gke.GPUS:
    for nodes, spot in ((1, False), (2, True), (4, False)):
      yield dict(accelerator=machine, nodes=nodes, spot=spot)
  for gen, counts in (("v5e", (1, 4, 8, 16, 32, 64, 128, 256)),
                      ("v6e", (1, 4, 8, 16, 32, 64, 128, 256)),
                      ("v5p", (8, 16, 32, 64, 128, 256, 512, 1024))):
    for count in counts:
      yield dict(accelerator=f"{gen}-{count}")
  yield dict(accelerator="v5e-8", machine_type="ct5lp-hightpu-8t")
  yield dict(accelerator="v6e-8", machine_type="ct6e-standard-8t", spot=True)
  yield dict(accelerator="v6e-8", slices=4)  # two 4-chip hosts per slice
  yield dict(accelerator="v5p-64", slices=2)


@pytest.mark.parametrize("kw", list(_every_topology()), ids=lambda kw: "-".join(
  str(v) for v in kw.values()))
def test_every_nameable_topology_renders_a_jobset_that_validates(kw):
  spec = _spec(**kw)
  m = yaml.safe_load(gke.render(spec))
  validate.all_checks(m, spec)
  pod = _pod(m)
  argv = gke_gpu.container_argv(pod["containers"][0])
  assert argv[:3] == ["python", "main.py", ARGS[0]]
  assert argv[3] == f"--config.train.stop_grace_s={15 if kw.get('spot') else 600}"
  if kw.get("spot"):
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
  if spec.hardware.kind == "tpu":
    assert m["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert (pod["hostNetwork"], pod["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
    assert {"key": "google.com/tpu", "operator": "Exists"} in pod["tolerations"]
    want = XPK_TPU.get((kw["accelerator"], kw.get("machine_type")))
    if want:
      hw = spec.hardware
      assert (hw.hosts, hw.chips_per_host) == want
    return
  facts = XPK_GPU[kw["accelerator"]]
  assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == facts["label"]
  container = pod["containers"][0]
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env.items() >= facts.get("env", {"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"}).items()
  mounts = {mt["mountPath"] for mt in container["volumeMounts"]}
  assert mounts >= facts.get("mounts", {"/dev/shm"})
  volumes = {v["name"]: v for v in pod["volumes"]}
  assert {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v} == \
    facts.get("hostpaths", set())
  shm = next(mt["name"] for mt in container["volumeMounts"] if mt["mountPath"] == "/dev/shm")
  assert volumes[shm]["emptyDir"]["medium"] == "Memory"
  annotations = _job(m)["template"].get("metadata", {}).get("annotations", {})
  if "nics" not in facts:  # A3 High: plain
    assert annotations == {} and "initContainers" not in pod
    assert container["command"][:2] == ["python", "main.py"]
    return
  assert annotations["networking.gke.io/default-interface"] == "eth0"
  nics = json.loads(annotations["networking.gke.io/interfaces"])
  assert [n["interfaceName"] for n in nics] == [f"eth{i}" for i in range(facts["nics"])]
  assert nics[0]["network"] == "default"
  assert {"key": "user-workload", "operator": "Equal", "value": "true",
          "effect": "NoSchedule"} in pod["tolerations"]
  if "sidecar" in facts:
    (sidecar,) = pod["initContainers"]
    assert (sidecar["name"], sidecar["image"], sidecar["restartPolicy"]) == (
      facts["sidecar"], facts["sidecar_image"], "Always")
    devices = annotations[f"devices.gke.io/container.{facts['sidecar']}"]
    assert [f"/dev/nvidia{i}" in devices for i in range(8)] == [True] * 8
  else:
    assert "initContainers" not in pod


def test_gpu_networks_are_the_clusters_names_in_eth_order():
  spec = _spec(accelerator="a3-ultragpu-8g", nodes=2,
               gpu_networks=("default", "my-gvnic", *(f"my-rdma-{i}" for i in range(8))))
  nics = json.loads(_job(gke.manifest(spec))["template"]["metadata"]["annotations"][
    "networking.gke.io/interfaces"])
  assert [n["network"] for n in nics][:3] == ["default", "my-gvnic", "my-rdma-0"]
  with pytest.raises(ValueError, match=r"^gpu_networks: 3 networks, want 10"):
    _spec(accelerator="a3-ultragpu-8g", gpu_networks=("a", "b", "c"))
  with pytest.raises(ValueError, match=r"^gpu_networks: only for GPUDirect"):
    _spec(accelerator="a3-highgpu-8g", gpu_networks=("a",))


@pytest.mark.parametrize("overrides, match", [
  (dict(accelerator="v5e-8", machine_type="ct5lp-hightpu-8t", slices=2),
   r"^slices: 2 slices of v5e-8 \(2x4\) on one host each: .*--machine_type=ct5lp-hightpu-4t"),
  (dict(accelerator="v6e-4", slices=2), r"^slices: .*GKE multislice needs multi-host"),
  (dict(accelerator="v5e-16", machine_type="ct5lp-hightpu-8t"),
   r"^machine_type: ct5lp-hightpu-8t \(8 chips per host\) cannot hold a 16-chip slice"),
  (dict(accelerator="v5e-8", machine_type="ct6e-standard-4t"),
   r"^machine_type: 'ct6e-standard-4t' is not a v5e node pool's machine type"),
  (dict(accelerator="a3-highgpu-8g", machine_type="a3-highgpu-8g"), r"^machine_type: only"),
  (dict(args=(*ARGS, "--config.train.stop_grace_s=100")), r"^args: --config.train.stop_grace"),
])
def test_tpu_forms_that_cannot_run_fail_in_one_line(overrides, match):
  with pytest.raises(ValueError, match=match):
    _spec(**overrides)


@pytest.mark.parametrize("name, edit, match", [
  ("tpu-v5e-8.yaml", lambda m: m["metadata"].pop("annotations"),
   r"^metadata\.annotations\.alpha\.jobset\.sigs\.k8s\.io/exclusive-topology: "),
  ("tpu-v5p-128.yaml", lambda m: _pod(m).pop("hostNetwork"), r"\.hostNetwork: TPU pods"),
  ("gpu-a3mega-2nodes-spot.yaml", lambda m: _job(m)["template"].pop("metadata"),
   r"annotations\.networking\.gke\.io/interfaces: missing or not JSON"),
  ("gpu-a3mega-2nodes-spot.yaml", lambda m: _pod(m).pop("initContainers"),
   r"\.initContainers: no tcpxo-daemon sidecar"),
  ("gpu-a3ultra-2nodes.yaml", lambda m: _pod(m)["volumes"].pop(1),
   r"\.volumes: missing hostPath \['/home/kubernetes/bin/gib'\]"),
  ("gpu-a3ultra-2nodes.yaml", lambda m: _pod(m)["volumes"][-1].update(emptyDir={}),
   r"\.volumeMounts: no memory-backed /dev/shm"),
  ("gpu-a3ultra-2nodes.yaml",
   lambda m: _pod(m)["containers"][0].update(command=_pod(m)["containers"][0]["command"][3:]),
   r"\.command: must source /usr/local/gib/scripts/set_nccl_env\.sh before python main\.py"),
  ("gpu-a3mega-2nodes-spot.yaml",
   lambda m: _pod(m)["containers"][0]["command"].__setitem__(6, "--config.train.stop_grace_s=600"),
   r"stop_grace_s=600: want 15 \(the pod's Spot grace period\) or less"),
])
def test_placement_and_network_checks_name_the_field(name, edit, match):
  with pytest.raises(validate.ManifestError, match=match):
    validate.semantics(_broken(name, edit))


def test_validate_cli_exits_nonzero_on_a_bad_manifest(tmp_path, capsys):
  good = sorted(str(p) for p in gke.GOLDEN_DIR.glob("*.yaml"))
  assert validate.main(good) == 0
  garbage = tmp_path / "garbage.yaml"
  garbage.write_text("just: [a, list\n")
  not_jobset = tmp_path / "pod.yaml"
  not_jobset.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
  broken = tmp_path / "broken.yaml"
  broken.write_text(yaml.safe_dump(_broken("tpu-v5e-8.yaml", lambda m: _pod(m).pop(
    "nodeSelector"))))
  capsys.readouterr()
  assert validate.main([good[0], str(garbage), str(not_jobset), str(broken),
                        str(tmp_path / "missing.yaml")]) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 4 and all(line.startswith(str(tmp_path)) for line in err), err
  assert "'Pod' is not a jobset.x-k8s.io/v1alpha2 JobSet" in err[1]
  assert validate.main([]) == 2
