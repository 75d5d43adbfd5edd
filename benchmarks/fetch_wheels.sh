#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, at requirements.txt's pins (its Python 3.12 has torch 2.11,
# transformers 5.17, peft and accelerate, not ours): into $WHEELS (default .whl, 20 MB), and
# bitsandbytes (43 MB) into $WHEELS-bnb: a device call carries 64 MiB at most, the tree with it.
#   bash benchmarks/fetch_wheels.sh                                   # the device's (3.12)
#   PYVER=3.11 WHEELS=/tmp/whl bash benchmarks/fetch_wheels.sh        # this machine's, to rehearse
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
pins() { for name in "$@"; do grep -i "^$name==" requirements.txt; done; }
download() {
    local into=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
# dill and multiprocess: datasets' needs (trl imports datasets), at the versions datasets 5.2 takes
download "$wheels" $(pins transformers tokenizers peft trl liger-kernel qwen-vl-utils datasets \
    pycocotools) dill==0.4.1 multiprocess==0.70.19
download "$wheels-bnb" $(pins bitsandbytes)
du -sh "$wheels" "$wheels-bnb"
