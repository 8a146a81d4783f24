"""Sphinx settings of the course site (the role of nbdev's `_quarto.yml`): myst-nb renders the notebooks as stored.

Build (README's ci:docs block): `python -m sphinx -b html -E -j 2 -q -W --keep-going nbs _docs` -> `_docs/index.html`.
Nothing is executed. At read time each notebook is shown as nbdev would show it (`_nbdev_view`): `#| hide` and
`#| default_exp` cells dropped, `#| ...` directive lines stripped, `show_doc(...)` cells shown by their output only,
and a widget output replaced by the figure stored in its saved state. MathJax is served from `_static/mathjax`
(sphinx-mathjax-offline): no page loads anything from outside the site.
"""
import json, re, sys
from importlib.metadata import distribution
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # `conf.jupyter_slug` below, importable in the workers

# The course order, in one place: the sidebar is built from it, and tests/test_docs.py checks README.md against it.
COURSE = {
    'Lessons': ['01_augment', '02_backbone', '03_search', '04_heads', '05_losses', '06_model', '07_train',
                '08_evaluate', '09_gpu_pretraining', '10_maps', '11_widgets'],
    'Library': ['00_core', '00_data', '00a_shapes', '00b_images', '00c_digits', '05a_config', '06a_runfiles',
                '06b_distributed', '06c_loader', '07a_pretrain', '10a_scores', '14_cli'],
    'Lab': ['12_experiments', '12a_recipes', '13_bench'],
}

project = 'scfs'
author = 'scfs developers'
copyright = '2026 onwards, scfs developers'
root_doc = 'index'
include_patterns = ['*.ipynb']                  # the top-level notebooks only (not runs/, data/, results/)
exclude_patterns = ['.ipynb_checkpoints']
extensions = ['myst_nb']
# MathJax 3 from the sphinx-mathjax-offline package, copied into _static/mathjax (its own extension is not
# declared parallel-safe, so the files are used directly)
html_static_path = [str(distribution('sphinx-mathjax-offline').locate_file('sphinx-mathjax-offline/static'))]
mathjax_path = 'mathjax/tex-chtml.js'

# myst-nb: render the stored outputs, run nothing; markdown outputs (show_doc, result tables) as MyST with tables
nb_execution_mode = 'off'
nb_render_markdown_format = 'myst'
nb_ipywidgets_js = {}                            # no widget manager from a CDN: widgets show their stored figure
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3
myst_heading_slug_func = 'conf.jupyter_slug'    # Jupyter's heading ids, so `NB.ipynb#Some-heading` links work
suppress_warnings = ['myst.header']            # a notebook may skip a heading level: not an error

html_theme = 'sphinx_book_theme'
html_title = 'scfs — Semantics-Consistent Feature Search'
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    'home_page_in_toc': True,
    'show_toc_level': 2,
    'use_download_button': False,
    'use_fullscreen_button': False,
    'navigation_with_keys': False,
}
html_last_updated_fmt = None
html_css_files = ['scfs.css']                    # written by `_write_css` below: a wider page, compact result tables
_CSS = '''.bd-page-width { max-width: 100rem; }
.cell_output table { font-size: 0.85em; }
.cell_output table td, .cell_output table th { padding: 0.25em 0.5em; }
'''


def jupyter_slug(title: str) -> str:
    "A heading's id as Jupyter makes it: spaces to hyphens, case and punctuation kept."
    return title.strip().replace(' ', '-')


# ---- notebooks as nbdev shows them --------------------------------------------------------------------------------
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_SHOW_DOC = re.compile(r'^\s*show_doc\([^\n]*\)\s*$')


def _directives(src: str):
    "The cell's `#| name: value` directives (at the top of the cell) and the source without them."
    lines, dirs = src.splitlines(), {}
    while lines and _DIRECTIVE.match(lines[0]):
        m = _DIRECTIVE.match(lines.pop(0)); dirs[m.group(1)] = m.group(2)
    return dirs, '\n'.join(lines)


def _tag(cell, *tags):
    cell.setdefault('metadata', {}).setdefault('tags', [])
    cell['metadata']['tags'] = list(dict.fromkeys(cell['metadata']['tags'] + list(tags)))


