"""Simulated users behind the GameSession protocol: the paper's deployment setting in miniature.

Each seed is one user (id `u<seed>`; seeds.py keeps held-out users disjoint from user-side ones) with a
name, an everyday question and ONE hidden preference drawn from params `preferences`, all a pure
function of the seed:
  french        reply in French                     "Please, in French!"
  one_sentence  answer in one sentence              "Too long! One sentence, please."
  question      end the reply with a question       "Please end with a question for me."
  short         at most 12 words                    "Shorter, please: a few words."
The preference is never stated up front. A reply (the whole response after any </think>) that misses
it earns the user's feedback and another try; success = a reply meets it (games/checkers.py) within
`max_turns` replies. An empty reply is the one invalid move. The final feedback line names the
preference, so extraction can learn it from the transcript as from a game's "Failure: ..." line.

Its episodes export as OpenAI chat logs with oel.chatlog.write_chatlog (turn 0's prompt, then each
reply and the user's answer), the shape `oel import-trajectories` reads back.

Extraction studies them as conversations, not as games: `conversation_text` renders an episode as
`User:` / `Assistant:` lines plus its feedback, and CONVERSATIONS tells the extract stage to read it with the
chat-log prompt (prompts/extract_chat.md: what the user wanted, where the replies missed). The game prompt
would have the extractor write about "the game's rules" for what is a person's wish.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from oel.config import UsersParams
from oel.games.base import StepResult
from oel.games.checkers import CHECKERS
from oel.prompts.render import sanitize

if TYPE_CHECKING:
    from oel.schemas import Episode

HEADER = "You are an assistant chatting with a user. Every user has their own wishes about how you reply."
QUESTION = "Write your next reply to the user."
MAX_ACTION_CHARS = 300   # the reply as it is shown back in the transcript ("[Player] [...]")
USER_PREFIX = "[User] "

WANTS = {
    "french": "replies in French",
    "one_sentence": "answers of one sentence",
    "question": "replies that end with a question",
    "short": "replies of at most 12 words",
}
FEEDBACK = {
    "french": ("Please, in French!", "En français, s'il vous plaît ! I only read French.",
               "Could you say that in French?"),
    "one_sentence": ("Too long! One sentence, please.", "Just one sentence, please.",
                     "Can you put that in a single sentence?"),
    "question": ("Please end with a question for me.", "Ask me something back at the end, please.",
                 "I like it when you finish with a question."),
    "short": ("Shorter, please: a few words.", "Too many words! Keep it brief.",
              "Could you say that in under a dozen words?"),
}
NAMES = ("Ana", "Ben", "Chloé", "Dev", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kenji", "Lea",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Ugo", "Vera", "Wen", "Yara")
QUESTIONS = (
    "What is a quick breakfast idea?", "How do I keep basil alive on a windowsill?",
    "What should I cook tonight?", "How can I fall asleep faster?", "What is a good stretch after running?",
    "How do I get a coffee stain out of a shirt?", "What is a fun thing to do on a rainy day?",
    "How often should I water a cactus?", "What book should I read next?",
    "How do I make my bike chain stop squeaking?", "What is a good gift for my neighbour?",
    "How can I drink more water during the day?", "What should I pack for a weekend trip?",
    "How do I boil an egg?", "What is a simple way to save money each month?",
    "How do I stop my glasses from fogging up?", "What game can I play with my kids tonight?",
    "How do I remember people's names?", "What is a healthy snack for work?",
    "How do I clean a cast iron pan?", "What can I do with old bananas?", "How do I start jogging?",
    "What flowers are easy to grow on a balcony?", "How can I make my room feel cosier?",
    "What is a good way to learn a few words of a new language?", "How do I fix a wobbly table?",
    "What should I do when I feel bored?", "How long should I rest a steak after cooking?",
    "How do I keep bread fresh longer?", "What is a nice walk to take on a Sunday?",
    "How can I be on time more often?", "What is an easy soup to make?",
)


class UsersSession:
    name = "users"
    header = HEADER
    question = QUESTION

    def __init__(self, params: UsersParams):
        self.params = params
        self.user: dict[str, str] | None = None
        self.calls = 0
        self.done = False

    def reset(self, seed: int) -> str:
        rng = random.Random(f"users:{seed}")  # str seeds hash with sha512: stable across processes
        self.user = {"id": f"u{seed}", "name": rng.choice(NAMES), "question": rng.choice(QUESTIONS),
                     "preference": rng.choice(list(self.params.preferences))}
        self._rng = rng
        self.calls, self.done = 0, False
        return f"{USER_PREFIX}Hi, I'm {self.user['name']}. {self.user['question']}"

    def step(self, response: str) -> StepResult:
        if self.user is None:
            raise RuntimeError("users: call reset(seed) before step()")
        if self.done:
            raise RuntimeError("users: the episode is over; reset(seed) starts a new one")
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        self.calls += 1
        reply = reply_text(response)
        action = " ".join(reply.split())[:MAX_ACTION_CHARS] or None
        preference = self.user["preference"]
        if reply and CHECKERS[preference](reply):
            return self._finish("[User] Thanks, that is just what I wanted.", action, True,
                                f"Success: the user wanted {WANTS[preference]}, and reply {self.calls} was one")
        feedback = self._rng.choice(FEEDBACK[preference]) if reply else "Hello? You did not say anything."
        if self.calls >= self.params.max_turns:
            return self._finish(f"[User] {feedback}", action, bool(reply),
                                f"Failure: the user wanted {WANTS[preference]}; none of "
                                f"{self.params.max_turns} replies was one")
        return StepResult(f"[User] {feedback}", action, bool(reply), False, False, 0.0, None)

    def legal_actions(self) -> list[str]:
        return []  # any non-empty reply is a valid move

    def _finish(self, observation: str, action: str | None, valid: bool, feedback: str) -> StepResult:
        self.done = True
        success = feedback.startswith("Success")
        return StepResult(observation, action, valid, True, success, 1.0 if success else 0.0, feedback)


def reply_text(response: str) -> str:
    """What the user reads: the response after the last </think> (an unclosed <think> reads as nothing)."""
    text = (response or "").rsplit("</think>", 1)[-1]
    return text.split("<think>", 1)[0].strip()


def conversation_text(episode: Episode) -> str:
    """The episode as the conversation it was, for the extractor: the user's opening message, then each
    whole response (thinking included, as the paper's transcripts show it) and the user's answer to it,
    then the final feedback. Every piece is neutralised: replies and user text are data."""
    if not episode.turns:
        return f"Feedback: {_clean(episode.feedback)}"
    opening = (episode.turns[0].context or {}).get("transcript", "")
    lines = [f"User: {_clean(opening.removeprefix(USER_PREFIX))}"]
    for turn in episode.turns:
        lines.append(f"Assistant: {_clean(turn.response)}")
        if turn.observation:
            lines.append(f"User: {_clean(turn.observation.removeprefix(USER_PREFIX))}")
    lines.append(f"Feedback: {_clean(episode.feedback)}")
    return "\n".join(lines)


def _clean(text: str) -> str:
    return sanitize(text or "").strip()


# Games whose episodes are conversations: game name -> their text for the extractor (read with the chat prompt).
CONVERSATIONS: dict[str, Callable[[Episode], str]] = {UsersSession.name: conversation_text}
