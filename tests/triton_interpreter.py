"""Run a Triton kernel check on the CPU with Triton's interpreter (TRITON_INTERPRET=1), in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (the kernels run on GPU)")


# Run first in every interpreted check: numpy 2 refuses int() of the 1-element arrays the interpreter passes
# as indices, so give the interpreter's tensors an __index__ that reads the single element.
_NUMPY2_PATCH = """
import numpy as _np
import triton.runtime.interpreter as _ti
_orig_patch = _ti._patch_lang_tensor
def _patch_with_index(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(_np.asarray(self.handle.data).reshape(-1)[0]))
_ti._patch_lang_tensor = _patch_with_index
"""


def run_interpreted(code: str) -> None:
    """Run ``code`` (which prints a line starting with 'ok' on success) under the Triton interpreter."""
    code = _NUMPY2_PATCH + code
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def run_compiled(code: str) -> None:
    """Run ``code`` (which prints a last line 'ok' on success) with Triton's real compiler (no interpreter): it
    builds kernels for an H100 with triton.compile and ptxas, no GPU needed, which catches what the interpreter
    accepts but the compiler does not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("ok"), out.stderr[-3000:]


def compile_sm90(kernel, types: dict, const: dict, num_warps: int = 4, num_stages: int = 3, **options):
    """Compile a ``@triton.jit`` kernel for an H100 (sm_90) with Triton's real compiler and ptxas, no GPU needed (for
    the scripts that :func:`run_compiled` runs). ``types``: the Triton types of the arguments that are not i32 (e.g.
    ``{"x_ptr": "*fp16"}``); ``const``: the constexpr arguments' values; ``num_stages`` defaults to Triton's own
    default, as a launch without it. Returns the compiled kernel (``.asm``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(types)
    sig.update({name: "constexpr" for name in const})
    constexprs = {(kernel.arg_names.index(n),): v for n, v in const.items()}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **options})  # fmt: skip
