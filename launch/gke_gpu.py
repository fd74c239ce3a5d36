"""GKE GPU node pools: their node labels, and what a pod needs to use their networks.

A3 High (`a3-highgpu-8g`) runs plain: NCCL over the pod's one interface. A3 Mega
(`a3-megagpu-8g`) has eight more NICs for GPUDirect-TCPXO, A3 Ultra (`a3-ultragpu-8g`) and A4
(`a4-highgpu-8g`) eight RDMA NICs (GPUDirect-RDMA through gIB). Without what `decorate()`
adds, NCCL falls back to TCP on eth0: the job runs, at a fraction of the bandwidth. What it
adds is what xpk's workload decorators add for the same machine (tcpxo_decorator.py,
rdma_decorator.py), plus the NCCL settings Google's GPUDirect guides source at start-up:

- the multi-NIC annotations: `networking.gke.io/interfaces` maps eth0, eth1, ... to the
  cluster's GKENetworkParamSet networks, in order (`kubectl get GKENetworkParamSet`; the
  defaults below are the names Google's guides create; --gpu_networks overrides them);
- TCPXO: the receive-datapath manager `tcpxo-daemon` as a native sidecar (an init container
  with restartPolicy Always), the devices it may open, and /dev/aperture_devices;
- RDMA: the gIB plugin from the node (/home/kubernetes/bin/gib);
- every GPU pod: the driver's libraries (/usr/local/nvidia/lib64 on LD_LIBRARY_PATH) and a
  memory-backed /dev/shm (NCCL's intra-node buffers; the container default is 64 MiB).

The node pools need GKE's NCCL plugin installer DaemonSet (GPUDIRECT[...].installer): the
start-up script checks for the file it installs and exits 1 naming it, rather than run slow.
"""

import dataclasses
import json

DRIVER_LIB = "/usr/local/nvidia/lib64"  # where GKE mounts the driver's user-space libraries
SHM_MOUNT = "/dev/shm"
TOLERATE_USER_WORKLOAD = {"key": "user-workload", "operator": "Equal", "value": "true",
                          "effect": "NoSchedule"}
INTERFACES = "networking.gke.io/interfaces"
DEFAULT_INTERFACE = "networking.gke.io/default-interface"


@dataclasses.dataclass(frozen=True)
class GpuDirect:
  """One GPUDirect flavour: where its NCCL settings come from, its default networks."""

  name: str  # "tcpxo" or "rdma"
  nccl_env_script: str  # sourced before main.py: NCCL_* for this fabric
  networks: tuple[str, ...]  # eth0, eth1, ...: GKENetworkParamSet names
  installer: str  # the DaemonSet that puts the NCCL plugin on the nodes


TCPXO = GpuDirect(
  "tcpxo", f"{DRIVER_LIB}/nccl-env-profile.sh",
  ("default", *(f"vpc{i}" for i in range(1, 9))),
  "https://raw.githubusercontent.com/GoogleCloudPlatform/container-engine-accelerators/"
  "master/gpudirect-tcpxo/nccl-tcpxo-installer.yaml")
RDMA = GpuDirect(
  "rdma", "/usr/local/gib/scripts/set_nccl_env.sh",
  ("default", "gvnic-1", *(f"rdma-{i}" for i in range(8))),
  "https://raw.githubusercontent.com/GoogleCloudPlatform/container-engine-accelerators/"
  "master/gpudirect-rdma/nccl-rdma-installer.yaml")
TCPXO_DAEMON_IMAGE = "us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpxo/tcpgpudmarxd-dev:v1.0.12"


@dataclasses.dataclass(frozen=True)
class GpuMachine:
  label: str  # the nodes' cloud.google.com/gke-accelerator
  gpus: int
  gpudirect: GpuDirect | None = None


# GKE machine type -> its GPUs and fabric (the node labels: xpk's system_characteristics.py).
MACHINES = {
  "a3-highgpu-8g": GpuMachine("nvidia-h100-80gb", 8),
  "a3-megagpu-8g": GpuMachine("nvidia-h100-mega-80gb", 8, TCPXO),
  "a3-ultragpu-8g": GpuMachine("nvidia-h200-141gb", 8, RDMA),
  "a4-highgpu-8g": GpuMachine("nvidia-b200", 8, RDMA),
}


def networks(machine: GpuMachine, override: tuple[str, ...] | None) -> tuple[str, ...]:
  if machine.gpudirect is None:
    if override:
      raise ValueError("gpu_networks: only for GPUDirect machines (a3-megagpu-8g, "
                       "a3-ultragpu-8g, a4-highgpu-8g)")
    return ()
  nets = override or machine.gpudirect.networks
  want = len(machine.gpudirect.networks)
  if len(nets) != want:
    raise ValueError(f"gpu_networks: {len(nets)} networks, want {want} (eth0 to "
                     f"eth{want - 1}: {','.join(machine.gpudirect.networks)})")
  return tuple(nets)


