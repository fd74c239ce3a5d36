"""Check a rendered JobSet three ways, without a cluster: Kubernetes schemas, JobSet schema,
and what mm_jax needs to start and to survive a preemption.

A cluster would reject a wrong field name at `kubectl apply` time, but a wrong env var or
failure rule is accepted and only shows weeks later, at the first preemption. So:

- `kubernetes(m)`: each replicated Job's template as a batch/v1 Job and its pod template as a
  v1 Pod, against the API schemas `kubernetes-validate` ships (offline), strict: an unknown
  field fails.
- `jobset(m)`: the JobSet level against launch/schemas/jobset-v1alpha2.json (written from
  kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go), also strict.
- `semantics(m)`: replicas/parallelism/completions, chips x hosts = topology, TPU selectors,
  the env mm_jax.distributed reads, the grace period, the exit-code failure chain.

Each raises `ManifestError` with one line naming the field (a dotted path).
"""

import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from launch import gke, gke_gpu
from launch import tpu as tpu_lib
from mm_jax.faults import EXIT_LOST, EXIT_PREEMPTED

KUBERNETES_VERSION = "1.33.0"
SCHEMA = Path(__file__).parent / "schemas" / "jobset-v1alpha2.json"
MIN_GRACE_S = 60  # a save needs time after SIGTERM


class ManifestError(ValueError):
  """A manifest that would not run as intended; one line that names the field."""


def _path(parts) -> str:
  return ".".join(str(p) for p in parts) or "<root>"


def kubernetes(m: dict, version: str = KUBERNETES_VERSION) -> None:
  for i, rj in enumerate(m["spec"]["replicatedJobs"]):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]},
           **rj["template"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": rj["name"]},
           **rj["template"]["spec"]["template"]}
    for what, obj, prefix in [("Job", job, f"spec.replicatedJobs.{i}.template"),
                              ("Pod", pod, f"spec.replicatedJobs.{i}.template.spec.template")]:
      try:
        kubernetes_validate.validate(obj, version, strict=True)
      except kubernetes_validate.ValidationError as e:
        where = _path([prefix, *e.path])  # both wrap the template's own `spec`
        raise ManifestError(f"{where}: {e.message} (Kubernetes {version} {what})") from None


def jobset(m: dict) -> None:
  schema = json.loads(SCHEMA.read_text())
  validator = jsonschema.Draft202012Validator(schema)
  errors = sorted(validator.iter_errors(m), key=lambda e: list(e.path))
  if errors:
    e = errors[0]
    raise ManifestError(f"{_path(e.path)}: {e.message} (JobSet v1alpha2 schema)")


def _fail(field: str, message: str):
  raise ManifestError(f"{field}: {message}")


