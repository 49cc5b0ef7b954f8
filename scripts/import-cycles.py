#!/usr/bin/env python3
"""Import cycles between the .rs files of crates: a file imports another when it names a path into it
(`crate::a::b`, `super::x`, `use crate::{a, b::{c}}`). Usage: scripts/import-cycles.py monitor/src analysis/src ...
Prints each cycle (a strongly connected set of files) and exits 1 if there is one."""
import os, re, sys

def modfile(src, parts):
    # longest prefix of parts that is a file
    for n in range(len(parts), 0, -1):
        base = os.path.join(src, *parts[:n])
        for cand in (base + '.rs', os.path.join(base, 'mod.rs')):
            if os.path.exists(cand):
                return cand
    return None

def modpath(src, f):
    rel = os.path.relpath(f, src)[:-3].split(os.sep)
    if rel[-1] == 'mod': rel = rel[:-1]
    if rel in (['lib'], ['main']): rel = []
    return rel

def expand(tree):
    # expand "a::{b, c::{d}}" into paths
    out = []
    def rec(prefix, s):
        s = s.strip()
        m = re.match(r'^([\w:]*?)::\{(.*)\}$', s, re.S)
        if m:
            pre = [p for p in m.group(1).split('::') if p]
            depth = 0; cur = ''; items = []
            for ch in m.group(2):
                if ch == '{': depth += 1
                if ch == '}': depth -= 1
                if ch == ',' and depth == 0: items.append(cur); cur = ''
                else: cur += ch
            items.append(cur)
            for it in items:
                if it.strip(): rec(prefix + pre, it)
        else:
            out.append(prefix + [p for p in re.split(r'::', s.split(' as ')[0]) if p])
    rec([], tree)
    return out

def edges(src):
    files = []
    for d, _, fs in os.walk(src):
        files += [os.path.join(d, f) for f in fs if f.endswith('.rs')]
    E = {}
    for f in files:
        text = re.sub(r'//[^\n]*', '', open(f).read())
        me = modpath(src, f)
        paths = []
        for m in re.finditer(r'\buse\s+((?:crate|super)(?:::\{[^;]*\}|[\w:]*(?:::\{[^;]*\})?))\s*;', text, re.S):
            paths += expand(m.group(1))
        for m in re.finditer(r'\b((?:crate|super)(?:::\w+)+)', text):
            paths.append(m.group(1).split('::'))
        tgt = set()
        for p in paths:
            if p[0] == 'crate':
                parts = p[1:]
            else:
                # `use super::*` in an inline test module means the file itself.
                if p == ['super', '*']:
                    continue
                parts = me[:-1] + p[1:]
            t = modfile(src, parts) if parts else None
            if t and t != f:
                tgt.add(t)
        E[f] = tgt
    return E

def cycles(E):
    """Strongly connected components of more than one file (Tarjan)."""
    index = {}; low = {}; st = []; on = set(); sccs = []; i = [0]
    def sc(v):
        index[v] = low[v] = i[0]; i[0] += 1; st.append(v); on.add(v)
        for w in E.get(v, ()):
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: sccs.append(comp)
    sys.setrecursionlimit(10000)
    for v in E:
        if v not in index: sc(v)
    return sccs

bad = False
for src in sys.argv[1:]:
    E = edges(src)
    sccs = cycles(E)
    for c in sccs:
        bad = True
        print('CYCLE in', src, ':', ' '.join(sorted(os.path.relpath(x, src) for x in c)))
    print(src, ':', len(E), 'files,', sum(len(v) for v in E.values()), 'file imports,', len(sccs), 'cycles')
sys.exit(1 if bad else 0)
