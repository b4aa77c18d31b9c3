"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): the prompt, the grammar, the parsing.

A tool call is written as Hermes' `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (the format Qwen2.5,
Hermes and many fine-tunes are trained on). The tools reach the model through its chat template when the
template takes `tools` (and assistant `tool_calls` and `tool` messages the same way); a template that does not
gets them in a system message that describes the format. With `tool_choice` `required` or a named function
the output is constrained to the call itself: a JSON object (an array of them with parallel calls) whose
`arguments` follow the function's schema, so it always parses. With `auto` the model decides, and its
`<tool_call>` blocks are parsed out of its text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ember.runtime.model.grammar import json_grammar
from ember.runtime.serving.protocol import ChatRequest, NamedToolChoice, ToolDef

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools and how they may be used."""

    tools: list[ToolDef]
    tool_choice: str | NamedToolChoice = "auto"
    parallel_tool_calls: bool = True

    @property
    def names(self) -> list[str]:
        return [t.function.name for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def parsed(self) -> bool:
        """Whether the output may hold tool calls."""
        return self.tool_choice != "none"

    def template_tools(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def system_prompt(self) -> str:
        """The tools, for a chat template that does not take them."""
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), separators=(",", ":"))
                              for t in self.tools)
        return ("You may call these functions:\n" + described + "\nTo call one, answer with "
                '<tool_call>{"name": <function name>, "arguments": <arguments as JSON>}</tool_call> and nothing else.')

    def grammar(self) -> str | None:
        """The output's grammar when a call is required: the call (or calls) as JSON."""
        if not self.constrained:
            return None
        chosen = [t for t in self.tools if isinstance(self.tool_choice, str)
                  or t.function.name == self.tool_choice.function.name]
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "arguments": t.function.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel_tool_calls and not isinstance(self.tool_choice, NamedToolChoice):
            return json_grammar({"type": "array", "items": call, "minItems": 1})
        return json_grammar(call)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished output."""
        if self.constrained:
            found = json.loads(text)
            return None, [_call(c) for c in (found if isinstance(found, list) else [found])]
        calls, kept = [], text
        for block in _BLOCK.findall(text):
            try:
                found = json.loads(block)
            except json.JSONDecodeError:
                continue  # not a call: it stays in the text
            if isinstance(found, dict) and found.get("name") in self.names:
                calls.append(_call(found))
                kept = kept.replace(f"<tool_call>{block}</tool_call>", "", 1)
        content = kept.strip() if calls else text
        return (content or None), calls


def tool_use(body: ChatRequest) -> ToolUse | None:
    """A chat request's tools and their use (None without tools)."""
    if not body.tools:
        return None
    return ToolUse(body.tools, body.tool_choice or "auto", body.parallel_tool_calls)


def _call(found: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": found["name"], "arguments": json.dumps(found.get("arguments", {}))}}


def template_messages(messages: list, uses: ToolUse | None, template_takes_tools: bool) -> list[dict]:
    """The conversation as the chat template gets it: tool calls and results in the template's own terms when it
    takes tools, else as `<tool_call>` text and tool results in the turns."""
    rendered = []
    for m in messages:
        entry = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            if template_takes_tools:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in m.tool_calls]
            else:
                entry["content"] += "".join(
                    f'<tool_call>{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}'
                    f"</tool_call>" for c in m.tool_calls)
        if m.tool_call_id and template_takes_tools:
            entry["tool_call_id"] = m.tool_call_id
        rendered.append(entry)
    if uses is not None and uses.parsed and not template_takes_tools:
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + uses.system_prompt()}
        else:
            rendered.insert(0, {"role": "system", "content": uses.system_prompt()})
    return rendered
