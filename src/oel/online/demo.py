"""`make demo-online`: the online loop end to end on this machine, in its own project folder.

    python -m oel.online.demo --config examples/online-demo.yaml --dir .cache/demo-online --report reports/online-demo.md

1. start    `oel serve`'s stack (oel.online.stack): the champion (base) on an engine behind the MLflow AI Gateway,
            both on 127.0.0.1
2. before   simulated users (oel.online.simulated_users) talk to the gateway through the openai client, one
            conversation id each, and rate their conversation (`user_feedback`, mlflow.log_feedback)
3. learn    round r1 is declared on that traffic (rounds.r1.collect: {source: traces, until: <now>}) and run stage
            by stage with the `oel` CLI, each a process of its own as scripts/cpu_proof.sh runs them:
            eval of base (the gate's reference), collect, extract, consolidate, headroom, distill, eval
4. gate     `oel promote --round r1`: the gate decides, and a promotion routes the running gateway to r1 (the swap)
5. after    a fresh set of users (the held-out seeds, disjoint from the first) talks to whatever is served now
6. report   success before and after with 95% Wilson intervals and Fisher's exact test, the gate's decision and
            reason, what lines up between traces, feedback and trajectories, and the wall time of every phase

The stack is stopped whatever happens. The folder is started afresh each run (params.yaml, mlruns/, data/,
models/, reports/, logs/); the embedded models and knowledge/ are linked from the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from oel import traces, tracking
from oel.artifacts import read_jsonl, write_json, write_text
from oel.config import Params, load_params
from oel.errors import UserError
from oel.metrics import wilson_interval
from oel.online import simulated_users
from oel.online.simulated_users import Request, Talk
from oel.paths import ProjectPaths
from oel.schemas import Episode

log = logging.getLogger(__name__)

ROUND = "r1"
LEARN = ("collect", "extract", "consolidate", "headroom", "distill", "eval")


class DemoError(UserError, RuntimeError):
    """The demo cannot go on; one line naming the cause and where its log is."""


class RequestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)


class DemoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    users: int = Field(48, gt=0, le=1000)        # per phase: before (user-side seeds), after (held-out seeds)
    concurrency: int = Field(2, gt=0, le=64)     # users talking at once
    request: RequestSettings = RequestSettings()


class DemoConfig(BaseModel):
    """examples/online-demo.yaml: `demo` (the simulated users) and `params` (the demo project's params.yaml)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    demo: DemoSettings = DemoSettings()
    params: dict[str, Any]


@dataclass
class Phase:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class Result:
    settings: dict[str, Any]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    feedback: dict[str, int]
    window: dict[str, Any]
    round: dict[str, Any]
    gate: dict[str, Any]
    phases: list[Phase]
    started: str


def read_config(path: Path) -> DemoConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return DemoConfig.model_validate(raw)
    except (OSError, yaml.YAMLError) as err:
        raise DemoError(f"{path}: cannot read the demo's settings ({err})") from None
    except ValueError as err:
        raise DemoError(f"{path}: {str(err).splitlines()[0]} ({' '.join(str(err).splitlines()[1:3])})") from None


# ---- the project folder -----------------------------------------------------------------------------------------

def prepare(root: Path, repo: Path) -> None:
    """A fresh folder; the embedded models (built once) and the knowledge files linked from the repository."""
    if root.exists():
        shutil.rmtree(root)
    (root / ".cache").mkdir(parents=True)
    (repo / ".cache" / "models").mkdir(parents=True, exist_ok=True)
    (root / ".cache" / "models").symlink_to((repo / ".cache" / "models").resolve(), target_is_directory=True)
    if (repo / "knowledge").is_dir():
        (root / "knowledge").symlink_to((repo / "knowledge").resolve(), target_is_directory=True)


def write_params(root: Path, raw: dict[str, Any], window_until: datetime | None = None) -> Params:
    """params.yaml of the demo project; with `window_until`, r1 is declared on the gateway's traffic until then."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    if window_until is not None:
        experiment = load_params_from(raw).serve.experiment
        raw["rounds"] = {ROUND: {"from": "base", "collect": {
            "source": "traces", "experiment": experiment,
            "until": window_until.isoformat(timespec="milliseconds").replace("+00:00", "Z")}}}
    write_text(root / "params.yaml", yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return load_params(root / "params.yaml")


def load_params_from(raw: dict[str, Any]) -> Params:
    from oel.config import parse_params

    return parse_params(raw, "examples/online-demo.yaml params")


# ---- processes ----------------------------------------------------------------------------------------------------

def oel_command(root: Path, *args: str, timeout: float = 3600) -> str:
    """One `oel` command in the project folder, in a process of its own; its output goes to logs/<name>.log."""
    exe = Path(sys.executable).with_name("oel")
    argv = [str(exe) if exe.exists() else "oel", *args]
    logfile = root / "logs" / f"{'-'.join(args[:3]).replace('--', '')}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info("oel %s", " ".join(args))
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=timeout)
    logfile.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        last = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()][-1:] or ["no output"]
        raise DemoError(f"`oel {' '.join(args)}` failed with exit code {done.returncode}: {last[0][:300]} "
                        f"(log: {logfile})")
    return done.stdout


class Clock:
    """Wall time per phase, in the order they ran."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def run(self, name: str, fn: Callable[[], Any], detail: str = "") -> Any:
        start = time.monotonic()
        out = fn()
        self.phases.append(Phase(name, round(time.monotonic() - start, 1), detail))
        log.info("%s: %.1f s", name, self.phases[-1].seconds)
        return out


# ---- traffic and feedback ---------------------------------------------------------------------------------------

def users_phase(stack: Any, params: Params, settings: DemoSettings, phase: str, seeds: list[int]) -> list[Talk]:
    import openai

    client = openai.OpenAI(base_url=stack.base_url, api_key="unused-by-the-gateway", timeout=300, max_retries=0)
    request = Request(**settings.request.model_dump())
    return simulated_users.talk_all(client, params.serve.endpoint, seeds, params.games.users,
                                    lambda seed: f"demo-{phase}-u{seed}", request, settings.concurrency)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def recorded(params: Params, since_ms: int | None, talks: list[Talk], timeout: float = 120.0
             ) -> tuple[list[traces.Exchange], int]:
    """The phase's answered exchanges as collect will read them (oel.traces), once every request the users sent is
    a trace (the gateway writes them asynchronously); and how many traces the phase's conversations have."""
    wanted = sum(len(t.replies) for t in talks)
    sessions = {t.conversation for t in talks}
    deadline = time.monotonic() + timeout
    while True:
        with tracking.client(params) as client:
            written = _traces_of(client, params.serve.experiment, sessions)
            found, _ = traces.read_exchanges(client, params.serve.experiment, since_ms, now_ms())
        if written >= wanted or time.monotonic() > deadline:
            return [ex for ex in found if ex.session in sessions], written
        time.sleep(1.0)


def _traces_of(client: Any, experiment: str, sessions: set[str]) -> int:
    """Traces of any state in the deployment experiment whose session is one of `sessions`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    count, token = 0, None
    while True:
        page = client.search_traces(locations=[found.experiment_id], max_results=traces.PAGE, page_token=token,
                                    include_spans=False)
        count += sum(t.info.trace_metadata.get(traces.SESSION) in sessions for t in page)
        token = page.token
        if not token:
            return count


def rate(params: Params, talks: list[Talk], exchanges: list[traces.Exchange]) -> dict[str, int]:
    """Each user's rating on the last request of their conversation (tracking.log_feedback: mlflow.log_feedback)."""
    last: dict[str, traces.Exchange] = {}
    for ex in exchanges:
        last[ex.session] = ex  # exchanges come in end order
    counts = {"rated": 0, "unrated": 0}
    for t in talks:
        ex = last.get(t.conversation)
        if ex is None or t.error is not None:
            counts["unrated"] += 1
            continue
        tracking.log_feedback(params, ex.trace_id, t.success, t.last_words or None, t.user)
        counts["rated"] += 1
    return counts


# ---- the round --------------------------------------------------------------------------------------------------

def learn(root: Path, clock: Clock) -> None:
    clock.run("eval base (the gate's reference)", lambda: oel_command(root, "eval", "--round", "base"))
    for stage in LEARN:
        clock.run(f"{stage} {ROUND}", lambda stage=stage: oel_command(root, stage, "--round", ROUND))


def round_summary(root: Path, before_exchanges: list[traces.Exchange]) -> dict[str, Any]:
    """What the round read and how it lines up with the traffic: every trajectory's traces were phase-1 requests."""
    paths = ProjectPaths(root).round(ROUND)
    episodes = read_jsonl(paths.trajectories, Episode)
    served = {ex.trace_id for ex in before_exchanges}
    used = [tid for ep in episodes for tid in ep.trace_ids or ()]
    collect = _stage_json(paths.root / "reports" / ROUND, "collect")
    return {"conversations": len(episodes), "heldout": sum(ep.split == "heldout" for ep in episodes),
            "traces_used": len(used), "traces_served": len(served), "before_trace_ids": sorted(served), "traces_not_served": len(set(used) - served),
            "rated": sum(ep.feedback not in (None, "", "No feedback.") for ep in episodes),
            "successes": sum(ep.success for ep in episodes), "collect": collect,
            "items": _items(paths), "eval": _eval(paths)}


def _stage_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _items(paths: Any) -> list[str]:
    stores = [p for _, p in sorted(paths.store_files().get("chat", []))]
    return [line.strip() for p in stores[:1] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _eval(paths: Any) -> dict[str, Any]:
    try:
        details = json.loads(paths.details.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    gap = details.get("gap", {})
    return {k: gap.get(k) for k in ("prompts", "start", "after") if k in gap}


def gate(root: Path, params: Params) -> dict[str, Any]:
    from oel.online.engine import served_name
    from oel.online.stack import CONFIG_TTL_S
    from oel.rounds.lifecycle import champion, decisions

    said = oel_command(root, "promote", "--round", ROUND)
    record = decisions(params, root)[ROUND]
    served = champion(params, root)
    if record.decision == "champion":
        time.sleep(CONFIG_TTL_S + 2)  # the gateway applies a route change when its cached routes expire
    return {"decision": record.decision, "reason": record.reason, "champion": served, "served": served_name(served),
            "checks": [c.model_dump() for c in record.checks],
            "said": [line for line in said.splitlines() if line.strip()]}


# ---- the whole demo ---------------------------------------------------------------------------------------------

def run(config: DemoConfig, root: Path, repo: Path, started_at: float | None = None) -> Result:
    from oel.online.stack import start
    from oel.seeds import episode_seeds

    root, repo = root.resolve(), repo.resolve()
    clock = Clock()
    if started_at is not None:  # the make target's start: the bootstrap and everything before this process
        clock.phases.append(Phase("setup (bootstrap, before the demo)", round(time.time() - started_at, 1)))
    prepare(root, repo)
    os.chdir(root)
    os.environ["OEL_PROJECT_ROOT"] = str(root)
    params = write_params(root, config.params)
    settings = config.demo
    if not params.games.users.enabled:
        raise DemoError("params.games.users: the simulated users are the users game's personas; enable it")
    clock.run("oel base", lambda: oel_command(root, "base"))
    before_seeds = episode_seeds(params.seed, "users", "user", ROUND, settings.users)
    after_seeds = episode_seeds(params.seed, "users", "heldout", None, settings.users)
    with contextlib.ExitStack() as running:  # the stack stops (gateway, then engine) whatever happens
        stack = clock.run("start the stack (engine + gateway)", lambda: running.enter_context(start(params, root)))
        before = clock.run(f"before: {settings.users} users talk", lambda: users_phase(
            stack, params, settings, "before", before_seeds))
        before_ex, before_traced = recorded(params, None, before)
        feedback = clock.run("before: ratings logged", lambda: rate(params, before, before_ex))
        until = datetime.fromtimestamp((now_ms() + 1) / 1000, UTC)
        time.sleep(1.1)  # the window's end is in the past when collect reads it
        params = write_params(root, config.params, until)
        learn(root, clock)
        summary = round_summary(root, before_ex)
        decided = clock.run("gate (oel promote) and swap", lambda: gate(root, params))
        since = int(until.timestamp() * 1000)
        after = clock.run(f"after: {settings.users} fresh users talk", lambda: users_phase(
            stack, params, settings, "after", after_seeds))
        after_ex, after_traced = recorded(params, since, after)
        after_feedback = clock.run("after: ratings logged", lambda: rate(params, after, after_ex))
    feedback = {"before_rated": feedback["rated"], "before_unrated": feedback["unrated"],
                "after_rated": after_feedback["rated"], "after_unrated": after_feedback["unrated"],
                "before_requests": sum(len(t.replies) for t in before), "before_traced": before_traced,
                "before_answered": len(before_ex), "after_requests": sum(len(t.replies) for t in after),
                "after_traced": after_traced, "after_answered": len(after_ex)}
    return Result(settings=settings.model_dump(), before=[t.dump() for t in before], after=[t.dump() for t in after],
                  feedback=feedback, window={"since": None, "until": until.isoformat(timespec="milliseconds")},
                  round=summary, gate=decided, phases=clock.phases,
                  started=datetime.now(UTC).isoformat(timespec="seconds"))


# ---- the report -------------------------------------------------------------------------------------------------

def success_line(talks: list[dict[str, Any]]) -> dict[str, Any]:
    """k/n with a 95% Wilson interval over the users whose conversation ended (a failed request is not a user's
    verdict), and how many passed on the first reply."""
    ended = [t for t in talks if t["error"] is None]
    k, n = sum(t["success"] for t in ended), len(ended)
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else 0.0, "low": low, "high": high,
            "first": sum(t["passed_at"] == 1 for t in ended), "failed": len(talks) - n,
            "served": sorted({name for t in talks for name in t["served_by"]})}


def compare(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Two-sided Fisher's exact test: different users before and after, so nothing to pair."""
    from scipy.stats import fisher_exact

    if not before["n"] or not after["n"]:
        return None
    table = [[after["k"], after["n"] - after["k"]], [before["k"], before["n"] - before["k"]]]
    return float(fisher_exact(table, alternative="two-sided").pvalue)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _fmt(line: dict[str, Any]) -> str:
    return f"{line['k']}/{line['n']} = {_pct(line['rate'])} [{_pct(line['low'])}, {_pct(line['high'])}]"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def render(result: Result, config_name: str) -> str:
    before, after = success_line(result.before), success_line(result.after)
    p = compare(before, after)
    s, r, g, fb = result.settings, result.round, result.gate, result.feedback
    total = sum(ph.seconds for ph in result.phases)
    lines = [
        "# The online loop on CPU: `make demo-online`",
        "",
        f"Regenerated by `make demo-online` ({config_name}, run {result.started}). **The round's knowledge comes from a "
        "file** (`extract.source: file`, `knowledge/users.md`, one line: \"Always reply in French, even when the "
        "user writes in English.\"), not from the model's own extraction: the embedded SmolLM2-135M writes junk items "
        "(reports/cpu-proof.md sections 1-2). Everything else is the loop as it runs for real: the gateway's traces "
        "of the users' conversations are the round's trajectories, their ratings its feedback.",
        "",
        f"**Users' success: before {_fmt(before)}, after {_fmt(after)}** (95% Wilson intervals; Fisher's exact test, "
        f"two-sided, different users: p = {'n/a' if p is None else f'{p:.2g}'}). **Gate: {g['decision']}** "
        f"({g['reason']}). Served after the gate: {', '.join(after['served']) or 'nothing'}. "
        f"Wall time {_clock(total)}.",
        "",
        "## What ran",
        "",
        "1. `oel serve`'s stack on 127.0.0.1: `transformers serve` with the champion behind the MLflow AI Gateway "
        "(endpoint `oel`, every request a trace in the experiment `oel-deployment`).",
        f"2. **before**: {s['users']} simulated users (the users game's personas, user-side seeds of {ROUND}; "
        f"hidden preference: French, at most {_max_turns(result)} replies) talk to the gateway through the `openai` "
        f"client, {s['concurrency']} at a time, each with its own `X-Conversation-Id`; requests ask for "
        f"max_tokens {s['request']['max_tokens']}, temperature {s['request']['temperature']}, top_p "
        f"{s['request']['top_p']} (temperature 0 is greedy; above 0 the engine samples). A reply that misses the "
        "preference earns the user's complaint as the next "
        f"message (the implicit signal); at the end each user rates the conversation (`user_feedback`: true/false, "
        f"their last words as the rationale) with `mlflow.log_feedback` (oel.tracking.log_feedback, what `oel "
        f"feedback` runs).",
        f"3. **learn**: {ROUND} declared on that traffic (`rounds.{ROUND}.collect: {{source: traces, experiment: "
        f"oel-deployment, until: '{result.window['until']}'}}`), then `oel eval --round base` (the gate's "
        f"reference) and `oel collect/extract/consolidate/headroom/distill/eval --round {ROUND}`, each a process of "
        "its own in the demo's project folder.",
        f"4. **gate**: `oel promote --round {ROUND}`; a promotion routes the running gateway to the new champion.",
        f"5. **after**: {s['users']} fresh users (the held-out seeds, none of them in the round) talk to what is "
        "served now, and rate.",
        "",
        "## Users' success",
        "",
        "| phase | served by | users | success [95% CI] | passed on reply 1 | failed requests |",
        "|---|---|---|---|---|---|",
        f"| before | {', '.join(before['served'])} | {before['n']} | {_fmt(before)} | {before['first']}/{before['n']} "
        f"| {before['failed']} |",
        f"| after | {', '.join(after['served'])} | {after['n']} | {_fmt(after)} | {after['first']}/{after['n']} "
        f"| {after['failed']} |",
        "",
        f"Difference after - before: {_pct(after['rate'] - before['rate'])} "
        f"(Fisher's exact, two-sided: p = {'n/a' if p is None else f'{p:.2g}'}).",
        "",
        "## The round from the traces",
        "",
        f"- Traffic before the gate: {fb['before_requests']} requests, {fb['before_traced']} traces in their "
        f"conversations, {fb['before_answered']} read back as answered chat requests (a blank reply is none); "
        f"{fb['before_rated']} conversations rated ({fb['before_unrated']} unrated). After: {fb['after_requests']} "
        f"requests, {fb['after_traced']} traces, {fb['after_rated']} rated.",
        f"- collect read {r['conversations']} conversations from {r['traces_used']} traces "
        f"({r['traces_not_served']} not among the phase's requests), {r['heldout']} of them held out "
        f"(never trained on); {r['rated']} carry a rating, {r['successes']} rated a success.",
        f"- The store the teacher saw: {'; '.join(r['items']) or '(none)'}",
        f"- eval of {ROUND}: {_gap(r['eval'])}.",
        "",
        "## The gate and the swap",
        "",
        "A round on traffic has no held-out games in its eval (its eval is the consolidation gap), so the gate's "
        "checks against the champion are the OOD probe's alone; the users' success above is measured by this demo "
        "after the swap, not by the gate.",
        "",
        f"- Decision: **{g['decision']}**. Reason: {g['reason']}",
        *[f"- Check: {_check(c)}" for c in g["checks"]],
        f"- Champion after the gate: {g['champion']} (served as `{g['served']}`); the after-phase replies came from "
        f"{', '.join(after['served']) or 'nothing'}.",
        "",
        "## Wall time per phase",
        "",
        "| phase | wall |",
        "|---|---|",
        *[f"| {ph.name} | {_clock(ph.seconds)} |" for ph in result.phases],
        f"| **total** | **{_clock(total)}** |",
        "",
    ]
    return "\n".join(lines)


def _max_turns(result: Result) -> int:
    return max((len(t["replies"]) for t in result.before + result.after), default=0)


def _gap(ev: dict[str, Any]) -> str:
    """The consolidation gap (oel.gap): per-token KL(policy || teacher with the store) on held-out prompts."""
    if not ev.get("start") or not ev.get("after"):
        return "(no gap in the eval)"

    def one(level: dict[str, Any]) -> str:
        return f"{level['kl_mean']:.3f} [{level['kl_ci_low']:.3f}, {level['kl_ci_high']:.3f}]"

    return (f"KL(policy || teacher with the store) per reply token on {ev['prompts']} held-out turn prompts: "
            f"at the round's start {one(ev['start'])}, after distillation {one(ev['after'])} (95% intervals)")


def _check(c: dict[str, Any]) -> str:
    p, rate = c.get("p_value"), c.get("metric", "").endswith(("_pass", "_rate"))
    show = (lambda x: _pct(x)) if rate else (lambda x: f"{x:.3f}")
    pairs = f", {c['pairs']} pairs" if c.get("pairs") else ""
    return (f"{c.get('game')} {c.get('metric')}: {show(c['candidate'])} ({ROUND}) vs {show(c['champion'])} "
            f"(champion; {c.get('test')}{pairs}, p = {'n/a' if p is None else f'{p:.2g}'}, "
            f"{'blocked' if c.get('blocked') else 'not blocked'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The online loop end to end: serve, users, learn, gate, swap.")
    parser.add_argument("--config", type=Path, default=Path("examples/online-demo.yaml"))
    parser.add_argument("--dir", type=Path, default=Path(".cache/demo-online"))
    parser.add_argument("--report", type=Path, default=Path("reports/online-demo.md"))
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the make target started")
    args = parser.parse_args(argv)
    from oel.log import setup_logging

    setup_logging()
    for chatty in ("httpx", "httpx2", "openai"):  # a line per request: the users' progress lines say enough
        logging.getLogger(chatty).setLevel(logging.WARNING)
    repo, folder, report = Path.cwd(), args.dir.resolve(), args.report.resolve()
    try:
        config = read_config(args.config)
        result = run(config, folder, repo, args.started_at)
    except UserError as err:
        log.error("demo-online: %s", err)
        return 2
    write_json(folder / "demo.json", asdict(result))
    write_text(report, render(result, str(args.config)))
    log.info("report: %s", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
