"""Spec text -> syntax tree (lark LALR parser + a Transformer), with friendly syntax errors."""
from __future__ import annotations

import json
import sys
import threading
from importlib import resources

import lark
import lark.grammar
import lark.lexer
from lark import v_args
from lark.visitors import Transformer_NonRecursive

from . import ast
from .errors import Span, SpecError

# Human names for the grammar's terminals, used in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "a newline", "SEMICOLON": "';'", "LBRACE": "'{'",
    "RBRACE": "'}'", "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','",
    "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "OUTER": "'⊗'",
    "DOT": "'·'", "__ANON_0": "'**'", "$END": "end of input",
}

# Known mistakes -> a clearer message (lark's match_examples picks the closest parser state).
_EXAMPLES = {
    "a dims list needs names separated by commas, e.g. `dims b, t, h`":
        ["ssm m { dims b t }", "ssm m {\n dims b t\n}", "ssm m {\n dims\n}"],
    "an array declaration needs its dims in brackets, e.g. `in x[b,t,h]`":
        ["ssm m { in x[b,t }", "ssm m {\n in x[b,t\n}", "ssm m {\n in x[b t]\n}", "ssm m {\n in x[b,t,\n}"],
    "an expression is missing an operand":
        ["ssm m { y = x + }", "ssm m {\n y = x +\n}", "ssm m {\n y = * x\n}", "ssm m {\n y =\n}",
         "ssm m {\n y = x *\n}", "ssm m {\n y = x ·\n}"],
    "unbalanced parentheses": ["ssm m { y = (x + 1 }", "ssm m {\n y = (x + 1\n}", "ssm m {\n y = exp(x\n}"],
    "statements are separated by a newline or ';'": ["ssm m { y = x z = x }", "ssm m {\n y = x z = x\n}"],
}


_PARSER_OPTIONS = dict(parser="lalr", strict=True, propagate_positions=True, maybe_placeholders=False)
_parser: lark.Lark | None = None
_parser_lock = threading.Lock()


def parser(disk_cache: bool = True) -> lark.Lark:
    """The spec parser, built once per process. Building it costs ~0.2 s (mostly strict mode's regex-collision
    check), so its tables are also kept in the disk cache (``disk_cache``), under the same trust rules as kernels
    (ssmc/cache.py: ours, not group/other-writable, HMAC-authenticated) and as JSON, never a pickle."""
    global _parser
    if _parser is None:
        with _parser_lock:
            if _parser is None:
                _parser = _load_or_build(disk_cache)
    return _parser


def _load_or_build(disk_cache: bool) -> lark.Lark:
    from .cache import DiskCache, cache_key

    text = resources.files("ssmc.grammar").joinpath("ssm.lark").read_text(encoding="utf-8")
    dc = key = None
    if disk_cache:
        dc = DiskCache(space="lark")
        key = cache_key(grammar=text, lark=lark.__version__, options=repr(sorted(_PARSER_OPTIONS.items())),
                        python="%d.%d" % sys.version_info[:2])
        entry = dc.get(key)
        if entry is not None:
            try:
                d = json.loads(entry["tables"], object_hook=_untag)
                return lark.Lark._load_from_dict(d["data"], d["memo"])
            except Exception:  # an authentic entry lark cannot load (should not happen): rebuild and overwrite
                pass
    p = lark.Lark(text, **_PARSER_OPTIONS)
    if dc is not None:
        data, memo = p.memo_serialize([lark.lexer.TerminalDef, lark.grammar.Rule])
        dc.put(key, {"tables": json.dumps(_tag({"data": data, "memo": memo}), separators=(",", ":"))})
    return p


