"""The GPU-only paths CI cannot run, checked against the real vLLM and Ray Serve LLM packages on a CPU:

    ~/.cache/rebase/vllm-venv/bin/python benchmarks/vllm_contract.py

Run with a Python that has `vllm` and `ray[serve,llm]` installed (a separate environment: vLLM pins its
own CUDA torch) and this checkout installed with `pip install -e . --no-deps`. From our own config files
(jobs/configs/cluster.yaml, jobs/serve.yaml, a shipped task) it builds exactly what the `vllm` engine and
`rebase serve --engine vllm` build, without starting an engine or needing a GPU, and checks each against
the installed libraries:
1. `vllm_llm_kwargs`: every keyword is a parameter of `vllm.LLM` or a field of `vllm.EngineArgs`, and
   `LLM(**kwargs)` runs vLLM's own code up to the engine start (patched out: the one thing that needs a
   GPU), keeping our values; its structured-output config writes JSON without free whitespace;
2. `vllm_sampling_params` for the teacher (the task's JSON schema) and the student (stop strings): the
   `SamplingParams` constructs, and the schema passes the xgrammar validation vLLM runs on each request;
3. the calls `VLLMEngine` makes on `LLM` and the fields it reads from its outputs exist;
4. `vllm_llm_config` constructs Ray Serve LLM's `LLMConfig` with our name, model and scaling, and
   `build_app` (what `serve run jobs/serve.yaml` imports) returns the application of `build_openai_app`
   (which starts a local Ray to read the cluster's resources, but deploys nothing).
Prints the versions and one PASS/FAIL line per check; exits 1 on any FAIL. tests/test_vllm_contract.py
runs the same checks under pytest where vllm imports.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from vllm import EngineArgs

    from rebase.config import ServeConfig, TransformConfig
    from rebase.generate.engines import GenerationParams

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "jobs" / "configs" / "cluster.yaml"  # the GPU cluster's pipeline: transform on vllm
SERVE = ROOT / "jobs" / "serve.yaml"  # the Ray Serve config `serve run` / `serve deploy` reads
PACKAGES = ("vllm", "ray", "torch", "transformers", "xgrammar")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


def transform_config() -> TransformConfig:
    """The transform stage's config as `rebase run jobs/configs/cluster.yaml` builds it (engine vllm)."""
    from rebase.pipeline import load_pipeline

    config = load_pipeline(PIPELINE).stage_config("transform", Path("RUN"))  # its task path is relative to ROOT
    assert config.engine == "vllm", f"{PIPELINE.name}: transform.engine is {config.engine}, expected vllm"
    return config


def llm_kwargs() -> dict:
    """What the vllm engine passes to `vllm.LLM` for the cluster pipeline's teacher, with the options the
    generation pool hands every engine (rebase/generate/pool.py)."""
    from rebase.generate.engines import vllm_llm_kwargs

    config = transform_config()
    return vllm_llm_kwargs(
        config.teacher, gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len
    )


class _EngineStart(Exception):
    """Raised where `LLM` would start vLLM's engine; carries the EngineArgs it built up to there."""

    def __init__(self, engine_args):
        super().__init__("engine start stopped")
        self.engine_args = engine_args


def engine_args(kwargs: dict) -> EngineArgs:
    """The `EngineArgs` that `vllm.LLM(**kwargs)` builds, by vLLM's own code, stopped just before it starts
    an engine (the one boundary a CPU machine cannot cross)."""
    from unittest import mock

    import vllm.entrypoints.llm as entrypoint
    from vllm import LLM

    def stop(*_, **given):
        raise _EngineStart(given["engine_args"])

    with mock.patch.object(entrypoint.LLMEngine, "from_engine_args", side_effect=stop):
        try:
            LLM(**kwargs)
        except _EngineStart as started:
            return started.engine_args
    raise AssertionError("LLM did not build its engine through LLMEngine.from_engine_args")


