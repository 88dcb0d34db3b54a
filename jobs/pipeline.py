"""Ray job entrypoint for a pipeline: the whole run, or one stage of it with --only STAGE.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py jobs/configs/demo.yaml --root "$PWD"

The job runs in an uploaded copy of the working directory, so `--root` names where relative output paths
(the run directory, a datastore's out) go: the submitting directory on one machine, shared storage
(`/data`) on a cluster. Every flag of `rebase run` works here; a re-submitted run resumes."""

import sys

from rebase.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
