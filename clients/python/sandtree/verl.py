"""A verl tool (the shape of `verl.tools.base_tool.BaseTool`) whose instances are sandtree episodes.

verl is not a dependency (it needs torch and a GPU stack) and is not imported: `SandtreeTool`
matches the `BaseTool` signature verl published in its 0.4 series (`__init__(config,
tool_schema)`, `get_openai_tool_schema()`, `async create(instance_id=None, **kwargs) -> str`,
`async execute(instance_id, parameters, **kwargs) -> tuple[str, float, dict]`,
`async calc_reward(instance_id, **kwargs) -> float`, `async release(instance_id, **kwargs)`),
which is what verl's tool loader calls; it is tested here against that signature, not against
verl itself. Later verl releases return a `ToolResponse` from `execute` (and a pair from
`create`); wrap this class for those.

Each instance is one episode; `fork(instance_id, turn, n)` adds n instances, live copies of it at
`turn`::

    tool = SandtreeTool({"image": "busybox"})
    iid = await tool.create()
    out, reward, metrics = await tool.execute(iid, {"command": "echo hi"})
    kids = await tool.fork(iid, turn=1, n=4)
    for i in [iid, *kids]:
        await tool.release(i)
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sandtree.aio import AsyncClient, AsyncEpisode
from sandtree.models import StepResult

__all__ = ["DEFAULT_TOOL_SCHEMA", "SandtreeTool"]

DEFAULT_TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command in the sandbox (sh -c; cwd and exported variables persist).",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The command to run."}},
            "required": ["command"],
        },
    },
}
"""The OpenAI function schema used when none is given: one string parameter, `command`."""

RewardFn = Callable[[StepResult, AsyncEpisode], "float | Awaitable[float]"]


class SandtreeTool:
    """verl `BaseTool`-shaped tool: one sandtree episode per instance.

    `config` (verl passes the tool's YAML `config`): `image` ("busybox"), `policy` ("auto"),
    `timeout` (seconds per step; None: the service's), `socket` (None: $SANDTREE_SOCKET), `labels`.
    `tool_schema`: verl's `OpenAIFunctionToolSchema` or a dict (default `DEFAULT_TOOL_SCHEMA`); its
    function name is `self.name`. `client`: a `sandtree.AsyncClient` (None: one from `socket`).
    `reward_fn(result, episode) -> float` (may be async) scores each `execute`; `calc_reward`
    returns the latest score of the instance (0.0 before any).

    `execute` reads the command from `parameters["command"]` and returns `(response, reward,
    metrics)`: `response` is stdout, stderr and, when non-zero, `[exit code N]`; `metrics` holds
    `turn`, `exit_code`, `verdict`, `duration_ms`, `timed_out`.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        tool_schema: Any = None,
        *,
        client: AsyncClient | None = None,
        reward_fn: RewardFn | None = None,
    ) -> None:
        self.config = dict(config or {})
        self.tool_schema = tool_schema if tool_schema is not None else DEFAULT_TOOL_SCHEMA
        fn = (
            self.tool_schema["function"]
            if isinstance(self.tool_schema, dict)
            else getattr(self.tool_schema, "function", None)
        )
        self.name: str = fn["name"] if isinstance(fn, dict) else getattr(fn, "name", "bash")
        self.client = client if client is not None else AsyncClient(self.config.get("socket"))
        self.reward_fn = reward_fn
        self._instances: dict[str, AsyncEpisode] = {}
        self._rewards: dict[str, float] = {}

    def get_openai_tool_schema(self) -> Any:
        return self.tool_schema

    def episode(self, instance_id: str) -> AsyncEpisode:
        """The episode of an instance (KeyError if unknown)."""
        return self._instances[instance_id]

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> str:
        """A new instance: a fresh episode on the configured image. Returns its id (`instance_id`,
        else a new uuid)."""
        iid = instance_id or str(uuid.uuid4())
        if iid in self._instances:
            raise ValueError(f"instance {iid} exists")
        ep = await self.client.create(
            self.config.get("image", "busybox"),
            self.config.get("policy", "auto"),
            labels=self.config.get("labels"),
        )
        self._instances[iid] = ep
        self._rewards[iid] = 0.0
        return iid

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[str, float, dict[str, Any]]:
        ep = self._instances[instance_id]
        cmd = str(parameters.get("command", ""))
        if not cmd:
            return "error: no command given (parameters.command)", 0.0, {}
        r = await ep.step(cmd, timeout=self.config.get("timeout"))
        response = r.stdout + r.stderr + (f"[exit code {r.exit_code}]" if r.exit_code else "")
        reward = 0.0
        if self.reward_fn is not None:
            v = self.reward_fn(r, ep)
            reward = float(await v if isinstance(v, Awaitable) else v)
        self._rewards[instance_id] = reward
        metrics = {
            "turn": r.turn,
            "exit_code": r.exit_code,
            "verdict": r.verdict,
            "duration_ms": r.duration_ms,
            "timed_out": r.timed_out,
        }
        return response, reward, metrics

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        return self._rewards[instance_id]

    async def fork(self, instance_id: str, turn: int, n: int = 1) -> list[str]:
        """n new instances, each a live copy of `instance_id`'s episode after `turn`; their ids
        (those of the new episodes). They start with the instance's latest reward."""
        kids = await self._instances[instance_id].fork(turn, n)
        for k in kids:
            self._instances[k.id] = k
            self._rewards[k.id] = self._rewards[instance_id]
        return [k.id for k in kids]

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        """Deletes the instance's episode (an unknown id is ignored)."""
        ep = self._instances.pop(instance_id, None)
        self._rewards.pop(instance_id, None)
        if ep is not None:
            await ep.delete()
