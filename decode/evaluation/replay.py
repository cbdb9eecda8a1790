"""Replaying a method's decisions at another model size (docs/algorithms.md 5.4; `make bench-xl`).

The world target is small enough that a pass over a tree costs far more than a pass over one
token; a LlamaGen-XL-sized target is not, and there speculation pays. Its weights cannot be trained
here, so its drafter cannot agree with it: random weights would accept nothing. A replay takes the
decisions a method made on the world (per image and step: verified or skipped, the tree's shape and
the nodes it took) and makes the same decisions at the other size, through the real engine and the
real strategies: every draft round, target pass over a tree of the recorded shape, acceptance walk
and skip rule runs at full size and pays its real cost, and then the recorded outcome replaces the
one its random weights produced. The step compression is the world's; the wall-clock is the other
size's.

`recording(method)` wraps a method to write its trace; `replaying(method, trace)` wraps a method
(the same composition, built at the other size) to follow one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from decode.core.engine import Method
from decode.core.trees import ancestry_mask
from decode.strategies.acceptance import Verdict

VERIFY, SKIP = "v", "s"


@dataclass
class Trace:
    """Per image, its steps in order: (VERIFY or SKIP, the nodes taken, root first, and the tree's
    parent pointers). A verified step takes its accepted path; a skipped one the selector's nodes
    (the last becomes the next root)."""
    method: str
    num_tokens: int
    images: list[list[tuple[str, list[int], list[int]]]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"method": self.method, "num_tokens": self.num_tokens, "images": self.images}))

    @classmethod
    def load(cls, path: Path, method: str, num_tokens: int) -> "Trace":
        saved = json.loads(Path(path).read_text())
        if saved["method"] != method or saved["num_tokens"] != num_tokens:
            raise ValueError(f"{path} is a trace of {saved['method']} over {saved['num_tokens']} tokens; this replay "
                             f"needs {method} over {num_tokens}")
        return cls(method, num_tokens, [[tuple(e) for e in image] for image in saved["images"]])

    def step_compression(self) -> float:
        passes = sum(1 for image in self.images for event in image if event[0] == VERIFY)
        return self.num_tokens * len(self.images) / max(1, passes)


class _RecordAcceptance:
    def __init__(self, inner, events: list[list]):
        self.inner, self.events = inner, events

    def __call__(self, tree, logits, sampling, generators, rows=None):
        verdict = self.inner(tree, logits, sampling, generators, rows)
        parents = tree.parents.cpu()  # the recording run reads the tree back once more per step
        for r in range(tree.tokens.shape[0]) if rows is None else rows:
            self.events[r].append((VERIFY, list(verdict.paths[r]), parents[r].tolist()))
        return verdict


class _RecordSkipping:
    def __init__(self, inner, events: list[list]):
        self.inner, self.events = inner, events
        self.max_skip_run = getattr(inner, "max_skip_run", None)

    def start(self, *args, **kwargs):
        return _RecordSkipRun(self.inner.start(*args, **kwargs), self.events)


class _Passing:
    """A skip run passing everything to the one it wraps (the recording and replaying runs add to `plan`)."""

    def __init__(self, inner):
        self.inner = inner

    def stale_features(self, row, n):
        return self.inner.stale_features(row, n)

    def observe(self, outcome, filled):
        self.inner.observe(outcome, filled)


class _RecordSkipRun(_Passing):
    def __init__(self, inner, events):
        super().__init__(inner)
        self.events = events

    def plan(self, tree, progress):
        tree, skips = self.inner.plan(tree, progress)
        parents = tree.parents.cpu()
        for r, nodes in skips.items():
            self.events[r].append((SKIP, list(nodes), parents[r].tolist()))
        return tree, skips


def _check_replayable(method: Method) -> None:
    if getattr(method.schedule, "lane_drafts", 0) and getattr(method.skipping, "rule", None) is not None:
        raise ValueError(f"method {method.name}: a wavefront's skips are decided per row inside its loop, which "
                         "traces do not record; replay it without skipping")


def recording(method: Method, batch: int) -> tuple[Method, list[list]]:
    """`method` writing each of `batch` images' steps into the returned lists."""
    _check_replayable(method)
    events: list[list] = [[] for _ in range(batch)]
    return replace(method, acceptance=_RecordAcceptance(method.acceptance, events),
                   skipping=_RecordSkipping(method.skipping, events)), events


