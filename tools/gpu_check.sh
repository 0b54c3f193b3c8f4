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
    # FFmpeg 5.1 shared libraries (Debian bookworm) for torchcodec, plus ffmpeg/ffprobe (arena's fallback decoder):
    # exactly the packages that own what the libraries load here (ldd closure), minus what every image has.
    L=/usr/lib/x86_64-linux-gnu
    pk=$(ldd $L/libavdevice.so.59 $L/libavfilter.so.8 $L/libavformat.so.59 $L/libavcodec.so.59 $L/libswscale.so.6 \
            $L/libswresample.so.4 $L/libavutil.so.57 /usr/bin/ffmpeg | awk '/=>/{print $3}' | sort -u \
         | while read -r f; do dpkg -S "$(readlink -f "$f")" 2>/dev/null || dpkg -S "$f"; done | cut -d: -f1 \
         | sort -u | grep -v -E '^(libc6|libgcc-s1|libstdc\+\+6|zlib1g)$')
    (cd .debs && apt-get download ffmpeg $pk)
    # ~93 MB of .debs (libflite 12 MB, libicu 9 MB, libcodec2 8 MB ...): over the 64 MiB a device call carries.
    # Until a smaller set is proven, carry .whl only; the run then records "TORCHCODEC FAILED" and measures the
    # decode-free steps (train), or carry a PyAV wheel's bundled FFmpeg with soname links (not yet tried).
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
