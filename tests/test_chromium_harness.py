"""The headless-Chromium helper (tests/chromium.py) itself: what it reports for small pages."""

import base64
import struct
import zlib

from chromium import open_page, require_chromium


def png(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A solid-colour RGB PNG."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))  # filter 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_inline_image_and_table_read_back(tmp_path):
    require_chromium()
    src = "data:image/png;base64," + base64.b64encode(png(2, 2)).decode()
    page = tmp_path / "page.html"
    page.write_text(
        "<!doctype html><html><body><h1>Report</h1>"
        f'<img src="{src}" alt="chart">'
        "<table><thead><tr><th>lang</th><th>accuracy</th></tr></thead>"
        "<tbody><tr><td>en</td><td>0.91</td></tr><tr><td>de</td><td>0.875</td></tr></tbody>"
        "</table></body></html>"
    )

    seen = open_page(page)

    assert seen.console_errors == []
    assert seen.requests == []  # the inline image fetched nothing
    assert len(seen.images) == 1
    image = seen.images[0]
    assert image["src"] == src[:80]
    assert image["complete"] is True
    assert (image["natural_width"], image["natural_height"]) == (2, 2)
    assert seen.tables == [[["lang", "accuracy"], ["en", "0.91"], ["de", "0.875"]]]
    assert seen.text.startswith("Report\n")


def test_broken_image_and_console_error_are_reported(tmp_path):
    require_chromium()
    page = tmp_path / "page.html"
    page.write_text(
        '<!doctype html><html><body><p>hello</p><img src="missing.png">'
        '<script>console.error("boom")</script></body></html>'
    )

    seen = open_page(page)

    assert seen.text == "hello"
    assert seen.images == [
        {"src": "missing.png", "complete": True, "natural_width": 0, "natural_height": 0}
    ]
    assert "boom" in seen.console_errors
    missing = (tmp_path / "missing.png").as_uri()
    assert seen.requests == [missing]
    # the failed load, as Chromium logs it (the only other error)
    assert [e for e in seen.console_errors if e != "boom"] == [
        f"Failed to load resource: net::ERR_FILE_NOT_FOUND ({missing})"
    ]