class _Cursor:
    """Each image's position in its recorded steps; past its end (the replay took fewer tokens per
    step than recorded, which a faithful replay does not), the root alone is verified."""

    def __init__(self, images: list[list]):
        self.images, self.at, self.past_end = images, [0] * len(images), 0

    def peek(self, r: int):
        steps = self.images[r]
        return steps[self.at[r]] if self.at[r] < len(steps) else None

    def take(self, r: int):
        event = self.peek(r)
        self.at[r] += 1
        if event is None:
            self.past_end += 1
        return event


class _ReplayDrafting:
    """The method's drafting, its tree's shape replaced by the recorded one: the drafter runs at full
    size, and the target verifies a tree of the shape the world drafter grew."""

    def __init__(self, inner, cursor: _Cursor):
        self.inner, self.cursor = inner, cursor
        self.static_shapes = getattr(inner, "static_shapes", False)

    def start(self, *args, **kwargs):
        return _ReplayDraftRun(self.inner.start(*args, **kwargs), self.cursor)


class _ReplayDraftRun:
    def __init__(self, inner, cursor: _Cursor):
        self.inner, self.cursor = inner, cursor

    @property
    def tree_size(self) -> int:  # static shapes: the recorded trees have the method's size (checked below)
        return self.inner.tree_size

    @property
    def longest_path(self) -> int:
        return self.inner.longest_path

    def begin(self, *args):
        self.inner.begin(*args)

    def observe(self, *args):
        self.inner.observe(*args)

    def propose(self, root, sampling, generators):
        tree = self.inner.propose(root, sampling, generators)
        parents = tree.parents.cpu().clone()
        for r in range(parents.shape[0]):
            event = self.cursor.peek(r)
            if event is not None:
                if len(event[2]) != tree.size:
                    raise ValueError(f"replay: the trace's trees have {len(event[2])} nodes, this method's "
                                     f"{tree.size}: a trace of another tree")
                parents[r] = torch.tensor(event[2])
        parents = parents.to(tree.parents.device)
        depths = _depths(parents)
        return dataclasses.replace(tree, parents=parents, depths=depths, mask=ancestry_mask(parents), host=None)


def _depths(parents: Tensor) -> Tensor:
    """[B, T] depth of each node from parent pointers (parents precede children)."""
    depths = torch.zeros_like(parents)
    for i in range(1, parents.shape[1]):
        depths[:, i] = depths.gather(1, parents[:, i:i + 1].clamp_min(0))[:, 0] + 1
    return depths


class _ReplayAcceptance:
    def __init__(self, inner, cursor: _Cursor):
        self.inner, self.cursor = inner, cursor

    def __call__(self, tree, logits, sampling, generators, rows=None):
        verdict = self.inner(tree, logits, sampling, generators, rows)  # its real cost; its outcome is replaced
        paths = list(verdict.paths)
        for r in range(tree.tokens.shape[0]) if rows is None else rows:
            event = self.cursor.take(r)
            if event is not None and event[0] != VERIFY:
                raise ValueError(f"replay: image {r} verifies where its trace skips: a trace of another schedule")
            paths[r] = event[1] if event is not None else [0]
        return Verdict(paths, verdict.next_tokens)


class _ReplaySkipping:
    def __init__(self, inner, cursor: _Cursor):
        self.inner, self.cursor = inner, cursor
        self.max_skip_run = getattr(inner, "max_skip_run", None)

    def start(self, *args, **kwargs):
        return _ReplaySkipRun(self.inner.start(*args, **kwargs), self.cursor)


class _ReplaySkipRun(_Passing):
    def __init__(self, inner, cursor: _Cursor):
        super().__init__(inner)
        self.cursor = cursor

    def plan(self, tree, progress):
        tree, _ = self.inner.plan(tree, progress)  # the rule's real cost; its decisions are replaced
        skips = {}
        for r, live in enumerate(progress.live):
            event = self.cursor.peek(r)
            if live and event is not None and event[0] == SKIP:
                skips[r] = self.cursor.take(r)[1]
        return tree, skips


def replaying(method: Method, images: list[list]) -> tuple[Method, _Cursor]:
    """`method` making the recorded decisions of `images` (one list of steps per batch row) on trees
    of the recorded shapes."""
    _check_replayable(method)
    cursor = _Cursor(images)
    # a wavefront's chains take the shape its schedule gives them, which the replayed acceptances reproduce;
    # a raster method's tree takes the recorded shape
    lanes = getattr(method.schedule, "lane_drafts", 0)
    drafting = _ReplayDrafting(method.drafting, cursor) if method.drafting is not None and not lanes else method.drafting
    return replace(method, drafting=drafting, acceptance=_ReplayAcceptance(method.acceptance, cursor),
                   skipping=_ReplaySkipping(method.skipping, cursor)), cursor