def _widget_figure(state: dict, model_id: str):
    "The ImageModels and HTML readouts under widget `model_id` in the saved widget state, in display order."
    imgs, texts, todo, seen = [], [], [model_id], set()
    while todo:
        mid = todo.pop(0)
        m = state.get(mid)
        if m is None or mid in seen: continue
        seen.add(mid)
        name, st = m.get('model_name', ''), m.get('state', {})
        if name == 'ImageModel':
            for b in m.get('buffers', []):
                if b.get('path') == ['value'] and b.get('encoding', 'base64') == 'base64':
                    imgs.append((st.get('format', 'png'), b['data']))
        elif name == 'HTMLModel' and st.get('value'):
            texts.append(st['value'])
        todo[:0] = [c.split('IPY_MODEL_', 1)[1] for c in st.get('children', []) if isinstance(c, str)]
    return imgs, texts


_WIDGET = 'application/vnd.jupyter.widget-view+json'
_SOURCE_LINK = re.compile(r'^\[source\]\([^)]*\)(\{[^}]*\})?\s*$')


def _clean_show_doc(out):
    "show_doc's markdown without its rule (`---`) and its `[source](...){target=...}` link to a code host."
    md = out.get('data', {}).get('text/markdown')
    if md is None: return
    lines = (''.join(md) if isinstance(md, list) else md).splitlines()
    out['data']['text/markdown'] = '\n'.join(l for l in lines if l.strip() != '---' and not _SOURCE_LINK.match(l))


def _static_widget(out, state):
    "A widget output -> its stored figure (image/png) with the readout, or a note when the state holds none."
    imgs, texts = _widget_figure(state, out['data'][_WIDGET].get('model_id', ''))
    note = '<p><em>An interactive widget: open the notebook in Jupyter to use it. Shown here: its figure as stored.</em></p>'
    html = note + ''.join(f'<div class="scfs-readout">{t}</div>' for t in texts[-1:])
    outs = [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/html': html}}]
    outs += [{'output_type': 'display_data', 'metadata': {}, 'data': {f'image/{fmt}': data, 'text/plain': 'figure'}}
             for fmt, data in imgs if fmt in ('png', 'jpeg')]
    if not imgs:
        outs[0]['data']['text/html'] = '<p><em>An interactive widget (no figure stored): open the notebook in Jupyter.</em></p>'
    return outs


def _nbdev_view(nb: dict, docname: str) -> dict:
    "Apply nbdev's display directives to a notebook (dict), the way nbdev's docs show it."
    state = nb.get('metadata', {}).pop('widgets', {}).get('application/vnd.jupyter.widget-state+json', {}).get('state', {})
    cells = []
    for cell in nb['cells']:
        src = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        if cell['cell_type'] != 'code':
            cells.append(cell); continue
        dirs, body = _directives(src)
        if 'hide' in dirs or 'default_exp' in dirs or dirs.get('include') == 'false': continue
        cell['source'] = body
        show_doc = bool(body.strip()) and all(_SHOW_DOC.match(l) for l in body.strip().splitlines())
        if show_doc:
            for o in cell.get('outputs', []): _clean_show_doc(o)
        if dirs.get('echo') == 'false' or show_doc: _tag(cell, 'remove-input')
        if dirs.get('output') == 'false': _tag(cell, 'remove-output')
        if dirs.get('code-fold') in ('true', 'show'): _tag(cell, 'hide-input')
        outs = []
        for o in cell.get('outputs', []):
            if _WIDGET in o.get('data', {}): outs += _static_widget(o, state)
            else: outs.append(o)
        cell['outputs'] = outs
        cells.append(cell)
    nb['cells'] = cells
    if docname == root_doc:       # the sidebar: one hidden toctree per group of COURSE, appended to the home page
        for caption, names in COURSE.items():
            toc = '```{toctree}\n:hidden:\n:caption: ' + caption + '\n\n' + '\n'.join(names) + '\n```\n'
            cells.append({'cell_type': 'markdown', 'metadata': {}, 'source': toc, 'id': f'toc-{caption.lower()}'})
    return nb


def _source_read(app, docname, source):
    if not app.env.doc2path(docname).name.endswith('.ipynb'): return
    source[0] = json.dumps(_nbdev_view(json.loads(source[0]), docname), ensure_ascii=False)


def _outputs_inside(app):
    "myst-nb writes output files next to the build folder (../jupyter_execute): keep them inside it."
    app.env.mystnb_config = app.env.mystnb_config.copy(output_folder=str(Path(app.outdir) / '.jupyter_execute'))


def _write_css(app, exc):
    if exc is None and app.builder.format == 'html':
        (Path(app.outdir) / '_static' / 'scfs.css').write_text(_CSS)


def setup(app):
    app.connect('build-finished', _write_css)
    app.connect('source-read', _source_read)
    app.connect('builder-inited', _outputs_inside, priority=900)   # after myst-nb's own builder-inited