def semantics(m: dict, spec: gke.JobSpec | None = None) -> None:
  """Checks a manifest against what its node selector implies (and `spec`, when given)."""
  rjs = m["spec"]["replicatedJobs"]
  if len(rjs) != 1:
    _fail("spec.replicatedJobs", f"{len(rjs)} replicated jobs; the renderer makes one")
  rj, at = rjs[0], "spec.replicatedJobs.0"
  job = rj["template"]["spec"]
  pod = job["template"]["spec"]
  (container,) = [c for c in pod["containers"] if c["name"] == gke.CONTAINER]
  selector = pod.get("nodeSelector", {})
  limits = container.get("resources", {}).get("limits", {})
  hosts, slices = job.get("parallelism"), rj.get("replicas", 1)
  if job.get("completions") != hosts:
    _fail(f"{at}.template.spec.completions", f"{job.get('completions')} != parallelism {hosts}")
  if job.get("completionMode") != "Indexed":
    _fail(f"{at}.template.spec.completionMode", "must be Indexed (process ids come from it)")
  tpu = "cloud.google.com/gke-tpu-accelerator" in selector
  resource = "google.com/tpu" if tpu else "nvidia.com/gpu"
  chips = limits.get(resource)
  if not isinstance(chips, int) or chips < 1:
    _fail(f"{at}...containers.{gke.CONTAINER}.resources.limits", f"no {resource} count")
  if tpu:
    topology = selector.get("cloud.google.com/gke-tpu-topology")
    if not topology or not re.fullmatch(r"\d+(x\d+)+", topology):
      _fail(f"{at}...nodeSelector.cloud.google.com/gke-tpu-topology", f"{topology!r}")
    labels = {t[0] for t in tpu_lib.GENERATIONS.values()}
    if selector["cloud.google.com/gke-tpu-accelerator"] not in labels:
      _fail(f"{at}...nodeSelector.cloud.google.com/gke-tpu-accelerator",
            f"unknown {selector['cloud.google.com/gke-tpu-accelerator']!r}")
    if chips * hosts != tpu_lib.topology_chips(topology):
      _fail(f"{at}.template.spec.parallelism", f"{hosts} hosts x {chips} chips != topology "
            f"{topology} ({tpu_lib.topology_chips(topology)} chips)")
    _check_tpu_placement(m, pod, hosts, slices, at)
  else:
    machines = {g.label: g for g in gke.GPUS.values()}
    machine = machines.get(selector.get("cloud.google.com/gke-accelerator"))
    if machine is None:
      _fail(f"{at}...nodeSelector.cloud.google.com/gke-accelerator", "not a known GPU")
    if slices != 1:
      _fail(f"{at}.replicas", f"{slices}: GPU nodes are one replicated job")
    _check_gpu_pod(job["template"], pod, container, machine, f"{at}.template.spec.template")
  _check_env(m, container, tpu, hosts, slices, f"{at}...containers.{gke.CONTAINER}.env")
  grace = pod.get("terminationGracePeriodSeconds", 30)
  if grace < MIN_GRACE_S:
    _fail(f"{at}.template.spec.template.spec.terminationGracePeriodSeconds",
          f"{grace} s is too short to save a checkpoint (>= {MIN_GRACE_S})")
  _check_stop_grace(pod, container, grace, f"{at}...containers.{gke.CONTAINER}.command")
  _check_failure_chain(m, job, f"{at}.template.spec")
  if spec is not None and m != gke.manifest(spec):
    _fail("<root>", "differs from the spec's rendering")


def _check_tpu_placement(m, pod, hosts, slices, at) -> None:
  """As xpk runs a slice: one slice per node pool, on the host's network."""
  key = gke.EXCLUSIVE_TOPOLOGY
  if m["metadata"].get("annotations", {}).get(key) != "cloud.google.com/gke-nodepool":
    _fail(f"metadata.annotations.{key}", "must be cloud.google.com/gke-nodepool (else a "
          "slice's pods can land on two node pools and never form a slice)")
  if pod.get("hostNetwork") is not True or pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
    _fail(f"{at}.template.spec.template.spec.hostNetwork", "TPU pods run on the host's "
          "network with dnsPolicy ClusterFirstWithHostNet")
  if slices > 1 and hosts < 2:
    _fail(f"{at}.replicas", f"{slices} single-host slices: GKE multislice needs multi-host "
          "slices")


