"""The RL adapters against a real service and the real upstream packages: sandtree.gym with
gymnasium (including gymnasium's own env checker), sandtree.skyrl with skyrl-gym, and
sandtree.verl against verl's published BaseTool signature (verl itself needs a GPU stack)."""

from __future__ import annotations

import asyncio
import inspect
import warnings

import pytest

import sandtree
from sandtree import Client, StepResult

gymnasium = pytest.importorskip("gymnasium")


def test_gym_env_passes_check_env(client: Client) -> None:
    from gymnasium.utils.env_checker import check_env

    from sandtree.gym import SandboxEnv

    env = SandboxEnv(client=client, max_turns=5, max_action_length=12, timeout=10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # check_env reports problems as warnings too
            check_env(env, skip_render_check=True)
    finally:
        env.close()
    assert env.episode is None


def test_gym_env_step_reward_truncation_rewind_fork(client: Client) -> None:
    from sandtree.gym import SandboxEnv

    def reward(r: StepResult, env: SandboxEnv) -> float:
        return 1.0 if r.exit_code == 0 else -1.0

    env = SandboxEnv("busybox", client=client, reward_fn=reward, max_turns=3)
    try:
        obs, info = env.reset(seed=7)
        assert obs == "" and info["turn"] == 0
        assert obs in env.observation_space
        obs, rew, term, trunc, info = env.step("echo one > /f; cat /f")
        assert (obs, rew, term, trunc) == ("one\n", 1.0, False, False)
        assert info["turn"] == 1 and info["exit_code"] == 0 and info["verdict"] in {"fs", "proc"}
        obs, rew, term, trunc, info = env.step("echo oops >&2; exit 2")
        assert (obs, rew, trunc, info["exit_code"]) == ("oops\n", -1.0, False, 2)
        kids = env.fork(2)
        obs, rew, term, trunc, info = env.step("echo two >> /f")
        assert trunc and info["turn"] == 3, "truncated at max_turns"
        # The forks are at turn 2: /f holds only "one", and each goes on on its own.
        for k, kid in enumerate(kids):
            obs, _, _, trunc, info = kid.step(f"echo kid{k} >> /f; cat /f")
            assert obs == f"one\nkid{k}\n" and info["turn"] == 3 and trunc
            kid.close()
        # Rewind through reset(options={"turn": t}): the observation is turn t's recorded output.
        obs, info = env.reset(options={"turn": 1})
        assert obs == "one\n" and info["turn"] == 1 and env.turn == 1
        obs, *_ = env.step("cat /f")
        assert obs == "one\n"
        # A plain reset makes a new episode.
        old = env.episode
        env.reset()
        assert env.episode is not None and old is not None and env.episode.id != old.id
        assert old.id not in {e.id for e in client.list_episodes()}, "the old episode was deleted"
        obs, *_ = env.step("test -e /f; echo $?")
        assert obs == "1\n"
    finally:
        env.close()


def test_skyrl_env(client: Client) -> None:
    pytest.importorskip("skyrl_gym")
    from skyrl_gym.envs.base_text_env import BaseTextEnv

    from sandtree.skyrl import SandtreeEnv, parse_command

    assert parse_command("x <bash> ls /\n</bash> y <bash>no</bash>") == "ls /"
    assert parse_command("no command") is None

    def reward(r: StepResult | None, env: SandtreeEnv) -> float:
        return 1.0 if r is not None and r.stdout == "42\n" else 0.0

    env = SandtreeEnv(extras={"image": "busybox", "max_turns": 3}, client=client, reward_fn=reward)
    assert isinstance(env, BaseTextEnv)
    try:
        prompt = [{"role": "user", "content": "Make /f hold 42."}]
        chat, meta = env.init(prompt)
        assert chat == prompt and meta["episode"]
        out = env.step("Writing it. <bash>echo 42 > /f; cat /f</bash>")
        assert out["reward"] == 1.0 and not out["done"]
        assert out["observations"] == [{"role": "user", "content": '<output exit_code="0">\n42\n</output>'}]
        assert out["metadata"]["turn"] == 1 and out["metadata"]["command"] == "echo 42 > /f; cat /f"
        (kid,) = env.fork(1)
        out = env.step("<bash>rm /f; cat /f</bash>")
        assert out["metadata"]["exit_code"] == 1 and out["reward"] == 0.0
        out = kid.step("<bash>cat /f</bash>")
        assert out["reward"] == 1.0, "the fork still has /f"
        kid.close()
        out = env.step("Done.")
        assert out["done"] and out["observations"] == [] and out["metadata"]["command"] is None
    finally:
        env.close()


# verl's BaseTool (verl/tools/base_tool.py, 0.4 series): the methods and parameters SandtreeTool
# must have for verl's tool loader.
VERL_BASE_TOOL = {
    "__init__": ["self", "config", "tool_schema"],
    "get_openai_tool_schema": ["self"],
    "create": ["self", "instance_id", "kwargs"],
    "execute": ["self", "instance_id", "parameters", "kwargs"],
    "calc_reward": ["self", "instance_id", "kwargs"],
    "release": ["self", "instance_id", "kwargs"],
}


def test_verl_tool_signature() -> None:
    from sandtree.verl import SandtreeTool

    for name, params in VERL_BASE_TOOL.items():
        sig = inspect.signature(getattr(SandtreeTool, name))
        positional = [p.name for p in sig.parameters.values() if p.kind is not p.KEYWORD_ONLY]
        assert positional == params, name
        if name in {"create", "execute", "calc_reward", "release"}:
            assert inspect.iscoroutinefunction(getattr(SandtreeTool, name)), name


def test_verl_tool(service: object) -> None:
    from sandtree.verl import SandtreeTool

    async def main(socket: str) -> None:
        async with sandtree.AsyncClient(socket) as c:
            tool = SandtreeTool({"image": "busybox"}, client=c, reward_fn=lambda r, ep: float(r.ok))
            assert tool.name == "bash"
            iid = await tool.create("traj-1")
            assert iid == "traj-1"
            out, reward, metrics = await tool.execute(iid, {"command": "echo hi > /f; cat /f"})
            assert (out, reward, metrics["turn"]) == ("hi\n", 1.0, 1)
            out, reward, metrics = await tool.execute(iid, {"command": "cat /nope"})
            assert reward == 0.0 and metrics["exit_code"] == 1 and out.endswith("[exit code 1]")
            assert await tool.calc_reward(iid) == 0.0
            kids = await tool.fork(iid, turn=1, n=2)
            outs = await asyncio.gather(*(tool.execute(k, {"command": "cat /f"}) for k in kids))
            assert [o[0] for o in outs] == ["hi\n", "hi\n"]
            for i in [iid, *kids]:
                await tool.release(i)
            await tool.release("unknown")

    asyncio.run(main(service.socket))  # type: ignore[attr-defined]
