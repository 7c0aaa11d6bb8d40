"""The chat page's flows that broke (issue 14), in a real browser at desktop (1280×800) and phone (390×844) sizes."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from aiwriter.money import money_str
from conversations.models import Conversation, Message
from tests.factories import make_agent, make_fake_model, make_provider, make_user
from tests.fixtures_web import browser_login
from tests.test_browser_chat import RECORDER

pytestmark = [pytest.mark.browser, pytest.mark.pg, pytest.mark.timeout(120)]

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SIZES = [pytest.param(DESKTOP, id="desktop"), pytest.param(PHONE, id="phone")]
LONG_WORD = "abcdefghij" * 5  # 50 characters
LONG_REPLY = " ".join(f"{i:04d}{LONG_WORD}" for i in range(370))  # about 20,000 characters


@pytest.fixture
def upstream_model(fake_upstream):
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="sk-fake-test-key",
                             max_retries=0)
    model = make_fake_model(fake_upstream, "web-model", input_price="1000", output_price="2000", provider=provider)
    fake_upstream.configure("web-model", reply="A short answer.", chunk_delay=0.01)
    return model


@pytest.fixture
def agent(upstream_model):
    return make_agent("writer", name="Writer", model=upstream_model)


@pytest.fixture
def alice(db):
    from usage.billing.ledger import grant_credits

    user = make_user("alice")
    grant_credits(user=user, amount=Decimal("100"), reason="test", created_by=None)
    return user


def _open(page, web_server, size, path="/"):
    page.set_viewport_size(size)
    page.add_init_script(RECORDER)
    browser_login(page, web_server, "alice", next_path=path)
    page.wait_for_selector("#connection[data-state=open]")
    return page


def _send(page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def _last_assistant(page):
    return page.locator("article.message.assistant").last


def _no_page_scroll(page) -> dict:
    return page.evaluate("""() => ({
      page: document.scrollingElement.scrollHeight, view: window.innerHeight,
      wide: document.scrollingElement.scrollWidth, width: window.innerWidth,
      composerBottom: document.getElementById('composer').getBoundingClientRect().bottom,
      topbarTop: document.querySelector('.topbar').getBoundingClientRect().top,
      listGap: (() => { const m = document.getElementById('messages');
                        return m.scrollHeight - m.scrollTop - m.clientHeight; })(),
    })""")


# --- 1. the list scrolls, the page does not -------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_a_long_reply_scrolls_inside_the_list_and_the_composer_stays(browser_page, web_server, agent, alice,
                                                                     fake_upstream, size):
    fake_upstream.configure("web-model", reply=LONG_REPLY, chunk_delay=0.004)
    page = _open(browser_page, web_server, size)
    _send(page, "A very long answer, please")
    page.wait_for_function("() => window.__frames.filter(f => f.type === 'delta').length >= 20")
    # While it streams, the newest text stays in view.
    page.wait_for_function("() => { const m = document.getElementById('messages');"
                           " return m.scrollHeight > m.clientHeight * 2; }")
    during = _no_page_scroll(page)
    assert during["listGap"] < 60, "the list follows the streaming reply"
    # The user scrolls up to read: the list stops following.
    page.evaluate("document.getElementById('messages').scrollTop = 0")
    page.wait_for_function("() => window.__frames.filter(f => f.type === 'delta').length >= 60")
    assert page.evaluate("document.getElementById('messages').scrollTop") < 200
    # The button shows once the page has handled the scroll event (a busy page may take a frame or two).
    page.locator("#jump-latest").wait_for(state="visible", timeout=5_000)
    _last_assistant(page).locator(".meta").wait_for(state="visible", timeout=60_000)
    after = _no_page_scroll(page)
    assert after["page"] <= after["view"] + 1, f"the page grew to {after['page']} px"
    assert after["wide"] <= after["width"] + 1
    assert after["composerBottom"] <= after["view"] + 1 and after["topbarTop"] >= 0
    page.click("#jump-latest")
    assert _no_page_scroll(page)["listGap"] < 60


# --- 2. a reply survives a reload; retry streams ---------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_a_reload_mid_reply_shows_the_text_so_far_and_follows_the_rest(browser_page, web_server, agent, alice,
                                                                       fake_upstream, size, settings):
    reply_text = " ".join(f"w{i}" for i in range(250))
    fake_upstream.configure("web-model", reply=reply_text, chunk_delay=0.04)
    page = _open(browser_page, web_server, size)
    _send(page, "Tell me a long story")
    page.wait_for_function("() => window.__frames.filter(f => f.type === 'delta').length >= 5")
    page.wait_for_url(re.compile(r"c=\d+"))
    page.reload()
    page.wait_for_selector("#connection[data-state=open]")
    bubble = _last_assistant(page)
    bubble.locator(".content").wait_for(state="visible")
    assert "Tell me a long story" in page.locator("article.message.user").first.inner_text()
    assert page.locator("#stop").is_visible(), "the reopened page knows the reply is still running"
    bubble.locator(".meta").wait_for(state="visible", timeout=60_000)
    assert bubble.locator(".content").inner_text().strip() == reply_text
    assert bubble.locator(".failure").is_hidden()
    reply = Message.objects.get(role="assistant")
    assert reply.status == Message.Status.SUCCESS and reply.content == reply_text
    assert page.locator("#send").is_disabled() is True  # empty box
    assert page.locator("article.message").count() == 2


def test_retry_streams_its_reply(browser_page, web_server, agent, alice, fake_upstream):
    fake_upstream.configure("web-model", status=500)
    page = _open(browser_page, web_server, DESKTOP)
    _send(page, "This fails first")
    failed = _last_assistant(page)
    failed.locator(".failure").wait_for(state="visible")
    fake_upstream.configure("web-model", status=200, reply=" ".join(f"r{i}" for i in range(120)), chunk_delay=0.03)
    page.evaluate("window.__lengths = []")
    failed.locator(".retry").click()
    fresh = _last_assistant(page)
    fresh.locator(".meta").wait_for(state="visible", timeout=60_000)
    lengths = page.evaluate("window.__lengths")
    assert len([n for n in lengths if 0 < n < len(" ".join(f"r{i}" for i in range(120)))]) > 2, \
        f"the retried reply appears piece by piece, not all at the end: {lengths[:20]}"


# --- 3. a reconnect draws nothing twice -----------------------------------------------------------------

def test_reconnects_never_draw_the_users_message_twice(browser_page, web_server, agent, alice):
    page = _open(browser_page, web_server, DESKTOP)
    _send(page, "Only once, please")
    _last_assistant(page).locator(".meta").wait_for(state="visible")
    for _ in range(3):
        with page.expect_response(lambda r: "/messages/" in r.url):
            page.evaluate("window.__connection = []; window.aiwChat.socket.drop()")
            page.wait_for_function("() => window.__connection.includes('closed') "
                                   "&& window.__connection.at(-1) === 'open'")
        page.wait_for_timeout(200)  # the reconcile's rendering (one animation frame)
    assert page.locator("article.message.user").count() == 1
    assert page.locator("article.message.assistant").count() == 1


# --- 4. one message at a time; a refused text is never lost -----------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_send_waits_for_the_running_reply_and_a_refused_text_is_kept(browser_page, web_server, agent, alice,
                                                                     fake_upstream, size):
    fake_upstream.configure("web-model", reply=" ".join(["word"] * 150), chunk_delay=0.04)
    page = _open(browser_page, web_server, size)
    _send(page, "First question")
    page.wait_for_function("() => window.__frames.some(f => f.type === 'delta')")
    page.fill("#message-input", "A second question typed meanwhile")
    assert page.locator("#send").is_disabled()
    page.press("#message-input", "Enter")
    assert page.input_value("#message-input") == "A second question typed meanwhile", "the text stays in the box"
    assert page.locator("article.message.user").count() == 1
    # Whatever gets through anyway (another tab, a queued frame) and is refused comes back to the box.
    page.fill("#message-input", "")
    page.evaluate("window.aiwChat.sendMessage('Forced while busy')")
    page.locator(".notice").wait_for(state="visible")
    assert "still answering" in page.locator(".notice").inner_text()
    assert page.input_value("#message-input") == "Forced while busy"
    assert page.locator("article.message.user").count() == 1
    _last_assistant(page).locator(".meta").wait_for(state="visible", timeout=60_000)
    assert page.locator("#send").is_enabled()
    page.press("#message-input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('article.message.assistant .meta:not([hidden])')"
                           ".length === 2", timeout=60_000)
    assert Message.objects.filter(role="user", content="Forced while busy").count() == 1


# --- 5 and 6. the address bar, Back, the agent per conversation, failed ones listed ------------------------

@pytest.mark.parametrize("size", SIZES)
def test_the_address_bar_follows_conversations_and_the_agent_is_the_conversations(
        browser_page, web_server, agent, upstream_model, alice, size):
    editor = make_agent("editor", name="Editor", model=upstream_model)
    first = Conversation.objects.create(owner=alice, agent=editor, title="Edited essay", has_success=True)
    Message.objects.create(conversation=first, role="user", status="success", sequence=1, content="Fix my essay")
    second = Conversation.objects.create(owner=alice, agent=agent, title="Stopped story")
    Message.objects.create(conversation=second, role="user", status="error", sequence=1, content="Story please")
    Message.objects.create(conversation=second, role="assistant", status="error", sequence=2, content="Once",
                           error_code="cancelled", error_message="Stopped.")
    page = _open(browser_page, web_server, size)

    def open_from_sidebar(conversation):
        if page.locator("#sidebar-toggle").is_visible():
            page.click("#sidebar-toggle")
        page.click(f"#conversation-list button.conversation[data-conversation-id='{conversation.pk}']")

    # A stopped conversation (no successful reply) is listed, marked.
    page.wait_for_selector(f"#conversation-list button.conversation[data-conversation-id='{second.pk}']",
                           state="attached")
    open_from_sidebar(first)
    page.wait_for_url(re.compile(rf"\?c={first.pk}$"))
    page.wait_for_selector("article.message.user")
    page.wait_for_function("() => document.getElementById('agent-select').value === 'editor'")
    assert page.locator("#agent-select").is_disabled(), "the server keeps a conversation's agent: no picking"
    assert "Editor" in page.locator("#agent-name").inner_text()
    open_from_sidebar(second)
    page.wait_for_url(re.compile(rf"\?c={second.pk}$"))
    page.locator("article.message.assistant .failure").wait_for(state="visible")
    assert "Stopped" in page.locator("article.message.assistant .failure-text").inner_text()
    page.wait_for_function("() => document.getElementById('agent-select').value === 'writer'")
    # Back returns to the first conversation, Forward to the second; a reload keeps where we are.
    page.go_back()
    page.wait_for_url(re.compile(rf"\?c={first.pk}$"))
    page.wait_for_function("(t) => document.querySelector('article.message.user .content')?.textContent === t",
                           arg="Fix my essay")
    page.wait_for_function("() => document.getElementById('agent-select').value === 'editor'")
    page.reload()
    page.wait_for_function("(t) => document.querySelector('article.message.user .content')?.textContent === t",
                           arg="Fix my essay")
    assert page.locator(f"button.conversation.active[data-conversation-id='{first.pk}']").count() == 1
    # The stopped one is still listed after all this.
    assert page.locator(f"#conversation-list button.conversation[data-conversation-id='{second.pk}']").count() == 1
    assert "no reply" in page.locator(
        f"#conversation-list button.conversation[data-conversation-id='{second.pk}']").inner_text()
    if page.locator("#sidebar-toggle").is_visible():
        page.click("#sidebar-toggle")
    page.click("#new-conversation")
    page.wait_for_url(re.compile(r"/$"))
    assert page.locator("#agent-select").is_enabled()
    assert page.locator("#empty-hint").is_visible()


# --- 7. money -------------------------------------------------------------------------------------------

def test_live_cost_is_a_plain_decimal(browser_page, web_server, agent, alice, fake_upstream):
    free_model = make_fake_model(fake_upstream, "free-model")
    fake_upstream.configure("free-model", reply="Free of charge.")
    make_agent("free", name="Free", model=free_model)
    page = _open(browser_page, web_server, DESKTOP)
    page.select_option("#agent-select", "free")
    _send(page, "Free please")
    meta = _last_assistant(page).locator(".meta")
    meta.wait_for(state="visible")
    assert "cost 0 CNY" in meta.inner_text() and "E-" not in meta.inner_text()
    page.click("#new-conversation")
    page.select_option("#agent-select", "writer")
    _send(page, "Priced please")
    meta = _last_assistant(page).locator(".meta")
    meta.wait_for(state="visible")
    priced = Message.objects.filter(role="assistant", cost__gt=0).get()
    assert f"cost {money_str(priced.cost)} CNY" in meta.inner_text()
    assert not re.search(r"\d0 CNY", meta.inner_text()), "no trailing zeros"
    shown = page.evaluate("""async () => {
      const { formatMoney } = await import("/static/js/money.js");
      return ["0E-10", "0.0005725000", "1.5E-7", "2.5000000000", "100"].map((v) => formatMoney(v, "CNY"));
    }""")
    assert shown == ["0 CNY", "0.0005725 CNY", "0.00000015 CNY", "2.5 CNY", "100 CNY"]


# --- 8. the length limit is said, counted and explained ----------------------------------------------------

def test_over_long_input_is_counted_refused_and_kept(browser_page, web_server, agent, alice, settings):
    limit = 32_000
    page = _open(browser_page, web_server, DESKTOP)
    page.fill("#message-input", "x" * (limit + 1))
    counter = page.locator("#char-count")
    assert counter.inner_text() == "32,001 / 32,000" and "over" in counter.get_attribute("class")
    assert page.locator("#send").is_disabled()
    assert len(page.input_value("#message-input")) == limit + 1, "nothing is cut silently"
    page.press("#message-input", "Enter")
    assert page.locator("article.message").count() == 0
    # Forced past the page, the server's refusal is told as what it is, and the text comes back.
    page.fill("#message-input", "")
    page.evaluate("(n) => window.aiwChat.sendMessage('y'.repeat(n))", limit + 5)
    page.locator(".notice").wait_for(state="visible")
    notice = page.locator(".notice").inner_text()
    assert "too long" in notice and "32,000" in notice and "model error" not in notice
    assert len(page.input_value("#message-input")) == limit + 5
    assert page.locator("article.message").count() == 0
    page.fill("#message-input", "short")
    assert page.locator("#char-count").inner_text() == "5 / 32,000" and page.locator("#send").is_enabled()


def test_a_message_past_the_models_window_is_told_as_too_long_not_as_a_model_error(browser_page, web_server, alice,
                                                                                   fake_upstream):
    model = make_fake_model(fake_upstream, "tiny-window", context_window=60, max_output_tokens=20)
    make_agent("tiny", name="Tiny", model=model, system_prompt="Short.")
    page = _open(browser_page, web_server, DESKTOP)
    _send(page, "word " * 200)  # far under the page's 32,000 characters, far over the model's 60 tokens
    box = _last_assistant(page).locator(".failure")
    box.wait_for(state="visible")
    text = box.inner_text()
    assert "too long for this model's context window" in text and "model error" not in text
    assert fake_upstream.requests == []


# --- 9. a failure is said once, in words for the person reading ---------------------------------------------

def test_a_failure_is_said_once_and_never_tells_a_user_to_top_up(browser_page, web_server, agent):
    make_user("poor")  # no credit at all
    page = browser_page
    page.set_viewport_size(DESKTOP)
    browser_login(page, web_server, "poor")
    page.wait_for_selector("#connection[data-state=open]")
    _send(page, "Hello")
    box = _last_assistant(page).locator(".failure")
    box.wait_for(state="visible")
    text = box.inner_text()
    assert "balance is too low" in text and "administrator" in text
    assert "Top up" not in text and "top up" not in text
    assert _last_assistant(page).locator(".failure-detail").inner_text() == "", "said once, not twice"
    sentences = [s.strip() for s in re.split(r"[.!?]", text.replace("Retry", "")) if s.strip()]
    assert len(sentences) == len(set(sentences))


# --- 10. the phone ---------------------------------------------------------------------------------------

def test_on_a_phone_everything_is_reachable_and_nothing_overflows(browser_page, web_server, agent, alice):
    conversation = Conversation.objects.create(owner=alice, agent=agent, title="From yesterday", has_success=True)
    Message.objects.create(conversation=conversation, role="user", status="success", sequence=1, content="Hi there")
    page = _open(browser_page, web_server, PHONE)
    sizes = _no_page_scroll(page)
    assert sizes["wide"] <= PHONE["width"] and sizes["page"] <= PHONE["height"] + 1
    for link in page.locator(".topbar a, .topbar button").all():
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 1, link.inner_text()
        assert box["y"] + box["height"] <= PHONE["height"]
    assert page.locator("#conversation-list").is_hidden()
    page.click("#sidebar-toggle")
    new = page.locator("#new-conversation")
    assert new.is_visible() and new.bounding_box()["x"] >= 0
    page.click(f"#conversation-list button.conversation[data-conversation-id='{conversation.pk}']")
    page.wait_for_url(re.compile(rf"\?c={conversation.pk}$"))
    page.wait_for_selector("article.message.user")
    assert page.locator("#conversation-list").is_hidden(), "the drawer closes once a conversation is open"
    page.click("#sidebar-toggle")
    page.click("#new-conversation")
    assert page.locator("#empty-hint").is_visible()
    # The usage page fits too: its tables and charts scroll inside their panels.
    page.goto(f"{web_server}/account/")
    page.wait_for_selector("#key-rows")
    page.wait_for_timeout(500)
    sizes = page.evaluate("() => ({wide: document.scrollingElement.scrollWidth, width: window.innerWidth})")
    assert sizes["wide"] <= sizes["width"], f"the usage page is {sizes['wide']} px wide"


# --- what users expect ------------------------------------------------------------------------------------

def test_markdown_tables_and_code_blocks_with_language_highlighting_and_copy(browser_page, web_server, agent, alice,
                                                                            fake_upstream):
    fake_upstream.configure("web-model", reply="| Name | Age |\n|---|---|\n| Ann | 30 |\n\n"
                            "```python\ndef add(a, b):\n    return a + b\n```\n", chunk_delay=0)
    page = _open(browser_page, web_server, DESKTOP)
    _send(page, "A table and some code")
    bubble = _last_assistant(page)
    bubble.locator(".meta").wait_for(state="visible")
    assert bubble.locator("table th").all_inner_texts() == ["Name", "Age"]
    assert bubble.locator("table td").all_inner_texts() == ["Ann", "30"]
    assert bubble.locator(".code-lang").inner_text() == "python"
    assert bubble.locator("pre code span.hljs-keyword").first.inner_text() == "def", "highlighted"
    bubble.locator(".copy-code").click()
    page.wait_for_function("() => document.querySelector('.copy-code').textContent === 'Copied'")
    assert page.evaluate("window.__lastCopied || null") in (None, "def add(a, b):\n    return a + b\n")
    assert page.external_requests == []


def test_copy_edit_and_regenerate(browser_page, web_server, agent, alice, fake_upstream):
    page = _open(browser_page, web_server, DESKTOP)
    _send(page, "First try")
    _last_assistant(page).locator(".meta").wait_for(state="visible")
    page.locator("article.message.user .edit").click()
    assert page.input_value("#message-input") == "First try"
    page.fill("#message-input", "")
    _last_assistant(page).locator(".regenerate").click()
    page.wait_for_function("() => document.querySelectorAll('article.message.assistant .meta:not([hidden])')"
                           ".length === 2")
    assert [m.content for m in Message.objects.filter(role="user").order_by("sequence")] == ["First try", "First try"]


def test_rename_delete_and_search_conversations(browser_page, web_server, agent, alice):
    keep = Conversation.objects.create(owner=alice, agent=agent, title="Holiday plans", has_success=True)
    drop = Conversation.objects.create(owner=alice, agent=agent, title="Old notes", has_success=True)
    page = _open(browser_page, web_server, DESKTOP)
    item = page.locator(f"li.conversation-item[data-conversation-id='{keep.pk}']")
    item.wait_for()
    assert re.search(r"\d", item.locator(".info").inner_text()), "a date or time is shown"
    item.locator(".rename").click()
    page.fill(".rename-input", "Summer holiday")
    page.press(".rename-input", "Enter")
    page.wait_for_function("(id) => document.querySelector(`button.conversation[data-conversation-id='${id}'] .title`)"
                           "?.textContent === 'Summer holiday'", arg=keep.pk)
    keep.refresh_from_db()
    assert keep.title == "Summer holiday"
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f"li.conversation-item[data-conversation-id='{drop.pk}'] .delete").click()
    page.wait_for_selector(f"li.conversation-item[data-conversation-id='{drop.pk}']", state="detached")
    drop.refresh_from_db()
    assert drop.deleted_at is not None
    page.fill("#conversation-search", "summer")
    page.wait_for_function("() => document.querySelectorAll('li.conversation-item').length === 1")
    page.fill("#conversation-search", "nothing like it")
    page.wait_for_selector("li.empty-list")


def test_welcome_examples_and_dark_mode(browser_page, web_server, agent, alice):
    page = _open(browser_page, web_server, DESKTOP)
    assert page.locator(".example-prompt").count() >= 3
    page.locator(".example-prompt").first.click()
    assert page.input_value("#message-input") == page.locator(".example-prompt").first.inner_text()
    before = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != before
    page.reload()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark", "the choice is kept"
