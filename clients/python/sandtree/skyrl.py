"""A SkyRL-Gym text environment (`skyrl_gym.envs.base_text_env.BaseTextEnv`) whose tool is a shell
in a sandtree sandbox.

The model's action is text; the command it runs is the content of the first
`<bash>...</bash>` block in it (leading and trailing whitespace stripped). An action with no such
block ends the episode (the model gave its final answer) without running anything::

    from sandtree.skyrl import SandtreeEnv

    env = SandtreeEnv(extras={"image": "busybox", "max_turns": 8})
    chat, meta = env.init([{"role": "user", "content": "Make /f hold 42."}])
    out = env.step("I will write it. <bash>echo 42 > /f; cat /f</bash>")
    out["observations"]  # [{"role": "user", "content": "<output exit_code=\\"0\\">\\n42\\n</output>"}]
    env.close()  # deletes the episode

Needs the `skyrl` extra (`pip install 'sandtree[skyrl]'`, i.e. skyrl-gym).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput, ConversationType

from sandtree.client import Client, Episode
from sandtree.models import StepResult

__all__ = ["BASH_BLOCK", "SandtreeEnv", "format_output", "parse_command"]

BASH_BLOCK = re.compile(r"<bash>(.*?)</bash>", re.DOTALL)
"""What `step` looks for in an action: the first `<bash>...</bash>` block."""


def parse_command(action: str) -> str | None:
    """The command of an action: the stripped content of its first `<bash>...</bash>` block, or
    None when it has none."""
    m = BASH_BLOCK.search(action)
    return m.group(1).strip() if m else None


def format_output(r: StepResult) -> str:
    """The observation text of a turn: `<output exit_code="N">` stdout, stderr `</output>` (and
    `timed_out="true"` when the step timed out)."""
    attrs = f'exit_code="{r.exit_code}"' + (' timed_out="true"' if r.timed_out else "")
    return f"<output {attrs}>\n{r.stdout}{r.stderr}</output>"


class SandtreeEnv(BaseTextEnv):  # type: ignore[misc]  # skyrl_gym ships no type information
    """`BaseTextEnv` over one sandtree episode, made the SkyRL-Gym way:
    `SandtreeEnv(env_config, extras)`. `extras` (all optional): `image` ("busybox"), `policy`
    ("auto"), `max_turns` (8), `timeout` (seconds per step; None: the service's), `socket` (the
    service's socket; None: $SANDTREE_SOCKET), `labels`. `client` and `reward_fn` can be given as
    keywords: `reward_fn(result, env) -> float`, with `result` the turn's `StepResult` or None for
    an action without a command (default: 0.0).

    `init(prompt)` creates the episode and returns `(prompt, {"episode": id})`. `step(action)` runs
    the action's command (`parse_command`) as the episode's next turn and returns a
    `BaseTextEnvStepOutput`: `observations` one user message holding `format_output(result)`
    (none when the action had no command), `reward`, `done` (no command, or `max_turns` turns),
    `metadata` (`turn`, `exit_code`, `verdict`, `episode`; `command` None when there was none) and
    `postprocessed_action` (the action). `fork(n)` returns n envs continuing from this one's current
    turn (chat history copied). `close()` deletes the episode.
    """

    def __init__(
        self,
        env_config: Any = None,
        extras: dict[str, Any] | None = None,
        *,
        client: Client | None = None,
        reward_fn: Callable[[StepResult | None, SandtreeEnv], float] | None = None,
    ) -> None:
        super().__init__()
        extras = dict(extras or {})
        self.env_config = env_config
        self.image: str = extras.get("image", "busybox")
        self.policy: str = extras.get("policy", "auto")
        self.max_turns = int(extras.get("max_turns", 8))
        self.timeout: float | None = extras.get("timeout")
        self.labels: dict[str, str] = dict(extras.get("labels") or {})
        self._own_client = client is None
        self.client = client if client is not None else Client(extras.get("socket"))
        self.reward_fn = reward_fn
        self.episode: Episode | None = None
        self.chat_history: ConversationType = []

    def init(self, prompt: ConversationType) -> tuple[ConversationType, dict[str, Any]]:
        if self.episode is None:
            self.episode = self.client.create(self.image, self.policy, labels=self.labels)
        self.turns = 0
        self.chat_history = list(prompt)
        return prompt, {"episode": self.episode.id}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        if self.episode is None:
            raise RuntimeError("step() before init(): call env.init(prompt) first")
        self.turns += 1
        self.chat_history.append({"role": "assistant", "content": action})
        cmd = parse_command(action)
        meta: dict[str, Any] = {"episode": self.episode.id, "command": cmd}
        if cmd is None:
            reward = float(self.reward_fn(None, self)) if self.reward_fn is not None else 0.0
            return BaseTextEnvStepOutput(
                observations=[], reward=reward, done=True, metadata=meta, postprocessed_action=action
            )
        r = self.episode.step(cmd, timeout=self.timeout)
        obs = {"role": "user", "content": format_output(r)}
        self.chat_history.append(obs)
        meta.update(turn=r.turn, exit_code=r.exit_code, verdict=r.verdict)
        reward = float(self.reward_fn(r, self)) if self.reward_fn is not None else 0.0
        return BaseTextEnvStepOutput(
            observations=[obs],
            reward=reward,
            done=self.turns >= self.max_turns,
            metadata=meta,
            postprocessed_action=action,
        )

    def fork(self, n: int = 1) -> list[SandtreeEnv]:
        """`n` envs, each a live copy of this one's episode at its current turn, with this env's
        chat history, turn count and settings (they share its client)."""
        if self.episode is None:
            raise RuntimeError("fork() before init(): call env.init(prompt) first")
        kids = []
        for ep in self.episode.fork(None, n):
            env = SandtreeEnv(
                self.env_config,
                {
                    "image": self.image,
                    "policy": self.policy,
                    "max_turns": self.max_turns,
                    "timeout": self.timeout,
                    "labels": self.labels,
                },
                client=self.client,
                reward_fn=self.reward_fn,
            )
            env.episode = ep
            env.turns = self.turns
            env.chat_history = list(self.chat_history)
            kids.append(env)
        return kids

    def get_metrics(self) -> dict[str, Any]:
        return {"turns": self.turns}

    def close(self) -> None:
        """Deletes the episode; closes the client if the env made it. Calling it again is a no-op."""
        if self.episode is not None:
            ep, self.episode = self.episode, None
            ep.delete()
        if self._own_client:
            self._own_client = False
            self.client.close()
