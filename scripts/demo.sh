#!/usr/bin/env bash
# The main job on the built-in sample library: build it (real key layouts of several families and
# kinds, both A1111 and ComfyUI folder layouts), then run ckptlab over it as a user would.
# Usage: scripts/demo.sh [LIBRARY_DIR]   (make demo runs it with ./sample-library)
set -euo pipefail
LIB=${1:-sample-library}
here=$(cd "$(dirname "$0")/.." && pwd)
PATH="$here/.venv/bin:$PATH"
export CKPTLAB_DB="$LIB/catalog.db"   # the demo keeps its catalog beside the library, not in yours
OUT="$LIB/out"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

python -m ckptlab.sample "$LIB"
rm -rf "$OUT" "$CKPTLAB_DB"* && mkdir -p "$OUT"
A="$LIB/a1111/models/Stable-diffusion"

step "What is every file? (headers only: no tensor is loaded, no pickle code runs)" \
  ckptlab inspect "$LIB/a1111"
step "Are the pickles safe? (own data-only reader; exit 0 = all safe)" \
  ckptlab check "$LIB/a1111"
step "Catalog both layouts, with the six CivitAI hashes and tensor fingerprints" \
  ckptlab scan "$LIB" --hash --fingerprint
step "The catalog" ckptlab ls --sort size
step "Inventory report" ckptlab report --format html -o "$OUT/report.html"
step "Convert the legacy pickle to safetensors (tensors bit-identical)" \
  ckptlab convert "$A/v1-5-pruned.ckpt" --out-dir "$OUT"
step "Prune it: use the EMA weights, fp16" \
  ckptlab prune "$OUT/v1-5-pruned.safetensors" --ema use --precision fp16 --out-dir "$OUT"
step "Merge two SD1 checkpoints, weighted sum at alpha 0.3" \
  ckptlab merge weighted_sum "$A/v1-5-pruned-emaonly.safetensors" "$A/anything-merge-v3.safetensors" \
  --alpha 0.3 -o "$OUT/merge-0.3.safetensors"
step "The merge remembers its recipe" ckptlab inspect "$OUT/merge-0.3.safetensors"
step "Compare the merge at three ratios, same prompt and seed: one grid, the blend computed in memory from the recipe the merge carries (no merged file is written); each cell keeps its A1111 infotext" \
  ckptlab grid --merge "$OUT/merge-0.3.safetensors" -p "a lighthouse at dusk" --seed 42 --steps 3 --sampler Euler \
  --size 64x64 --x alpha=0,0.3,0.6 --cells "$OUT/merge-grid-cells" -o "$OUT/merge-grid.png"
step "Single file to a diffusers folder" ckptlab to-diffusers "$A/v1-5-pruned-emaonly.safetensors" -o "$OUT/sd15-diffusers"
# LoRA work: bake the sample LoRA into the SD1.5 checkpoint, extract a LoRA back from the difference, explain it
L="$LIB/a1111/models/Lora"
step "Bake a LoRA into a checkpoint (streamed one weight at a time; W += strength * alpha/rank * up @ down)" \
  ckptlab lora bake "$A/v1-5-pruned-emaonly.safetensors" "$L/sd15_style_lora.safetensors" \
  -o "$OUT/sd15-style-baked.safetensors"
step "Extract a rank-4 LoRA back from (baked, base) by SVD of the difference; the error is reported" \
  ckptlab lora extract "$OUT/sd15-style-baked.safetensors" "$A/v1-5-pruned-emaonly.safetensors" --rank 4 \
  -o "$OUT/sd15-style-extracted.safetensors"
step "What the extracted LoRA is: family, rank/alpha, modules covered, metadata" \
  ckptlab lora info "$OUT/sd15-style-extracted.safetensors"
step "Catalog the outputs too (incremental: only the new files are read)" \
  ckptlab scan "$LIB" --hash --fingerprint
step "Duplicates: exact copies, and by fingerprint the same weights in another form (the converted pickle, the diffusers folder)" \
  ckptlab dupes
step "What could be freed: copies in UI folders become links, the rest goes (nothing is changed yet)" \
  ckptlab plan-space -o "$OUT/plan.json"
step "What apply-plan would do, each kept copy re-verified first (--dry-run: nothing is changed)" \
  ckptlab apply-plan "$OUT/plan.json" --dry-run
printf '\nDone. Outputs in %s; catalog in %s.\n' "$OUT" "$CKPTLAB_DB"
# the last word: the same library as a web app (not started here: it runs until Ctrl-C)
printf '\nSee it all in your browser (cards, search, model pages, jobs; local only, Ctrl-C stops):\n  ckptlab serve --db %q --open\n' "$CKPTLAB_DB"
