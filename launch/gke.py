"""Render a JobSet manifest that runs main.py on a GKE TPU slice (or slices) or GPU node pool.

    python -m launch.gke --accelerator=v5p-128 --workdir=gs://b/run --image=IMAGE --name=run \
        [--slices N] [--nodes N] [--topology AxBxC] [--out FILE] -- --config=configs/llava.py:tiny

Everything comes from one typed `JobSpec`, so a spec that cannot run (hosts x chips not the
slice, a GPU node count on a TPU) fails here with a one-line ValueError naming the field,
not minutes later in the cluster. `env_for()` is the env a given pod gets, fieldRefs
resolved; launch/local.py starts processes with exactly that env, so what runs on one machine
is what the cluster runs. launch/validate.py checks the output three ways.

The resilience contract (mm_jax/faults.py) is the point of the failure policy: exit 42 means
"saved, restart me", so a preemption restarts the whole JobSet without using up maxRestarts,
and anything else (1 error, 3 diverged, a crash) fails it, since a restart would not fix it.
"""

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import yaml

from launch import gke_gpu, tpu
from mm_jax.distributed import DEFAULT_PORT
from mm_jax.faults import EXIT_LOST, EXIT_PREEMPTED

API_VERSION = "jobset.x-k8s.io/v1alpha2"
CONTAINER = "main"
MEGASCALE_PORT = 8080  # xpk's default
JOB_INDEX = "jobset.sigs.k8s.io/job-index"  # which replicated Job (slice) a pod belongs to
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the pod's index in its Job
# Job failure reason when a podFailurePolicy FailJob rule fired (k8s batch/v1 JobReason...).
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"

