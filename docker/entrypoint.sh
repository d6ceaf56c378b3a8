#!/usr/bin/env bash
# Entrypoint of the hospital-fl site and server images (run under tini as PID 1).
#
#   (no arguments)  start the FLARE participant whose startup kit is mounted read-only at
#                   $FL_KIT_DIR (/kit), with its writable workspace at $FL_WORKSPACE (/workspace)
#   healthcheck     exit 0 while a FLARE client or server parent process is alive
#   anything else   run it as given, e.g. the command the kit's startup/docker.sh passes
#                   (that script mounts the kit itself read-write at /workspace) or
#                   `hospital-fl site check ...`
#
# Why a copy: FLARE writes into its workspace root (log.txt, pid files, transfer/, one folder
# per job, the site's privacy ledger under privacy/), and that root is the kit folder itself
# when a kit is started in place. The kit holds the site's private key and signed policies, so
# it is mounted read-only and FLARE's own startup/sub_start.sh does the rest: with
# NVFL_WORKSPACE set to another folder it copies the kit to $NVFL_WORKSPACE/kit, links
# startup/ and local/ there, and runs FLARE with $NVFL_WORKSPACE as its workspace root. The
# copy is made afresh at every start; job folders, logs and the privacy ledger in the
# workspace are kept.
set -euo pipefail

KIT_DIR=${FL_KIT_DIR:-/kit}
WORKSPACE=${FL_WORKSPACE:-/workspace}

die() {
    echo "hospital-fl: $*" >&2
    exit 1
}

healthcheck() {
    # /proc only: no extra process tools in the image. "[c]lient" keeps grep's own command
    # line from matching.
    grep -qsa -E 'nvflare\.private\.fed\.app\.(client\.[c]lient|server\.[s]erver)_train' /proc/[0-9]*/cmdline
}

start_kit() {
    if [[ ! -f "$KIT_DIR/startup/sub_start.sh" ]]; then
        die "no FLARE startup kit at $KIT_DIR: mount the participant's kit folder there read-only (-v /path/to/kit:$KIT_DIR:ro)"
    fi
    if [[ "$KIT_DIR" == "$WORKSPACE" || "$KIT_DIR" == "$WORKSPACE"/* ]]; then
        die "the kit ($KIT_DIR) must be mounted outside the workspace ($WORKSPACE)"
    fi
    if [[ ! -d "$WORKSPACE" || ! -w "$WORKSPACE" ]]; then
        die "$WORKSPACE is not writable by uid $(id -u): mount a writable volume there (FLARE writes its logs, jobs and the privacy ledger to it)"
    fi
    local key
    for key in "$KIT_DIR"/startup/*.key; do
        if [[ -e "$key" && ! -r "$key" ]]; then
            die "$key is not readable by uid $(id -u): run the container as the kit's owner (build with --build-arg FL_UID=\$(id -u) and run with --user \$(id -u):\$(id -g))"
        fi
    done

    # FLARE signs a kit's startup/ and local/ (each with its own signature.json) when HE is
    # on: check every signed folder against the kit's root CA before anything runs, so an
    # altered policy or key is refused. FL_VERIFY_KIT=false skips it.
    if [[ "${FL_VERIFY_KIT:-true}" != false ]]; then
        local folder
        for folder in "$KIT_DIR" "$KIT_DIR/startup" "$KIT_DIR/local"; do
            if [[ -f "$folder/signature.json" ]]; then
                python3 -m nvflare.tool.verify_startup_kits -f "$folder" -c "$KIT_DIR/startup/rootCA.pem" ||
                    die "$folder does not match its signature.json (signed by the kit's root CA): use the kit as provisioned"
            fi
        done
    fi

    export NVFL_WORKSPACE="$WORKSPACE"
    # --once: FLARE runs in the foreground without its restart loop; the container's restart
    # policy restarts it.
    echo "hospital-fl: starting FLARE from $KIT_DIR (read-only) in workspace $WORKSPACE"
    exec bash "$KIT_DIR/startup/sub_start.sh" --once
}

case "${1:-}" in
"") start_kit ;;
healthcheck) healthcheck ;;
*) exec "$@" ;;
esac
