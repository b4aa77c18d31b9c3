# Sourced by Ember's Python plugin hosts: sets PYTHON to the program's interpreter, as the language host
# picks it. The engine passes Pulumi.yaml's `virtualenv` runtime option as PULUMI_RUNTIME_VIRTUALENV
# (relative to the program); without one, PULUMI_PYTHON_CMD or python3 on PATH.
if [ -n "${PULUMI_RUNTIME_VIRTUALENV:-}" ]; then
    case $PULUMI_RUNTIME_VIRTUALENV in
        /*) venv=${PULUMI_RUNTIME_VIRTUALENV%/} ;;
        *) venv=$PWD/${PULUMI_RUNTIME_VIRTUALENV%/} ;;
    esac
    if [ ! -x "$venv/bin/python" ]; then
        echo "Pulumi.yaml's virtualenv option names $venv, which is not a virtual environment" >&2
        exit 1
    fi
    PATH="$venv/bin:$PATH"
    export PATH
    unset PYTHONHOME
    PYTHON=$venv/bin/python
else
    PYTHON=${PULUMI_PYTHON_CMD:-python3}
fi