GPUS = gke_gpu.MACHINES  # GKE machine type -> its GPUs, node label and networking
# GKE gives a Spot (or preemptible) VM's pods 15 s from SIGTERM to SIGKILL, whatever their
# terminationGracePeriodSeconds says (the VM stops 30 s after its notice; system pods get
# the other 15 s).
SPOT_GRACE_S = 15
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What one accelerator name means on GKE: node selector, chips per host, hosts per slice."""

  kind: str  # "tpu" or "gpu"
  node_selector: dict
  resource: str  # the extended resource a container requests, e.g. google.com/tpu
  chips_per_host: int
  hosts: int  # per slice (TPU) or in all (GPU)
  topology: str | None = None  # TPU only

  @property
  def topology_chips(self) -> int:
    return tpu.topology_chips(self.topology) if self.topology else self.chips_per_host * self.hosts


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One training run on GKE. `args` are main.py's flags (with --config, without --workdir)."""

  name: str
  image: str
  workdir: str
  accelerator: str  # v5e-16, v5p-128, v6e-256, or a GPU machine type (GPUS)
  args: tuple[str, ...]
  topology: str | None = None  # TPU: overrides the default shape for the chip count
  slices: int = 1  # TPU multislice
  nodes: int = 1  # GPU nodes
  # A SIGTERM (drain, spot reclaim, maintenance) makes main.py finish its step, save and exit
  # 42; the kubelet sends SIGKILL this long after the SIGTERM. A save of a large model to GCS
  # takes minutes, and a save cut short is lost, so the default is generous.
  grace_period_s: int = 600
  # TPU: the node pool's machine type (TPU_MACHINES), which fixes the chips per host where a
  # topology has two forms (v5e/v6e 2x4: one 8-chip host, or two 4-chip hosts). None: the
  # form GKE gives that topology by default (one host up to 8 chips, else 4 per host).
  machine_type: str | None = None
  # GPUDirect machines: the cluster's GKENetworkParamSet names for eth0, eth1, ... (None: the
  # names Google's GPUDirect guides create, launch/gke_gpu.py).
  gpu_networks: tuple[str, ...] | None = None
  # Spot (or preemptible) nodes: selected and tolerated; the stop after SIGTERM gets 15 s.
  spot: bool = False
  # Restarts for failures no rule matches. The rules below match every failure (preemptions
  # restart without counting, the rest fail), so this is a ceiling, not a retry budget.
  max_restarts: int = 0
  coordinator_port: int = DEFAULT_PORT

  def __post_init__(self):
    _check(_DNS_LABEL.match(self.name) and len(self.name) <= 40,
           f"name: {self.name!r} must be a DNS label of at most 40 characters (pod hostnames "
           "add '-<job>-<i>-<j>' to it and must fit 63)")
    for field in ("image", "workdir"):
      _check(getattr(self, field), f"{field}: must not be empty")
    _check(any(a.startswith("--config=") for a in self.args),
           "args: main.py's flags need --config=...")
    _check(not any(a.startswith("--workdir") for a in self.args),
           "args: pass the workdir as the spec's workdir, not as a main.py flag")
    _check(self.slices >= 1, f"slices: {self.slices} must be at least 1")
    _check(self.nodes >= 1, f"nodes: {self.nodes} must be at least 1")
    _check(self.grace_period_s >= 30, f"grace_period_s: {self.grace_period_s} leaves no time "
           "to save (at least 30)")
    _check(self.max_restarts >= 0, f"max_restarts: {self.max_restarts} must be >= 0")
    _check(0 < self.coordinator_port < 65536, f"coordinator_port: {self.coordinator_port}")
    _check(not any(a.startswith("--config.train.stop_grace_s") for a in self.args),
           "args: --config.train.stop_grace_s comes from the grace period (and --spot)")
    hw = self.hardware  # validates accelerator and topology
    if hw.kind == "gpu":
      gke_gpu.networks(GPUS[self.accelerator], self.gpu_networks)  # a ValueError names it
    else:
      _check(self.gpu_networks is None, "gpu_networks: only for GPU machines")
    _check(hw.kind == "tpu" or self.slices == 1, "slices: multislice is for TPUs only")
    _check(self.slices == 1 or hw.hosts > 1,
           f"slices: {self.slices} slices of {self.accelerator} ({hw.topology}) on one host "
           "each: GKE multislice needs multi-host slices (a larger slice, or 4-chip hosts: "
           f"--machine_type={_multi_host_machine(self.accelerator)})")
    _check(hw.kind == "gpu" or self.nodes == 1,
           "nodes: a TPU slice's host count comes from its topology, not --nodes")

  @property
  def hardware(self) -> Hardware:
    if self.accelerator in GPUS:
      _check(self.machine_type is None, "machine_type: only for TPUs (a GPU's accelerator "
             "is its machine type)")
      return _gpu(self)
    return _tpu(self.accelerator, self.topology, self.machine_type)

  @property
  def stop_grace_s(self) -> int:
    """Seconds from SIGTERM to SIGKILL that the pod really gets."""
    return min(self.grace_period_s, SPOT_GRACE_S) if self.spot else self.grace_period_s

  @property
  def job_name(self) -> str:
    """The replicated Job's name: one Job per slice, or one over all GPU nodes."""
    return "slice" if self.hardware.kind == "tpu" else "node"

  @property
  def coordinator_host(self) -> str:
    """Pod 0 of Job 0, through the headless service: <jobset>-<job>-0-0.<subdomain>."""
    return f"{self.name}-{self.job_name}-0-0.{self.name}"

  @property
  def num_processes(self) -> int:
    return self.hardware.hosts * self.slices


