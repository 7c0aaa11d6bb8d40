"""The chat page in a real browser (Debian's chromium via Playwright) against a live daphne and the test upstream."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from conversations.models import Message
from tests.factories import make_agent, make_fake_model, make_provider, make_user
from tests.fixtures_web import browser_login

pytestmark = [pytest.mark.browser, pytest.mark.pg, pytest.mark.timeout(60)]

REPLY = ("Here is **bold** text and `code`. <script>window.pwned = 1</script> "
         "<img src=x onerror=\"window.pwned = 2\"> And a [link](javascript:window.pwned=3) at the end.")

# Installed before the page's own scripts: records frames, statuses and the reply's growth as the user sees it.
RECORDER = """
window.__frames = [];
window.__statuses = [];
window.__lengths = [];
window.__connection = [];
document.addEventListener("aiw:frame", (e) => window.__frames.push(e.detail));
new MutationObserver(() => {
  const connection = document.getElementById("connection");
  const state = connection && connection.dataset.state;
  if (state && window.__connection[window.__connection.length - 1] !== state) window.__connection.push(state);
  const bubbles = document.querySelectorAll("article.message.assistant");
  const last = bubbles[bubbles.length - 1];
  if (!last) return;
  const line = last.querySelector(".status-line");
  const status = line && !line.hidden ? line.textContent : "";
  if (status && window.__statuses[window.__statuses.length - 1] !== status) window.__statuses.push(status);
  const length = last.querySelector(".content").textContent.length;
  if (window.__lengths[window.__lengths.length - 1] !== length) window.__lengths.push(length);
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""
# Predicates as functions: the page's CSP (script-src 'self') forbids evaluating a bare expression string.
TWO_REPLIES_SHOWN = "() => document.querySelectorAll('article.message.assistant .meta:not([hidden])').length === 2"


@pytest.fixture(scope="module")
def web_server_env() -> dict[str, str]:
    return {"MODERATION_BLOCKLIST": "forbiddenword"}


@pytest.fixture
def upstream_model(fake_upstream):
    # No retries: a configured failure fails at once.
    provider = make_provider(kind="openai", base_url=fake_upstream.base_url, api_key="sk-fake-test-key",
                             max_retries=0)
    model = make_fake_model(fake_upstream, "web-model", input_price="1000", output_price="2000", provider=provider)
    fake_upstream.configure("web-model", reply=REPLY, chunk_delay=0.03)
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


@pytest.fixture
def chat_page(browser_page, web_server, agent, alice):
    browser_page.add_init_script(RECORDER)
    browser_login(browser_page, web_server, "alice")
    browser_page.wait_for_selector("#connection[data-state=open]")
    return browser_page


def _send(page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def _last_assistant(page):
    return page.locator("article.message.assistant").last


def test_reply_streams_in_pieces_with_status_and_cost(chat_page):
    page = chat_page
    _send(page, "Write something")
    bubble = _last_assistant(page)
    meta = bubble.locator(".meta")
    meta.wait_for(state="visible")
    assert re.search(r"\d+ tokens", meta.inner_text())
    assert "cost 0." in meta.inner_text() and "CNY" in meta.inner_text()
    frames = page.evaluate("window.__frames")
    deltas = [f for f in frames if f["type"] == "delta"]
    assert len(deltas) > 3, "the reply arrives in pieces"
    statuses = [f["status"] for f in frames if f["type"] == "status"]
    assert statuses[:1] == ["thinking"] and "generating" in statuses
    assert "Thinking…" in page.evaluate("window.__statuses")
    assert "Generating…" in page.evaluate("window.__statuses")
    lengths = page.evaluate("window.__lengths")
    assert len([n for n in lengths if n > 0]) > 2, "the text on screen grows while it streams"
    done = next(f for f in frames if f["type"] == "done")
    message = Message.objects.get(pk=done["message"])
    assert message.status == "success" and message.cost > 0
    # The sidebar now lists the conversation (it has a successful reply).
    page.wait_for_selector("#conversation-list button.conversation")
    assert page.external_requests == [], "the page works with no internet: nothing is fetched from elsewhere"


def test_html_in_a_reply_shows_as_text(chat_page):
    page = chat_page
    _send(page, "Show me HTML")
    bubble = _last_assistant(page)
    bubble.locator(".meta").wait_for(state="visible")
    content = bubble.locator(".content")
    assert "<script>window.pwned = 1</script>" in content.inner_text()
    assert content.locator("script").count() == 0 and content.locator("img").count() == 0
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("code").first.inner_text() == "code"
    assert content.locator("a").count() == 0  # a javascript: link stays text
    assert page.evaluate("window.pwned === undefined")


def test_stop_cancels_the_reply_midway(chat_page, fake_upstream):
    fake_upstream.configure("web-model", reply=" ".join(["word"] * 400), chunk_delay=0.05)
    page = chat_page
    _send(page, "A long one please")
    page.wait_for_function("() => window.__frames.filter(f => f.type === 'delta').length >= 3")
    page.click("#stop")
    bubble = _last_assistant(page)
    bubble.locator(".failure").wait_for(state="visible")
    assert "Stopped" in bubble.locator(".failure-text").inner_text()
    assert bubble.locator(".retry").is_visible()
    shown = bubble.locator(".content").inner_text()
    assert 0 < len(shown) < len(" ".join(["word"] * 400))
    assert page.locator("#stop").is_hidden()
    reply = Message.objects.get(pk=int(bubble.get_attribute("data-message-id")))
    assert reply.status == Message.Status.ERROR
    assert 0 < len(reply.content) < 2000


def test_failed_reply_shows_its_status_and_retry_works(chat_page, fake_upstream):
    fake_upstream.configure("web-model", status=500)
    page = chat_page
    _send(page, "This will fail first")
    failed = _last_assistant(page)
    failed.locator(".failure").wait_for(state="visible")
    assert "model error" in failed.locator(".failure-text").inner_text()
    failed_id = int(failed.get_attribute("data-message-id"))
    reply = Message.objects.get(pk=failed_id)
    assert reply.status == Message.Status.LLM_ERROR
    assert reply.conversation.has_success is False

    # Reloaded, the page reopens the conversation (its id is in the URL) with the failure and its retry button,
    # and the sidebar keeps it (marked: no reply yet), so it never vanishes.
    with page.expect_response(lambda r: "/api/conversations/?" in r.url):
        page.reload()
    failed = _last_assistant(page)
    failed.locator(".failure").wait_for(state="visible")
    assert "model error" in failed.locator(".failure-text").inner_text()
    assert failed.get_attribute("data-message-id") == str(failed_id)
    page.wait_for_selector(f"#conversation-list button.conversation[data-conversation-id='{reply.conversation_id}']")
    assert "no reply" in page.locator("#conversation-list button.conversation").inner_text()

    fake_upstream.configure("web-model", status=200, reply="Second time lucky.")
    failed.locator(".retry").click()
    fresh = _last_assistant(page)
    fresh.locator(".meta").wait_for(state="visible")
    assert "Second time lucky." in fresh.locator(".content").inner_text()
    assert "cost" in fresh.locator(".meta").inner_text()
    assert Message.objects.get(pk=int(fresh.get_attribute("data-message-id"))).status == Message.Status.SUCCESS
    # Now it has a successful reply, the sidebar no longer marks it.
    page.wait_for_function("() => !document.querySelector('#conversation-list .tag')")


def test_low_balance_is_told_in_plain_words_and_retry_works_after_a_top_up(browser_page, web_server, agent):
    from usage.billing.ledger import grant_credits

    poor = make_user("poor")  # no credit at all
    page = browser_page
    browser_login(page, web_server, "poor")
    page.wait_for_selector("#connection[data-state=open]")
    _send(page, "Hello")
    bubble = _last_assistant(page)
    bubble.locator(".failure").wait_for(state="visible")
    assert "balance is too low" in bubble.locator(".failure-text").inner_text()
    failed = Message.objects.get(pk=int(bubble.get_attribute("data-message-id")))
    assert failed.status == Message.Status.INSUFFICIENT_BALANCE

    grant_credits(user=poor, amount=Decimal("10"), reason="test", created_by=None)
    bubble.locator(".retry").click()
    fresh = _last_assistant(page)
    fresh.locator(".meta").wait_for(state="visible")
    assert "cost" in fresh.locator(".meta").inner_text()
    assert Message.objects.get(pk=int(fresh.get_attribute("data-message-id"))).status == Message.Status.SUCCESS


def test_refused_content_is_told_in_plain_words(chat_page, fake_upstream):
    page = chat_page
    _send(page, "Please write about forbiddenword")
    bubble = _last_assistant(page)
    bubble.locator(".failure").wait_for(state="visible")
    assert "refused by the content rules" in bubble.locator(".failure-text").inner_text()
    assert fake_upstream.requests == []  # the model was never asked


def test_reconnects_after_a_dropped_socket_and_keeps_the_screen(chat_page):
    page = chat_page
    _send(page, "First message")
    _last_assistant(page).locator(".meta").wait_for(state="visible")
    before = page.locator("article.message").count()
    page.evaluate("window.__connection = []; window.aiwChat.socket.drop()")
    # The states are recorded in the page: "closed" lasts only until the first retry, a few hundred ms.
    page.wait_for_function("() => window.__connection.includes('closed') && window.__connection.at(-1) === 'open'")
    assert page.locator("article.message").count() == before
    assert "First message" in page.locator("article.message.user").first.inner_text()
    _send(page, "Second message")
    page.wait_for_function(TWO_REPLIES_SHOWN)
    assert page.locator("article.message").count() == before + 2


def test_a_socket_dropped_midway_keeps_the_reply_going_and_follows_it(chat_page, fake_upstream):
    long_reply = " ".join(f"w{i}" for i in range(300))
    fake_upstream.configure("web-model", reply=long_reply, chunk_delay=0.03)
    page = chat_page
    _send(page, "A long one please")
    page.wait_for_function("() => window.__frames.filter(f => f.type === 'delta').length >= 3")
    bubble = _last_assistant(page)
    # Drop the socket as a network failure would: the server keeps generating (only Stop cancels), the page
    # says it is reconnecting, reconnects by itself and shows the whole reply in the end.
    page.evaluate("window.aiwChat.socket.drop()")
    bubble.locator(".meta").wait_for(state="visible", timeout=40_000)
    assert "Connection lost, reconnecting…" in page.evaluate("window.__statuses")
    page.wait_for_function("(n) => document.querySelector('article.message.assistant .content').textContent"
                           ".trim().length === n", arg=len(long_reply))
    assert bubble.locator(".content").inner_text().strip() == long_reply
    assert bubble.locator(".failure").is_hidden()
    assert page.locator("article.message").count() == 2
    assert page.locator("#stop").is_hidden()
    reply = Message.objects.get(pk=int(bubble.get_attribute("data-message-id")))
    assert reply.status == Message.Status.SUCCESS and reply.content == long_reply


def test_pick_an_agent_and_continue_an_old_conversation_from_the_sidebar(chat_page, upstream_model):
    from conversations.models import Conversation

    make_agent("editor", name="Editor", model=upstream_model)
    page = chat_page
    page.reload()  # the page lists the agents there are when it loads
    page.wait_for_selector("#connection[data-state=open]")
    page.select_option("#agent-select", "writer")
    _send(page, "Remember me")
    _last_assistant(page).locator(".meta").wait_for(state="visible")

    page.click("#new-conversation")
    assert page.locator("article.message").count() == 0
    page.select_option("#agent-select", "editor")
    _send(page, "Edit this")
    _last_assistant(page).locator(".meta").wait_for(state="visible")
    first, second = Conversation.objects.order_by("id")
    assert (first.agent.slug, second.agent.slug) == ("writer", "editor")

    page.wait_for_selector(f"#conversation-list button.conversation[data-conversation-id='{second.pk}']")
    page.click(f"#conversation-list button.conversation[data-conversation-id='{first.pk}']")
    page.wait_for_selector("article.message.assistant .meta:not([hidden])")
    assert "Remember me" in page.locator("article.message.user").first.inner_text()
    assert "cost" in page.locator("article.message.assistant .meta").first.inner_text()
    assert page.input_value("#agent-select") == "writer", "the conversation's own agent is picked again"
    assert "active" in page.get_attribute(f"button.conversation[data-conversation-id='{first.pk}']", "class")

    _send(page, "And once more")  # continues the old conversation
    page.wait_for_function(TWO_REPLIES_SHOWN)
    first.refresh_from_db()
    assert first.message_count == 4 and Conversation.objects.count() == 2


def test_new_conversation_with_the_same_agent_starts_a_new_one(chat_page, fake_upstream):
    from conversations.models import Conversation

    page = chat_page
    _send(page, "About cats")
    _last_assistant(page).locator(".meta").wait_for(state="visible")
    page.click("#new-conversation")  # same agent, well within the server's 5-minute dedupe
    _send(page, "About dogs")
    page.wait_for_function("() => window.__frames.filter((f) => f.type === 'done').length === 2")
    first, second = Conversation.objects.order_by("id")
    assert (first.message_count, second.message_count) == (2, 2)
    assert first.agent_id == second.agent_id
    sent = [m["content"] for m in fake_upstream.requests[-1]["body"]["messages"] if m["role"] != "system"]
    assert sent == ["About dogs"], "the model sees only the new conversation"
    assert page.url.endswith(f"c={second.pk}")


XSS_INPUTS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[x](http://a\"onmouseover=\"alert(1))",
    "[x](//evil.example/)",
    "**<b onclick=alert(1)>bold</b>**",
    "`<svg onload=alert(1)>`",
    "```\n<iframe src=javascript:alert(1)></iframe>\n```",
    "> <a href=javascript:alert(1)>q</a>",
    "# <style>body{display:none}</style>",
    "- item <details open ontoggle=alert(1)>",
    "\u0000 0 \u0000 [a](https://ok.example/?a=1&b=\"2\")",
]


def test_markdown_renders_only_its_own_safe_tags(browser_page, web_server):
    page = browser_page
    page.goto(f"{web_server}/accounts/login/")
    found = page.evaluate("""async (inputs) => {
      const { renderMarkdown } = await import("/static/js/markdown.js");
      const allowed = new Set(["P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "A", "UL", "OL", "LI", "BLOCKQUOTE",
                               "H1", "H2", "H3", "H4", "H5", "H6", "HR", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD",
                               "SPAN", "DIV"]);
      const problems = [];
      for (const input of inputs) {
        const doc = new DOMParser().parseFromString(`<div>${renderMarkdown(input)}</div>`, "text/html");
        for (const el of doc.body.firstChild.querySelectorAll("*")) {
          if (!allowed.has(el.tagName)) problems.push(`${input} -> <${el.tagName}>`);
          for (const attr of el.attributes) {
            const ok = (el.tagName === "A" && ["href", "rel", "target"].includes(attr.name))
              || (["CODE", "SPAN", "DIV"].includes(el.tagName) && attr.name === "class")
              || (["TH", "TD"].includes(el.tagName) && attr.name === "align");
            if (!ok) problems.push(`${input} -> ${el.tagName}[${attr.name}]`);
            if (attr.name === "href" && !/^(https?:|mailto:|\\/[^/])/i.test(attr.value)) {
              problems.push(`${input} -> href ${attr.value}`);
            }
          }
        }
      }
      return problems;
    }""", XSS_INPUTS)
    assert found == []
    rendered = page.evaluate("""async () => {
      const { renderMarkdown } = await import("/static/js/markdown.js");
      return renderMarkdown("[docs](https://example.com/a?b=1&c=2) and **bold** and *it*");
    }""")
    assert '<a href="https://example.com/a?b=1&amp;c=2" rel="noopener noreferrer nofollow" target="_blank">docs</a>' \
        in rendered
    assert "<strong>bold</strong>" in rendered and "<em>it</em>" in rendered
