"""Compatibility verdicts: a manager written for one FlashInfer API, run on a release that lacks or renamed it.

Such a manager never reaches the workspace policy the suite checks: it fails when it is built (an import of a
class the release removed) or when it dispatches (a keyword the release renamed). That is not a defect of its
policy and not the harness's, so it is named once, as one line, instead of one traceback per test::

    vllm 0.32.0 with FlashInfer 0.7.4: fails at build: flashinfer.comm has no MoeAlltoAll (removed in 0.7.4)

Ranks turn the ``ImportError`` / ``AttributeError`` / ``TypeError`` into :class:`FlashInferIncompatible`
(:func:`classify`), whose message is that line; the parent reads it back from the rank's traceback with
:meth:`Incompatibility.parse`, so the verdict travels wherever a failure's summary does (pytest-xdist too).
Only errors that name a FlashInfer module, class or function count: anything else stays the manager's error.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class Stage(enum.Enum):
    """Where the manager's own code met the missing API."""

    BUILD = "build"  # importing or constructing the manager
    DISPATCH = "dispatch"  # its forward pass's dispatch / combine path


@dataclass(frozen=True)
class ApiChange:
    """One FlashInfer API change that breaks code written for an earlier release: ``name`` of ``owner``
    (a module, or a ``Class.method`` whose keyword it is) is gone in ``release``, or renamed ``renamed_to``."""

    release: str
    owner: str
    name: str
    renamed_to: str | None = None

    def note(self) -> str:
        if self.renamed_to is None:
            return f"removed in {self.release}"
        return f"renamed {self.renamed_to} in {self.release}"


#: The changes the managers in the wild trip over (read from FlashInfer 0.7.2.post1 and 0.7.4's wheels).
KNOWN_CHANGES = (
    ApiChange("0.7.4", "flashinfer.comm", "MoeAlltoAll"),
    ApiChange("0.7.4", "flashinfer.comm.trtllm_moe_alltoall", ""),  # the module itself (vLLM <= 0.32 imports it)
    ApiChange("0.7.4", "NVLinkOneSidedAlltoAll.dispatch", "max_tokens_per_rank", "runtime_max_tokens_per_rank"),
)


@dataclass(frozen=True)
class Incompatibility:
    """``manager`` (``vllm 0.32.0``, or the spec) with FlashInfer ``flashinfer`` fails at ``stage``: ``reason``."""

    manager: str
    flashinfer: str
    stage: Stage
    reason: str

    @property
    def line(self) -> str:
        return f"{self.manager} with FlashInfer {self.flashinfer}: fails at {self.stage.value}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {
            "manager": self.manager,
            "flashinfer": self.flashinfer,
            "stage": self.stage.value,
            "reason": self.reason,
            "verdict": self.line,
        }

    @classmethod
    def parse(cls, text: str) -> Incompatibility | None:
        """The verdict in ``text`` (a rank's traceback, a failure's summary), or ``None`` when it has none."""
        found = _RAISED.search(text) or _LINE.match(text)
        if found is None:
            return None
        return cls(found["manager"], found["flashinfer"], Stage(found["stage"]), found["reason"].strip())


#: A manager label is a spec (no spaces) or ``vllm VERSION``: a longer text that ends in a verdict is not one.
_VERDICT = (
    r"(?P<manager>vllm \S+|\S+) with FlashInfer (?P<flashinfer>\S+): "
    r"fails at (?P<stage>build|dispatch): (?P<reason>.+)"
)
_LINE = re.compile(rf"^{_VERDICT}$")
#: The last line of a rank's traceback that ended in :class:`FlashInferIncompatible`.
_RAISED = re.compile(rf"^(?:[\w.]+\.)?FlashInferIncompatible: {_VERDICT}$", re.MULTILINE)


class FlashInferIncompatible(Exception):
    """Raised in a rank (``from`` the original error) for an :class:`Incompatibility`; its message is the line."""

    def __init__(self, incompatibility: Incompatibility) -> None:
        self.incompatibility = incompatibility
        super().__init__(incompatibility.line)