def _check(ok, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _gpu(spec: JobSpec) -> Hardware:
  _check(spec.topology is None, "topology: only for TPUs")
  machine = GPUS[spec.accelerator]
  return Hardware("gpu", {"cloud.google.com/gke-accelerator": machine.label}, "nvidia.com/gpu",
                  machine.gpus, spec.nodes)


def _tpu(accelerator: str, topology: str | None, machine_type: str | None = None) -> Hardware:
  match = re.fullmatch(r"(v5e|v5p|v6e)(?:-(\d+))?", accelerator)
  _check(match, f"accelerator: {accelerator!r} is not one of v5e-N, v5p-N, v6e-N or "
         f"{', '.join(GPUS)}")
  generation, count = match.group(1), match.group(2)
  label, counts_cores, rank = tpu.GENERATIONS[generation]
  counts_cores = counts_cores > 1
  if topology is not None:
    example = "4x4x4" if rank == 3 else "4x4"
    _check(re.fullmatch(r"[1-9]\d*(x[1-9]\d*){" + str(rank - 1) + "}", topology),
           f"topology: {topology!r} is not a {rank}-D shape like {example} for {generation}")
  _check(count or topology, f"accelerator: {accelerator!r} needs a size (e.g. "
         f"{generation}-16) or --topology")
  chips = None
  if count:
    _check(not counts_cores or int(count) % 2 == 0,
           f"accelerator: {accelerator!r}: v5p names count TensorCores, 2 per chip")
    chips = int(count) // 2 if counts_cores else int(count)
  if topology is None:
    table = tpu.TOPOLOGIES[rank]
    known = ", ".join(f"{generation}-{c * (2 if counts_cores else 1)}" for c in table)
    _check(chips in table, f"accelerator: {accelerator!r} ({chips} chips) has no standard "
           f"topology; give --topology (known: {known})")
    topology = table[chips]
  topo_chips = tpu.topology_chips(topology)
  _check(chips is None or chips == topo_chips,
         f"topology: {topology} is {topo_chips} chips, but {accelerator} is {chips}")
  per_host = _chips_per_host(generation, topo_chips, machine_type)
  selector = {"cloud.google.com/gke-tpu-accelerator": label,
              "cloud.google.com/gke-tpu-topology": topology}
  if rank == 2 and topo_chips == 8:
    # 2x4 exists as one 8-chip host and as two 4-chip hosts: pin the pool's machine type,
    # or two 4-chip pods could share an 8-chip node (or wait forever for one).
    selector["node.kubernetes.io/instance-type"] = TPU_MACHINES[generation][per_host]
  hw = Hardware("tpu", selector, "google.com/tpu", per_host, topo_chips // per_host, topology)
  assert hw.chips_per_host * hw.hosts == hw.topology_chips, hw
  return hw


# TPU generation -> {chips per host: the GKE node pool's machine type} (GKE's TPU tables).
TPU_MACHINES = {
  "v5e": {1: "ct5lp-hightpu-1t", 4: "ct5lp-hightpu-4t", 8: "ct5lp-hightpu-8t"},
  "v6e": {1: "ct6e-standard-1t", 4: "ct6e-standard-4t", 8: "ct6e-standard-8t"},
  "v5p": {4: "ct5p-hightpu-4t"},
}


def _chips_per_host(generation: str, chips: int, machine_type: str | None) -> int:
  """Chips per host of a `chips`-chip slice on `machine_type` (None: GKE's default form)."""
  if machine_type is None:
    # As xpk: a 2x4 slice is two 4-chip hosts (the pools GKE's multi-host guides create);
    # one 8-chip host needs --machine_type=ct5lp-hightpu-8t (or ct6e-standard-8t).
    single = tpu.GENERATIONS[generation][2] == 2 and chips <= tpu.CHIPS_PER_HOST
    return chips if single else tpu.CHIPS_PER_HOST
  by_type = {m: n for n, m in TPU_MACHINES[generation].items()}
  _check(machine_type in by_type, f"machine_type: {machine_type!r} is not a {generation} "
         f"node pool's machine type ({', '.join(by_type)})")
  per_host = by_type[machine_type]
  # 1- and 8-chip hosts only ever hold a whole slice; 4-chip hosts hold a 2x2 slice or
  # 4 chips of a multi-host one.
  fits = chips == per_host or (per_host == tpu.CHIPS_PER_HOST and chips % per_host == 0)
  _check(fits, f"machine_type: {machine_type} ({per_host} chips per host) cannot hold a "
         f"{chips}-chip slice")
  return per_host


def _multi_host_machine(accelerator: str) -> str:
  generation = accelerator.split("-")[0]
  return TPU_MACHINES.get(generation, {}).get(tpu.CHIPS_PER_HOST, "?")


# --- env ------------------------------------------------------------------------------------

def env_entries(spec: JobSpec) -> list[dict]:
  """The container's env as Kubernetes writes it (values, or fieldRefs to pod annotations).

  GPU: what mm_jax.distributed reads from the env (JAX_COORDINATOR_*, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID). TPU: GKE injects TPU_WORKER_HOSTNAMES and TPU_WORKER_ID itself and jax
  detects a slice from them; several slices also need the MEGASCALE_* variables (as xpk
  sets them), the coordinator being slice 0's first pod.
  """
  def ref(annotation):
    return {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}

  if spec.hardware.kind == "gpu":
    return [{"name": "JAX_COORDINATOR_ADDRESS", "value": spec.coordinator_host},
            {"name": "JAX_COORDINATOR_PORT", "value": str(spec.coordinator_port)},
            {"name": "JAX_NUM_PROCESSES", "value": str(spec.num_processes)},
            {"name": "JAX_PROCESS_ID", "valueFrom": ref(COMPLETION_INDEX)}]
  if spec.slices == 1:
    return []
  return [{"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": spec.coordinator_host},
          {"name": "MEGASCALE_NUM_SLICES", "value": str(spec.slices)},
          {"name": "MEGASCALE_SLICE_ID", "valueFrom": ref(JOB_INDEX)},
          {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)}]


def env_for(spec: JobSpec, process_index: int) -> dict[str, str]:
  """The env of the pod running global process `process_index`, its fieldRefs resolved."""
  hosts = spec.hardware.hosts
  _check(0 <= process_index < spec.num_processes,
         f"process_index: {process_index} not in [0, {spec.num_processes})")
  annotations = {JOB_INDEX: str(process_index // hosts),
                 COMPLETION_INDEX: str(process_index % hosts)}
  env = {}
  for e in env_entries(spec):
    if "value" in e:
      env[e["name"]] = e["value"]
    else:
      path = e["valueFrom"]["fieldRef"]["fieldPath"]
      env[e["name"]] = annotations[re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)[1]]
  return env


# --- manifest -------------------------------------------------------------------------------

def main_argv(spec: JobSpec) -> list[str]:
  """main.py's command line; the stop's time limit right after --config (a later override
  of the user's could not change it: __post_init__ refuses one)."""
  i = next(i for i, a in enumerate(spec.args) if a.startswith("--config=")) + 1
  args = [*spec.args[:i], f"--config.train.stop_grace_s={spec.stop_grace_s}", *spec.args[i:]]
  return ["python", "main.py", *args, f"--workdir={spec.workdir}"]


def command(spec: JobSpec) -> list[str]:
  if spec.hardware.kind == "gpu":
    return gke_gpu.command(GPUS[spec.accelerator], main_argv(spec))
  return main_argv(spec)


def _pod_spec(spec: JobSpec) -> dict:
  hw = spec.hardware
  ports = [{"name": "jax-coordinator", "containerPort": spec.coordinator_port}]
  if spec.slices > 1:
    ports.append({"name": "megascale", "containerPort": MEGASCALE_PORT})
  container = {"name": CONTAINER, "image": spec.image, "command": command(spec),
               "ports": ports,
               "resources": {"limits": {hw.resource: hw.chips_per_host}}}
  env = env_entries(spec)
  if env:
    container["env"] = env
  selector = dict(hw.node_selector)
  pod = {"restartPolicy": "Never",  # the Job's podFailurePolicy decides, not the kubelet
         "terminationGracePeriodSeconds": spec.grace_period_s,
         "nodeSelector": selector, "containers": [container]}
  annotations: dict = {}
  if hw.kind == "tpu":
    # As xpk and JobSet's TPU examples run slices: the host's network (the TPU VM's own
    # NICs for the inter-host and DCN traffic), with cluster DNS kept for the pod names.
    pod.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet",
               tolerations=[{"key": "google.com/tpu", "operator": "Exists"}])
  else:
    machine = GPUS[spec.accelerator]
    gke_gpu.decorate(pod, annotations, machine, gke_gpu.networks(machine, spec.gpu_networks))
  if spec.spot:
    selector["cloud.google.com/gke-spot"] = "true"
    pod.setdefault("tolerations", []).append(
        {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
         "effect": "NoSchedule"})
  return pod, annotations


