"""IR -> IR passes and the pipeline driver.

Each pass is a small frozen dataclass with a `name` and its options as fields; a pipeline is a string such as
"expand-groups{mode=split},chunk{size=64},fuse". The driver verifies the IR after every pass and records its text.
"""
from __future__ import annotations

import dataclasses
import re

from ssmc.errors import SSMCError
from ssmc.ir import Program, dce, verify

from .adjoint import Adjoint
from .chunk import Chunk
from .classify import Classify
from .expand_groups import ExpandGroups
from .fuse import Fuse


@dataclasses.dataclass(frozen=True)
class DeadCode:
    name = "dce"

    def run(self, p: Program) -> Program:
        return dce(p)


PASSES = {cls.name: cls for cls in (ExpandGroups, Classify, Chunk, Fuse, DeadCode, Adjoint)}


def parse_pipeline(text: str) -> list:
    """"a,b{k=v,k2=v2},c" -> pass objects. Option values are converted to the field's type."""
    out = []
    for m in re.finditer(r"\s*([\w-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)", text):
        if not m.group(1):
            continue
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise SSMCError(f"unknown pass '{name}' in pipeline '{text}'; passes: {', '.join(PASSES)}")
        cls = PASSES[name]
        kw = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for item in filter(None, (s.strip() for s in (opts or "").split(","))):
            k, _, v = item.partition("=")
            k, v = k.strip(), v.strip()
            if k not in fields:
                raise SSMCError(f"pass '{name}' has no option '{k}'; options: {', '.join(fields) or 'none'}")
            kw[k] = _convert(v, fields[k].type)
        out.append(cls(**kw))
    return out


def _convert(v: str, typ) -> object:
    t = str(typ)
    if v in ("none", "None"):
        return None
    if "int" in t:
        return int(v)
    if "bool" in t:
        return v.lower() in ("1", "true", "yes")
    return v


def pipeline_text(passes) -> str:
    def one(p):
        opts = ",".join(f"{f.name}={getattr(p, f.name)}" for f in dataclasses.fields(p))
        return p.name + (f"{{{opts}}}" if opts else "")
    return ",".join(one(p) for p in passes)


def run_pipeline(p: Program, passes, trace=None) -> tuple[Program, list[tuple[str, str]]]:
    """Run passes in order, verifying after each; returns the final program and (pass, IR text) after each."""
    verify(p, "lower")
    texts = [("lower", p.text())]
    for ps in passes:
        p = ps.run(p)
        verify(p, ps.name)
        texts.append((ps.name, p.text()))
        if trace:
            trace(ps.name, p)
    return p, texts