def interfaces(nets: tuple[str, ...]) -> str:
  """The `networking.gke.io/interfaces` value: eth<i> on the i-th network."""
  return json.dumps([{"interfaceName": f"eth{i}", "network": n} for i, n in enumerate(nets)])


def command(machine: GpuMachine, argv: list[str]) -> list[str]:
  """`argv` as the container's command: for GPUDirect, after sourcing the fabric's NCCL
  settings (argv passes through "$@" untouched: no quoting to get wrong)."""
  g = machine.gpudirect
  if g is None:
    return argv
  script = (f'if [ ! -f {g.nccl_env_script} ]; then echo "mm_jax: {g.nccl_env_script} is '
            f'missing: install the GPUDirect-{g.name.upper()} NCCL plugin on the node pool '
            f'(kubectl apply -f {g.installer})" >&2; exit 1; fi; '
            f'source {g.nccl_env_script} && exec "$0" "$@"')
  return ["/bin/bash", "-c", script, *argv]


def container_argv(container: dict) -> list[str]:
  """The program and flags a container runs, with `command()`'s start-up script taken off."""
  cmd = list(container.get("command", []))
  return cmd[3:] if cmd[:2] == ["/bin/bash", "-c"] else cmd


def decorate(pod: dict, annotations: dict, machine: GpuMachine, nets: tuple[str, ...]) -> None:
  """Adds to a GPU pod spec (and its template's `annotations`) what its machine needs."""
  (main,) = pod["containers"]
  env, mounts = main.setdefault("env", []), main.setdefault("volumeMounts", [])
  volumes = pod.setdefault("volumes", [])
  tolerations = pod.setdefault("tolerations", [])
  tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists"})
  env.append({"name": "LD_LIBRARY_PATH", "value": DRIVER_LIB})
  shm = {"medium": "Memory"}
  g = machine.gpudirect
  if g is not None:
    annotations[DEFAULT_INTERFACE] = "eth0"
    annotations[INTERFACES] = interfaces(nets)
    tolerations.append(dict(TOLERATE_USER_WORKLOAD))
  if g is TCPXO:
    devices = [f"/dev/nvidia{i}" for i in range(machine.gpus)]
    devices += ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/dmabuf_import_helper"]
    annotations["devices.gke.io/container.tcpxo-daemon"] = "".join(
        f"- path: {d}\n" for d in devices)
    volumes += [{"name": "libraries", "hostPath": {"path": "/home/kubernetes/bin/nvidia"}},
                {"name": "sys", "hostPath": {"path": "/sys"}},
                {"name": "proc-sys", "hostPath": {"path": "/proc/sys"}},
                {"name": "aperture-devices", "hostPath": {"path": "/dev/aperture_devices"}}]
    pod["initContainers"] = [{
      "name": "tcpxo-daemon", "image": TCPXO_DAEMON_IMAGE, "imagePullPolicy": "Always",
      "restartPolicy": "Always",  # a native sidecar: up before main, for as long as it runs
      "command": ["/bin/sh", "-c"],
      "args": ["set -ex\nchmod 755 /fts/entrypoint_rxdm_container.sh\n"
               "/fts/entrypoint_rxdm_container.sh --num_hops=2 --num_nics=8 --uid= "
               "--alsologtostderr"],
      "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_BIND_SERVICE"]}},
      "volumeMounts": [{"name": "libraries", "mountPath": "/usr/local/nvidia"},
                       {"name": "sys", "mountPath": "/hostsysfs"},
                       {"name": "proc-sys", "mountPath": "/hostprocsysfs"}],
      "env": [{"name": "LD_LIBRARY_PATH", "value": DRIVER_LIB}]}]
    env.append({"name": "NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY", "value": "/dev/aperture_devices"})
    mounts += [{"name": "aperture-devices", "mountPath": "/dev/aperture_devices"},
               {"name": "libraries", "mountPath": "/usr/local/nvidia"}]
    shm["sizeLimit"] = "128Gi"
  elif g is RDMA:
    volumes += [{"name": "library-dir-host", "hostPath": {"path": "/home/kubernetes/bin/nvidia"}},
                {"name": "gib", "hostPath": {"path": "/home/kubernetes/bin/gib"}}]
    mounts += [{"name": "library-dir-host", "mountPath": "/usr/local/nvidia"},
               {"name": "gib", "mountPath": "/usr/local/gib"}]
  volumes.append({"name": "dshm", "emptyDir": shm})
  mounts.append({"name": "dshm", "mountPath": SHM_MOUNT})
