import json

from spoold.names import MAX_DISPLAY_CHARS, display_name


def test_an_ordinary_name_is_shown_as_it_is():
    for name in ("batch_5k.jsonl", "with space.jsonl", "ünïcødé-名前.jsonl", "[/x].jsonl"):
        assert display_name(name) == name


def test_newlines_and_control_characters_cannot_leave_the_line():
    shown = display_name("a\nWATCHDOG=trigger\nb\r\x1b[2J\x7f.jsonl")
    assert shown == "a\\x0aWATCHDOG=trigger\\x0ab\\x0d\\x1b[2J\\x7f.jsonl"
    assert shown.isprintable()


def test_bytes_that_are_not_utf8_are_shown_as_the_bytes_they_were():
    name = b"\xff\xfeok.jsonl".decode("utf-8", "surrogateescape")  # as os.scandir names it
    shown = display_name(name)
    assert shown == "\\xff\\xfeok.jsonl"
    shown.encode("utf-8")  # sendable to systemd, writable to the journal


def test_bidi_overrides_and_line_separators_are_escaped():
    assert display_name("evil\u202egnp.jsonl") == "evil\\u202egnp.jsonl"
    assert display_name("a\u2028b\u2029c\u200b.jsonl") == "a\\u2028b\\u2029c\\u200b.jsonl"


def test_the_display_form_is_stable_and_bounded():
    for name in ("a\nb.jsonl", "\udcff.jsonl", "x" * 1000, "\n" * 400):
        shown = display_name(name)
        assert display_name(shown) == shown
        assert len(shown) <= MAX_DISPLAY_CHARS
        json.dumps(shown, ensure_ascii=False).encode("utf-8")