_CANNOT_IMPORT = re.compile(r"cannot import name '(?P<name>[\w.]+)' from '(?P<module>[\w.]+)'")
_UNEXPECTED_KEYWORD = re.compile(r"^(?P<callee>[\w.<>]+)\(\) got an unexpected keyword argument '(?P<keyword>\w+)'")


def _flashinfer(name: str) -> bool:
    return name == "flashinfer" or name.startswith("flashinfer.")


def _note(owner: str, name: str, release: str, fallback: str) -> str:
    for change in KNOWN_CHANGES:
        if change.owner == owner and change.name == name and change.release == release:
            return change.note()
    return fallback


def classify(exc: BaseException, release: str, flashinfer_objects: Iterable[Any] = ()) -> str | None:
    """Why ``exc`` is an incompatibility with FlashInfer ``release`` (the reason of the verdict), or ``None``.

    An ``ImportError`` or ``AttributeError`` counts when it names a ``flashinfer`` module (or one of its
    classes); a ``TypeError`` for an unexpected keyword only when the callee is a method of one of
    ``flashinfer_objects`` (the live FlashInfer handles) that indeed lacks that keyword: a keyword error in
    the manager's own functions is its bug, not the release's."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and _flashinfer(exc.name):
        return f"no module named {exc.name} ({_note(exc.name, '', release, f'not in FlashInfer {release}')})"
    if isinstance(exc, ImportError):
        found = _CANNOT_IMPORT.search(str(exc))
        if found and _flashinfer(found["module"]):
            module, name = found["module"], found["name"]
            return f"{module} has no {name} ({_note(module, name, release, f'not in FlashInfer {release}')})"
        return None
    if isinstance(exc, AttributeError):
        owner, name = getattr(exc, "obj", None), getattr(exc, "name", None)
        if owner is None or not name:
            return None
        cls = owner if inspect.isclass(owner) else type(owner)
        where = owner.__name__ if inspect.ismodule(owner) else f"{cls.__module__}.{cls.__qualname__}"
        if not _flashinfer(where):
            return None
        label = where if inspect.ismodule(owner) else where.rpartition(".")[2]
        return f"{label} has no {name} ({_note(label, name, release, f'not in FlashInfer {release}')})"
    if isinstance(exc, TypeError):
        found = _UNEXPECTED_KEYWORD.match(str(exc))
        if found is None:
            return None
        callee, keyword = found["callee"], found["keyword"]
        accepted = _parameters_of(callee, flashinfer_objects)
        if accepted is None or keyword in accepted:
            return None
        similar = [p for p in accepted if p.endswith(f"_{keyword}") or keyword.endswith(f"_{p}")]
        fallback = f"FlashInfer {release} has {similar[0]}" if similar else f"not in FlashInfer {release}"
        return f"{callee}() got an unexpected keyword '{keyword}' ({_note(callee, keyword, release, fallback)})"
    return None


def _parameters_of(callee: str, objects: Iterable[Any]) -> list[str] | None:
    """The parameter names of ``Class.method`` when one of ``objects`` is a FlashInfer ``Class`` instance."""
    cls_name, _, method = callee.rpartition(".")
    for obj in objects:
        cls = type(obj)
        if cls.__qualname__ != cls_name or not _flashinfer(cls.__module__):
            continue
        function = getattr(cls, method, None)
        if function is None:
            return None
        try:
            return list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            return None
    return None


@contextmanager
def verdict_on(manager: str, stage: Stage, flashinfer_objects: Iterable[Any] | None = None) -> Iterator[list[Any]]:
    """Turn an incompatibility raised inside into :class:`FlashInferIncompatible` (``from`` the original, so the
    traceback stays as evidence); every other error passes unchanged. Yields a list the caller may append the
    FlashInfer objects to whose keyword errors count (the handle the manager dispatches through)."""
    objects: list[Any] = list(flashinfer_objects or ())
    try:
        yield objects
    except (ImportError, AttributeError, TypeError) as exc:
        from pytest_mnnvl.model import releases

        release = releases.current()
        reason = classify(exc, release, objects)
        if reason is None:
            raise
        raise FlashInferIncompatible(Incompatibility(manager, release, stage, reason)) from exc
