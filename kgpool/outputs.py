"""A pure fold of one execution's iopub messages into an ExecutionResult."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExecutionResult:
    """What one execute_request produced, in the order the kernel sent it."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    execute_result: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: bool = False

    def feed(self, msg_type: str, content: dict[str, Any]) -> None:
        """Fold one iopub message (already filtered to this execution's msg_id)."""
        if msg_type == "stream":
            (self.stderr if content.get("name") == "stderr" else self.stdout).append(
                content.get("text", ""))
        elif msg_type == "execute_result":
            self.execute_result = content.get("data", {})
        elif msg_type in ("display_data", "update_display_data"):
            self.displays.append(content.get("data", {}))
        elif msg_type == "error":
            self.error = content
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.done = True

    @property
    def text(self) -> str:
        """The response body as Kernel Gateway builds it: stdout, else the result bundle as JSON."""
        if self.stdout:
            return "".join(self.stdout)
        if self.execute_result is not None:
            return json.dumps(self.execute_result)
        return ""
