# Sourced by the stages that run Python tools (tests/conformance/run.sh, tests/sdk/run.sh).
#
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