def _job_spec(spec: JobSpec) -> dict:
  hosts = spec.hardware.hosts
  pod, annotations = _pod_spec(spec)
  template = {"metadata": {"annotations": annotations}, "spec": pod} if annotations else \
      {"spec": pod}
  return {
    "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
    # backoffLimit 0: the first pod failure no podFailurePolicy rule matches fails the Job
    # with reason BackoffLimitExceeded (a lone restarted pod could not rejoin jax anyway).
    "backoffLimit": 0,
    "podFailurePolicy": {"rules": [
      # exit 42: main.py saved and wants a restart; 43: a peer died (or the run stalled) and
      # the survivors stopped so the job can restart from its newest checkpoint. FailJob
      # ends the Job at once with reason PodFailurePolicy, which the JobSet rule below
      # restarts without counting.
      {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                            "values": [EXIT_PREEMPTED, EXIT_LOST]}},
      # A pod disrupted by node drain, spot reclaim or maintenance (if it died before
      # exiting 42 itself): the same, since its last checkpoint is intact.
      {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget",
                                                 "status": "True"}]},
    ]},
    "template": template,
  }


def failure_policy(spec: JobSpec) -> dict:
  """The chain: pod exit 42 / DisruptionTarget -> Job FailJob (reason PodFailurePolicy) ->
  JobSet RestartJobSetAndIgnoreMaxRestarts (every Job recreated, maxRestarts untouched, main.py
  resumes from its checkpoint). Any other pod failure -> Job BackoffLimitExceeded (backoffLimit
  0) -> the catch-all rule FailJobSet: errors and divergence need a person. Rules are tried in
  order; JobSet's default with no match would be RestartJobSet, hence the explicit last rule.
  """
  return {"maxRestarts": spec.max_restarts, "rules": [
    {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
     "onJobFailureReasons": [REASON_POD_FAILURE_POLICY]},
    {"name": "failed", "action": "FailJobSet"},
  ]}


