"""Trajectories: a simulated user, the agent (any LLM client) and the tools, turn by turn (K2 report Fig. 8).

The simulated user has a persona, a goal (the task's ``user_goal``) and a style; it knows the task's
``known_info`` and gives ``hidden_info`` only when the agent asks; it ends the dialogue explicitly with
:data:`STOP`. Guards against the failure modes reported for tau2-bench's user simulator: a stop in the
first message is refused; a stop in the same message that confirms an action is withheld until the agent
has acted; a user that re-states its opening request after the task was handled ends the dialogue (it would
make the agent act twice), and one that repeats the agent's last reply (role confusion) ends it too; the user never sees tool results or the agent's hidden reasoning; it is told not
to invent goals beyond its task.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from openk2.llm.base import LLMClient, LLMError
from openk2.synth.common import Stats, rng_for
from openk2.synth.env import Environment

STOP = "###STOP###"
PERSONAS = (
    "a small-business owner in her fifties", "a graduate student", "a retired engineer", "a busy nurse on a night shift",
    "an operations manager at a logistics firm", "a freelance designer", "a high-school teacher", "a junior developer",
    "a hobbyist investor", "a support lead at a software company",
)
STYLES = ("concise and direct", "friendly and chatty", "formal and precise", "impatient, writes short messages",
          "unsure, asks follow-up questions", "writes in plain, simple English")
OPENING = "Write your first message to the assistant now: state your request as the user."
_THINK = re.compile(r"<think>.*?</think>", re.S)
_CONFIRM = re.compile(r"\b(yes|yeah|yep|sure|go ahead|please do|confirm(ed)?|do it|proceed|ok(ay)?)\b", re.I)


def persona_for(task_id: str) -> dict[str, str]:
    rng = rng_for("persona", task_id)
    return {"persona": rng.choice(PERSONAS), "style": rng.choice(STYLES)}


def user_system_prompt(task: dict[str, Any], persona: dict[str, str]) -> str:
    hidden = task.get("hidden_info") or ""
    return (
        f"You are role-playing a user talking to an AI assistant. You are {persona['persona']}; your style is "
        f"{persona['style']}.\n\nYour goal: {task['user_goal']}\n"
        + (f"Details you give when the assistant asks: {task['known_info']}\n" if task.get("known_info") else "")
        + (f"A detail you keep back and give ONLY if the assistant asks for it: {hidden}\n" if hidden else "")
        + "\nRules:\n"
        "- Write only the user's next message, one at a time, in your style. Never act as the assistant, never call tools.\n"
        "- Pursue only this goal. Do not invent new requests, facts, names or numbers beyond the ones above; if asked "
        "for something you were not given, say you do not know.\n"
        "- Start by stating your request (without the held-back detail).\n"
        f"- When the goal is fully achieved (the assistant reports it done), or it clearly cannot be done, reply with "
        f"only {STOP}.\n"
        f"- If the assistant asks you to confirm an action, confirm or decline, but do not write {STOP} in that same "
        "message: wait until the assistant reports the result.\n"
        "- Once your goal is done, do not repeat your original request.")


def user_view(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dialogue as the user sees it, roles swapped for the user model: the agent's visible replies
    become 'user' turns, the user's own messages 'assistant' turns; tool traffic is hidden."""
    out = []
    for m in messages:
        if m["role"] == "user":
            out.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("content") and not m.get("tool_calls"):
            out.append({"role": "user", "content": _THINK.sub("", m["content"]).strip()})
    return out


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


