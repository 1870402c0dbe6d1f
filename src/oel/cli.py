"""`oel` console script: one subcommand per stage, plus validate, chat, report, import, demo.

Stage commands take only --round (and --params / --root): hyperparameters live in params.yaml.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from oel.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Online Experiential Learning: collect -> extract -> consolidate -> distill -> eval.")

RoundOpt = Annotated[str, typer.Option("--round", "-r", help="Round id from params.yaml rounds (r1, r2, ...)")]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file")]
RootOpt = Annotated[Path, typer.Option("--root", help="Project root holding data/, models/, reports/")]


def _fail(message: str) -> None:
    # One `error:` line per problem: a chat-log import reports every bad record (file:line), one per line.
    for line in message.splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _guard(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume")


def _stage(name: str, round_id: str, params: Path, root: Path, **options: Any) -> None:
    from oel.stages._common import stage_main

    module = importlib.import_module(f"oel.stages.{'evaluate' if name == 'eval' else name}")
    _guard(stage_main, name, module.run, round_id, params, root, **options)


@app.command()
def validate(params: ParamsOpt = Path("params.yaml"),
             show: Annotated[bool, typer.Option("--show", help="Also print every resolved key (as `oel params`)")]
             = False) -> None:
    """Check a params file: one line naming the offending key, non-zero exit on error."""
    from oel.config import load_params
    from oel.env import setup_env
    from oel.generation import check_backend
    from oel.ood.ifeval import check_requirements

    p = _guard(load_params, params)
    _guard(check_backend, p.generation)  # generation.backend vllm without vllm or CUDA: one line
    setup_env()  # HF_HOME as the stages set it: the cache the IFEval data check looks in
    _guard(check_requirements, p)  # eval.ood: ifeval without lm-eval, CUDA or the IFEval data: one line
    if show:
        params_(params)
    typer.echo(f"{params}: ok (profile {p.profile}, model {p.model.name}, games {', '.join(p.games.enabled())}, "
               f"rounds {', '.join(p.rounds)})")


@app.command("params")
def params_(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the fully resolved params and where each key comes from (file, override, profile, default)."""
    from oel.provenance import render, resolve_file

    profile, entries = _guard(resolve_file, params)
    typer.echo(render(params, profile, entries))


@app.command()
def chat(question: str, model: Annotated[str | None, typer.Option(help="Model spec (default: params model)")] = None,
         params: ParamsOpt = Path("params.yaml"), max_new_tokens: int = 128) -> None:
    """Answer one question with a model (greedy), e.g. oel chat "What is the capital of France?"."""
    from oel.chat import answer
    from oel.config import ModelParams, load_params
    from oel.env import setup_env

    setup_env()
    cfg = load_params(params).model if params.is_file() else ModelParams()
    typer.echo(_guard(answer, question, model or cfg.name, cfg, max_new_tokens))


