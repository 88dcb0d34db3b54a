"""Ray job entrypoint for one stage on its own: `python jobs/stage.py COMMAND ARGS...` runs `rebase COMMAND ARGS...`

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/stage.py datastore build --config jobs/configs/datastore.yaml --out "$PWD/out/datastore"

COMMAND is datastore, retrieve, transform, train, evaluate or serve, with the flags `rebase COMMAND` takes.
Give absolute output paths: the job runs in an uploaded copy of the working directory."""

import sys

from rebase.cli import main

STAGE_COMMANDS = ("datastore", "retrieve", "transform", "train", "evaluate", "serve")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STAGE_COMMANDS:
        print(f"jobs/stage.py: error: the first argument is one of {', '.join(STAGE_COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1:]))