def check_llm_kwargs(_: Path) -> str:
    """Every keyword is one `LLM.__init__` names or one `EngineArgs` takes through `**kwargs`, and the
    EngineArgs `LLM` builds from them keeps our values."""
    from vllm import LLM, EngineArgs

    kwargs = llm_kwargs()
    named = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - named - {field.name for field in fields(EngineArgs)})
    assert not unknown, f"LLM and EngineArgs take no keyword {unknown}"
    args = engine_args(kwargs)
    for name, value in kwargs.items():
        built = getattr(args, name)
        if isinstance(value, dict):  # LLM turns a dict into vLLM's config object
            built = {key: getattr(built, key) for key in value}
        assert built == value, f"EngineArgs.{name} is {built!r}, we passed {value!r}"
    return f"LLM({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def check_structured_outputs_config(_: Path) -> str:
    """The engine's structured-output settings that `LLM` builds from our kwargs make JSON without free
    whitespace, as the transformers engine writes it. vLLM (0.29 to 0.33 at least) reads
    `disable_any_whitespace` from the engine's config only, never from a request's `StructuredOutputsParams`."""
    config = engine_args(llm_kwargs()).structured_outputs_config
    assert config.disable_any_whitespace, (
        "LLM's structured_outputs_config.disable_any_whitespace is False, so its JSON may hold whitespace "
        "(a request's StructuredOutputsParams.disable_any_whitespace is not read); pass "
        "structured_outputs_config={'backend': 'xgrammar', 'disable_any_whitespace': True} to LLM"
    )
    return f"backend={config.backend}, disable_any_whitespace={config.disable_any_whitespace}"


def teacher_params() -> GenerationParams:
    """The teacher's generation settings in `rebase transform` (rebase/teacher/transform.py) for the
    cluster pipeline's task: its answer's JSON schema, greedy."""
    from rebase.generate.engines import GenerationParams
    from rebase.task import load_task
    from rebase.teacher.prompts import output_schema

    config = transform_config()
    return GenerationParams(config.max_new_tokens, config.temperature, output_schema(load_task(ROOT / config.task)))


def student_params() -> GenerationParams:
    """The student's generation settings in `rebase evaluate --engine vllm` (rebase/evaluate.py)."""
    from rebase.config import EvaluateConfig
    from rebase.generate.engines import GenerationParams
    from rebase.task import STUDENT_STOP

    config = EvaluateConfig(model="RUN/train", task=transform_config().task, out=Path("RUN/evaluate"), engine="vllm")
    return GenerationParams(config.max_new_tokens, config.temperature, None, stop=STUDENT_STOP)


def check_teacher_sampling(_: Path) -> str:
    """SamplingParams with our schema constructs and passes the xgrammar validation vLLM runs per request
    (with backend auto it falls back to another backend, slower, when xgrammar rejects a schema)."""
    from vllm import SamplingParams
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    from rebase.generate.engines import vllm_sampling_params

    params = teacher_params()
    sampling = vllm_sampling_params(params)
    assert isinstance(sampling, SamplingParams), f"got {type(sampling).__name__}, not SamplingParams"
    structured = sampling.structured_outputs
    assert structured is not None and structured.json == params.json_schema, "the schema did not reach vLLM"
    assert (sampling.max_tokens, sampling.temperature) == (params.max_new_tokens, params.temperature)
    validate_xgrammar_grammar(sampling)
    labels = params.json_schema["properties"]["output"].get("enum")
    return f"max_tokens={sampling.max_tokens}, temperature={sampling.temperature}, json keys " + (
        f"{list(params.json_schema['properties'])}, output one of {labels}"
    )


def check_student_sampling(_: Path) -> str:
    """SamplingParams with the student's stop strings constructs and keeps them (cut, not included)."""
    from rebase.generate.engines import vllm_sampling_params

    params = student_params()
    sampling = vllm_sampling_params(params)
    assert sampling.stop == params.stop, f"stop is {sampling.stop!r}, we passed {params.stop!r}"
    assert not sampling.include_stop_str_in_output
    assert sampling.structured_outputs is None
    return f"max_tokens={sampling.max_tokens}, stop={sampling.stop!r}"