# lark's serialised tables are plain data with tuples and int-keyed dicts, which JSON alone would turn into lists
# and str keys: tag those two so a load gives back exactly what lark wrote.
def _tag(x):
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not {"(", "{"} & set(x):
            return {k: _tag(v) for k, v in x.items()}
        return {"{": [[_tag(k), _tag(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"(": [_tag(v) for v in x]}
    if isinstance(x, list):
        return [_tag(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"unexpected {type(x).__name__} in lark's serialised parser")


def _untag(o: dict):
    if len(o) == 1:
        if "(" in o:
            return tuple(o["("])
        if "{" in o:
            return {k: v for k, v in o["{"]}
    return o


def _span(meta_or_token) -> Span:
    m = meta_or_token
    return Span(m.line, m.column, m.end_line, m.end_column)


class _ToAst(Transformer_NonRecursive):
    """Turns lark trees into ast dataclasses (with an explicit stack: a sum of thousands of terms or a nest of
    thousands of calls is as deep a tree, and must not exhaust Python's)."""

    def __init__(self, source: str, filename: str):
        super().__init__()
        self.source, self.filename = source, filename

    def start(self, items):
        return items[0]

    @v_args(meta=True)
    def ssm(self, meta, items):
        name, body = items[0], (items[1] if len(items) > 1 else [])
        dims, scan, groups, arrays, stmts = [], None, [], [], []
        for it in body:
            kind = it[0]
            if kind == "dims":
                dims.extend(it[1])
            elif kind == "scan":
                if scan is not None:
                    raise SpecError("the scan dim is declared twice", it[1].span, self.source, self.filename)
                scan = it[1]
            elif kind == "group":
                groups.append(it[1:])
            elif kind == "arrays":
                arrays.extend(it[1])
            else:
                stmts.append(it[1])
        return ast.Spec(str(name), tuple(dims), scan, tuple(groups), tuple(arrays), tuple(stmts), _span(meta),
                        self.source, self.filename)

    def body(self, items):
        return items

    def dims_decl(self, items):
        return ("dims", [ast.Name(str(t), _span(t)) for t in items])

    def scan_decl(self, items):
        return ("scan", ast.Name(str(items[0]), _span(items[0])))

    @v_args(meta=True)
    def group_decl(self, meta, items):
        g, h = items
        return ("group", ast.Name(str(g), _span(g)), ast.Name(str(h), _span(h)), _span(meta))

    def _arrays(kind):
        def rule(self, items):
            return ("arrays", [ast.ArrayDecl(kind, n, d, s) for n, d, s in items])
        return rule

    in_decl, state_decl, out_decl = _arrays("in"), _arrays("state"), _arrays("out")

    @v_args(meta=True)
    def array(self, meta, items):
        return (str(items[0]), items[1] if len(items) > 1 else (), _span(meta))

    def dimlist(self, items):
        return tuple(ast.Name(str(t), _span(t)) for t in items)

    @v_args(meta=True)
    def target(self, meta, items):
        return (str(items[0]), items[1] if len(items) > 1 else None, _span(items[0]))

    @v_args(meta=True)
    def assign(self, meta, items):
        (name, dims, tspan), expr = items
        return ("assign", ast.Assign(name, dims, expr, _span(meta), tspan))

    @v_args(meta=True)
    def number(self, meta, items):
        return ast.Num(float(items[0]), _span(items[0]))

    @v_args(meta=True)
    def var(self, meta, items):
        return ast.Var(str(items[0]), _span(items[0]))

    def _binop(op):
        @v_args(meta=True)
        def rule(self, meta, items):
            left, right = items[0], items[-1]  # outer/dot keep their operator token in the middle
            return ast.BinOp(op, left, right, _span(meta))
        return rule

    add, sub, mul, div = _binop("add"), _binop("sub"), _binop("mul"), _binop("div")
    outer, dot, pow = _binop("outer"), _binop("dot"), _binop("pow")

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(items[0], _span(meta))

    @v_args(meta=True)
    def call(self, meta, items):
        func, args, kwargs = str(items[0]), [], []
        for a in items[1:]:
            if isinstance(a, tuple) and a and a[0] == "kw":
                kwargs.append(a[1:])
            else:
                if kwargs:
                    raise SpecError("positional argument after a keyword argument", a.span, self.source, self.filename)
                args.append(a)
        return ast.Call(func, tuple(args), tuple(kwargs), _span(meta))

    @v_args(meta=True)
    def kwarg(self, meta, items):
        return ("kw", str(items[0]), items[1], _span(meta))

    @v_args(meta=True)
    def kwlist(self, meta, items):
        return ("kw", str(items[0]), items[1] if len(items) > 1 else (), _span(meta))


def parse(source: str, filename: str = "<spec>") -> ast.Spec:
    """Parse spec text into an ast.Spec, raising SpecError with line:column and a caret on bad syntax."""
    p = parser()
    try:
        tree = p.parse(source)
    except lark.UnexpectedInput as e:
        raise _syntax_error(e, p, source, filename) from None
    except lark.exceptions.VisitError as e:  # pragma: no cover - transformer errors are raised directly
        raise e.orig_exc from None
    try:
        return _ToAst(source, filename).transform(tree)
    except lark.exceptions.VisitError as e:
        raise e.orig_exc from None


def _syntax_error(e: lark.UnexpectedInput, p: lark.Lark, source: str, filename: str) -> SpecError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    width = 1
    if isinstance(e, lark.UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            found = "end of input"
        elif tok.type == "_NL":
            found = "end of line"
        else:
            found = repr(str(tok))
            width = max(1, len(str(tok)))
        expected = sorted({_TERMINAL_NAMES.get(t, repr(p.get_terminal(t).pattern.value) if _is_str_terminal(p, t) else t)
                           for t in e.expected})
        msg = f"syntax error: unexpected {found}; expected {', '.join(expected)}"
    elif isinstance(e, lark.UnexpectedCharacters):
        msg = f"syntax error: unexpected character {source[e.pos_in_stream]!r}" if 0 <= e.pos_in_stream < len(source) \
            else "syntax error: unexpected character"
    else:
        msg = "syntax error: unexpected end of input"
    try:
        hint = e.match_examples(p.parse, _EXAMPLES, use_accepts=True)
    except Exception:  # match_examples re-parses the examples; never let it mask the real error
        hint = None
    if not hint and isinstance(e, lark.UnexpectedToken):
        hint = _hint(e)
    if hint:
        msg += f" ({hint})"
    if line < 1:  # end of input: point after the last character
        lines = source.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    return SpecError(msg, Span(line, col, line, col + width), source, filename)


def _hint(e: lark.UnexpectedToken) -> str | None:
    """A plain-words hint from what the parser expected at the bad token (match_examples only matches when the
    parser stack has the example's depth)."""
    exp, tok = set(e.expected), e.token.type
    ends = {"_NL", "SEMICOLON", "RBRACE", "$END"}
    if tok in ends and "RPAR" in exp and "NAME" not in exp:
        return "unbalanced parentheses: a '(' is not closed"
    if tok in ends and {"NAME", "NUMBER"} <= exp:
        return "an expression is missing an operand"
    if "RSQB" in exp and "NAME" not in exp:
        return "dims in brackets are separated by commas, e.g. x[b,t,h]"
    if tok == "NAME" and "_NL" in exp:
        return "list items are separated by commas, statements by a newline or ';'"
    return None


def _is_str_terminal(p: lark.Lark, name: str) -> bool:
    try:
        return p.get_terminal(name).pattern.type == "str"
    except KeyError:
        return False