async def user_turn(client: LLMClient, task: dict[str, Any], persona: dict[str, str], messages: Sequence[dict[str, Any]],
                    stats: Stats, seed: int | None = None) -> tuple[str | None, str]:
    """(the user's next message or None, why): why is '' for a message, 'stop' for an explicit end, or a failure."""
    view = user_view(messages)
    if not view:
        view = [{"role": "user", "content": OPENING}]
    stats.add("llm.user.calls")
    try:
        resp = await client.achat([{"role": "system", "content": user_system_prompt(task, persona)}] + view,
                                  max_tokens=200, temperature=0.0, seed=seed)
    except LLMError:
        stats.add("llm.user.request_error")
        raise
    text = _THINK.sub("", resp.content or "").strip()
    if text.startswith(OPENING):  # a small model echoes the cue
        text = text[len(OPENING):].strip()
    first = not any(m["role"] == "user" for m in messages)
    if STOP in text:
        rest = text.replace(STOP, "").strip()
        if first:
            stats.add("user.stop_in_first_message")
            if not rest:
                return None, "user_stopped_at_start"
            return rest, ""
        if rest and _CONFIRM.search(rest) and _last_agent_asked(messages):
            stats.add("user.stop_withheld_after_confirmation")
            return rest, ""
        return None, "stop"
    if not text:
        stats.add("user.empty_reply")
        return None, "user_empty_reply"
    if not first:
        opening = next(m["content"] for m in messages if m["role"] == "user")
        if _norm(text) == _norm(opening):
            stats.add("user.restated_opening")
            return None, "user_restarted"
        last_agent = next((m["content"] for m in reversed(messages) if m["role"] == "assistant" and m.get("content")), "")
        if last_agent and _norm(text) == _norm(last_agent):
            stats.add("user.echoed_agent")  # role confusion: the user model answers as the assistant
            return None, "user_echoed_agent"
    return text, ""


def _last_agent_asked(messages: Sequence[dict[str, Any]]) -> bool:
    for m in reversed(messages):
        if m["role"] == "assistant" and m.get("content") and not m.get("tool_calls"):
            return "?" in m["content"]
    return False


async def rollout(agent_client: LLMClient, user_client: LLMClient, agent: dict[str, Any], task_rec: dict[str, Any],
                  env: Environment, *, max_turns: int = 6, max_steps: int = 6, max_tokens: int = 512,
                  stats: Stats | None = None) -> dict[str, Any]:
    """One dialogue. Returns {messages, tools, calls, end, turns, problems}; ``end`` is 'stop' when the user
    ended it, else why it ended (max_turns, max_steps, empty_agent_reply, user_restarted...). A failed LLM
    request raises (the trajectory is redone on the next run)."""
    stats = stats or Stats()
    task = task_rec["task"]
    persona = persona_for(task_rec["id"])
    messages: list[dict[str, Any]] = [{"role": "system", "content": agent["system_prompt"]}]
    problems: list[str] = []
    n_calls, end, turns = 0, "max_turns", 0
    seed = int(rng_for("seed", task_rec["id"]).random() * 2**31)
    for turns in range(1, max_turns + 1):
        text, why = await user_turn(user_client, task, persona, messages, stats, seed=seed + turns)
        if text is None:
            end = why
            break
        messages.append({"role": "user", "content": text})
        replied = False
        for _ in range(max_steps):
            stats.add("llm.agent.calls")
            try:
                resp = await agent_client.achat(messages, tools=env.openai_tools, max_tokens=max_tokens, temperature=0.0,
                                                seed=seed)
            except LLMError:
                stats.add("llm.agent.request_error")
                raise  # the endpoint failed: the whole trajectory is redone on the next run
            for pe in resp.parse_errors:  # calls the local backend could not parse: they never ran
                stats.add("agent.unparsed_tool_call")
                problems.append(f"unparsed_tool_call: {pe}"[:200])
            if resp.tool_calls:
                calls = []
                for c in resp.tool_calls:
                    fn = c.get("function") or {}
                    name = str(fn.get("name") or "unknown")
                    calls.append({"id": f"functions.{name}:{n_calls}", "type": "function",
                                  "function": {"name": name, "arguments": fn.get("arguments") if isinstance(fn.get("arguments"), str)
                                               else json.dumps(fn.get("arguments") or {}, ensure_ascii=False)}})
                    n_calls += 1
                content = _THINK.sub("", resp.content or "").strip() or None
                messages.append({"role": "assistant", "content": content, "tool_calls": calls})
                for c in calls:
                    rec = await env.call(c["id"], c["function"]["name"], c["function"]["arguments"])
                    if rec.executor == "check":
                        stats.add("agent.invalid_call")
                    messages.append({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": rec.output})
                continue
            content = _THINK.sub("", resp.content or "").strip()
            if not content:
                stats.add("agent.empty_reply")
                end = "empty_agent_reply"
                break
            messages.append({"role": "assistant", "content": content})
            replied = True
            break
        else:
            end = "max_steps"
        if not replied:
            break
    else:
        end = "max_turns"
    return {"messages": messages, "tools": env.openai_tools, "calls": [c.__dict__ for c in env.log], "end": end,
            "turns": sum(1 for m in messages if m["role"] == "user"), "persona": persona, "problems": problems,
            "end_state": env.end_state()}
