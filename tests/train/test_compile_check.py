"""The --target report: kernels read off compiled HLO, the fits line, one-line failures."""

import pytest

from mm_jax import target
from mm_jax.kernels import merge
from mm_jax.train import compile_check
from mm_jax.train.plan import Plan


def _line(name: str, call: str, op: str = "") -> str:
  meta = f', metadata={{op_name="{op}" source_file="x"}}' if op else ""
  return f'  %{name} = bf16[2] custom-call(%a), custom_call_target="{call}"{meta}'


HLO = "\n".join([
    _line("pallas_call.7", "__gpu$xla.gpu.triton", "jit(f)/jvp(flash_attention_fwd)/pallas_call"),
    _line("tpu", "tpu_custom_call", "jit(f)/transpose(jvp(flash_attention_dq))/pallas_call"),
    _line("tpu.2", "tpu_custom_call", "jit(f)/transpose(jvp(flash_attention_dq))/pallas_call"),
    _line("mgpu", "mosaic_gpu_v2", "jit(f)/transpose(jvp())/attention_mgpu_dkv/mpmd_map"),
    _line("fmha", "__cudnn$fmhaSoftmax", "jit(f)/dot_product_attention"),
    _line("other", "SomethingElse"),
])


def test_kernel_calls_name_each_kernel_and_backend():
  assert compile_check.kernel_calls(HLO) == {
      ("attention_mgpu_dkv", "Mosaic GPU"): 1, ("flash_attention_dq", "Mosaic TPU"): 2,
      ("flash_attention_fwd", "Triton"): 1, ("fmhaSoftmax", "cuDNN"): 1}


def _report(total_gib: float) -> compile_check.Report:
  plan = Plan(8, int(total_gib * 2**30), 0, 0, 0)
  return compile_check.Report("train step", plan, 1.0, {}, 1e15, None)


def test_the_closing_line_compares_the_largest_plan_with_the_chips_memory():
  v5e = target.Target("tpu", "TPU v5 lite")
  line, fits = compile_check.verdict("v5e-16", [_report(12.0), _report(3.0)], v5e)
  assert (line, fits) == ("mm_jax: v5e-16: 12.00 GiB per chip of 16.0 GiB: fits", True)
  line, fits = compile_check.verdict("v5e-16", [_report(3.0), _report(17.5)], v5e)
  assert (line, fits) == ("mm_jax: v5e-16: 17.50 GiB per chip of 16.0 GiB: does not fit", False)


def test_a_compile_failure_names_the_kernel_it_happened_in():
  try:
    merge._chunk("not a width")  # any error raised inside mm_jax/kernels
  except TypeError as e:
    failure = compile_check._failure(e, "train step")
  assert str(failure).startswith("train step: compile failed in kernel _chunk: TypeError:")
  e = RuntimeError('Mosaic failed\nThe MLIR operation involved:\n  %1 = "tpu.memref_slice"(%a)')
  assert str(compile_check._failure(e, "decode step")) == (
      "decode step: compile failed: RuntimeError: Mosaic failed (op tpu.memref_slice)")


@pytest.mark.parametrize("args,message", [
    (("--target=v5p-7",), "config error: --target: v5p-7: v5p names count TensorCores"),
    (("--target=h100x8", "--target_slices=2"), "slices are for TPU names"),
    (("--target=l4x1",), "--target=l4x1: no compile facts for l4 GPUs (GPUs with them: h100"),
])
def test_a_bad_target_is_one_line(args, message):
  from test_main import _main

  r = _main("--config=configs/llava.py:tiny", *args)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()]
  assert message in r.stderr
