"""A gymnasium environment whose actions are shell commands run in a sandtree sandbox.

    from sandtree.gym import SandboxEnv

    env = SandboxEnv("busybox", reward_fn=lambda r, env: float(r.exit_code == 0), max_turns=20)
    obs, info = env.reset(seed=0)                  # a new episode (obs "")
    obs, reward, terminated, truncated, info = env.step("echo hi > /f; cat /f")
    kids = env.fork(4)                             # 4 envs, live copies at the current turn
    env.reset(options={"turn": 0})                 # rewind this episode to turn 0
    env.close()                                    # deletes the episode

Needs the `gym` extra (`pip install 'sandtree[gym]'`, i.e. gymnasium).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, SupportsFloat

import gymnasium
from gymnasium import spaces

from sandtree.client import Client, Episode
from sandtree.models import StepResult

__all__ = ["ACTION_CHARSET", "MAX_OBSERVATION_CHARS", "RewardFn", "SandboxEnv", "observation_text"]

RewardFn = Callable[[StepResult, "SandboxEnv"], SupportsFloat]
"""`reward_fn(result, env) -> float`: the reward of the turn whose `StepResult` is `result`."""

ACTION_CHARSET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t\n"
"""The characters `action_space.sample()` draws from (printable ASCII, tab, newline). `step`
runs any str the service accepts, in or out of this set."""

MAX_OBSERVATION_CHARS = 2 << 20
"""An observation is stdout + stderr, each at most the service's 1 MiB output cap."""

_OBS_SPACE: spaces.Text | None = None


def _observation_space() -> spaces.Text:
    # Every character of the Basic Multilingual Plane but the surrogates (which a decoded str
    # never holds): building it costs ~0.2 s, so it is built once and copied per env.
    global _OBS_SPACE
    if _OBS_SPACE is None:
        charset = frozenset(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
        _OBS_SPACE = spaces.Text(MAX_OBSERVATION_CHARS, min_length=0, charset=charset)
    return copy.copy(_OBS_SPACE)


def observation_text(stdout: str, stderr: str) -> str:
    """The observation of a turn: its stdout then its stderr, with characters outside the Basic
    Multilingual Plane (emoji, ...) replaced by U+FFFD so that it lies in the observation space."""
    s = stdout + stderr
    if s.isascii():
        return s
    return "".join(c if ord(c) < 0x10000 else "\ufffd" for c in s)


class SandboxEnv(gymnasium.Env[str, str]):
    """A `gymnasium.Env` over one sandtree episode. Action: a shell command (run with `sh -c` in the
    episode's shell session, so cwd and exported variables carry over). Observation: the turn's
    stdout followed by its stderr (`observation_text`). Both spaces are `gymnasium.spaces.Text`.

    `reset(seed=None, options=None)` deletes the env's current episode (if any) and creates a new
    one on `image` with `policy` (observation ""); with `options={"turn": t}` it instead rewinds the
    current episode to turn t (observation: the recorded output of turn t). `seed` seeds
    `np_random` only: the sandbox itself is not randomized, so a seeded reset always starts from
    the same image.

    `step(action)` returns `(obs, reward, terminated, truncated, info)`: reward is
    `reward_fn(result, env)` (default 0.0), `terminated` is `done_fn(result, env)` (default False:
    a shell has no end of its own), `truncated` is True once the episode's turn reaches
    `max_turns`; info holds `turn`, `exit_code`, `verdict`, `stdout`, `stderr` and `timed_out` (what
    the same command in the same state gives again, as gymnasium's checker asks: the episode id
    is `env.episode.id` and the whole `StepResult`, with `duration_ms`, is `env.last_result`).
    reset's info holds `turn`, `episode` (the id) and `rewound`.

    `fork(n)` returns n new envs, each a live copy of this one at its current turn (files,
    processes, shell session), sharing its client, reward_fn, done_fn and max_turns; each owns its
    episode. `close()` deletes the episode (and closes the client if the env made it).

    `client`: a `sandtree.Client` (None: one on $SANDTREE_SOCKET, closed with the env). `timeout`:
    seconds per step (None: the service's default). `labels`: the episode's labels.
    `max_action_length`: the action space's length bound (the service itself takes up to 131008
    bytes). The action space is seeded with 0 at construction, so `action_space.sample()` is
    reproducible.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012  # gymnasium's class attribute

    def __init__(
        self,
        image: str = "busybox",
        client: Client | None = None,
        policy: str = "auto",
        reward_fn: RewardFn | None = None,
        max_turns: int = 50,
        *,
        done_fn: Callable[[StepResult, SandboxEnv], bool] | None = None,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        max_action_length: int = 4096,
    ) -> None:
        super().__init__()
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.image = image
        self.policy = policy
        self.reward_fn = reward_fn
        self.done_fn = done_fn
        self.max_turns = max_turns
        self.timeout = timeout
        self.labels = dict(labels or {})
        self.max_action_length = max_action_length
        self._own_client = client is None
        self.client = client if client is not None else Client()
        self.action_space = spaces.Text(max_action_length, min_length=1, charset=ACTION_CHARSET, seed=0)
        self.observation_space = _observation_space()
        self.episode: Episode | None = None
        """The current episode (None before the first reset and after close)."""
        self.turn = 0
        """The episode's current turn."""
        self.last_result: StepResult | None = None
        """The result of the latest step (None after a reset)."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self.last_result = None
        if options and "turn" in options:
            if self.episode is None:
                raise ValueError('reset(options={"turn": t}) needs an episode: call reset() first')
            t = int(options["turn"])
            self.turn = self.episode.rewind(t)
            rec = self.episode.tree(outputs=True)[self.turn]
            obs = observation_text(rec.stdout, rec.stderr)
            return obs, {"turn": self.turn, "episode": self.episode.id, "rewound": True}
        self._drop_episode()
        self.episode = self.client.create(self.image, self.policy, labels=self.labels)
        self.turn = 0
        return "", {"turn": 0, "episode": self.episode.id, "rewound": False}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.episode is None:
            raise RuntimeError("step() before reset(): call env.reset() first")
        r = self.episode.step(action, timeout=self.timeout)
        self.turn = r.turn
        self.last_result = r
        reward = float(self.reward_fn(r, self)) if self.reward_fn is not None else 0.0
        terminated = bool(self.done_fn(r, self)) if self.done_fn is not None else False
        truncated = not terminated and r.turn >= self.max_turns
        info = {
            "turn": r.turn,
            "exit_code": r.exit_code,
            "verdict": r.verdict,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "timed_out": r.timed_out,
        }
        return observation_text(r.stdout, r.stderr), reward, terminated, truncated, info

    def fork(self, n: int = 1) -> list[SandboxEnv]:
        """`n` new envs, each a live copy of this one at its current turn (one Fork call)."""
        if self.episode is None:
            raise RuntimeError("fork() before reset(): call env.reset() first")
        kids = []
        for ep in self.episode.fork(self.turn, n):
            env = SandboxEnv(
                self.image,
                self.client,
                self.policy,
                self.reward_fn,
                self.max_turns,
                done_fn=self.done_fn,
                timeout=self.timeout,
                labels=self.labels,
                max_action_length=self.max_action_length,
            )
            env.episode = ep
            env.turn = self.turn
            env.last_result = self.last_result
            kids.append(env)
        return kids

    def _drop_episode(self) -> None:
        if self.episode is not None:
            ep, self.episode = self.episode, None
            ep.delete()

    def close(self) -> None:
        """Deletes the episode; closes the client if the env made it. Calling it again is a no-op."""
        self._drop_episode()
        if self._own_client:
            self._own_client = False
            self.client.close()
