# Sourced by the .ci/run stages that run tools against the binary (tests/conformance/run.sh,
# tests/sdk/run.sh): their shared scaffolding.

# python_venv DIR REQUIREMENTS: makes DIR a venv holding exactly what the pinned REQUIREMENTS
# file names. It is kept between runs and rebuilt from scratch when that file changes, so that a
# stale tool never answers for a new pin.
python_venv() {
    local venv=$1 requirements=$2 digest
    digest=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$digest" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
        echo "$digest" >"$venv/.requirements"
    fi
}

# service_workdir: sets `work` to a fresh temporary directory and `pid` to empty; at exit the
# service whose pid the stage stores in `pid` is stopped and the directory removed.
service_workdir() {
    work="$(mktemp -d)"
    pid=""
    trap service_cleanup EXIT
}

service_cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}

# free_port: prints a loopback port nobody listens on now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