def _check_gpu_pod(template, pod, container, machine, at) -> None:
  """The driver's libraries, a memory-backed /dev/shm, and the machine's GPUDirect."""
  env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
  if gke_gpu.DRIVER_LIB not in env.get("LD_LIBRARY_PATH", "").split(":"):
    _fail(f"{at}.spec.containers.{gke.CONTAINER}.env.LD_LIBRARY_PATH",
          f"must hold {gke_gpu.DRIVER_LIB} (the driver's libraries)")
  volumes = {v["name"]: v for v in pod.get("volumes", [])}
  shm = [mt["name"] for mt in container.get("volumeMounts", [])
         if mt["mountPath"] == gke_gpu.SHM_MOUNT]
  if not shm or volumes.get(shm[0], {}).get("emptyDir", {}).get("medium") != "Memory":
    _fail(f"{at}.spec.containers.{gke.CONTAINER}.volumeMounts", f"no memory-backed "
          f"{gke_gpu.SHM_MOUNT} (the container default is 64 MiB; NCCL needs more)")
  g = machine.gpudirect
  if g is None:
    return
  annotations = template.get("metadata", {}).get("annotations", {})
  try:
    nics = json.loads(annotations.get(gke_gpu.INTERFACES, ""))
  except json.JSONDecodeError:
    _fail(f"{at}.metadata.annotations.{gke_gpu.INTERFACES}", "missing or not JSON: without "
          "it the pod gets one NIC and NCCL runs over TCP on eth0")
  names = [n.get("interfaceName") for n in nics]
  if names != [f"eth{i}" for i in range(len(g.networks))]:
    _fail(f"{at}.metadata.annotations.{gke_gpu.INTERFACES}", f"interfaces {names}, want eth0 "
          f"to eth{len(g.networks) - 1} for {g.name}")
  argv = gke_gpu.container_argv(container)
  if container.get("command", [])[:2] != ["/bin/bash", "-c"] or \
      g.nccl_env_script not in container["command"][2]:
    _fail(f"{at}.spec.containers.{gke.CONTAINER}.command", f"must source "
          f"{g.nccl_env_script} before {' '.join(argv[:2])}")
  if g is gke_gpu.TCPXO:
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"
                and c.get("image", "").startswith(gke_gpu.TCPXO_DAEMON_IMAGE.split(":")[0])]
    if not sidecars or f"devices.gke.io/container.{sidecars[0]['name']}" not in annotations:
      _fail(f"{at}.spec.initContainers", "no tcpxo-daemon sidecar with its device annotation")
  hostpaths = {v.get("hostPath", {}).get("path") for v in volumes.values()}
  need = {"/dev/aperture_devices"} if g is gke_gpu.TCPXO else {"/home/kubernetes/bin/gib"}
  if not need <= hostpaths:
    _fail(f"{at}.spec.volumes", f"missing hostPath {sorted(need - hostpaths)} for {g.name}")


def _check_stop_grace(pod, container, grace, at) -> None:
  """main.py must know when the kill comes: its stop gives up a save that cannot commit."""
  spot = pod.get("nodeSelector", {}).get("cloud.google.com/gke-spot") == "true"
  real = min(grace, gke.SPOT_GRACE_S) if spot else grace
  flag = "--config.train.stop_grace_s="
  given = [a[len(flag):] for a in gke_gpu.container_argv(container) if a.startswith(flag)]
  if not given or float(given[-1]) <= 0 or float(given[-1]) > real:
    _fail(at, f"{flag}{given[-1] if given else '<missing>'}: want {real} (the pod's "
          f"{'Spot ' if spot else ''}grace period) or less")


def _check_env(m, container, tpu, hosts, slices, at) -> None:
  env = {e["name"]: e for e in container.get("env", [])}

  def want(name, value=None, annotation=None):
    if name not in env:
      _fail(f"{at}.{name}", "missing (mm_jax.distributed reads it)")
    if value is not None and env[name].get("value") != value:
      _fail(f"{at}.{name}", f"{env[name].get('value')!r}, want {value!r}")
    if annotation is not None:
      path = env[name].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
      if path != f"metadata.annotations['{annotation}']":
        _fail(f"{at}.{name}", f"fieldRef {path!r}, want the {annotation} annotation")

  name, subdomain = m["metadata"]["name"], m["spec"]["network"].get("subdomain")
  job_name = m["spec"]["replicatedJobs"][0]["name"]
  if m["spec"]["network"].get("enableDNSHostnames") is not True:
    _fail("spec.network.enableDNSHostnames", "must be true (pods find pod 0 by name)")
  coordinator = f"{name}-{job_name}-0-0.{subdomain or name}"
  if not tpu:
    want("JAX_COORDINATOR_ADDRESS", coordinator)
    want("JAX_COORDINATOR_PORT")
    want("JAX_NUM_PROCESSES", str(hosts * slices))
    want("JAX_PROCESS_ID", annotation=gke.COMPLETION_INDEX)
  elif slices > 1:
    want("MEGASCALE_COORDINATOR_ADDRESS", coordinator)
    want("MEGASCALE_NUM_SLICES", str(slices))
    want("MEGASCALE_SLICE_ID", annotation=gke.JOB_INDEX)
    want("MEGASCALE_PORT")


