"""The display's pure parts, without sockets: escaping, locales, frames, health."""

from __future__ import annotations

import json

import pytest

from waiting_room.config import RoomConfig
from waiting_room.display.render import (
    PageOptions,
    LocaleError,
    as_of,
    fill,
    health,
    load_assets,
    parse_locale,
    render_page,
    resolve_locale,
    state_frame,
)
from waiting_room.model import LinkState, LinkStatus, RoomState
from waiting_room.store import Batch


def test_fill_escapes_every_value_once():
    out = fill('<p title="{{a}}">{{b}}</p>{{missing}}', {"a": '"><script>', "b": "{{a}} & <b>"})
    assert out == '<p title="&quot;&gt;&lt;script&gt;">{{a}} &amp; &lt;b&gt;</p>'


def test_built_in_locales_and_fallbacks():
    assets = load_assets()
    assert {"en", "bn"} <= set(assets.locales)
    bn = assets.locales["bn"]
    assert bn.digits == "০১২৩৪৫৬৭৮৯" and bn.strings["waiting"] == "অপেক্ষমাণ রোগী"
    # Every English string exists in every language (missing ones fall back to English).
    assert set(assets.locales["en"].strings) <= set(bn.strings)
    assert resolve_locale("bn-BD", assets.locales) == "bn"
    assert resolve_locale("xx", assets.locales) == "en"
    assert resolve_locale(None, assets.locales) == "en"


def test_a_new_language_is_one_small_file():
    english = load_assets().locales["en"]
    fr = parse_locale("fr", json.dumps({"name": "Français", "strings": {"waiting": "Patients en attente"}}), english)
    assert fr.strings["waiting"] == "Patients en attente"
    assert fr.strings["connecting"] == "Connecting…" and fr.digits == "0123456789"
    for bad in ('{"digits": "012"}', '{"dir": "up"}', '{"strings": {"a": 1}}', "[]", "{"):
        with pytest.raises(LocaleError, match="fr.json"):
            parse_locale("fr", bad, english)
    with pytest.raises(LocaleError):
        parse_locale("../../etc", "{}", english)


def test_page_carries_settings_as_escaped_data_only():
    assets = load_assets()
    rooms = [RoomConfig(id="opd-1", name="</script><script>alert(1)</script>", locale="bn", label='"x"')]
    page = render_page(rooms, None, "en", assets, PageOptions(heartbeat=5)).decode()
    assert "<script>alert" not in page and page.count("<script") == 1
    start = page.index('data-config="') + len('data-config="')
    import html

    config = json.loads(html.unescape(page[start:page.index('"', start)]))
    assert config["rooms"][0]["name"] == "</script><script>alert(1)</script>"
    assert config["rooms"][0]["locale"] == "bn" and set(config["locales"]) == {"en", "bn"}
    assert config["ws"] == "/ws" and config["heartbeat"] == 5


def test_as_of_is_when_the_number_was_last_known_live():
    live = RoomState("opd-1", "OPD 1", patients=4, received_at=100.0, stale=False)
    connected = LinkState(LinkStatus.CONNECTED, since=50.0, connects=1)
    assert as_of(live, connected) == 100.0
    dropped = LinkState(LinkStatus.DISCONNECTED, since=160.0, connects=1)
    assert as_of(live, dropped) == 160.0  # live until the link dropped
    restored = LinkState(LinkStatus.DISCONNECTED, since=160.0, connects=0)
    assert as_of(live, restored) == 100.0  # from a previous run: as old as its last frame
    assert as_of(RoomState("lab", "Lab"), dropped) is None
    polled = LinkState(LinkStatus.DEGRADED, since=160.0, connects=1, poll_interval=5.0)
    assert as_of(RoomState("opd-1", "OPD 1", patients=4, received_at=170.0, stale=False), polled) == 170.0


def test_state_frame_filters_to_the_page_room():
    link = LinkState(LinkStatus.CONNECTED)
    batch = Batch({"opd-1": RoomState("opd-1", "OPD 1", patients=1), "lab": None}, None)
    frame = json.loads(state_frame(batch, link, None, 1.0))
    assert [r["room"] for r in frame["rooms"]] == ["opd-1"] and frame["removed"] == ["lab"]
    assert state_frame(batch, link, "x-ray", 1.0) is None
    only = json.loads(state_frame(batch, link, "lab", 1.0))
    assert only["rooms"] == [] and only["removed"] == ["lab"]


def test_health_needs_upstream_and_mqtt():
    rooms = {"opd-1": RoomState("opd-1", "OPD 1", patients=1, received_at=90.0, stale=False)}
    up = LinkState(LinkStatus.CONNECTED)
    status, body = health(up, {"mqtt": "connected"}, rooms, 3, 100.0)
    doc = json.loads(body)
    assert status == 200 and doc["rooms"]["opd-1"]["age"] == 10.0 and doc["dropped_frames"] == 3
    assert health(up, {"mqtt": "disconnected"}, rooms, 0, 100.0)[0] == 503
    assert health(up, {}, rooms, 0, 100.0)[0] == 503
    assert health(LinkState(LinkStatus.DISCONNECTED), {"mqtt": "connected"}, rooms, 0, 100.0)[0] == 503
    assert health(up, {}, rooms, 0, 100.0, required=())[0] == 200


def test_degraded_is_working():
    """Values polled from the snapshot are fresh: 200, and the document says how they come."""
    rooms = {"opd-1": RoomState("opd-1", "OPD 1", patients=1, received_at=98.0, stale=False)}
    degraded = LinkState(LinkStatus.DEGRADED, "handshake refused: HTTP 426", poll_interval=5.0)
    status, body = health(degraded, {"mqtt": "connected"}, rooms, 0, 100.0)
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "degraded" and doc["problems"] == []
    assert doc["upstream"] | {"since": None} == {
        "status": "degraded", "detail": "handshake refused: HTTP 426", "since": None, "connects": 0,
        "feed": "poll", "poll_interval": 5.0}
    assert health(degraded, {"mqtt": "disconnected"}, rooms, 0, 100.0)[0] == 503
    frame = json.loads(state_frame(Batch({}, degraded), degraded, None, 1.0))
    assert frame["link"]["feed"] == "poll" and frame["link"]["poll_interval"] == 5.0
    connected = LinkState(LinkStatus.CONNECTED)
    assert json.loads(health(connected, {"mqtt": "connected"}, rooms, 0, 100.0)[1])["upstream"]["feed"] == "socket"