@app.command()
def base(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Write models/base/policy.json (round 0's policy) from params.model."""
    from oel.config import load_params
    from oel.models import write_policy
    from oel.models.loading import check_spec
    from oel.paths import ProjectPaths
    from oel.schemas import PolicyManifest

    p = _guard(load_params, params)
    _guard(check_spec, p.model.name, root)  # a missing/corrupt model folder must not replace a good manifest
    write_policy(ProjectPaths(root).policy_dir("base"), PolicyManifest(model=p.model.name, round="base"))
    typer.echo(f"models/base -> {p.model.name}")


@app.command()
def collect(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Play the round's user-side seeds with the round's starting policy (no knowledge in context)."""
    _stage("collect", round_id, params, root)


@app.command()
def extract(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Write experiential knowledge items from the round's trajectories into K stores."""
    _stage("extract", round_id, params, root)


@app.command()
def consolidate(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Final budgeted stores + the distillation set (partial rollouts paired with a store)."""
    _stage("consolidate", round_id, params, root)


@app.command()
def distill(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """On-policy context distillation: knowledge into the weights -> models/<round>/ (merged full weights too
    with distill.merge: a param, so DVC sees it)."""
    _stage("distill", round_id, params, root)


@app.command("eval")
def eval_(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Held-out pass rate, token efficiency, headroom and OOD probe of the round's policy (`base` = round 0);
    the teacher level with eval.with_knowledge (a param, so DVC sees it)."""
    _stage("eval", round_id, params, root)


@app.command()
def headroom(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Before distill: the round's start policy with each store vs without, on the round's own user-side seeds
    (never held-out ones); distill trains only where the teacher is better (distill.require_headroom)."""
    _stage("headroom", round_id, params, root)


@app.command("import-trajectories")
def import_trajectories(file: Path, round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"),
                        root: RootOpt = Path("."),
                        fmt: Annotated[str, typer.Option(
                            "--format", help="openai (chat-completions JSONL), oel (trajectory rows) or auto")]
                        = "auto") -> None:
    """Check a deployment log (OpenAI chat JSONL or the trajectory schema) and copy it to the log its round
    declares (rounds.<r>.collect.chatlog), for `dvc repro` to collect; every bad record is one
    `error: file:line` line and nothing is written."""
    from oel.artifacts import file_sha256
    from oel.log import setup_logging
    from oel.rounds.plan import declare_log_hash
    from oel.stages.collect import import_file

    setup_logging()
    n, target = _guard(import_file, file, round_id, params, root, fmt)
    digest = file_sha256(target)
    _guard(declare_log_hash, params, round_id, digest)  # DVC sees the log's bytes through its declared hash
    typer.echo(f"{file}: {n} episodes ok; round {round_id} reads {target} (sha256 {digest[:12]}..., declared in "
               f"{params}; dvc repro collect@{round_id})")


@app.command("log-round")
def log_round(file: Path, round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."),
              fmt: Annotated[str, typer.Option("--format", help="openai, oel or auto")] = "auto") -> None:
    """Learn from a log in one command: import-trajectories, then `dvc repro eval@<round>` (collect, extract,
    consolidate, distill and eval of the round; the eval of a round on chat logs is the consolidation gap)."""
    import subprocess

    if params.resolve() != (root / "params.yaml").resolve():
        # DVC reads the project's params.yaml; a round checked against another file would not be the one run.
        _fail(f"{params}: log-round runs dvc repro, which reads {root / 'params.yaml'}; declare the round there")
    import_trajectories(file, round_id, params, root, fmt)
    dvc = Path(sys.executable).with_name("dvc")  # the dvc of this environment, whatever PATH holds
    rc = subprocess.run([str(dvc) if dvc.exists() else "dvc", "repro", f"eval@{round_id}"], cwd=root).returncode
    if rc != 0:
        _fail(f"dvc repro eval@{round_id} failed (exit {rc}); the stage's error is above")
    typer.echo(f"round {round_id} on {file}: see {root / 'reports' / round_id / 'eval.json'} (`oel report`)")


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Markdown + HTML report across finished rounds -> reports/summary.md."""
    from oel.rounds.report import write_report

    out = _guard(write_report, params, root)
    typer.echo(f"wrote {out}")


@app.command("distill-demo")
def distill_demo(steps: int = 20, model: str = "smollm2-135m-instruct") -> None:
    """Show the mechanism: distil "Always answer in French." into the weights and print before/after."""
    from oel.distill.demo import run_demo

    _guard(run_demo, steps=steps, model_spec=model, echo=typer.echo)


@app.command()
def iterate(params: ParamsOpt = Path("params.yaml"), start_from: Annotated[str | None, typer.Option(
        "--from", help="Policy a newly declared round starts from: a round, base, champion, challenger")] = None) -> None:
    """Advance the loop by one round through the Prefect flow (same as the deployment)."""
    from oel.config import load_params
    from oel.rounds.lifecycle import check_name

    if start_from is not None:  # one line, before the flow (and its lock) starts
        _guard(lambda: check_name(start_from, load_params(params)))
    sys.path.insert(0, str(Path.cwd()))
    from flows.oel_iteration import oel_iteration

    oel_iteration(params_file=str(params), start_from=start_from)


ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (recorded in the decision file, the registry "
                                               "and the report)")]


@app.command()
def promote(round_id: RoundOpt, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."),
            force: Annotated[bool, typer.Option("--force", help="Make the round champion against the gate's "
                                                "decision (needs --reason)")] = False,
            reason: ReasonOpt = None) -> None:
    """The promotion gate on an evaluated round: champion (the next round starts from it) or challenger."""
    from oel.rounds import lifecycle

    p = _setup(params, root)
    if force:
        record = _guard(lambda: lifecycle.force(p, root, round_id, reason or ""))
    else:
        if reason is not None:
            _fail("--reason goes with --force (the gate's own decision says why)")
        record = _guard(lambda: lifecycle.promote(p, root, round_id))
    _mirror(p, root, record)
    typer.echo(f"{round_id}: {record.decision} ({record.reason})")
    if record.decision == "champion" and p.rounds[round_id].source.source != "games" and not p.serve.canary:
        # No held-out games: the gate judged this round on the OOD probe alone.
        typer.echo(f"note: {round_id} learned from conversations, so the gate had no held-out games to play it on; "
                   f"serve.canary > 0 lets its users judge it first (`oel canary`)")
    _follow(p, root, full=False)


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."), reason: ReasonOpt = None) -> None:
    """Give the champion alias back to the champion before the current one (say why with --reason)."""
    from oel.rounds import lifecycle

    p = _setup(params, root)
    record = _guard(lambda: lifecycle.rollback(p, root, reason or ""))
    _mirror(p, root, record)
    typer.echo(f"rolled back {record.round}: champion is {record.champion_after} again ({record.events[-1].reason})")
    _follow(p, root, full=True)  # a rollback takes every request back at once, never as a canary


def _setup(params: Path, root: Path):
    from oel.config import load_params
    from oel.env import setup_env

    setup_env(root)
    return _guard(load_params, params)


def _mirror(params, root: Path, record) -> None:
    """The decision file is written: now the registry's aliases follow it (one line if MLflow fails)."""
    from oel.rounds.registry import register_round

    _guard(register_round, params, root, record)


def _follow(params, root: Path, full: bool) -> None:
    """A running `oel serve` routes where the decision files now say (nothing runs: nothing to do)."""
    from oel.online.engine import served_name
    from oel.online.routes import describe
    from oel.online.stack import CONFIG_TTL_S, route

    routes = _guard(route, params, root, full)
    if routes is not None:
        typer.echo(f"gateway {params.serve.endpoint}: {describe(routes, served_name)} (in effect within "
                   f"{CONFIG_TTL_S} s)")


@app.command()
def serve(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Serve the champion behind the MLflow AI Gateway on 127.0.0.1 (serve section) until Ctrl-C: every request
    is a trace in serve.experiment; `oel promote` and `oel rollback` move the gateway while it runs."""
    from oel.log import setup_logging
    from oel.online.stack import run

    p = _setup(params, root)
    setup_logging()
    _guard(run, p, root, typer.echo)


@app.command()
def route(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."),
          full: Annotated[bool, typer.Option("--full", help="Every request to the champion (ends a canary)")]
          = False) -> None:
    """Point the running gateway where the decision files say: the champion, first at serve.canary's share."""
    from oel.online.engine import served_name
    from oel.online.routes import describe
    from oel.online.stack import CONFIG_TTL_S
    from oel.online.stack import route as route_

    p = _setup(params, root)
    routes = _guard(route_, p, root, full)
    if routes is None:
        _fail(f"no `oel serve` runs for {root.resolve()}; start it (it routes to the champion)")
    typer.echo(f"gateway {p.serve.endpoint}: {describe(routes, served_name)} (in effect within {CONFIG_TTL_S} s)")


@app.command()
def canary(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """End the running canary on its users' ratings: every request to the new champion, or, if they rated it
    worse than the previous champion beyond serve.canary_margin, a rollback (not enough ratings yet: no change)."""
    from oel.online.canary import decide

    p = _setup(params, root)
    verdict = _guard(decide, p, root.resolve())
    typer.echo(f"canary {verdict.canary} vs {verdict.incumbent}: {verdict.outcome.replace('_', ' ')} -- "
               f"{verdict.reason}")
    if verdict.outcome == "waiting":
        return
    from oel.rounds.lifecycle import decisions

    _mirror(p, root, decisions(p, root)[verdict.canary])
    _follow(p, root, full=True)


@app.command()
def feedback(trace_id: Annotated[str | None, typer.Argument(help="The served request's trace id (tr-...)")] = None,
             value: Annotated[str, typer.Option("--value", help="true/false, a number, or text (a correction)")]
             = ...,
             rationale: Annotated[str | None, typer.Option("--rationale", help="Why, in the user's words")] = None,
             user: Annotated[str | None, typer.Option("--user", help="Who rated it")] = None,
             conversation: Annotated[str | None, typer.Option(
                 "--conversation", help="Instead of TRACE_ID: the latest request of this conversation")] = None,
             params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """A user's rating or correction of a served answer, as the `user_feedback` assessment on its MLflow trace."""
    from oel.tracking import latest_trace, log_feedback

    if (trace_id is None) == (conversation is None):
        _fail("name the request: a TRACE_ID, or --conversation ID for the conversation's latest request")
    p = _setup(params, root)
    if conversation is not None:
        trace_id = _guard(latest_trace, p, conversation)
    assessment = _guard(log_feedback, p, trace_id, _feedback_value(value), rationale, user)
    typer.echo(f"{trace_id}: user_feedback {value!r} recorded ({assessment})")


def _feedback_value(text: str) -> Any:
    """JSON scalars stay typed (true, 0.5); anything else is the user's words."""
    import json

    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, (bool, int, float, str)) else text


@app.command("rounds")
def rounds_(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Every declared round: its start, alias, the gate's decision and every metric check behind it."""
    from oel.config import load_params
    from oel.rounds.lifecycle import rounds_table

    typer.echo(_guard(lambda: rounds_table(load_params(params), root)))


if __name__ == "__main__":
    app()