def _check_failure_chain(m, job, at) -> None:
  """42, 43 and DisruptionTarget -> FailJob -> restart without counting; all else -> fail."""
  if job.get("backoffLimit") != 0:
    _fail(f"{at}.backoffLimit", f"{job.get('backoffLimit')}: must be 0 (a failure not "
          "matched by podFailurePolicy ends the Job: BackoffLimitExceeded)")
  rules = job.get("podFailurePolicy", {}).get("rules", [])
  fail_codes = {c for r in rules if r.get("action") == "FailJob" and "onExitCodes" in r
                and r["onExitCodes"].get("operator") == "In"
                for c in r["onExitCodes"].get("values", [])}
  if fail_codes != {EXIT_PREEMPTED, EXIT_LOST}:
    _fail(f"{at}.podFailurePolicy.rules", f"FailJob exit codes {sorted(fail_codes)}, want "
          f"[{EXIT_PREEMPTED}, {EXIT_LOST}] (preempted, peer lost or stalled)")
  if any(r.get("action") in ("Ignore", "Count", "FailIndex") for r in rules):
    _fail(f"{at}.podFailurePolicy.rules", "only FailJob rules keep the exit-code contract")
  disruption = [r for r in rules if r.get("action") == "FailJob" and
                {"type": "DisruptionTarget", "status": "True"} in r.get("onPodConditions", [])]
  if not disruption:
    _fail(f"{at}.podFailurePolicy.rules", "no FailJob rule on pod condition DisruptionTarget")
  policy = m["spec"].get("failurePolicy", {})
  frules = policy.get("rules", [])
  if "maxRestarts" not in policy:
    _fail("spec.failurePolicy.maxRestarts", "missing")
  want = [("RestartJobSetAndIgnoreMaxRestarts", [gke.REASON_POD_FAILURE_POLICY]),
          ("FailJobSet", [])]
  got = [(r.get("action"), r.get("onJobFailureReasons", [])) for r in frules]
  if got != want or any(r.get("onJobFailureMessagePatterns") or r.get("targetReplicatedJobs")
                        for r in frules):
    _fail("spec.failurePolicy.rules", f"{got}, want {want}: PodFailurePolicy restarts without "
          "counting, anything else fails")


def all_checks(m: dict, spec: gke.JobSpec | None = None) -> None:
  if not isinstance(m, dict) or m.get("kind") != "JobSet" or \
      m.get("apiVersion") != gke.API_VERSION:
    kind = m.get("kind") if isinstance(m, dict) else type(m).__name__
    raise ManifestError(f"<root>: {kind!r} is not a {gke.API_VERSION} JobSet")
  jobset(m)  # the schemas first: semantics() may assume the fields they require
  kubernetes(m)
  try:
    semantics(m, spec)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    if isinstance(e, ManifestError):
      raise
    raise ManifestError(f"<root>: not as launch/gke.py renders it ({type(e).__name__}: "
                        f"{e})") from None


def main(argv: list[str] | None = None) -> int:
  """python -m launch.validate FILE...: 0 if every JobSet in every file passes every check;
  else one line per failing file, and 1."""
  files = sys.argv[1:] if argv is None else argv
  if not files:
    print("usage: python -m launch.validate FILE...", file=sys.stderr)
    return 2
  failed = 0
  for name in files:
    try:
      with open(name) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
      if not docs:
        raise ManifestError("<root>: no YAML document")
      for d in docs:
        all_checks(d)
    except (OSError, yaml.YAMLError, ManifestError) as e:
      failed += 1
      print(f"{name}: {' '.join(str(e).split())}", file=sys.stderr)
    else:
      print(f"{name}: ok ({len(docs)} JobSet{'s' if len(docs) > 1 else ''})")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