def manifest(spec: JobSpec) -> dict:
  """The JobSet as a plain dict, ready for yaml.safe_dump."""
  metadata = {"name": spec.name}
  if spec.hardware.kind == "tpu":
    # One slice per node pool, one pool per slice: without it a slice's pods can land on
    # two pools of the same topology, and the slice never forms.
    metadata["annotations"] = {EXCLUSIVE_TOPOLOGY: "cloud.google.com/gke-nodepool"}
  return {
    "apiVersion": API_VERSION, "kind": "JobSet", "metadata": metadata,
    "spec": {
      # JobSet creates a headless service named <subdomain>: pods resolve as
      # <jobset>-<job>-<jobindex>-<podindex>.<subdomain>, which is how every pod finds pod 0.
      "network": {"enableDNSHostnames": True, "subdomain": spec.name,
                  "publishNotReadyAddresses": True},
      "failurePolicy": failure_policy(spec),
      "replicatedJobs": [{"name": spec.job_name, "replicas": spec.slices,
                          "template": {"spec": _job_spec(spec)}}],
    },
  }


def render(spec: JobSpec) -> str:
  layout = f"{spec.slices} slice(s) x " if spec.hardware.kind == "tpu" else ""
  header = (f"# Rendered by launch/gke.py: {spec.accelerator}, {layout}{spec.hardware.hosts} "
            "pod(s). Edit the spec and re-render, not this file.\n")
  return header + yaml.safe_dump(manifest(spec), sort_keys=False, width=100)


