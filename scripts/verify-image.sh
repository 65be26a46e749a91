#!/usr/bin/env bash
# Build the action's Dockerfile without a Docker engine and run a full release through the image's entrypoint.
#
#   sudo scripts/verify-image.sh          (needs root: buildah with the vfs driver and chroot isolation)
#
# 1. base image: Debian bookworm (python3 + pip) debootstrapped and committed as a local image (kept between runs);
# 2. `buildah bud` of ./Dockerfile on that base (--pull-never), torch from the local CPU wheel folder, the host's CA
#    bundle mounted so pip inside the build reaches the package index;
# 3. `hubconv devhub` (a loopback Hub) from the repo's .venv, then the image's ENTRYPOINT under `buildah run` with a
#    GitHub-like environment (release.published event, repo mounted at /github/workspace) on the host network;
# 4. checks: exit 0, GITHUB_OUTPUT has commit-sha and smoke-status=pass, the Hub repo's main and the release tag
#    point at that commit, the fsspec backends for checkpoint URLs (https, s3, gs, hf) import in the image. Prints the image size and the time of each phase; exits non-zero on any failure.
#
# Environment (all optional): IMAGE (localhost/hubconv:verify), BASE_IMAGE (localhost/hubconv-base:bookworm),
# DEBIAN_MIRROR (from the apt sources), WHEELS (pip's find-links, else /opt/wheels), TORCH_SPEC (pip arguments for
# torch inside the build; default the CPU wheel from $WHEELS mounted at /wheels), KEEP_IMAGE=0 removes the built
# image at the end, REBUILD_BASE=1 re-creates the base image, SKIP_BUILD=1 reuses an existing $IMAGE,
# RUNNER_TEMP_AS_ON_GITHUB=1 passes RUNNER_TEMP unmounted, as GitHub's runner does.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

IMAGE=${IMAGE:-localhost/hubconv:verify}
BASE_IMAGE=${BASE_IMAGE:-localhost/hubconv-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
ORG=hubconv-demo
HUB_REPO=$ORG/tiny-llama3-torchtitan
CONFIG=examples/tiny-llama3-torchtitan/.hubconv.yml
EVENT_JSON=tests/data/webhooks/release.published.json

export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
BUILDAH=(buildah --storage-driver vfs)

log() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'verify-image: FAILED: %s\n' "$*" >&2; exit 1; }
TIMES=()
phase_start() { PHASE=$1; PHASE_T0=$SECONDS; log "$PHASE"; }
phase_end() { TIMES+=("$(printf '%-28s %4ss' "$PHASE" $((SECONDS - PHASE_T0)))"); }

[[ $(id -u) -eq 0 ]] || die "run as root (buildah vfs + chroot isolation, debootstrap)"

