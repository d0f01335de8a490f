#!/usr/bin/env bash
# The core install, alone: `pip install ckptlab` (no extras) in its own venv must run the core commands on
# real-layout sample files without torch, and `merge` must say in one line which extra it needs.
# Usage: scripts/core_check.sh   (make core-check: builds .venv-core first, and .venv for the sample files)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
CORE=${CORE_VENV:-$here/.venv-core}
DEV=${DEV_VENV:-$here/.venv}
ck="$CORE/bin/ckptlab"
[ -x "$ck" ] || { echo "core_check: $ck missing (run: make core-venv)" >&2; exit 1; }
if "$CORE/bin/python" -c "import torch" 2>/dev/null; then
  echo "core_check: FAIL: torch is importable in $CORE (the core install must not pull it in)" >&2; exit 1
fi
for m in numpy ml_dtypes; do "$CORE/bin/python" -c "import $m" || { echo "core_check: FAIL: $m missing" >&2; exit 1; }; done
if "$CORE/bin/python" -c "import safetensors" 2>/dev/null; then
  echo "core_check: FAIL: the safetensors library is installed in $CORE (a test-only dependency)" >&2; exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ckptlab-core-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export CKPTLAB_DB="$work/out/catalog.db" COLUMNS=200
lib="$work/lib"; out="$work/out"
mkdir -p "$lib/a" "$out"
# sample files (real SD1 key layouts, small widths) are made with the dev venv: the sample builder uses torch
PYTHONPATH="$here/src" "$DEV/bin/python" - "$lib" <<'PY'
import sys
from pathlib import Path

from ckptlab.ops.diffusers_io import to_diffusers
from ckptlab.sample.build import write_model

lib = Path(sys.argv[1])
write_model(lib / "a" / "sd15.safetensors", "sd1_checkpoint", dtype="F32", ema=True, seed=1)
write_model(lib / "a" / "sd15-bf16.safetensors", "sd1_checkpoint", dtype="BF16", seed=2)
write_model(lib / "a" / "old.ckpt", "sd1_checkpoint", dtype="F32", fmt="ckpt", ema=True, seed=3)
write_model(lib / "vae.safetensors", "sd1_vae", dtype="F32", seed=4)
to_diffusers(lib / "a" / "sd15-bf16.safetensors", lib / "diffusers")
PY

failed=0
run() {  # run NAME ARGS...: the core ckptlab must exit 0
  local name=$1; shift
  if "$ck" "$@" >"$work/stdout" 2>"$work/stderr"; then
    printf 'core_check: ok    %s\n' "$name"
  else
    printf 'core_check: FAIL  %s (exit %s): %s\n' "$name" "$?" "$(tail -n 3 "$work/stderr")" >&2; failed=1
  fi
}
run inspect        inspect "$lib" --json
run "check --deep" check "$lib/a" "$lib/vae.safetensors" --deep
run convert        convert "$lib/a/old.ckpt" --out-dir "$out"
run prune          prune "$lib/a/sd15.safetensors" --ema use --out-dir "$out"
run "precision fp16" precision "$lib/a/sd15.safetensors" --to fp16 --out-dir "$out"
run "precision bf16" precision "$lib/a/sd15.safetensors" --to bf16 --out-dir "$out"
run extract        extract "$lib/a/sd15.safetensors" -c vae -o "$out/vae.safetensors"
run replace        replace "$lib/a/sd15.safetensors" --vae "$lib/vae.safetensors" -o "$out/replaced.safetensors"
run to-diffusers   to-diffusers "$lib/a/sd15.safetensors" -o "$out/sd15-diffusers"
run from-diffusers from-diffusers "$lib/diffusers" -o "$out/from-diffusers.safetensors"
run scan           scan "$lib" "$out" --hash --fingerprint
run hash           hash "$lib/a/sd15.safetensors" --json
run dupes          dupes --json
run plan-space     plan-space --json
run report         report --format json
# merge needs torch: exactly one line naming the extra, and a non-zero exit
set +e
"$ck" merge weighted_sum "$lib/a/sd15.safetensors" "$out/sd15-fp16.safetensors" --alpha 0.5 \
  -o "$out/merged.safetensors" >"$work/stdout" 2>"$work/stderr"
rc=$?
set -e
want="ckptlab: error: merge needs PyTorch: pip install 'ckptlab[torch]' (see README for CPU/CUDA builds)"
if [ "$rc" -ne 0 ] && [ "$(cat "$work/stderr")" = "$want" ] && [ ! -e "$out/merged.safetensors" ]; then
  echo "core_check: ok    merge refused in one line (exit $rc)"
else
  printf 'core_check: FAIL  merge without torch: exit %s, stderr:\n%s\n' "$rc" "$(cat "$work/stderr")" >&2; failed=1
fi
# serve needs the web extra: one line naming it, a non-zero exit, no server started
set +e
"$ck" serve --port 1 >"$work/stdout" 2>"$work/stderr"
rc=$?
set -e
want='ckptlab: error: ckptlab serve needs the web extra'
if [ "$rc" -ne 0 ] && [ "$(wc -l <"$work/stderr")" -eq 1 ] && grep -qF "$want" "$work/stderr"; then
  echo "core_check: ok    serve refused in one line (exit $rc)"
else
  printf 'core_check: FAIL  serve without the web extra: exit %s, stderr:\n%s\n' "$rc" "$(cat "$work/stderr")" >&2; failed=1
fi
# the hub-scale extras: a remote path, a PostgreSQL catalog and --ray each refuse in one line naming the extra
refused() {  # refused NAME WANT ARGS...: exactly one stderr line holding WANT, a non-zero exit
  local name="$1" want="$2"; shift 2
  set +e
  "$ck" "$@" >"$work/stdout" 2>"$work/stderr"
  local rc=$?
  set -e
  if [ "$rc" -ne 0 ] && [ "$(wc -l <"$work/stderr")" -eq 1 ] && grep -qF "$want" "$work/stderr"; then
    echo "core_check: ok    $name refused in one line (exit $rc)"
  else
    printf 'core_check: FAIL  %s: exit %s, stderr:\n%s\n' "$name" "$rc" "$(cat "$work/stderr")" >&2; failed=1
  fi
}
refused "s3:// without fsspec" "pip install 'ckptlab[remote]'" inspect s3://bucket/model.safetensors
refused "postgresql:// without psycopg" "pip install 'ckptlab[postgres]'" ls --db postgresql://u:pw@127.0.0.1:1/x
if grep -qF ":pw@" "$work/stderr"; then echo "core_check: FAIL  a catalog URL's password was printed" >&2; failed=1; fi
refused "--ray without ray" "pip install 'ckptlab[ray]'" scan s3://bucket/prefix --ray auto
[ "$failed" -eq 0 ] && echo "core_check: the core install runs without torch" || exit 1
