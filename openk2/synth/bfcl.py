"""Executable stateful tool backends from PyPI ``bfcl-eval`` (BFCL's multi-turn APIs): a file system, trading,
travel booking, messaging, posting, ticketing, vehicle control and a math API, each a Python class whose
methods are the tools and whose attributes are the state.

Their tool docs (``data/multi_turn_func_doc/*.json``) become OpenAI function tools (BFCL's ``dict`` /
``float`` / ``tuple`` / ``any`` types mapped to JSON-schema ``object`` / ``number`` / ``array`` / no type);
calls run for real on a fresh instance per trajectory (the class's default scenario), and the instance's
attributes are the end state a gold replay is compared on. ``bfcl-eval`` installs with ``--no-deps``; only
these modules are imported (not its evaluator, which pulls in hosted-model clients).
"""

from __future__ import annotations

import copy
import importlib
import json
from typing import Any

from openk2.data.bfcl import bfcl_dir, function_tool

APIS = {  # BFCL doc file -> (module, class); the memory and web-search APIs are left out (need a backend / network)
    "gorilla_file_system": ("gorilla_file_system", "GorillaFileSystem"),
    "math_api": ("math_api", "MathAPI"),
    "message_api": ("message_api", "MessageAPI"),
    "posting_api": ("posting_api", "TwitterAPI"),
    "ticket_api": ("ticket_api", "TicketAPI"),
    "trading_bot": ("trading_bot", "TradingBot"),
    "travel_booking": ("travel_booking", "TravelAPI"),
    "vehicle_control": ("vehicle_control", "VehicleControlAPI"),
}
_PKG = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
def available() -> bool:
    try:
        importlib.import_module(_PKG)
        return True
    except Exception:  # noqa: BLE001 - not installed, or its imports fail
        return False


def bfcl_tools() -> list[dict[str, Any]]:
    """Repository entries for the executable BFCL APIs (empty when bfcl-eval is not installed)."""
    if not available():
        return []
    docs = bfcl_dir() / "multi_turn_func_doc"
    out = []
    for api in APIS:
        for line in (docs / f"{api}.json").read_text().splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            tool = function_tool(d)
            tool["function"]["parameters"]["type"] = "object"
            out.append({
                "id": f"bfcl/{api}/{d['name']}", "source": "bfcl", "server": f"bfcl:{api}", "package": "bfcl-eval",
                "executable": True,
                "tool": tool,
                "annotations": {}, "bfcl": {"api": api, "response": d.get("response")},
            })
    return out


def _state(obj: Any, seen: set[int] | None = None) -> Any:
    """An instance's attributes as JSON (private ones, parent links and cycles left out)."""
    seen = set() if seen is None else seen
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if id(obj) in seen:
        return "<cycle>"
    seen = seen | {id(obj)}
    if isinstance(obj, dict):
        return {str(k): _state(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [_state(v, seen) for v in obj]
        return sorted(items, key=json.dumps) if isinstance(obj, set) else items
    if hasattr(obj, "__dict__"):
        return {k: _state(v, seen) for k, v in vars(obj).items() if not k.startswith("_") and k != "parent"}
    return str(obj)


class Backend:
    """One BFCL API instance for one trajectory."""

    def __init__(self, api: str, scenario: dict[str, Any] | None = None) -> None:
        mod, cls = APIS[api]
        self.api = api
        self.obj = getattr(importlib.import_module(f"{_PKG}.{mod}"), cls)()
        if hasattr(self.obj, "_load_scenario"):
            self.obj._load_scenario(copy.deepcopy(scenario or {}))

    def call(self, name: str, args: dict[str, Any]) -> tuple[str, bool]:
        fn = getattr(self.obj, name, None)
        if fn is None or name.startswith("_") or not callable(fn):
            return json.dumps({"error": f"no tool {name!r} in {self.api}"}), True
        try:
            res = fn(**args)
        except Exception as e:  # noqa: BLE001 - the tool's own failure is an observation
            return json.dumps({"error": f"{type(e).__name__}: {e}"}), True
        text = json.dumps(_state(res), ensure_ascii=False)
        return text, isinstance(res, dict) and "error" in res

    def state(self) -> Any:
        return _state(self.obj)
