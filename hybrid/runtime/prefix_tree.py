"""Which token prefixes the page pools hold: a radix tree whose edges are pages.

Owns PrefixTree. A node is one page of a cached sequence: the token ids whose positions it holds (a
full page, P of them, or fewer for the last page of a sequence) and the page entry, on which the tree
holds one reference. Children follow only full pages. match() finds the longest prefix of a request
held anywhere (any earlier request, not only the last); insert() adds a finished sequence's pages;
evict_leaf() drops the least recently used leaf. Refcounts and data are the pools' (model/paged.py);
this module only decides. No torch, no files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]  # the ids at this page's positions (len <= P)
    page: int  # page entry (>= 0 main pool, < 0 spill pool)
    parent: "Node | None"
    children: dict[int, list["Node"]] = field(default_factory=dict)  # by first token
    used: int = 0  # the tree's clock at the last match or insert through this node

    def kids(self) -> Iterator["Node"]:
        for group in self.children.values():
            yield from group


@dataclass
class Match:
    full: list[Node]  # whole pages matched, in order
    partial: Node | None  # a page matched in its first `rows` positions only (copy it before writing)
    rows: int

    @property
    def tokens(self) -> int:
        return sum(len(n.tokens) for n in self.full) + self.rows


def _common(a: tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixTree:
    """Token prefixes -> page entries. `incref` / `decref` are the pools' (decref True: page freed)."""

    def __init__(self, page_size: int, incref: Callable[[int], None], decref: Callable[[int], bool]):
        self.P = page_size
        self.root = Node((), -1, None)
        self._incref, self._decref = incref, decref
        self.clock = 0
        self.nodes = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def match(self, ids: list[int]) -> Match:
        """The longest prefix of ids the tree holds (marks its nodes used)."""
        now, node, full, pos = self._tick(), self.root, [], 0
        while pos < len(ids):
            chunk = ids[pos:pos + self.P]
            best, best_n = None, 0
            for kid in node.children.get(chunk[0], ()):
                n = _common(kid.tokens, chunk)
                if n > best_n:
                    best, best_n = kid, n
            if best is None:
                break
            best.used = now
            if best_n == self.P and len(best.tokens) == self.P:
                full.append(best)
                node, pos = best, pos + self.P
                continue
            return Match(full, best, best_n)
        return Match(full, None, 0)

    def insert(self, ids: list[int], pages: list[int]) -> None:
        """Add a sequence: ids[k*P:(k+1)*P] held by pages[k]. Pages already held for the same tokens
        stay as they are; a new node takes a reference on its page; a leaf whose tokens are a
        strict prefix of the new page's (a partial page since extended) is dropped."""
        now, node = self._tick(), self.root
        for k in range(-(-len(ids) // self.P)):
            chunk = tuple(ids[k * self.P:(k + 1) * self.P])
            kids = node.children.get(chunk[0], ())
            same = next((kid for kid in kids if kid.tokens == chunk), None)
            if same is None and len(chunk) < self.P:
                longer = next((kid for kid in kids if kid.tokens[:len(chunk)] == chunk), None)
                if longer is not None:  # a page already holds these tokens and more
                    longer.used = now
                    break
            if same is None:
                for kid in list(node.children.get(chunk[0], ())):
                    if not kid.children and len(kid.tokens) < len(chunk) and chunk[:len(kid.tokens)] == kid.tokens:
                        self._drop(kid)  # superseded by the longer page below
                same = Node(chunk, pages[k], node)
                self._incref(pages[k])
                node.children.setdefault(chunk[0], []).append(same)
                self.nodes += 1
            same.used = now
            if len(chunk) < self.P:
                break
            node = same

    def _drop(self, leaf: Node) -> bool:
        group = leaf.parent.children[leaf.tokens[0]]
        group.remove(leaf)
        if not group:
            del leaf.parent.children[leaf.tokens[0]]
        self.nodes -= 1
        return self._decref(leaf.page)

    def leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            kids = list(n.kids())
            if not kids and n is not self.root:
                out.append(n)
            stack.extend(kids)
        return out

    def evict_leaf(self, want: Callable[[Node], bool] = lambda n: True,
                   before: Callable[[Node], None] | None = None) -> Node | None:
        """Drop the least recently used leaf that `want` accepts (before(leaf) runs first: the disk
        tier saves it there); None when there is none. Returns the dropped node."""
        leaves = [n for n in self.leaves() if want(n)]
        if not leaves:
            return None
        leaf = min(leaves, key=lambda n: n.used)
        if before is not None:
            before(leaf)
        self._drop(leaf)
        return leaf

    def path(self, node: Node) -> tuple[list[int], list[int]]:
        """The token ids and page entries from the root down to node."""
        nodes = []
        while node is not self.root:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return [t for n in nodes for t in n.tokens], [n.page for n in nodes]

    def clear(self) -> None:
        while self.evict_leaf() is not None:
            pass
