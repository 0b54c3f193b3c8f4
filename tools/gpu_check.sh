#!/usr/bin/env bash
# The GPU check of issues 7 and 16 in ONE device call (≤ 8 minutes on one H100/H200): install the carried wheels and
# PyNvVideoCodec, make FFmpeg loadable, then run tools/gpu_check.py, which prints ONE table: bare backbone frames/s;
# the clip pipeline with CPU decode + albumentations views, CPU decode + tensor views on the GPU, NVDEC + tensor
# views (each against the bare backbone); GPU views vs albumentations; NVDEC vs CPU decode (time, pixels, indices);
# submit -> 200 videos; train-full step and peak CUDA memory; `arena features` end to end. Each row that fails says
# why and the others still run.
#
# Prepare here (a machine with pip and apt), once:
#     bash tools/gpu_check.sh --prepare        # fills .gpu/: wheels (py3.12), FFmpeg 7.1 libraries, videos
# Run there (device tool):   command: bash tools/gpu_check.sh    carry: [".gpu"]    timeout_s: 540
# Smoke-test here:           bash tools/gpu_check.sh --cpu-smoke   (tiny, CPU, no wheels, same Python steps)
#
# Results: $OUT/table.md (the table), $OUT/gpu_check.json, $OUT/env.txt (what loaded, what fell back, the table
# again), $OUT/raw.tgz (each step's json/log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"

if [[ "${1:-}" == "--prepare" ]]; then
    # Everything the call carries goes into .gpu/ (git-ignored), under the 64 MiB a device call takes:
    #   .gpu/whl/           wheels the image lacks: torchcodec 0.11.1 (pairs with its torch 2.11), albumentations
    #                       and its needs (optuna is not needed by these steps and stays behind)
    #   .gpu/fflib.tar.xz   FFmpeg 7.1 shared libraries taken from PyAV's manylinux wheel, with the sonames
    #                       torchcodec links against (libavcodec.so.61 ...) as links: ~22 MB, against ~93 MB of
    #                       Debian packages; the image has no FFmpeg at all
    #   .gpu/data/          competition-like videos (640x360, 10 s, 30 fps H.264), since there is no FFmpeg CLI
    #                       there to encode with
    #   .gpu/pynvc.tar.xz   PyNvVideoCodec 2.2.4 (NVDEC), the package folders of its wheel only: ~6 MB, where the
    #                       wheel is 27 MB (FFmpeg's source tarball, samples and notebooks ride along in it)
    set -e
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    mkdir -p .gpu/whl /tmp/gpu_prep
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                "${plat[@]}" -d "$1" "$2" || python3 -m pip download -q --no-deps --only-binary=:all: \
                --python-version 3.12 --implementation cp --platform any -d "$1" "$2"; }
    for spec in torchcodec==0.11.1 albumentations==2.0.8 albucore==0.0.24 stringzilla simsimd pydantic pydantic-core \
                annotated-types typing-inspection; do
        get .gpu/whl "$spec"
    done
    get /tmp/gpu_prep av==15.1.0   # bundles FFmpeg 7.1 (libavutil 59): one of the majors torchcodec supports
    get /tmp/gpu_prep PyNvVideoCodec==2.2.4
    rm -rf /tmp/gpu_prep/pynvc && mkdir -p /tmp/gpu_prep/pynvc
    (cd /tmp/gpu_prep && unzip -q -o pynvvideocodec-2.2.4-*.whl -x 'samples/*' 'benchmarks/*' '*.data/*' -d pynvc)
    tar -C /tmp/gpu_prep/pynvc -cJf .gpu/pynvc.tar.xz .
    rm -rf /tmp/gpu_prep/fflib && mkdir -p /tmp/gpu_prep/fflib
    (cd /tmp/gpu_prep && unzip -q -o -j av-15.1.0-*.whl 'av.libs/*' -d fflib)
    (cd /tmp/gpu_prep/fflib && for f in lib{avutil,avcodec,avformat,avdevice,avfilter,swscale,swresample}-*.so.*; do
        ln -sf "$f" "${f%%-*}.so.$(echo "$f" | sed -E 's/.*\.so\.([0-9]+).*/\1/')"; done)
    tar -C /tmp/gpu_prep -cJf .gpu/fflib.tar.xz fflib
    py=python3; [[ -x .venv/bin/python ]] && py=.venv/bin/python
    [[ -f .gpu/data/test_public.csv ]] || "$py" -m arena demo-data .gpu/data --preset competition --n-train 4 \
        --n-test 8 --force
    du -sh .gpu/whl .gpu/fflib.tar.xz .gpu/pynvc.tar.xz .gpu/data
    du -sh .gpu   # a device call carries at most 64 MiB
    exit 0
fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    py=python3; [[ -x .venv/bin/python ]] && py=.venv/bin/python
    exec "$py" tools/gpu_check.py --out "$OUT" --device cpu --tiny --work /tmp/gpu_check_smoke
fi

export PYTHONUNBUFFERED=1
t0=$(date +%s)
exec > >(tee -a "$OUT/env.txt") 2>&1   # everything below is logged (no subshell: the exports stay)
{
    echo "start $(date -u)"; nvidia-smi --query-gpu=name,memory.total,temperature.gpu,driver_version --format=csv || true
    # 1. wheels (pip with no index: the machine reaches nothing outside)
    if ls .gpu/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || echo "WHEELS FAILED"
    else
        echo "no .gpu/whl carried: torchcodec/albumentations must already be importable"
        export PYTHONPATH=$PWD
    fi
    # 2. FFmpeg libraries: unpacked beside, never into /
    if [[ -f .gpu/fflib.tar.xz ]]; then
        tar -C /tmp -xJf .gpu/fflib.tar.xz && export LD_LIBRARY_PATH=/tmp/fflib:${LD_LIBRARY_PATH:-}
    fi
    # 2b. PyNvVideoCodec (NVDEC): its package folders, next to the wheels; a failure only costs the NVDEC rows
    if [[ -f .gpu/pynvc.tar.xz ]]; then
        mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/pynvc.tar.xz \
            && export PYTHONPATH=/tmp/site:${PYTHONPATH:-$PWD} || echo "PYNVVIDEOCODEC UNPACK FAILED"
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
    timeout 60 python3 - <<'PY'
try:  # NVDEC: whether the package loads (libnvcuvid from the driver) -- not fatal, its rows say why
    import PyNvVideoCodec as nvc
    print("PyNvVideoCodec", nvc.__version__, "cuda", getattr(nvc, "__cuda_version__", "?"))
except Exception as exc:  # noqa: BLE001
    print("PYNVVIDEOCODEC UNAVAILABLE:", repr(exc)[:500])
PY
}

steps=${GPU_STEPS:-data,decode,pipeline,train,submit,features}
if [[ "$tc" != "0" ]]; then
    # No decoder at all: still measure what needs none (train on random clips); record the failure.
    echo "torchcodec cannot load FFmpeg here: decode-free steps only"
    steps=train
fi
data=()
if [[ -f .gpu/data/test_public.csv ]]; then
    data=(--data-from .gpu/data --n-train 4 --replicate 8)   # 4 + 4 train and 8 test videos carried, x 8
elif ! command -v ffmpeg >/dev/null; then
    echo "no ffmpeg binary and no carried .gpu/data: the data step cannot encode"
fi
# Budget (H100, 16 cores): setup ~40 s, data 0 s (carried), decode ~30 s, pipeline 4 rows x ~35 s, train
# 2 x ~40 s, submit ~60 s, features ~40 s: ~6 minutes. gpu_check.py skips the steps left once its 380 s are spent,
# and the table is printed from the JSON written after every step even if this timeout has to stop it.
timeout 430 python3 tools/gpu_check.py --out "$OUT/raw" --device cuda --steps "$steps" --step-timeout 120 \
    --budget 380 --work /tmp/gpu_check_work "${data[@]}" ${GPU_ARGS:-}
[[ -f "$OUT/raw/table.md" ]] || python3 tools/gpu_check.py --out "$OUT/raw" --table-from "$OUT/raw/gpu_check.json"
echo "total $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=temperature.gpu,memory.used --format=csv || true
# At most 8 files come back from a device call: the summary, this log, and every per-step file in one archive.
cp "$OUT/raw/gpu_check.json" "$OUT/raw/table.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/raw.tgz" -C "$OUT" raw && rm -rf "$OUT/raw"
