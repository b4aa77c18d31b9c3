"""Whether a JSON Schema admits a finite JSON document at all.

Without `$ref` every schema's documents are finite; a `$ref` cycle with no way out (`{"$ref": "#"}`, an object
that requires a property of its own type) admits none, and a grammar built from it would let the model write
forever, or nothing. Productivity is a least fixpoint over the `$ref` targets: each starts as "no finite
document" and turns finite once its schema has one given what is known so far. Every rule over-approximates
(a keyword it does not model counts as satisfiable), so a schema is refused only when it has no finite document
for certain; the rest is llguidance's to enforce.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

# Schema nodes visited in all passes together: beyond it the answer is "finite" (unknown), so the check stays a
# few tens of milliseconds of the GIL however large or self-referential the schema.
MAX_VISITS = 50_000


class _Budget(Exception):
    pass


def has_finite_instance(schema: Any) -> bool:
    """False only when no finite JSON document satisfies `schema` (its `$ref` recursion never bottoms out)."""
    return _Productivity(schema).run()


class _Productivity:
    def __init__(self, root: Any):
        self.root, self.visits = root, 0
        self.finite: dict[str, bool] = {}  # "#..." pointer → has a finite document (as far as is known)
        # Before draft 2019-09 a $ref's sibling keywords are ignored: there the $ref alone decides.
        declared = root.get("$schema", "") if isinstance(root, dict) else ""
        self.ref_alone = isinstance(declared, str) and any(f"draft-0{n}" in declared for n in range(3, 8))

    def run(self) -> bool:
        try:
            while True:
                known = len(self.finite)
                root = self.visit(self.root)
                grown = False
                # Latest found first, each result used at once: a chain of definitions, each naming the next,
                # settles in one pass.
                for pointer in reversed([p for p, finite in self.finite.items() if not finite]):
                    if self.visit(self.resolve(pointer)):
                        self.finite[pointer] = grown = True
                if not grown and len(self.finite) == known:  # stable, and no target found this pass is unvisited
                    return root
        except _Budget:
            return True

    def resolve(self, pointer: str) -> Any:
        node = self.root
        for part in pointer[1:].split("/")[1:]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return True  # not in this document: llguidance refuses it, or it is its to resolve
        return node

    def ref(self, target: Any) -> bool:
        if not isinstance(target, str) or not (target == "#" or target.startswith("#/")):
            return True  # an $id, an anchor, a remote document: not modelled
        return self.finite.setdefault(target, False)

    def visit(self, node: Any) -> bool:
        self.visits += 1
        if self.visits > MAX_VISITS:
            raise _Budget()
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return True
        if "$ref" in node and (self.ref_alone or not self.ref(node["$ref"])):
            return self.ref(node["$ref"])
        if not all(self.visit(s) for s in node.get("allOf", ())):
            return False
        for key in ("anyOf", "oneOf"):
            if key in node and not any(self.visit(s) for s in node[key]):
                return False
        if "enum" in node or "const" in node:
            return True  # its listed values are finite documents
        if "type" not in node:
            return True  # a scalar satisfies whatever object and array keywords demand
        types = [node["type"]] if isinstance(node["type"], str) else node["type"]
        return any(self.typed(t, node) for t in types)

    def typed(self, kind: str, node: dict) -> bool:
        if kind == "object":
            properties = node.get("properties", {})
            extra = node.get("additionalProperties", True)
            for name in node.get("required", ()):
                if name in properties:
                    if not self.visit(properties[name]):
                        return False
                elif "patternProperties" not in node and not self.visit(extra):
                    return False
            return True
        if kind == "array":
            least = node.get("minItems", 0)
            prefix = node.get("prefixItems", node.get("items") if isinstance(node.get("items"), list) else [])
            prefix = prefix if isinstance(prefix, list) else []
            rest = node.get("additionalItems", True) if isinstance(node.get("items"), list) else node.get("items", True)
            if not all(self.visit(s) for s in prefix[:least]):
                return False
            if least > len(prefix) and not self.visit(rest):
                return False
            return node.get("minContains", 1) == 0 or self.visit(node.get("contains", True))
        return True