def parse(argv: list[str]) -> tuple[JobSpec, str | None]:
  """argv (without the program name) -> (spec, --out or None)."""
  ours, sep, main_flags = _split(argv)
  p = argparse.ArgumentParser(prog="python -m launch.gke", description=__doc__.split("\n")[0])
  p.add_argument("--accelerator", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--image", required=True)
  p.add_argument("--name", required=True)
  p.add_argument("--topology")
  p.add_argument("--slices", type=int, default=1)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--machine_type", help="TPU: the node pool's machine type, e.g. "
                 "ct5lp-hightpu-4t for a v5e-8 on two 4-chip hosts (default: one 8-chip host)")
  p.add_argument("--gpu_networks", help="GPUDirect machines: the GKENetworkParamSet names "
                 "for eth0,eth1,... (kubectl get GKENetworkParamSet), comma-separated")
  p.add_argument("--spot", action="store_true", help="Spot (or preemptible) nodes: 15 s "
                 "from SIGTERM to SIGKILL")
  p.add_argument("--grace_period_s", type=int, default=JobSpec.grace_period_s)
  p.add_argument("--max_restarts", type=int, default=JobSpec.max_restarts)
  p.add_argument("--out")
  p.add_argument("--write_goldens", action="store_true", help="re-render launch/manifests/ "
                 "(alone, without other flags)")
  a = p.parse_args(ours)
  spec = JobSpec(name=a.name, image=a.image, workdir=a.workdir, accelerator=a.accelerator,
                 args=tuple(main_flags), topology=a.topology, slices=a.slices, nodes=a.nodes,
                 machine_type=a.machine_type, spot=a.spot,
                 gpu_networks=tuple(a.gpu_networks.split(",")) if a.gpu_networks else None,
                 grace_period_s=a.grace_period_s, max_restarts=a.max_restarts)
  return spec, a.out


def _split(argv):
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], "--", argv[i + 1:]
  return argv, "", []


# The reviewed manifests in launch/manifests/ and the specs they come from; tests re-render
# them. Regenerate after a deliberate change: python -m launch.gke --write_goldens
GOLDEN_DIR = Path(__file__).parent / "manifests"
_GOLDEN = dict(image="us-docker.pkg.dev/my-project/mm-jax/train:latest",
               args=("--config=configs/llava.py:tiny", "--config.train.steps=1000"))
GOLDENS = {
  "gpu-a3ultra-2nodes.yaml": JobSpec(name="llava-a3ultra", accelerator="a3-ultragpu-8g",
                                     nodes=2, workdir="gs://my-bucket/runs/llava-a3ultra",
                                     **_GOLDEN),
  "gpu-a3mega-2nodes-spot.yaml": JobSpec(name="llava-a3mega", accelerator="a3-megagpu-8g",
                                         nodes=2, spot=True,
                                         workdir="gs://my-bucket/runs/llava-a3mega", **_GOLDEN),
  "tpu-v5e-8.yaml": JobSpec(name="llava-v5e", accelerator="v5e-8",
                            workdir="gs://my-bucket/runs/llava-v5e", **_GOLDEN),
  "tpu-v5p-128.yaml": JobSpec(name="llava-v5p", accelerator="v5p-128",
                              workdir="gs://my-bucket/runs/llava-v5p", **_GOLDEN),
  "tpu-v6e-256-2slices.yaml": JobSpec(name="llava-v6e", accelerator="v6e-256", slices=2,
                                      workdir="gs://my-bucket/runs/llava-v6e", **_GOLDEN),
}


def write_goldens() -> None:
  for filename, spec in GOLDENS.items():
    (GOLDEN_DIR / filename).write_text(render(spec))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv == ["--write_goldens"]:
    write_goldens()
    return 0
  try:
    spec, out = parse(argv)
  except ValueError as e:
    print(f"launch.gke: {e}", file=sys.stderr)
    return 2
  text = render(spec)
  if out:
    with open(out, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
