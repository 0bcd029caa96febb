#!/usr/bin/env bash
# H8's device check: install, my tests on the GPU (bf16 included), kernel times, layer_times v1 vs v2.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.log"; }
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_stem_v2.py tests/kernels/test_classifier_v2.py \
    tests/test_stem_classifier_v2.py 2>&1 | tee "$OUT/tests.log" | tail -8
timeout 100 python3 .h8/time_kernels.py 2>&1 | tee "$OUT/times.log" | grep -v "^$\|Warn\|_warn" | cut -c1-230
for k in v1 stem=v2,classifier=v2; do
    echo "== layer_times batch 1 DENSETRITON_KERNELS=$k"
    DENSETRITON_KERNELS=$k timeout 45 python3 -m densetriton.bench.layer_times --model densenet121 --batch-size 1 \
        --dtype float16 --repeats 20 2>&1 | grep -v Warning
done 2>&1 | tee "$OUT/layer_times.log"
