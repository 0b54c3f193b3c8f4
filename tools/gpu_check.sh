#!/usr/bin/env bash
# Issue 7's GPU check in ONE device call (≤ 8 minutes on one H100): install the carried wheels, make FFmpeg loadable,
# then run tools/gpu_check.py (NVDEC vs CPU decode, features fp16 + channels_last vs naive vs bare backbone,
# train-full steps at the seed's settings with cuda max allocated, submit timing -> 200 videos, pynvml readings).
#
# Prepare here (a machine with pip and apt), once:
#     bash tools/gpu_check.sh --prepare        # fills .whl/ (wheels, py3.12) and .debs/ (FFmpeg 5.1 libraries)
# Run there (device tool):   command: bash tools/gpu_check.sh    carry: [".whl", ".debs"]    timeout_s: 540
# Smoke-test here:           bash tools/gpu_check.sh --cpu-smoke   (tiny, CPU, no wheels, same Python steps)
#
# Results: $OUT/gpu_check.json (+ one .json/.log per benchmark), $OUT/env.txt (what loaded, what fell back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    grep -qx '/.debs/' .git/info/exclude 2>/dev/null || echo /.debs/ >> .git/info/exclude
    mkdir -p .whl .debs
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    # Not in the device image (KINDS.md): torchcodec (0.11.x pairs with torch 2.11), optuna + its needs,
    # albumentations + its needs. --no-deps: each need is named.
    for spec in torchcodec==0.11.1 optuna alembic sqlalchemy colorlog mako greenlet albumentations albucore \
                stringzilla simsimd pydantic pydantic-core annotated-types typing-inspection; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${plat[@]}" -d .whl "$spec" || python3 -m pip download -q --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform any -d .whl "$spec"
    done
    # FFmpeg 5.1 shared libraries (Debian bookworm) for torchcodec, plus the ffmpeg/ffprobe binaries arena's
    # fallback decoder uses. Their dependencies come along with apt-get's dependency list (libs only).
    (cd .debs && apt-get download ffmpeg libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 \
        libavfilter8 libavdevice59 libpostproc56 $(apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances libavcodec59 libavformat59 libavfilter8 libavdevice59 \
        | grep '^[a-z]' | grep -v -E '^(libc6|libgcc|libstdc|debconf|dpkg|perl|tzdata)' | sort -u) 2>/dev/null || true)
    du -sh .whl .debs
    exit 0
fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    exec python tools/gpu_check.py --out "$OUT" --device cpu --tiny --work /tmp/gpu_check_smoke
fi

export PYTHONUNBUFFERED=1
t0=$(date +%s)
exec > >(tee -a "$OUT/env.txt") 2>&1   # everything below is logged (no subshell: the exports stay)
{
    echo "start $(date -u)"; nvidia-smi --query-gpu=name,memory.total,temperature.gpu,driver_version --format=csv || true
    # 1. wheels (pip with no index: the machine reaches nothing outside)
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || echo "WHEELS FAILED"
    else
        echo "no .whl/ carried: torchcodec/optuna/albumentations must already be importable"
        export PYTHONPATH=$PWD
    fi
    # 2. FFmpeg libraries: unpacked beside, never into / (dpkg -x into a folder)
    if ls .debs/*.deb >/dev/null 2>&1; then
        mkdir -p /tmp/ffroot
        for f in .debs/*.deb; do dpkg -x "$f" /tmp/ffroot; done
        export LD_LIBRARY_PATH=/tmp/ffroot/usr/lib/x86_64-linux-gnu:/tmp/ffroot/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
        export PATH=/tmp/ffroot/usr/bin:$PATH
    fi
    # 3. in the first seconds: can torchcodec load FFmpeg and decode, on CPU and with NVDEC?
    timeout 60 python3 - <<'PY'
import sys
try:
    import torchcodec, torch  # noqa: E401
    from torchcodec.decoders import VideoDecoder  # noqa: F401
    print("torchcodec", torchcodec.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as exc:  # noqa: BLE001
    print("TORCHCODEC FAILED:", repr(exc)[:500]); sys.exit(3)
PY
    tc=$?
    echo "torchcodec check rc=$tc after $(( $(date +%s) - t0 )) s"
}

steps=data,decode,features,train,submit
if [[ "$tc" != "0" ]]; then
    # No decoder at all: still measure what needs none (train on random clips); record the failure.
    echo "torchcodec cannot load FFmpeg here: decode-free steps only"
    steps=train
elif ! ls .debs/*.deb >/dev/null 2>&1 && ! command -v ffmpeg >/dev/null; then
    echo "no ffmpeg binary: demo-data cannot encode; decode steps use whatever torchcodec loaded"
fi
# Budget: data ~60 s (16 cores), decode ~20 s, features ~90 s, train ~60 s, submit ~90 s; each step capped at 150 s.
timeout 450 python3 tools/gpu_check.py --out "$OUT" --device cuda --steps "$steps" --step-timeout 150 \
    --work /tmp/gpu_check_work
echo "total $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=temperature.gpu,memory.used --format=csv || true
