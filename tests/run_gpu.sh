#!/usr/bin/env bash
# GPU correctness: the kernel suites split over processes (compiling is CPU-bound), then the model-level ones.
# The convolution, combination and pair-packing files run whole (their tiny cases too, on the GPU).
cd "$(dirname "$0")/.."
# A GPU host without pip install (no package index): make this checkout importable as installed, with
# models/, kernels/, tasks/ and conf/ as mom_bench's sub-packages (pyproject.toml's package-dir).
if ! python3 -c "import mom_bench.models" 2>/dev/null; then
  for d in models kernels tasks conf; do ln -sfn ../$d mom_bench/$d; done
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT=${OUT:-outputs/gpu_tests}
mkdir -p $OUT/tests
for algo in linear_attention head_decay gla "delta_rule and not gated" gated_delta_rule kda; do
  timeout ${T1:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py -k "$algo" > "$OUT/tests/kernels_${algo%% *}.log" 2>&1 &
done
timeout ${T1:-300} python3 -m pytest -q -p no:cacheprovider tests/test_triton_conv.py tests/test_triton_combine.py tests/test_triton_pairs.py > $OUT/tests/conv_combine.log 2>&1 &
timeout ${T1:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_norm.py > $OUT/tests/norm.log 2>&1 &
wait
timeout ${T2:-200} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_dispatch.py > $OUT/tests/models.log 2>&1
for f in $OUT/tests/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
grep -h "^FAILED" $OUT/tests/*.log | cut -c1-160 | head -20
