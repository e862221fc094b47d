"""``extra-attrib report``: the page, its pictures' folder, what it refuses, and a real browser.

The browser tests drive headless Chromium (Debian's ``chromium``; CI installs it): the view lives
in the address's ``#`` part, the same code path the page's controls take, so sorting, filtering
and the large view are exercised by loading the page with a hash and reading the DOM back.
They are skipped where no Chromium is installed.
"""

import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from extra_attrib.__main__ import main
from extra_attrib._report import FOLDER_MARK, GENERATOR, folder_for

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("zarr")
MODEL = "tests._dataset_helpers:factory"
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of six 16 x 16 photos, one a different size, and a file that is not an image."""
    root = tmp_path_factory.mktemp("report")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (16, 16) if i else (20, 24)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = root / "s.zarr"
    code = main(
        ["explain", str(folder), "--out", str(out), "--model", MODEL, "--window", "8", "--k", "2"]
        + ["--score", "raw", "--no-progress"]
    )
    assert code == 1  # one failed item
    return out


def _report(capsys, store, out, *extra):
    code = main(["report", str(store), "--out", str(out), *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _items(page):
    text = open(page, encoding="utf-8").read()
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(data.group(1))["items"]


def _tree(path):
    """Every file under ``path`` with its size and modification time."""
    found = {}
    for where, _, files in os.walk(path):
        for name in files:
            full = os.path.join(where, name)
            stat = os.stat(full)
            found[full] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_a_small_store_is_embedded_in_one_page(store, tmp_path, capsys):
    before = _tree(store)
    out = tmp_path / "report.html"
    code, stdout, err = _report(capsys, store, out)
    assert code == 0, err
    assert "6 done, 1 failed, 0 unreadable of 7 items" in stdout
    assert _tree(store) == before  # nothing written into the store
    assert not os.path.exists(folder_for(str(out)))
    text = out.read_text(encoding="utf-8")
    assert f'<meta name="generator" content="{GENERATOR}">' in text
    assert "http://" not in text and "https://" not in text  # nothing from the network
    items = _items(out)
    assert [it["st"] for it in items].count("done") == 6
    failed = [it for it in items if it["st"] == "failed"]
    assert len(failed) == 1 and "broken.png" in failed[0]["p"]
    assert "UnidentifiedImageError" in failed[0]["m"]
    for it in items:
        if it["st"] == "done":
            assert it["th"].startswith("data:image/jpeg;base64,")
            assert isinstance(it["t"], int) and isinstance(it["s"], float)
    # written again over its own page: allowed
    assert _report(capsys, store, out)[0] == 0


def test_a_large_report_writes_its_pictures_beside_the_page(store, tmp_path, capsys):
    out = tmp_path / "big.html"
    code, stdout, err = _report(capsys, store, out, "--embed-limit", 0)
    assert code == 0, err
    folder = tmp_path / "big_files"
    assert (folder / FOLDER_MARK).is_file()
    items = _items(out)
    done = [it for it in items if it["st"] == "done"]
    for it in done:
        assert it["th"] == f"big_files/t/{it['i']}.jpg"
        with Image.open(folder / "t" / f"{it['i']}.jpg") as picture:
            assert picture.height == 96 and picture.width > 3 * 96  # image | map | overlay
        assert (folder / "l" / f"{it['i']}.jpg").is_file()
    assert sorted(os.listdir(folder / "t")) == sorted(f"{it['i']}.jpg" for it in done)
    # a file of the user's in the report's folder survives a new report that embeds everything
    (folder / "notes.txt").write_text("mine")
    (folder / "t" / "999.jpg").write_bytes(b"stale picture of the report's")
    assert _report(capsys, store, out)[0] == 0
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (folder / "t").exists()
    assert _items(out)[1]["th"].startswith("data:")


@pytest.mark.parametrize("what", ["file", "folder", "inside", "extension", "directory"])
def test_what_a_report_did_not_make_is_refused_and_untouched(store, tmp_path, capsys, what):
    out = tmp_path / "r.html"
    if what == "file":
        out.write_text("<html>my own page</html>")
    elif what == "folder":
        (tmp_path / "r_files").mkdir()
        (tmp_path / "r_files" / "photo.jpg").write_bytes(b"mine")
    elif what == "inside":
        out = store / "r.html"
    elif what == "extension":
        out = tmp_path / "r.png"
    else:
        out = tmp_path / "folder.html"
        out.mkdir()
    before = _tree(tmp_path)
    store_before = _tree(store)
    code, stdout, err = _report(capsys, store, out)
    assert code == 2 and "Traceback" not in err
    message = {
        "file": "was not written by extra-attrib report",
        "folder": "was not made by extra-attrib report",
        "inside": "inside the store",
        "extension": "must end in .html",
        "directory": "is a directory",
    }[what]
    assert err.startswith("extra-attrib report: error: ") and message in err
    assert _tree(tmp_path) == before and _tree(store) == store_before


def test_a_missing_store_exits_2(tmp_path, capsys):
    code, _, err = _report(capsys, tmp_path / "none.zarr", tmp_path / "r.html")
    assert code == 2 and "no store" in err


def test_help_documents_the_command(capsys):
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    for words in ("STORE.zarr", "--out", "--embed-limit", "offline", "filters", "10,000"):
        assert words in out


# --------------------------------------------------------------------------------------------
# in a real browser
# --------------------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")


def _chromium(*args, timeout=60):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    command += ["--disable-dev-shm-usage", "--virtual-time-budget=5000", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _dom(page, hash_=""):
    dom = _chromium("--dump-dom", f"file://{page}#{hash_}")
    assert 'data-ready="1"' in dom, "the page's script did not run"
    cards = re.findall(r'<figure class="card[^"]*" data-index="(\d+)" data-state="(\w+)"', dom)
    return dom, [(int(i), state) for i, state in cards]


@pytest.fixture(scope="module")
def page(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert main(["report", str(store), "--out", str(out), "--embed-limit", "0"]) == 0
    return out


def _cards(browser):
    return browser.evaluate("[...document.querySelectorAll('.card')].map(c => +c.dataset.index)")


@pytest.fixture
def browser():
    pytest.importorskip("websocket", reason="websocket-client (test extra) drives Chromium")
    from tests._browser import Browser

    with Browser() as b:
        yield b


@needs_chromium
def test_the_controls_sort_and_filter(page, browser):
    items = {it["i"]: it for it in _items(page)}
    done = sorted((it for it in items.values() if it["st"] == "done"), key=lambda it: -it["s"])
    browser.open(page)
    assert _cards(browser) == sorted(items)  # by index, every item
    browser.choose("sort", "score")
    browser.choose("order", "desc")
    not_done = [i for i, it in items.items() if it["st"] != "done"]
    assert _cards(browser) == [it["i"] for it in done] + not_done  # no score: last
    assert browser.evaluate("location.hash") == "#sort=score&order=desc"
    browser.choose("state", "failed")
    assert _cards(browser) == not_done
    assert "UnidentifiedImageError" in browser.evaluate("document.getElementById('grid').innerText")
    browser.choose("state", "all")
    target = done[0]["t"]
    browser.choose("target", str(target))
    assert sorted(_cards(browser)) == [i for i, it in items.items() if it["t"] == target]
    browser.choose("target", "all")
    middle = sorted(it["s"] for it in done)[3]
    browser.type_into("min", repr(middle))
    assert _cards(browser) == [it["i"] for it in done if it["s"] >= middle]
    browser.type_into("min", "1e9")
    assert _cards(browser) == []
    assert "none of 7 items match" in browser.evaluate("document.getElementById('count').innerText")
    browser.type_into("min", "-1e9")
    browser.type_into("q", "p3")
    assert _cards(browser) == [i for i, it in items.items() if it["p"].endswith("p3.png")]


@needs_chromium
def test_a_click_shows_the_item_large_and_the_keys_step_and_close(page, browser):
    done = [it for it in _items(page) if it["st"] == "done"]
    browser.open(page)
    browser.click(f'.card[data-index="{done[1]["i"]}"]')
    large = "document.getElementById('large')"
    assert browser.evaluate(f"{large}.classList.contains('open')")
    assert browser.evaluate(f"{large}.dataset.index") == str(done[1]["i"])
    assert browser.evaluate(f"{large}.querySelector('img').getAttribute('src')") == done[1]["lg"]
    browser.wait_for(f"{large}.querySelector('img').complete")
    assert browser.evaluate(f"{large}.querySelector('img').naturalWidth") > 0  # it loaded
    browser.key("ArrowRight")
    assert browser.evaluate(f"{large}.dataset.index") == str(done[2]["i"])
    browser.key("Escape")
    assert not browser.evaluate(f"{large}.classList.contains('open')")
    pixels = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@needs_chromium
def test_a_bookmarked_view_opens_as_it_was_saved(page):
    items = _items(page)
    done = sorted((it for it in items if it["st"] == "done"), key=lambda it: it["s"])
    dom, cards = _dom(page, f"sort=score&state=done&item={done[0]['i']}")
    assert [i for i, _ in cards] == [it["i"] for it in done]
    assert f'<div id="large" class="open" data-index="{done[0]["i"]}">' in dom


@needs_chromium
def test_a_screenshot_of_the_page_is_not_blank(page, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(
        "--hide-scrollbars", "--window-size=1000,700", f"--screenshot={shot}", f"file://{page}"
    )
    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape[:2] == (700, 1000)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, photos and maps, not a blank or one-colour page
    # the pictures loaded: the grid's area holds many more colours than the header's text
    grid = pixels[150:, :]
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 200


def test_damaged_and_pending_items_are_listed_with_the_reason(store, tmp_path, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "attributions" / "c" / "2")  # item 2's data is gone
    shutil.rmtree(copy / "records" / "c" / "3")  # item 3's record is gone: not done yet
    out = tmp_path / "r.html"
    code, stdout, err = _report(capsys, copy, out)
    assert code == 0, err
    assert "4 done, 1 failed, 1 unreadable of 7 items" in stdout
    items = _items(out)
    assert items[2]["st"] == "damaged" and "missing" in items[2]["m"]
    assert items[3]["st"] == "pending" and "th" not in items[3]


def test_a_path_holding_markup_stays_data():
    from extra_attrib._report import _page

    path = "</script><!--<script>alert(1)</script>%DATA%.png"
    record = {"i": 0, "p": path, "t": None, "s": None, "m": "<b>", "st": "failed"}
    page = _page([record], {}, "s.zarr", {})
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert "<" not in data.group(1)
    assert json.loads(data.group(1))["items"] == [record]
    assert page.count("</script>") == 2  # the data's and the program's


@pytest.mark.parametrize("shape", [(3, 20, 10), (2, 64), (1, 4, 12, 12), (30, 30), (50,)])
def test_maps_of_every_shape_are_drawn(shape):
    from extra_attrib._report import _strips

    attr = np.random.default_rng(0).standard_normal(shape)
    thumb, large, width = _strips(attr, None, 96, 320)
    with Image.open(io.BytesIO(thumb)) as small, Image.open(io.BytesIO(large)) as big:
        assert small.height == 96 and small.width == width
        assert big.height == 96  # a small map is not blown up beyond the grid's size
    image = np.random.default_rng(1).random((20, 10, 3))
    if shape == (3, 20, 10):
        thumb, _, width = _strips(attr, image, 40, 320)
        with Image.open(io.BytesIO(thumb)) as small:
            assert small.height == 40 and small.width == width == 3 * 20 + 2 * 1


def test_a_non_utf8_name_is_shown_escaped_and_its_image_drawn(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in (b"caf\xe9.png", b"plain.png"):
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        image.save(os.path.join(os.fsencode(folder), name))
    store = tmp_path / "s.zarr"
    code = main(
        ["explain", str(folder), "--out", str(store), "--model", MODEL, "--window", "8", "--k", "2"]
        + ["--score", "raw", "--no-progress"]
    )
    assert code == 0
    out = tmp_path / "r.html"
    code, _, err = _report(capsys, store, out)
    assert code == 0, err
    items = _items(out)
    assert [os.path.basename(item["p"]) for item in items] == ["caf\\xe9.png", "plain.png"]
    assert all(item["st"] == "done" and "th" in item for item in items)


@pytest.mark.filterwarnings("ignore:.*side arrays are unreadable")
def test_a_damaged_paths_chunk_leaves_the_items_listed(store, tmp_path, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    for where, _, files in os.walk(copy / "paths" / "c"):
        for name in files:
            with open(os.path.join(where, name), "r+b") as chunk:
                chunk.truncate(3)  # unreadable: its paths read as unknown
    out = tmp_path / "r.html"
    code, _, err = _report(capsys, copy, out)
    assert code == 0, err
    items = _items(out)
    assert len(items) == 7 and all(item["p"] == "" for item in items)  # unknown, not "None"
    assert sorted(item["st"] for item in items) == ["done"] * 6 + ["failed"]