WORK=$(mktemp -d /tmp/hubconv-verify.XXXXXX)
DEVHUB_PID=
CTR=
cleanup() {
    local rc=$?
    set +e
    if [[ -n $DEVHUB_PID ]] && kill -0 "$DEVHUB_PID" 2>/dev/null; then
        kill "$DEVHUB_PID" && wait "$DEVHUB_PID" 2>/dev/null
    fi
    [[ -n $CTR ]] && "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1
    [[ ${KEEP_IMAGE:-1} == 0 ]] && "${BUILDAH[@]}" rmi "$IMAGE" >/dev/null 2>&1
    rm -rf "$WORK"
    if ((${#TIMES[@]})); then
        printf '\nphase timings:\n' >&2
        printf '  %s\n' "${TIMES[@]}" >&2
    fi
    ((rc == 0)) && echo "verify-image: OK" >&2 || echo "verify-image: FAILED (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------------- tools
phase_start "tools (buildah, debootstrap)"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends buildah debootstrap ca-certificates curl >/dev/null
fi
command -v curl >/dev/null || die "curl is missing"
buildah --version
if [[ ! -x .venv/bin/hubconv ]]; then
    make setup
fi
# containers left behind by an interrupted earlier run
"${BUILDAH[@]}" containers --format '{{.ContainerName}}' 2>/dev/null | grep -E '^hubconv-verify-[0-9]+$' \
    | xargs -r "${BUILDAH[@]}" rm >/dev/null || true
phase_end

# ---------------------------------------------------------------------------------------------------------- base
image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

debian_mirror() {
    # The machine's Debian mirror (deb822 .sources or one-line sources.list), else deb.debian.org.
    local uri
    uri=$(grep -hsE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    if [[ -z $uri ]]; then
        uri=$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

phase_start "base image $BASE_IMAGE"
if [[ ${REBUILD_BASE:-0} == 1 ]] && image_exists "$BASE_IMAGE"; then
    "${BUILDAH[@]}" rmi "$BASE_IMAGE" >/dev/null
fi
if image_exists "$BASE_IMAGE"; then
    echo "kept existing $BASE_IMAGE"
else
    MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
    ROOTFS=$WORK/rootfs
    echo "debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    SECURITY=${MIRROR%/debian}/debian-security
    [[ $MIRROR == */debian ]] || SECURITY=http://deb.debian.org/debian-security
    cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/var/log/*.log "$ROOTFS"/etc/resolv.conf "$ROOTFS"/etc/hostname
    base_ctr=$("${BUILDAH[@]}" from --pull-never scratch)
    base_mnt=$("${BUILDAH[@]}" mount "$base_ctr")
    tar -C "$ROOTFS" -cf - . | tar -C "$base_mnt" -xpf -
    "${BUILDAH[@]}" umount "$base_ctr" >/dev/null
    "${BUILDAH[@]}" config --os linux --arch amd64 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd /bin/bash --label org.opencontainers.image.description="Debian bookworm + python3 (debootstrap)" \
        "$base_ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$base_ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOTFS"
fi
phase_end

# ---------------------------------------------------------------------------------------------------------- build
WHEELS=${WHEELS:-$(pip config get global.find-links 2>/dev/null | awk '{print $1}' || true)}
WHEELS=${WHEELS:-/opt/wheels}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0+cpu --find-links /wheels"}
[[ -d $WHEELS ]] || die "wheel folder $WHEELS is missing (set WHEELS)"
[[ -f $CA_BUNDLE ]] || die "CA bundle $CA_BUNDLE is missing"

phase_start "build $IMAGE"
if [[ ${SKIP_BUILD:-0} == 1 ]] && image_exists "$IMAGE"; then
    echo "SKIP_BUILD=1: reusing $IMAGE"
else
old_id=$("${BUILDAH[@]}" images -q --no-trunc "$IMAGE" 2>/dev/null || true)
"${BUILDAH[@]}" bud --isolation chroot --pull-never --layers=false \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
    --volume "$WHEELS:/wheels:ro" \
    -f Dockerfile -t "$IMAGE" .
new_id=$("${BUILDAH[@]}" images -q --no-trunc "$IMAGE")
if [[ -n $old_id && $old_id != "$new_id" ]]; then
    "${BUILDAH[@]}" rmi "$old_id" >/dev/null 2>&1 || true  # the previous run's image, now untagged
fi
fi
phase_end

# ---------------------------------------------------------------------------------------------------------- run
phase_start "release through the entrypoint"
mapfile -t ENTRYPOINT < <("${BUILDAH[@]}" inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
[[ ${ENTRYPOINT[*]} == "/usr/local/bin/hubconv action" ]] || die "unexpected ENTRYPOINT: ${ENTRYPOINT[*]}"
WORKDIR=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.WorkingDir}}' "$IMAGE")
[[ -z $WORKDIR || $WORKDIR == / ]] || die "the image sets WORKDIR $WORKDIR (GitHub overrides it; leave it unset)"

PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=hf_verify_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
HUB=http://127.0.0.1:$PORT
mkdir -p "$WORK/hub" "$WORK/home" "$WORK/workflow" "$WORK/file_commands" "$WORK/runner_temp"
.venv/bin/hubconv devhub --host 127.0.0.1 --port "$PORT" --data "$WORK/hub" --token "$TOKEN" --org "$ORG" \
    >"$WORK/devhub.log" 2>&1 &
DEVHUB_PID=$!
for _ in $(seq 100); do
    curl -fsS -o /dev/null "$HUB/api/whoami-v2" -H "Authorization: Bearer $TOKEN" 2>/dev/null && break
    kill -0 "$DEVHUB_PID" 2>/dev/null || { cat "$WORK/devhub.log" >&2; die "devhub exited"; }
    sleep 0.2
done
curl -fsS -o /dev/null "$HUB/api/whoami-v2" -H "Authorization: Bearer $TOKEN" || die "devhub did not come up on $HUB"
echo "devhub on $HUB (pid $DEVHUB_PID)"

cp "$EVENT_JSON" "$WORK/workflow/event.json"
: >"$WORK/file_commands/set_output"
: >"$WORK/file_commands/step_summary"
TAG=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["release"]["tag_name"])' "$EVENT_JSON")

# The mounts and variables GitHub's runner gives a Docker container action (paths under /github). One difference:
# the real runner passes the host's RUNNER_TEMP (/home/runner/work/_temp) WITHOUT mounting it (actions/runner#1984);
# here it is a mounted folder unless RUNNER_TEMP_AS_ON_GITHUB=1, which reproduces the runner exactly.
CTR_RUNNER_TEMP=/github/runner_temp
[[ ${RUNNER_TEMP_AS_ON_GITHUB:-0} == 1 ]] && CTR_RUNNER_TEMP=/home/runner/work/_temp
CTR=$("${BUILDAH[@]}" from --pull-never --name "hubconv-verify-$$" "$IMAGE")
set +e
"${BUILDAH[@]}" run --isolation chroot --network host \
    --volume "$REPO:/github/workspace:rw" \
    --volume "$WORK/home:/github/home:rw" \
    --volume "$WORK/workflow:/github/workflow:rw" \
    --volume "$WORK/file_commands:/github/file_commands:rw" \
    --volume "$WORK/runner_temp:/github/runner_temp:rw" \
    --env HOME=/github/home \
    --env CI=true \
    --env GITHUB_ACTIONS=true \
    --env GITHUB_EVENT_NAME=release \
    --env GITHUB_EVENT_PATH=/github/workflow/event.json \
    --env GITHUB_WORKSPACE=/github/workspace \
    --env GITHUB_OUTPUT=/github/file_commands/set_output \
    --env GITHUB_STEP_SUMMARY=/github/file_commands/step_summary \
    --env RUNNER_TEMP="$CTR_RUNNER_TEMP" \
    --env GITHUB_REPOSITORY=hubconv/hubconv \
    --env GITHUB_SHA="$(git rev-parse HEAD 2>/dev/null || printf '0%.0s' {1..40})" \
    --env GITHUB_REF="refs/tags/$TAG" \
    --env GITHUB_SERVER_URL=https://github.com \
    --env GITHUB_API_URL=https://api.github.com \
    --env INPUT_CONFIG="$CONFIG" \
    --env INPUT_ENDPOINT="$HUB" \
    --env "INPUT_HF-TOKEN=$TOKEN" \
    --env INPUT_DRY-RUN=false \
    --env INPUT_CREATE-PR=false \
    --env INPUT_PRIVATE=false \
    --env INPUT_COMMENT=true \
    "$CTR" -- "${ENTRYPOINT[@]}"
rc=$?
set -e
((rc == 0)) || die "the entrypoint exited $rc"
phase_end

# ---------------------------------------------------------------------------------------------------------- checks
phase_start "checks"
echo "--- GITHUB_OUTPUT"
cat "$WORK/file_commands/set_output"
# name<<delimiter / value lines / delimiter (the multi-line form `hubconv action` writes)
output() {
    awk -v want="$1" '
        !delim && index($0, "<<") { split($0, a, "<<"); name = a[1]; delim = a[2]; value = ""; n = 0; next }
        delim && $0 == delim { if (name == want) { print value; found = 1 } delim = ""; next }
        delim { value = (n++ ? value "\n" : "") $0 }
        END { exit !found }' "$WORK/file_commands/set_output"
}
SHA=$(output commit-sha) || die "GITHUB_OUTPUT has no commit-sha"
SMOKE=$(output smoke-status) || die "GITHUB_OUTPUT has no smoke-status"
HUB_TAG=$(output hub-tag || true)
[[ $SHA =~ ^[0-9a-f]{40}$ ]] || die "commit-sha is not a commit id: '$SHA'"
[[ $SMOKE == pass ]] || die "smoke-status is '$SMOKE', not pass"
[[ $HUB_TAG == "$TAG" ]] || die "hub-tag is '$HUB_TAG', expected the release tag $TAG"
[[ -s $WORK/file_commands/step_summary ]] || die "the job summary is empty"

hub_sha() {
    curl -fsS -H "Authorization: Bearer $TOKEN" "$HUB/api/models/$HUB_REPO$1" \
        | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["sha"])'
}
MAIN_SHA=$(hub_sha "") || die "cannot read $HUB_REPO from devhub"
TAG_SHA=$(hub_sha "/revision/$TAG") || die "cannot read $HUB_REPO@$TAG from devhub"
[[ $MAIN_SHA == "$SHA" ]] || die "$HUB_REPO main is $MAIN_SHA, the action reported $SHA"
[[ $TAG_SHA == "$SHA" ]] || die "$HUB_REPO tag $TAG is $TAG_SHA, the action reported $SHA"
curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" "$HUB/$HUB_REPO/resolve/$SHA/model.safetensors" \
    || die "model.safetensors is not in commit $SHA"
echo "devhub $HUB_REPO: main = tag $TAG = $SHA (smoke-status $SMOKE)"
# the fsspec backends the image ships for checkpoint URLs import (no network: classes only)
"${BUILDAH[@]}" run --isolation chroot "$CTR" -- python3 -c \
    'import fsspec; print("fsspec backends:", *[fsspec.get_filesystem_class(p).__name__ for p in ("https", "s3", "gs", "hf")])' \
    || die "an fsspec backend is missing from the image"
phase_end

echo
"${BUILDAH[@]}" images "$IMAGE"
"${BUILDAH[@]}" images --noheading "$BASE_IMAGE"
