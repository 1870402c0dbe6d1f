"""Typed view of params.yaml: the only place hyperparameters and their defaults live.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in params.yaml fails at
load time with the key path instead of silently falling back to a default.
"""

from __future__ import annotations

import copy
import functools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from oel.errors import UserError

ROUND_ID = re.compile(r"^r[1-9][0-9]*$")
STAGES = ("collect", "extract", "consolidate", "headroom", "distill", "eval")
DEFAULT_PARAMS = Path("params.yaml")
IFEVAL = "ifeval"  # eval.ood's third value: lm-eval's IFEval task (oel.ood.ifeval)


class ParamsError(UserError, ValueError):
    """A params file that cannot be used; the message is one line naming the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(_Section):
    # `smollm2-135m-instruct` (embedded, offline), `tiny-random` (tests), an HF hub id, or a local folder.
    name: str = "smollm2-135m-instruct"
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    # Thinking models wrap reasoning in <think>...</think>; the chat template gets enable_thinking=thinking.
    thinking: bool = False


class GenerationParams(_Section):
    """The one generation setting every generating stage reads (oel.rollout.factory.build_backend):
    collect, extract, eval, the OOD probe and distill's student sampling (TRL's vLLM colocate mode)."""
    # transformers: generate() on model.device (the CPU default). vllm: a vLLM engine (CUDA, the GPU lock);
    # a policy with an unmerged adapter is merged into .cache/merged/<fingerprint>/ before vLLM loads it.
    backend: Literal["transformers", "vllm"] = "transformers"
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.85  # collect, extract, eval
    # distill: vLLM shares the GPU with training (student, frozen teacher, optimizer state).
    colocate_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    max_model_len: Annotated[int, Field(ge=0)] = 0  # 0 = the model's own context length
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto = model.dtype


class SamplingParams(_Section):
    temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0 = off
    max_new_tokens: Annotated[int, Field(gt=0, le=32768)] = 64


class GridGameParams(_Section):
    enabled: bool = True
    max_calls: Annotated[int, Field(gt=0, le=100)] = 5
    # hidden = the paper's default (no legend for H, G, X, O...); explained = legend shown to the model.
    prompt_mode: Literal["hidden", "explained"] = "hidden"


class FrozenLakeParams(GridGameParams):
    size: Annotated[int, Field(ge=2, le=12)] = 3
    num_holes: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="after")
    def _holes_fit(self) -> FrozenLakeParams:
        if self.num_holes > self.size * self.size - 3:
            raise ValueError(f"num_holes={self.num_holes} leaves no safe path on a {self.size}x{self.size} grid; "
                             f"use at most {self.size * self.size - 3}")
        return self


class SokobanParams(GridGameParams):
    dim_room: tuple[Annotated[int, Field(ge=5, le=12)], Annotated[int, Field(ge=5, le=12)]] = (6, 6)
    num_boxes: Annotated[int, Field(ge=1, le=4)] = 1


class TextWorldParams(_Section):
    enabled: bool = True
    # tw-make challenge names; each episode's game is generated from (challenge, level, seed) and cached.
    # Default: treasure_hunter level 5 (5 rooms, a 3-move quest spelled out in the objective, a wrong
    # `take` loses) in 8 calls: random play wins 10% [5.5, 17.4], the walkthrough 100% (reports/baselines.md).
    challenges: list[Literal["tw-coin_collector", "tw-treasure_hunter", "tw-simple", "tw-cooking"]] = Field(
        default_factory=lambda: ["tw-treasure_hunter"], min_length=1)
    level: Annotated[int, Field(ge=1, le=300)] = 5
    max_turns: Annotated[int, Field(gt=0, le=200)] = 8
    show_objective: bool = True
    show_admissible_commands: bool = True

    # `level` is tw-make's --level for coin_collector (1-300) and treasure_hunter (1-30); tw-simple maps
    # 1/2/3+ to dense/balanced/sparse rewards, tw-cooking 1/2/3/4+ to growing recipes (games/twmake.py).
    @model_validator(mode="after")
    def _level_fits(self) -> TextWorldParams:
        if "tw-treasure_hunter" in self.challenges and self.level > 30:
            raise ValueError(f"level={self.level} is above tw-treasure_hunter's maximum of 30; lower it or "
                             "drop tw-treasure_hunter from challenges")
        return self


UserPreference = Literal["french", "one_sentence", "question", "short"]


class UsersParams(_Section):
    # Simulated users (games/users.py): each seed is one user with one hidden preference drawn from
    # `preferences`; success = a reply meets it within `max_turns` replies. Off by default.
    enabled: bool = False
    preferences: list[UserPreference] = Field(
        default_factory=lambda: ["french", "one_sentence", "question", "short"], min_length=1)
    max_turns: Annotated[int, Field(gt=0, le=20)] = 3


class GamesParams(_Section):
    frozenlake: FrozenLakeParams = FrozenLakeParams()
    sokoban: SokobanParams = SokobanParams()
    textworld: TextWorldParams = TextWorldParams()
    users: UsersParams = UsersParams()

    def enabled(self) -> list[str]:
        return [name for name in ("frozenlake", "sokoban", "textworld", "users") if getattr(self, name).enabled]

    @model_validator(mode="after")
    def _at_least_one(self) -> GamesParams:
        if not self.enabled():
            raise ValueError("every game is disabled; enable at least one of frozenlake, sokoban, textworld, users")
        return self


class RoundCollect(_Section):
    # Where the round's trajectories come from: `games` (the start policy plays, as the collect section says),
    # `chatlog` (a deployment log: OpenAI chat JSONL or trajectory rows, read and split by collect) or `traces`
    # (the requests the MLflow AI Gateway recorded in `experiment` that ended in (since, until], read by collect).
    # It sits in the round's own declaration, not in the collect section, because dvc.yaml gives each
    # round's collect stage its own declaration to track: a round on logs never reruns earlier game rounds, and
    # a round on traces names its whole snapshot here, so DVC sees a new window as a changed param.
    source: Literal["games", "chatlog", "traces"] = "games"
    chatlog: str | None = None  # the log file, relative to the project root (e.g. chatlogs/week1.jsonl)
    # chatlog: the log's sha256, written by `oel import-trajectories`. DVC tracks this declaration, not the log's
    # bytes (it has no optional per-round deps), so a log edited in place would change nothing DVC sees: with
    # its hash declared, collect refuses any other bytes, and a new hash here reruns the round.
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    experiment: str | None = None  # traces: the deployment experiment the gateway records into
    # traces: the window, quoted ISO 8601 with a timezone ('2026-12-04T14:00:00Z'). `since` is the previous traces
    # round's `until` or later (omitted only by the first one: all traffic before `until`); `until` must be past
    # when collect runs, so the snapshot cannot grow after it is read.
    since: datetime | None = None
    until: datetime | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _quoted(cls, value: Any, info: Any) -> Any:
        # YAML reads an unquoted 2026-12-04T14:00:00Z as a timestamp, and DVC 3.67 stops on a params value of that
        # type ("Unsupported value of type 'datetime'") before collect could say anything.
        if isinstance(value, datetime):
            raise ValueError(f"quote the time, e.g. {info.field_name}: '{_iso(value)}' (DVC tracks this param and "
                             "cannot read an unquoted YAML timestamp)")
        return value

    @field_validator("since", "until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("give a timezone, e.g. 2026-12-04T14:00:00Z (UTC) or +02:00")
        return value.astimezone(UTC) if value is not None else None

    @model_validator(mode="after")
    def _log_named_when_read(self) -> RoundCollect:
        if self.source == "chatlog" and not self.chatlog:
            raise ValueError("source: chatlog needs chatlog: PATH (the log file, e.g. chatlogs/week1.jsonl)")
        stray = " and ".join(k for k in ("chatlog", "sha256") if getattr(self, k))
        if self.source != "chatlog" and stray:
            raise ValueError(f"{stray} {'are' if ' and ' in stray else 'is'} read only with source: chatlog; set it, "
                             f"or drop {stray}")
        window = [k for k in ("experiment", "since", "until") if getattr(self, k) is not None]
        if self.source != "traces" and window:
            raise ValueError(f"{', '.join(window)}: read only with source: traces; set it, or drop them")
        if self.source == "traces":
            if not (self.experiment or "").strip() or self.until is None:
                raise ValueError("source: traces needs experiment: NAME (where the gateway records, serve.experiment) "
                                 "and until: TIME (e.g. 2026-12-04T14:00:00Z)")
            if self.since is not None and self.since >= self.until:
                raise ValueError(f"since {_iso(self.since)} is not before until {_iso(self.until)}")
        return self


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class RoundParams(_Section):
    # The policy this round starts from: `base` or an earlier round id.
    from_: str = Field(alias="from")
    collect: RoundCollect | None = None  # None: the round plays games
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def source(self) -> RoundCollect:
        return self.collect or RoundCollect()


# What oel.scrub finds without a downloaded model (Presidio's regex + checksum recognizers) -> the placeholder label.
SCRUB_LABELS = {"email": "EMAIL", "phone": "PHONE", "card": "CARD", "iban": "IBAN", "ip": "IP", "url": "URL"}
DENY_LABEL = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")


class ScrubParams(_Section):
    """Personal data replaced in a round's conversations (chat logs, traces) before anything is written
    (oel.scrub): each value becomes `[LABEL_n]`, the same value the same placeholder within the round."""
    entities: list[Literal["email", "phone", "card", "iban", "ip", "url"]] = Field(
        default_factory=lambda: list(SCRUB_LABELS))
    # Words or phrases of your own (customer names, project code names) per label, matched whole-word and
    # case-insensitively: deny: {PERSON: [Ada Lovelace], PROJECT: [Falcon]} -> [PERSON_1], [PROJECT_1].
    # The terms are themselves what must not leak: MLflow params and `oel params` show only how many there are.
    deny: dict[str, list[str]] = {}
    allow: list[str] = []  # values found by a recognizer that stay as they are (your public support address)

    @field_validator("entities")
    @classmethod
    def _each_once(cls, entities: list[str]) -> list[str]:
        if len(set(entities)) != len(entities):
            raise ValueError("an entity is listed twice; list each of email, phone, card, iban, ip, url once")
        return entities

    @field_validator("deny")
    @classmethod
    def _deny_terms(cls, deny: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        clean: dict[str, list[str]] = {}
        for label, terms in deny.items():
            if not DENY_LABEL.match(label) or label in SCRUB_LABELS.values():
                raise ValueError(f"label {label!r}: use capitals, digits and '_' (e.g. PERSON), not one of "
                                 f"{', '.join(SCRUB_LABELS.values())}")
            clean[label] = []
            for k, term in enumerate(terms):  # never echoed: the term is what must not leak
                term = " ".join(term.split())
                if not re.search(r"\w", term) or len(term) > 200:
                    raise ValueError(f"{label}[{k}]: a term needs a letter or digit and at most 200 characters")
                if term.casefold() in seen:
                    raise ValueError(f"{label}[{k}]: the same term is already listed under {seen[term.casefold()]}")
                seen[term.casefold()] = label
                clean[label].append(term)
        return clean

    @field_validator("allow")
    @classmethod
    def _allow_values(cls, allow: list[str]) -> list[str]:
        if any(not value.strip() for value in allow):
            raise ValueError("an allowed value is empty; list the exact values to keep, e.g. help@example.com")
        return [value.strip() for value in allow]

    @field_serializer("deny", when_used="json")
    def _deny_counted(self, deny: dict[str, list[str]]) -> dict[str, str]:
        # JSON dumps feed MLflow params, `oel params` and the registry's params hash.
        return {label: f"{len(terms)} term{'s' * (len(terms) != 1)} (not shown)" for label, terms in deny.items()}


class CollectParams(_Section):
    episodes_per_game: Annotated[int, Field(gt=0)] = 6        # user-side (deployment) games -> distill prompts
    # Games the extractor learns from; stores x steps of them (2 x 2) give every store its own games.
    extraction_episodes_per_game: Annotated[int, Field(ge=0)] = 4
    batch_size: Annotated[int, Field(gt=0)] = 16              # episodes played in lockstep
    # The reference's two regimes: deployment games sample at (0.7, top_p 1, top_k off); the games the
    # extractor learns from are played in its validate mode (0.7, top_p 0.8, top_k 20), like eval.
    sampling: SamplingParams = SamplingParams(max_new_tokens=48)
    extraction_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=48)
    # A round on a chat log (rounds.<r>.collect.source: chatlog): this share of the conversations (seeded by
    # `seed`, drawn per conversation content) is split `heldout`, the round's eval; never extracted from or distilled.
    import_heldout_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    # Each split's episodes in this many contiguous shards, one play() each with its own call seed
    # (oel.scaleout); 1 = one batched play per split, as always. Where shards run: orchestration.
    shards: Annotated[int, Field(ge=1, le=4096)] = 1
    # Rounds on conversations (source: chatlog or traces): what is replaced before their trajectories are written.
    scrub: ScrubParams = ScrubParams()


class ExtractParams(_Section):
    # knowledge: a model writes it (the paper); raw: transcripts as items (ablation); file: the items of
    # `knowledge_file`, one per line, go into every store of every game (OPCD's system-prompt distillation).
    source: Literal["knowledge", "raw", "file"] = "knowledge"
    knowledge_file: str | None = None
    # v4: "- EXPERIENCE ITEM:" lines, 1-2 per game (the paper's default); v3: free-form appended text.
    prompt_version: Literal["v3", "v4"] = "v4"
    extractor: str = "policy"  # `policy` (on-policy, the paper's default) or any model spec
    stores: Annotated[int, Field(gt=0, le=64)] = 2           # K independent stores (sampling seeds)
    steps: Annotated[int, Field(gt=0)] = 2                   # trajectories read per store
    with_previous: bool = True                               # extractor sees the store so far
    max_knowledge_tokens: Annotated[int, Field(gt=0)] = 512  # store budget; oldest whole items dropped
    max_item_tokens: Annotated[int, Field(gt=0)] = 96        # longer items are cut (a 135M model rambles)
    max_items_per_step: Annotated[int, Field(gt=0, le=10)] = 2
    # Start the extractor's answer with the item marker. Not in the paper: a 135M model ignores the
    # format and writes no item at all without it (measured: 0 items from 4 responses). Off on GPU.
    prefill_marker: bool = True
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=128)

    @model_validator(mode="after")
    def _file_names_a_file(self) -> ExtractParams:
        if self.source == "file" and not self.knowledge_file:
            raise ValueError("source: file needs knowledge_file: PATH (a text file, one item per line)")
        return self

    @model_validator(mode="after")
    def _budget_holds_an_item(self) -> ExtractParams:
        if self.max_knowledge_tokens < self.max_item_tokens:
            raise ValueError(f"max_knowledge_tokens={self.max_knowledge_tokens} is smaller than one item "
                             f"(max_item_tokens={self.max_item_tokens}); raise it or lower max_item_tokens")
        return self


class ConsolidateParams(_Section):
    dedupe: bool = True
    dedupe_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.85  # token-set Jaccard similarity
    max_rows: Annotated[int, Field(ge=0)] = 0                           # 0 = every turn prompt


def _refuse_moved(raw: Any, key: str, message: str) -> Any:
    """A section's `before` check for a key that moved or went: one line saying where, instead of pydantic's
    generic 'extra inputs are not permitted'."""
    if isinstance(raw, dict) and key in raw:
        raise ValueError(message)
    return raw


class LoraParams(_Section):
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[int, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class DistillParams(_Section):
    # on_policy: the student samples, reverse KL (OEL). off_policy: the teacher (knowledge in context)
    # samples, forward KL on its tokens (the OPCD off-policy context-distillation baseline).
    mode: Literal["on_policy", "off_policy"] = "on_policy"
    method: Literal["lora", "full"] = "lora"
    # cycle: `steps` steps of batch_size x grad_accum rows, reshuffling the rows as often as needed.
    # once: every row exactly once in `steps` optimizer steps (the reference's one step per game batch);
    # grad_accum is then derived from the number of rows.
    schedule: Literal["cycle", "once"] = "cycle"
    # Paper: 1e-6..5e-6 for 1.7B-8B models. A 135M model with LoRA needs far more to move in 20 CPU steps.
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-4
    steps: Annotated[int, Field(gt=0)] = 20
    batch_size: Annotated[int, Field(gt=0)] = 4
    grad_accum: Annotated[int, Field(gt=0)] = 1
    top_k: Annotated[int, Field(gt=0)] = 256
    kl_temperature: Annotated[float, Field(gt=0.0)] = 0.7
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    save_every: Annotated[int, Field(gt=0)] = 10
    merge: bool = False
    # bf16 mixed precision (autocast). auto: on where this machine computes in bf16 (the weights are bf16, or
    # model.dtype resolves to bf16 here, as the cpu profile's measured auto may), so the fp32 LoRA adapter
    # multiplies in bf16 instead of keeping an fp32 copy of every input.
    bf16: bool | Literal["auto"] = "auto"
    # Recompute each layer in backward instead of keeping its activations: the student forward over the whole
    # prompt otherwise holds ~1.4 MB per token (SmolLM2-135M, fp32), most of distill's peak memory.
    gradient_checkpointing: bool = True
    # With gradient_checkpointing on: the share of decoder layers recomputed, evenly spaced (1.0 all, 0.5 every
    # other). Each layer trades its activations (~1/n_layers of the forward's) for one recompute of its forward.
    checkpoint_layers: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: int = 0
    # Student prompts longer than this keep their newest tokens (0 = no limit). Teacher prompts are never cut.
    max_prompt_tokens: Annotated[int, Field(ge=0)] = 0
    # Token budget of one forward + backward (rows x longest sequence, student or teacher): each step's batch
    # runs in groups of rows within it, weighted to the same gradient (oel.distill.microbatch). 0 = one forward.
    max_tokens_per_microbatch: Annotated[int, Field(ge=0)] = 2048
    # Prompt prefixes run once instead of per row (oel.distill.prefix), same results up to float noise: the
    # frozen teacher's store prefixes (template, knowledge, game rules) once per run, the sampler's shared prefix
    # once per call. Single process (under DDP/FSDP it stays off).
    prefix_cache: bool = True
    # Privileged retention (ReSAIL): + lambda x KL(student WITH knowledge || frozen round-start
    # teacher with knowledge) on the teacher prompts, so training the no-knowledge view does not erode the
    # with-knowledge view (the next round's teacher). 0 = off: the loss is exactly the paper's.
    retention_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    # Train only when the round's teacher (start policy + this round's knowledge) beats the start policy on some
    # headline metric on the round's own user-side seeds (the headroom stage, before distill); else the round's
    # policy is its start policy and the reason is recorded. Held-out seeds are never used for this.
    require_headroom: bool = True
    sampling: SamplingParams = SamplingParams(temperature=0.7, max_new_tokens=48)
    lora: LoraParams = LoraParams()

    @model_validator(mode="before")
    @classmethod
    def _use_vllm_moved(cls, raw: Any) -> Any:
        return _refuse_moved(raw, "use_vllm", "use_vllm moved to the one generation setting: delete distill.use_vllm and set "
                             "generation: {backend: vllm} (it serves collect, extract, eval and distill)")


class HeadroomParams(_Section):
    # The check before distill (oel.headroom): the round's start policy plays this many of the round's own
    # user-side seeds per game without knowledge and with each store (never held-out seeds).
    episodes_per_game: Annotated[int, Field(gt=0)] = 32
    stores: Annotated[int, Field(ge=0)] = 0                 # the first N stores of each game (0: all)
    alpha: Annotated[float, Field(gt=0.0, le=0.5)] = 0.05   # one-sided, split over a game's stores
    bootstrap_resamples: Annotated[int, Field(ge=100, le=1_000_000)] = 4000
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=48)
    batch_size: Annotated[int, Field(gt=0)] = 16
    # A store that carries no knowledge ("- EXPERIENCE ITEM: Be friendly and helpful."), played in the knowledge
    # slot as one more level: a store then counts only where it also beats the placebo ("" = off).
    placebo: Annotated[str, Field(max_length=4000)] = ""


class EvalParams(_Section):
    episodes_per_game: Annotated[int, Field(gt=0)] = 6    # held-out seeds, identical every round
    batch_size: Annotated[int, Field(gt=0)] = 16
    with_knowledge: bool = True                           # also play with each store in context (teacher level)
    # Stores of each game the teacher level plays (0 = all): fewer keeps a powered eval in budget on CPU.
    teacher_stores: Annotated[int, Field(ge=0)] = 0
    # The OOD check: true = the shipped offline probe (oel.ood.probe), false = off, ifeval = lm-eval's IFEval
    # task as the paper ran it (CUDA, network or a cached copy, `pip install -e '.[ifeval]'`; docs/gpu.md).
    ood: bool | Literal["ifeval"] = True
    ood_max_new_tokens: Annotated[int, Field(gt=0)] = 64
    ood_drop_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=48)
    # A round on imported chat logs: held-out turn prompts scored for the consolidation gap (0 = all).
    gap_prompts: Annotated[int, Field(ge=0)] = 64

    @model_validator(mode="before")
    @classmethod
    def _teacher_drift_moved(cls, raw: Any) -> Any:
        return _refuse_moved(raw, "teacher_drift", "teacher_drift is no longer an eval setting: delete eval.teacher_drift (the report "
                             "compares each round's teacher with its start round's from the eval files)")

    @field_validator("ood", mode="before")
    @classmethod
    def _ood_choice(cls, value: Any) -> Any:
        if value is True or value is False or value == IFEVAL:
            return value
        raise ValueError(f"{value!r} is not a choice: use true (the offline probe), false (off) or ifeval "
                         f"(lm-eval's IFEval task; CUDA and network)")


ALIASES = ("champion", "challenger")  # registry aliases a round may be declared `from` (resolved, never stored)


class MarginParams(_Section):
    # How much worse than the champion a round may be on each headline metric before it is kept back, on top of
    # the paired test (oel.paired). Rates are absolute (0.02 = two points); tokens_per_turn and
    # ood_loglik are relative (0.10 = ten percent more tokens, or ten percent lower log-likelihood).
    pass_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    invalid_action_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    tokens_per_turn: Annotated[float, Field(ge=0.0, le=10.0)] = 0.10
    ood_instruction_pass: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    ood_loglik: Annotated[float, Field(ge=0.0, le=10.0)] = 0.10


class PromotionParams(_Section):
    # gate: after eval a round becomes `champion` only if no headline metric of any game (pass rate,
    # invalid-action rate, tokens per turn) nor the OOD probe is worse than the champion's beyond its margin,
    # by a paired test on the same held-out seeds (oel.rounds.gate); else it stays `challenger` and the next
    # round starts from the champion. always: every trained round is promoted (the loop without a gate).
    policy: Literal["gate", "always"] = "gate"
    alpha: Annotated[float, Field(gt=0.0, le=0.5)] = 0.05   # one-sided level of every paired test
    margins: MarginParams = MarginParams()
    bootstrap_resamples: Annotated[int, Field(ge=100, le=1_000_000)] = 4000

    @model_validator(mode="before")
    @classmethod
    def _margin_moved(cls, raw: Any) -> Any:
        return _refuse_moved(raw, "margin", "margin is now one per metric: delete promotion.margin and set promotion.margins "
                             "(pass_rate, invalid_action_rate, tokens_per_turn, ood_instruction_pass, ood_loglik)")


class LoopParams(_Section):
    rounds: Annotated[int, Field(gt=0, le=999)] = 2  # rounds one `oel-loop` run advances by default


class OrchestrationParams(_Section):
    # Where collect's shards (collect.shards) play. Not a DVC param: it cannot change what is written.
    # local: one after another in the stage's own process. dask: Prefect tasks on a Dask cluster
    # (prefect-dask): the scheduler at `dask_address` (tcp://host:8786), else a LocalCluster of
    # `dask_workers` processes. Each shard loads the policy itself (the workers need the project folder).
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: Annotated[int, Field(ge=1, le=1024)] = 2


class TrackingParams(_Section):
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "oel"
    # MLflow traces of play and extraction, written after the stage's outputs from its records (oel.traces):
    # all = every episode and extraction call; sample = `trace_sample` of each per stage call, spread
    # evenly (a 12k-game paper run does not flood the store); off = none.
    traces: Literal["all", "sample", "off"] = "sample"
    trace_sample: Annotated[int, Field(gt=0)] = 32


ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServeParams(_Section):
    """`oel serve` (oel.online): the champion on a serving engine behind the MLflow AI Gateway. Not a DVC param:
    serving reads the policies, it writes none."""
    # transformers: `transformers serve` on the merged policy folder (CPU); vllm: `vllm serve` on the base model
    # with each round's adapter loaded at run time (GPU, `oel[gpu]`); auto: vllm when generation.backend is vllm.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    # The gateway's address (an MLflow server); loopback unless you mean to expose it. The engine always binds
    # 127.0.0.1: only the gateway talks to it, so every request is traced.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 5001
    engine_port: Annotated[int, Field(ge=1, le=65535)] = 8001
    endpoint: str = "oel"              # the gateway endpoint: the `model` an app passes
    experiment: str = "oel-deployment"  # every request's trace lands here (collect.source: traces reads it)
    # After a promotion the new champion first gets this share of requests (the gateway's traffic split), the
    # previous champion the rest, until `oel route --full`; 0 = all at once.
    canary: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # `oel canary` ends a canary on the users' ratings of both versions' answers (user_feedback above 0 is good):
    # once each has canary_min_ratings rated answers, the new champion takes every request, unless its share of
    # good ratings is below the previous champion's by more than canary_margin with one-sided Fisher p <
    # promotion.alpha; then the champion is rolled back. The gate cannot judge a round on traffic on held-out
    # games (it has none), so such a round is best served as a canary first.
    canary_min_ratings: Annotated[int, Field(ge=1)] = 30
    canary_margin: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    max_loras: Annotated[int, Field(ge=2, le=64)] = 2  # vllm: adapters held at once (champion + previous >= 2)
    # transformers: a version nobody asked for this long is unloaded (0 = never); it reloads on its next request.
    unload_idle_s: Annotated[int, Field(ge=0)] = 1800
    startup_timeout_s: Annotated[int, Field(gt=0, le=3600)] = 600

    @model_validator(mode="after")
    def _names_and_ports(self) -> ServeParams:
        if not ENDPOINT_NAME.match(self.endpoint):
            raise ValueError(f"endpoint {self.endpoint!r}: use letters, digits, '.', '_' or '-' (at most 64), "
                             "e.g. oel")
        if not self.experiment.strip():
            raise ValueError("experiment: name the experiment the gateway traces into, e.g. oel-deployment")
        if self.canary and abs(self.canary * 100 - round(self.canary * 100)) > 1e-9:
            raise ValueError(f"canary {self.canary}: the gateway splits traffic in whole percents; use e.g. 0.1")
        if self.port == self.engine_port:
            raise ValueError(f"port and engine_port are both {self.port}; the gateway and the engine need two ports")
        if not self.host.strip() or any(c.isspace() for c in self.host):
            raise ValueError(f"host {self.host!r}: give an address to bind, e.g. 127.0.0.1")
        return self


class Params(_Section):
    profile: str = "cpu"  # a name in oel/profiles.yaml
    seed: int = 1234
    model: ModelParams = ModelParams()
    generation: GenerationParams = GenerationParams()
    games: GamesParams = GamesParams()
    rounds: dict[str, RoundParams] = Field(default_factory=lambda: {"r1": RoundParams(**{"from": "base"})})
    collect: CollectParams = CollectParams()
    extract: ExtractParams = ExtractParams()
    consolidate: ConsolidateParams = ConsolidateParams()
    headroom: HeadroomParams = HeadroomParams()
    distill: DistillParams = DistillParams()
    eval: EvalParams = EvalParams()
    promotion: PromotionParams = PromotionParams()
    loop: LoopParams = LoopParams()
    tracking: TrackingParams = TrackingParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    serve: ServeParams = ServeParams()

    @field_validator("rounds")
    @classmethod
    def _round_ids(cls, rounds: dict[str, RoundParams]) -> dict[str, RoundParams]:
        if not rounds:
            raise ValueError("declare at least one round, e.g. rounds: {r1: {from: base}}")
        for rid in rounds:
            if not ROUND_ID.match(rid):
                raise ValueError(f"round id {rid!r} must look like r1, r2, ...")
        return rounds

    @model_validator(mode="after")
    def _rounds_form_a_chain(self) -> Params:
        seen = {"base"}
        for rid, rnd in self.rounds.items():  # declaration order = execution order
            if rnd.from_ == rid:
                raise ValueError(f"rounds.{rid}.from: a round cannot start from itself (cycle)")
            if rnd.from_ in ALIASES:
                raise ValueError(f"rounds.{rid}.from: {rnd.from_!r} is a registry alias, not a round; params.yaml "
                                 f"names rounds so DVC's graph stays explicit: write the round `oel rounds` shows "
                                 f"as {rnd.from_}, or let `oel iterate --from {rnd.from_}` declare it")
            if rnd.from_ not in seen:
                hint = "a later round (cycle)" if rnd.from_ in self.rounds else "an undeclared round"
                raise ValueError(f"rounds.{rid}.from: {rnd.from_!r} is {hint}; use 'base' or one of "
                                 f"{sorted(seen - {'base'}) or 'no earlier round'}")
            seen.add(rid)
        return self

    @model_validator(mode="after")
    def _traffic_windows_follow(self) -> Params:
        # Each conversation is learned from once: a traces round's window starts where the previous one on the
        # same experiment ended. Both ends are in the round's own declaration, which is what DVC tracks for it.
        last: dict[str, tuple[str, datetime]] = {}
        for rid, rnd in self.rounds.items():
            src = rnd.source
            if src.source != "traces":
                continue
            if (prev := last.get(src.experiment)) is not None:
                prev_id, prev_until = prev
                if src.since is None:
                    raise ValueError(f"rounds.{rid}.collect.since: round {prev_id} read {src.experiment!r} until "
                                     f"{_iso(prev_until)}; set since: '{_iso(prev_until)}' so this window starts there")
                if src.since < prev_until:
                    raise ValueError(f"rounds.{rid}.collect.since {_iso(src.since)} is before round {prev_id}'s until "
                                     f"{_iso(prev_until)}: the windows overlap; set since: '{_iso(prev_until)}'")
            last[src.experiment] = (rid, src.until)
        return self

    def policy_of(self, round_id: str) -> str:
        """The policy a round starts from (`base` or an earlier round id)."""
        try:
            return self.rounds[round_id].from_
        except KeyError:
            raise ParamsError(f"round {round_id!r} is not declared in params.yaml rounds "
                              f"(declared: {', '.join(self.rounds)})") from None


PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # no dots: dvc.yaml tracks `<profile>.<section>`


@functools.cache
def profiles() -> dict[str, dict[str, Any]]:
    """Every profile in oel/profiles.yaml by name (`_`-prefixed blocks are shared anchors, not profiles)."""
    raw = yaml.safe_load(PROFILES_FILE.read_text(encoding="utf-8"))
    return {name: body for name, body in raw.items() if not name.startswith("_")}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("function-after",)) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see params.yaml for the allowed keys)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_params(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(_deep_merge(_deep_merge(_defaults(), profile_of(raw, source)), raw))
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


@functools.cache
def _defaults() -> dict[str, Any]:
    """The typed defaults as a mapping, so a partial nested section keeps its field's own defaults.

    Without this, `eval: {sampling: {max_new_tokens: 64}}` would build SamplingParams from the class
    defaults (top_p 1, top_k off) instead of eval's (top_p 0.8, top_k 20). Rounds are the user's alone.
    """
    defaults = Params().model_dump(mode="json", by_alias=True)
    defaults.pop("rounds")
    return defaults


def profile_of(raw: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """The profile a raw params mapping selects; one line listing the known ones if it names none."""
    name = raw.get("profile", "cpu")
    known = profiles()
    if not isinstance(name, str) or name not in known:
        raise ParamsError(f"{source}: profile: {name!r} is not a known profile; use one of {', '.join(known)}")
    return known[name]


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """The only loader of params.yaml. Raises ParamsError with one line naming the cause."""
    return parse_params(read_raw(path), str(path))


def read_raw(path: str | Path = DEFAULT_PARAMS) -> Any:
    """params.yaml as written (before the profile and the defaults fill it in)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file (run from the project root or pass --params FILE)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:  # PyYAML composes nested flow collections recursively
        raise ParamsError(f"{path}: nested too deeply to be a params file; see params.yaml's sections") from None
    return raw
