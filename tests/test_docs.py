"""The course site (issue 25): built from the stored notebooks by Sphinx + myst-nb (`nbs/conf.py`) into `_docs/`.

`site` builds `_docs/` with the README's ci:docs command when it is missing or older than a notebook or `nbs/conf.py`
(fresh environment, warnings are errors: a broken cross-reference fails the build). Then, without a browser: one page
per notebook, no page that loads a script, style sheet, font or image from outside the site, no nbdev directive or
widget state left in a page. In headless Debian chromium (marker `browser`, as tests/test_browser.py): the index and
two lessons (and the search page) served on 127.0.0.1, every request answered by that server (anything else is aborted and fails the test),
the sidebar lists the notebooks in the course order of `nbs/conf.py`, every image decoded (naturalWidth > 0), every
equation typeset by MathJax, and every internal link (page and #fragment) resolves. `.ci/show_doc.py` is tested on a
copy of `nbs/00_core.ipynb`; README's notebook tables must list the course in the same order as the site.
"""
import ast, functools, http.server, json, os, re, runpy, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS, DOCS = ROOT / 'nbs', ROOT / '_docs'
CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--dns-prefetch-disable']
# the README's ci:docs command (README.md, block `<!-- ci:docs -->`)
BUILD = [sys.executable, '-m', 'sphinx', '-b', 'html', '-E', '-j', '2', '-q', '-W', '--keep-going', 'nbs', '_docs']
def course() -> dict:
    "nbs/conf.py's COURSE, read without running conf.py (it needs the doc stack installed)."
    for node in ast.parse((NBS / 'conf.py').read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'COURSE' for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError('nbs/conf.py defines no COURSE')


COURSE = course()
PAGES = ['index.html', '03_search.html', '11_widgets.html']   # the home page and two lessons (equations; a widget)


def _sources():
    return list(NBS.glob('*.ipynb')) + [NBS / 'conf.py'] + [p for p in NBS.glob('images/*') if p.is_file()]


@pytest.fixture(scope='module')
def site() -> Path:
    "The built site; (re)built with BUILD when missing or older than its sources."
    index = DOCS / 'index.html'
    if not index.exists() or index.stat().st_mtime < max(p.stat().st_mtime for p in _sources()):
        r = subprocess.run(BUILD, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f'site build failed ({" ".join(BUILD[1:])}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    return DOCS


# ---- the course order: one place (nbs/conf.py), checked against the notebooks and README --------------------------
def test_course_lists_every_notebook_once():
    names = [n for group in COURSE.values() for n in group]
    assert len(names) == len(set(names)), 'a notebook is listed twice in nbs/conf.py COURSE'
    on_disk = {p.stem for p in NBS.glob('*.ipynb')} - {'index'}
    assert set(names) == on_disk, f'COURSE vs nbs/: missing {sorted(on_disk - set(names))}, ' \
                                  f'no such notebook {sorted(set(names) - on_disk)}'


def readme_course(text: str) -> dict:
    "The notebooks README lists under `### Lessons` / `### Library` / `### Lab`, from each table's first column."
    out = {}
    for group in COURSE:
        m = re.search(rf'^### {group}\s*$(.*?)(?=^#{{1,3}} |\Z)', text, re.M | re.S)
        if m is None: continue
        rows = [l for l in m.group(1).splitlines() if l.lstrip().startswith('|')]
        out[group] = [c.group(1) for l in rows
                      if (c := re.match(r'\s*\|\s*\[([^\]]+)\]\(nbs/\1\.ipynb\)', l))]
    return out


def test_readme_course_parser():
    text = '### Lessons\n\nintro\n\n| notebook | what |\n|---|---|\n| [01_a](nbs/01_a.ipynb) | x |\n' \
           '| [02_b](nbs/02_b.ipynb) | y |\n\n### Lab\n| [12_c](nbs/12_c.ipynb) | z |\n## Next\n| [9](nbs/9.ipynb) |\n'
    assert readme_course(text) == {'Lessons': ['01_a', '02_b'], 'Lab': ['12_c']}


def test_readme_lists_the_course_in_site_order():
    got = readme_course((ROOT / 'README.md').read_text())
    assert got == COURSE, f'README.md tables vs nbs/conf.py COURSE:\nREADME {got}\nsite   {COURSE}'


# ---- the built pages, without a browser ---------------------------------------------------------------------------
_EXTERNAL = re.compile(r'''<(script|link|img|iframe|source|video|audio|embed)\b[^>]*?\b(src|href)\s*=\s*["']?((https?:)?//[^"'\s>]+)''',
                       re.I)
_CSS_EXTERNAL = re.compile(r'''(url\(\s*["']?|@import\s+["']?)((https?:)?//[^"')\s]+)''', re.I)


def test_one_page_per_notebook(site):
    missing = [p.stem for p in NBS.glob('*.ipynb') if not (site / f'{p.stem}.html').exists()]
    assert not missing, f'no page for {missing}'


def test_no_page_loads_anything_from_outside(site):
    bad = []
    for page in site.glob('*.html'):
        # a link (<a href>) to elsewhere is fine; a resource the page loads is not (<link rel=...> included)
        bad += [f'{page.name}: {m.group(3)}' for m in _EXTERNAL.finditer(page.read_text())]
    for css in site.glob('_static/**/*.css'):
        bad += [f'{css.relative_to(site)}: {m.group(2)}' for m in _CSS_EXTERNAL.finditer(css.read_text(errors='ignore'))]
    assert not bad, 'pages load resources from outside the site:\n' + '\n'.join(sorted(set(bad))[:20])
    assert (site / '_static' / 'mathjax' / 'tex-chtml.js').exists(), 'MathJax is not served from the site'


def test_pages_show_notebooks_as_nbdev_does(site):
    for page in site.glob('*.html'):
        text = page.read_text()
        assert '#| ' not in text, f'{page.name} shows an nbdev directive line'
        assert 'widget-view+json' not in text and 'widget-state+json' not in text, f'{page.name} holds widget state'
    widgets = (site / '11_widgets.html').read_text()
    assert 'scfs-readout' in widgets and re.search(r'<img[^>]+src="_images/', widgets), \
        'the widget output did not become its stored figure'


# ---- .ci/show_doc.py on a copy ------------------------------------------------------------------------------------
def _show_doc_tool():
    return runpy.run_path(str(ROOT / '.ci' / 'show_doc.py'), run_name='show_doc')


def test_show_doc_tool_on_a_copy(tmp_path):
    sd = _show_doc_tool()
    (tmp_path / 'nbs').mkdir()
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    nb_path = tmp_path / 'nbs' / '00_core.ipynb'
    shutil.copy(NBS / '00_core.ipynb', nb_path)
    env = {k: v for k, v in os.environ.items() if k not in ('CI', 'IN_TEST')}
    export = lambda: subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export()'],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    r = export(); assert r.returncode == 0, r.stderr
    before = (tmp_path / 'scfs' / 'core.py').read_text()
    public = set(sd['module_all']('core', ROOT / 'scfs'))
    assert sd['main']([str(nb_path)]) == 0
    nb = json.loads(nb_path.read_text())
    docs = [n for c in nb['cells'] for n in sd['show_doc_names'](c)]
    assert docs and set(docs) <= public and len(docs) == len(set(docs)), docs
    # each show_doc cell follows the export cell that defines its symbol (or another show_doc cell)
    for i, c in enumerate(nb['cells']):
        for n in sd['show_doc_names'](c):
            j = i - 1
            while sd['show_doc_names'](nb['cells'][j]): j -= 1
            assert re.search(rf'^(def|class) {n}\b', sd['directives'](nb['cells'][j])[1], re.M), n
    # the import comes before the first show_doc cell
    first = next(i for i, c in enumerate(nb['cells']) if sd['show_doc_names'](c))
    assert any('from nbdev.showdoc import show_doc' in ''.join(c['source']) for c in nb['cells'][:first])
    text = nb_path.read_text()
    assert sd['main']([str(nb_path)]) == 0 and nb_path.read_text() == text, 'a second run changed the notebook'
    assert sd['main'](['--check', str(nb_path)]) == 0
    r = export(); assert r.returncode == 0, r.stderr
    assert (tmp_path / 'scfs' / 'core.py').read_text() == before, 'nbdev_export of the notebook changed the module'
    # the cells it added run: the import, then show_doc of each symbol gives markdown with its name
    code = 'from nbdev.showdoc import show_doc\nfrom scfs.core import *\n' + \
           ''.join(f'assert "### {n}" in show_doc({n})._repr_markdown_()\n' for n in docs)
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_show_doc_check_flags_a_missing_cell(tmp_path):
    sd = _show_doc_tool()
    nb_path = tmp_path / '00_core.ipynb'
    shutil.copy(NBS / '00_core.ipynb', nb_path)
    sd['main']([str(nb_path)])
    nb = json.loads(nb_path.read_text())
    nb['cells'] = [c for c in nb['cells'] if sd['show_doc_names'](c) != ['atomic_write']]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    assert sd['main'](['--check', str(nb_path)]) == 1


# ---- in the browser -----------------------------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope='module')
def server(site):
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_port}'
    srv.shutdown(); srv.server_close()


_SIDEBAR = """() => [...document.querySelectorAll('nav.bd-docs-nav p.caption')].map(p => {
  let ul = p.nextElementSibling; while (ul && ul.tagName !== 'UL') ul = ul.nextElementSibling;
  return [p.innerText.trim(), ul ? [...ul.querySelectorAll(':scope > li > a')].map(a => a.getAttribute('href')) : []];
})"""

_IMAGES = """async () => {
  const imgs = [...document.querySelectorAll('img')];
  for (const i of imgs) { i.loading = 'eager'; i.scrollIntoView(); try { await i.decode(); } catch (e) {} }
  return imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);
}"""

_MATH = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const els = [...document.querySelectorAll('.math')];
  return [els.length, els.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80))];
}"""

_LINKS = """() => [...document.querySelectorAll('a[href]')].map(a => a.href)"""


def _page_name(url: str, current: str) -> str:
    path = urlsplit(url).path.rsplit('/', 1)[-1] or 'index.html'
    return (path or current).removesuffix('.html')


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason='needs Debian chromium (.ci/install_browser.sh)')
def test_site_in_chromium(site, server, tmp_path):
    from playwright.sync_api import sync_playwright
    outside, failed = [], []
    want = [[g, [f'{n}.html' for n in names]] for g, names in COURSE.items()]

    def route(r):
        u = r.request.url
        if u.startswith(server + '/') or u.startswith(('data:', 'blob:')): r.continue_()
        else: outside.append(u); r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={'width': 1300, 'height': 900})
        page.route('**/*', route)
        page.on('response', lambda r: r.status >= 400 and not r.url.endswith('/favicon.ico')
                and failed.append(f'{r.status} {r.url}'))
        try:
            links, typeset = set(), 0
            for name in PAGES:
                page.goto(f'{server}/{name}', wait_until='load', timeout=60_000)
                # the sidebar: the three groups of nbs/conf.py, each in course order (the current page's link is '#')
                side = [[cap, [h if h != '#' else name for h in hrefs]] for cap, hrefs in page.evaluate(_SIDEBAR)]
                assert side == want, f'{name}: sidebar {side}\nwant {want}'
                imgs = page.evaluate(_IMAGES)
                assert all(ok and w > 0 for _, ok, w in imgs), f'{name}: images not loaded: {[i for i in imgs if not i[2]]}'
                n_math, raw = page.evaluate(_MATH)
                assert not raw, f'{name}: equations not typeset: {raw[:5]}'
                typeset += n_math
                if name != 'index.html': assert imgs, f'{name} shows no figure'
                for href in page.evaluate(_LINKS):
                    if href.startswith(server + '/'): links.add((name, href))
            assert typeset > 0, 'no equation on the pages checked: the MathJax check tested nothing'
            # search: Sphinx's own index, in the page; a word from one lesson finds that lesson
            page.goto(f'{server}/search.html?q=semantics-consistent', wait_until='load', timeout=60_000)
            page.wait_for_selector('#search-results ul.search li', timeout=30_000)
            hits = page.evaluate("() => [...document.querySelectorAll('#search-results ul.search li a')].map(a => a.getAttribute('href'))")
            assert any(h.startswith('03_search.html') for h in hits), f'search found {hits[:10]}'
            # every internal link: the page exists, and its #fragment is an id on that page
            broken, html = [], {}
            for src, href in sorted(links):
                url, frag = urldefrag(href)
                rel = unquote(urlsplit(url).path.lstrip('/')) or 'index.html'
                target = site / rel
                if rel.endswith('/'): target = target / 'index.html'
                if not target.is_file(): broken.append(f'{src}: {href}'); continue
                if frag and target.suffix == '.html':
                    text = html.setdefault(target, target.read_text())
                    if f'id="{unquote(frag)}"' not in text: broken.append(f'{src}: {href} (no such id)')
            assert not broken, 'broken internal links:\n' + '\n'.join(broken[:20])
            assert len(links) > 30, f'only {len(links)} internal links found: the link check tested little'
            assert not failed, f'requests that failed: {failed[:10]}'
            assert not outside, f'requests to outside the machine: {outside[:10]}'
        except Exception:
            page.screenshot(path=str(tmp_path / 'failure.png'), full_page=False)
            print('screenshot:', tmp_path / 'failure.png')
            raise
        finally:
            browser.close()
