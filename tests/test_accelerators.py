"""Target names -> machines (the table launch/ shares), and XLA's GPU target configs."""

import pytest

from mm_jax import accelerators


@pytest.mark.parametrize("name,kw,chip,devices,per_host,hosts,topology", [
    ("v5p-128", {}, "v5p", 64, 4, 16, "4x4x4"),
    ("v5p-8", {}, "v5p", 4, 4, 1, "2x2x1"),
    ("v6e-256", {"slices": 2}, "v6e", 512, 4, 64, "16x16"),
    ("v6e-8", {}, "v6e", 8, 8, 1, "2x4"),  # one VM with all 8 chips
    ("v5e-16", {}, "v5e", 16, 4, 4, "4x4"),
    ("a3-highgpu-8g", {"nodes": 2}, "h100", 16, 8, 2, None),
    ("a3-megagpu-8g", {}, "h100", 8, 8, 1, None),
    ("a3-ultragpu-8g", {}, "h200", 8, 8, 1, None),
    ("a2-ultragpu-8g", {}, "a100", 8, 8, 1, None),
    ("h100x8", {}, "h100", 8, 8, 1, None),
    ("h200x8", {"nodes": 2}, "h200", 16, 8, 2, None),
    ("a100_80gibx8", {}, "a100", 8, 8, 1, None),
])
def test_names_parse_to_machines(name, kw, chip, devices, per_host, hosts, topology):
  m = accelerators.machine(name, **kw)
  assert (m.chip.name, m.devices, m.per_host, m.hosts, m.topology) == (
      chip, devices, per_host, hosts, topology)


@pytest.mark.parametrize("name,kw,match", [
    ("v5p-7", {}, "count TensorCores"),
    ("v5e-3", {}, "no standard topology"),
    ("h100x8", {"slices": 2}, "slices are for TPU"),
    ("v5p-8", {"nodes": 2}, "hosts come from its topology"),
    ("a3-highgpu", {}, "is not a target"),
    ("tpu", {}, "v5e-N, v5p-N or v6e-N"),
])
def test_bad_names_say_what_is_wrong(name, kw, match):
  with pytest.raises(ValueError, match=match):
    accelerators.machine(name, **kw)


def test_chip_of_prefers_the_longest_device_kind():
  assert accelerators.chip_of("TPU v5 lite").name == "v5e"
  assert accelerators.chip_of("TPU v5").name == "v5p"
  assert accelerators.chip_of("TPU v6 lite").name == "v6e"
  assert accelerators.chip_of("NVIDIA H100 80GB HBM3").name == "h100"
  assert accelerators.chip_of("cpu") is None


def test_gpu_target_config_carries_the_card():
  text = accelerators.gpu_target_config(accelerators.CHIPS["h100"])
  assert "core_count: 132\n" in text and "major: 9\n    minor: 0\n" in text
  assert "ACCELERATED_FEATURES" in text and 'device_description_str: "NVIDIA H100' in text
  assert "collective_memory_granularity" not in text  # jaxlib 0.10.2 rejects it
  assert "feature_extension: NONE" in accelerators.gpu_target_config(accelerators.CHIPS["a100"])
  with pytest.raises(ValueError, match="no GPU compile facts"):
    accelerators.gpu_target_config(accelerators.CHIPS["v5p"])