def check_engine_calls(_: Path) -> str:
    """The calls VLLMEngine makes (`get_tokenizer`, `generate`/`chat` with `use_tqdm`) and the output
    fields it reads (`prompt_token_ids`, `outputs[0].text/token_ids/finish_reason`) exist."""
    from vllm import LLM, CompletionOutput, RequestOutput

    for method in ("generate", "chat"):
        inspect.signature(getattr(LLM, method)).bind(None, [], None, use_tqdm=False)
    assert callable(LLM.get_tokenizer)
    outputs = set(inspect.signature(RequestOutput.__init__).parameters)
    missing = {"prompt_token_ids", "outputs"} - outputs
    completion = {field.name for field in fields(CompletionOutput)}
    missing |= {"text", "token_ids", "finish_reason"} - completion
    assert not missing, f"vLLM's outputs have no {sorted(missing)}"
    return "LLM.generate/chat(prompts, sampling, use_tqdm=False), RequestOutput and CompletionOutput fields"


def student_directory(workdir: Path) -> Path:
    """A stand-in for the student directory `rebase train` leaves (only its config.json: nothing is loaded)."""
    student = workdir / "train"
    student.mkdir(parents=True, exist_ok=True)
    (student / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    return student


def serve_config(workdir: Path) -> ServeConfig:
    """The ServeConfig of jobs/serve.yaml's application with `engine: vllm` and a student directory, as
    `build_app` validates its `args`."""
    from rebase.config import ServeConfig, build_config

    args = yaml.safe_load(SERVE.read_text())["applications"][0]["args"]
    args = {**args, "engine": "vllm", "model": str(student_directory(workdir))}
    return build_config(ServeConfig, args, "serve config")


def check_llm_config(workdir: Path) -> str:
    """`vllm_llm_config` builds Ray Serve LLM's `LLMConfig` with our served name, model and scaling."""
    from ray.serve.llm import LLMConfig

    from rebase.serve import served_name, vllm_llm_config

    config = serve_config(workdir)
    llm = vllm_llm_config(config)
    assert isinstance(llm, LLMConfig), f"got {type(llm).__name__}, not LLMConfig"
    loading = llm.model_loading_config
    assert loading.model_id == served_name(config), f"model_id {loading.model_id}"
    assert loading.model_source == str(Path(config.model[0]).resolve()), f"model_source {loading.model_source}"
    scaling = llm.deployment_config.get("autoscaling_config") or {}
    replicas = scaling.get("min_replicas"), scaling.get("max_replicas")
    assert replicas == (config.min_replicas, config.max_replicas), f"replicas {replicas}"
    return f"model_id={loading.model_id}, replicas {replicas[0]}..{replicas[1]}, " + (
        f"max_ongoing_requests={llm.deployment_config.get('max_ongoing_requests')}"
    )


def check_openai_app(workdir: Path) -> str:
    """`build_app` with engine vllm returns the Serve application of `build_openai_app` (not run)."""
    from ray.serve import Application

    from rebase.serve import build_app

    app = build_app(serve_config(workdir))
    assert isinstance(app, Application), f"got {type(app).__name__}, not a Serve Application"
    return f"{type(app).__name__} from ray.serve.llm.build_openai_app"


CHECKS: tuple[Callable[[Path], str], ...] = (
    check_llm_kwargs,
    check_structured_outputs_config,
    check_teacher_sampling,
    check_student_sampling,
    check_engine_calls,
    check_llm_config,
    check_openai_app,
)


def run_check(check: Callable[[Path], str], workdir: Path) -> CheckResult:
    """One check's result: PASS with what it built, or FAIL with the library's reason."""
    name = check.__name__.removeprefix("check_")
    try:
        return CheckResult(name, True, check(workdir))
    except Exception as error:
        return CheckResult(name, False, f"{type(error).__name__}: {error}".splitlines()[0])


def versions() -> str:
    """The installed versions the checks ran against."""
    return " ".join(f"{name}=={version(name)}" for name in PACKAGES)


def main() -> int:
    """Run every check, print the versions and one line per check; 1 if any failed."""
    print(f"versions: {versions()}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_check(check, Path(workdir)) for check in CHECKS]
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'} {result.name}: {result.detail}")
    failed = sum(not result.passed for result in results)
    print(f"vllm contract: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
