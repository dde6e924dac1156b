# Developer shortcuts; each wraps ./dev, which bootstraps .venv on first use.

# bring the system up (embedded services where no URL is set)
up manifest="manifests/monolith.toml":
    ./dev up -m {{manifest}}

# run the tests (pytest arguments pass through)
test *args:
    ./dev test {{args}}

# run a benchmark: just bench rpc
bench name *args:
    ./dev bench {{name}} {{args}}

# lint and type-check
lint:
    ./dev help >/dev/null
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    mkdir -p .aiwfe/typecheck/aiwfe && for d in kernel bus plugins bench testing; do ln -sfn ../../../$d .aiwfe/typecheck/aiwfe/$d; done
    .venv/bin/mypy

# format the code
fmt:
    ./dev help >/dev/null
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .

# validate the shipped manifests
check:
    ./dev check manifests/*.toml
