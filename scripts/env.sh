#!/usr/bin/env bash
# Creates (when missing) the project's virtual environment in .venv and installs everything.
# Safe to run again: it only installs when setup.cfg changed since the last install.
# Usage: source scripts/env.sh   (or run it; it prints the python to use)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYCAM_VENV:-$root/.venv}"
stamp="$venv/.installed"
constraints="$root/constraints.txt"
want="$(sha256sum "$root/setup.cfg" "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  # Every install is constrained to the versions CI runs (constraints.txt), torch first: an
  # unconstrained torch on a machine without a GPU pulls a multi-GB CUDA build. The same torch
  # version on GPU machines (their default wheel); HYCAM_TORCH_INDEX names another wheel index,
  # e.g. https://download.pytorch.org/whl/cpu for the CPU build where the default index has CUDA's.
  "$venv/bin/pip" install -q -c "$constraints" ${HYCAM_TORCH_INDEX:+--index-url "$HYCAM_TORCH_INDEX"} torch
  # compat mode puts the repository on sys.path: packages added later import without reinstalling
  "$venv/bin/pip" install -q -c "$constraints" -e "$root[dev]" --config-settings editable_mode=compat
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # DeepSpeed's CPU accelerator JIT-compiles its shared-memory all-reduce op at the first
    # multi-process run (a minute or more on 2 cores): build it once here, not inside a timed job.
    "$venv/bin/python" -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
      >/dev/null 2>&1 || echo "note: DeepSpeed's shm op was not prebuilt; the first run will build it"
    # HyCAM's fused CPU kernel likewise (~20 s); without a compiler HyCAM runs on torch ops.
    "$venv/bin/python" -c "from hycam_ds.kernels import fused_cpu; assert fused_cpu.load() is not None" \
      >/dev/null 2>&1 || echo "note: HyCAM's fused CPU kernel was not prebuilt; the first CPU run will build it"
  fi
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
