#!/usr/bin/env python
"""Insert nbdev `show_doc` cells into notebooks: `python .ci/show_doc.py [--check] NB.ipynb ...`

For each notebook with a `#| default_exp MOD`: after every `#| export` (or `#| exports`) cell that defines public
functions or classes (top-level `def`/`class` whose name is in `scfs/MOD.py`'s `__all__`), one code cell
`show_doc(name)` per symbol, in the order they are defined. A symbol that already has a `show_doc(name)` cell anywhere
in the notebook is skipped, so a second run changes nothing. The notebook also gets `from nbdev.showdoc import
show_doc`: added to its first non-export cell with an import that comes before the first `show_doc` cell, or else a
new `#| hide` cell after the `default_exp` cell. Run it after `nbdev_export` (it reads `__all__` from the exported
module), then re-execute the notebooks. New cells are unexecuted; export cells are not touched, so `nbdev_export`
writes the same module. `--check` changes nothing and exits 1 when some notebook would change.
"""
import argparse, ast, json, re, sys, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_SHOW_DOC = re.compile(r'^\s*show_doc\(\s*([A-Za-z_][\w.]*)\s*[,)]')
IMPORT = 'from nbdev.showdoc import show_doc'


def _src(cell) -> str:
    return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def _lines(text: str) -> list:
    "Source as this repo stores it: a list of lines, each but the last ending in a newline."
    return text.splitlines(keepends=True)


def directives(cell) -> tuple:
    "(`#|` directives at the top of a code cell as {name: value}, the rest of the source)."
    lines, dirs = _src(cell).splitlines(), {}
    while lines and _DIRECTIVE.match(lines[0]):
        m = _DIRECTIVE.match(lines.pop(0)); dirs[m.group(1)] = m.group(2)
    return dirs, '\n'.join(lines)


def module_all(module: str, lib: Path) -> list:
    "The `__all__` of `lib/module.py` (read with ast, not imported)."
    path = lib / (module.replace('.', '/') + '.py')
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def _parse(body: str):
    try: return ast.parse(body)
    except SyntaxError: return None          # cell magics or shell lines: nothing to document


def defined(body: str, public: set) -> list:
    "Top-level functions and classes of a cell whose names are public, in order."
    tree = _parse(body)
    if tree is None: return []
    return [n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name in public]


def show_doc_names(cell) -> list:
    "The names a pure `show_doc(...)` cell documents ([] for any other cell)."
    if cell['cell_type'] != 'code': return []
    _, body = directives(cell)
    lines = [l for l in body.splitlines() if l.strip()]
    ms = [_SHOW_DOC.match(l) for l in lines]
    return [m.group(1) for m in ms] if lines and all(ms) else []


def _new_cell(source: str, ids: set) -> dict:
    cid = uuid.uuid4().hex[:8]
    while cid in ids: cid = uuid.uuid4().hex[:8]
    ids.add(cid)
    return {'cell_type': 'code', 'execution_count': None, 'id': cid, 'metadata': {}, 'outputs': [],
            'source': _lines(source)}


def _imports_show_doc(cells) -> bool:
    return any(c['cell_type'] == 'code' and re.search(r'^\s*from\s+nbdev\.showdoc\s+import\s+(\*|.*\bshow_doc\b)',
                                                      _src(c), re.M) for c in cells)


def _add_import(cell) -> bool:
    "Add IMPORT after the first run of top-level import statements of `cell`; False if the cell has none."
    src = _src(cell)
    lines = src.splitlines()
    n_dir = 0
    while n_dir < len(lines) and _DIRECTIVE.match(lines[n_dir]): n_dir += 1
    tree = _parse('\n'.join(lines[n_dir:]))
    if tree is None: return False
    is_imp = [isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body]
    if not any(is_imp): return False
    k = is_imp.index(True)
    while k + 1 < len(is_imp) and is_imp[k + 1]: k += 1   # the end of the cell's first run of import statements
    at = n_dir + tree.body[k].end_lineno
    lines.insert(at, IMPORT)
    cell['source'] = _lines('\n'.join(lines) + ('\n' if src.endswith('\n') else ''))
    return True


def add_show_docs(nb: dict, lib: Path = ROOT / 'scfs') -> list:
    "Insert the show_doc cells and the import into `nb` (in place); return the names newly documented."
    cells = nb['cells']
    exp = [directives(c)[0].get('default_exp') for c in cells if c['cell_type'] == 'code']
    module = next((m for m in exp if m), None)
    if module is None: return []
    public = set(module_all(module, lib))
    ids = {c.get('id') for c in cells}
    have = {n for c in cells for n in show_doc_names(c)}
    added, out = [], []
    i = 0
    while i < len(cells):
        cell = cells[i]; out.append(cell); i += 1
        if cell['cell_type'] != 'code': continue
        dirs, body = directives(cell)
        if not ({'export', 'exports'} & set(dirs)): continue
        names = [n for n in defined(body, public) if n not in have]
        while i < len(cells) and show_doc_names(cells[i]):      # keep existing show_doc cells right after it
            out.append(cells[i]); i += 1
        for n in names:
            out.append(_new_cell(f'show_doc({n})', ids)); have.add(n); added.append(n)
    nb['cells'] = out
    if have and not _imports_show_doc(out):
        first = next(k for k, c in enumerate(out) if show_doc_names(c))
        for c in out[:first]:
            if c['cell_type'] != 'code': continue
            d = directives(c)[0]
            if {'export', 'exports', 'exporti', 'default_exp'} & set(d): continue
            if _add_import(c): break
        else:
            at = next((k + 1 for k, c in enumerate(out) if c['cell_type'] == 'code' and 'default_exp' in directives(c)[0]), 0)
            out.insert(at, _new_cell('#| hide\n' + IMPORT, ids))
    return added


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + '\n'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='+', type=Path)
    ap.add_argument('--check', action='store_true', help='change nothing; exit 1 if a notebook would change')
    ap.add_argument('--lib', type=Path, default=ROOT / 'scfs', help='the package folder holding the exported modules')
    a = ap.parse_args(argv)
    changed = []
    for path in a.notebooks:
        text = path.read_text()
        nb = json.loads(text)
        added = add_show_docs(nb, a.lib)
        new = dumps(nb)
        if new != text:
            changed.append(path)
            if not a.check: path.write_text(new)
        print(f'{path}: {"would add" if a.check else "added"} show_doc for {", ".join(added) or "nothing"}'
              + (' (and the import)' if new != text and not added else ''))
    if a.check and changed:
        print(f'{len(changed)} notebook(s) lack show_doc cells: python .ci/show_doc.py ' + ' '.join(map(str, changed)))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
