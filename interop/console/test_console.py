"""The web console in a real headless Chromium, used as an operator would: log in,
read the overview, publish through the Publish form, find the messages on the
Queues page, get, purge and delete the queue, and close a client's connection.

Every figure the console shows is compared with the same figure fetched by this
script from the management API, so a console that showed a wrong number, or the
right number in the wrong place, fails. Each check prints "ok" or "FAIL" and the
script writes "PASSED FAILED" to the counts file; interop/console.sh prints the
summary line from it.

Usage: test_console.py HOST AMQP_PORT MANAGEMENT_PORT COUNTS_FILE
"""

import base64
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

import pika
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The console refreshes every 5 s; a figure that is not right after two refreshes
# is wrong.
SETTLE = 12.0
MESSAGES = 3
STATS = ["publish", "deliver_get", "ack", "confirm", "redeliver", "return_unroutable", "drop_unroutable"]


def log(line):
    print(f"[interop] {line}", flush=True)


class Failed(Exception):
    """A check's expectation that did not hold."""


def expect(condition, message):
    if not condition:
        raise Failed(message)


def eventually(probe, what, timeout=SETTLE):
    """Polls probe() until it returns (True, detail); fails with the last detail.

    For figures that settle after a refresh: the console and the API are read
    again on each try, so a race with a refresh cannot fail the check, while a
    console that keeps showing another number still does."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = probe()
        if ok:
            return detail
        if time.monotonic() >= deadline:
            raise Failed(f"{what}: {detail}")
        time.sleep(0.25)


# ---- the management API, as the test's own source of truth -----------------------


class Api:
    def __init__(self, base, user="guest", password="guest"):
        self.base = base
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = f"Basic {token}"

    def call(self, method, path, body=None, headers=None):
        """(status, parsed JSON or None); HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self.auth)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, (json.loads(raw) if raw else None)

    def get(self, path):
        status, body = self.call("GET", path)
        expect(status == 200, f"GET {path}: HTTP {status} {body}")
        return body


def q(name):
    """A name as one path segment ("/" is %2F, as the console sends it too)."""
    return urllib.parse.quote(name, safe="")


def pick(obj, path):
    for key in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


# The console's formats (console.js FORMATS): a missing figure is 0.
def as_count(value):
    return str(int(value or 0))


def as_rate(value):
    return f"{float(value or 0):.2f}"


def as_bool(value):
    return "yes" if value else "no"


# ---- the console, through Chromium -------------------------------------------------

ROWS_JS = """
const table = document.getElementById(arguments[0]);
if (!table || table.offsetParent === null) return null;
return Array.from(table.querySelectorAll('tbody tr[data-test=row]')).map((tr) => ({
  vhost: tr.dataset.vhost,
  name: tr.dataset.name,
  fields: Object.fromEntries(Array.from(tr.querySelectorAll('td[data-field]'))
    .map((td) => [td.dataset.field, td.textContent])),
  markup: tr.querySelectorAll('td > :not(a):not(button), td a > *').length,
}));
"""

FIGURES_JS = """
return Object.fromEntries(Array.from(document.querySelectorAll(arguments[0]))
  .map((node) => [node.dataset.field, node.textContent]));
"""


# What a reader sees: each figure by the label in front of it.
LABELLED_JS = """
return Object.fromEntries(Array.from(document.querySelectorAll(arguments[0] + ' dt'))
  .map((dt) => [dt.textContent, dt.nextElementSibling ? dt.nextElementSibling.textContent : null]));
"""


class Console:
    def __init__(self, base):
        self.base = base
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--disable-gpu"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)

    def quit(self):
        self.driver.quit()

    def open(self, hash_=""):
        if self.driver.current_url.startswith(self.base) and hash_:
            self.driver.execute_script("location.hash = arguments[0];", hash_)
        else:
            self.driver.get(self.base + hash_)

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def wait(self, condition, what, timeout=SETTLE):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda d: condition())
        except WebDriverException as error:
            raise Failed(f"timed out waiting for {what}") from error

    def visible(self, css):
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and found[0].is_displayed()

    def text(self, css):
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else None

    def rows(self, table_id):
        """The table's rows as {vhost, name, fields}, or None while it is not shown."""
        return self.driver.execute_script(ROWS_JS, table_id)

    def row(self, table_id, vhost, name):
        for row in self.rows(table_id) or []:
            if row["vhost"] == vhost and row["name"] == name:
                return row
        return None

    def figures(self, scope):
        return self.driver.execute_script(FIGURES_JS, f"{scope} [data-field]")

    def labelled(self, scope):
        return self.driver.execute_script(LABELLED_JS, scope)

    def page(self):
        return self.driver.execute_script("return document.getElementById('page').dataset.page || null;")

    def fill(self, css, value):
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def log_in(self, user, password):
        self.fill("#login-username", user)
        self.fill("#login-password", password)
        self.find("#login-submit").click()

    def confirm(self, accept=True):
        WebDriverWait(self.driver, 5).until(expected_conditions.alert_is_present())
        alert = self.driver.switch_to.alert
        text = alert.text
        if accept:
            alert.accept()
        else:
            alert.dismiss()
        return text

    def script_errors(self):
        return [e for e in self.driver.get_log("browser") if e.get("source") in ("javascript", "security")]


# ---- the scenario ------------------------------------------------------------------


class Scenario:
    def __init__(self, host, amqp_port, management_port):
        self.host, self.amqp_port = host, amqp_port
        self.base = f"http://{host}:{management_port}/"
        self.api = Api(self.base)
        self.passed = self.failed = 0
        tag = f"{os.getpid()}-{int(time.time())}"
        self.queue = f"console-q-{tag}"
        self.bound_queue = f"console-bound-{tag}"
        self.binding_key = f"console.key.{tag}"
        # A name that is markup if the console ever treated names as HTML.
        self.hostile = f'console-<img src=x onerror="window.injected=1">&amp;-{tag}'
        self.connection_name = f"console-test-{tag}"
        self.amqp = None
        self.amqp_closed_reason = None
        self.console = None
        self.login_failed = None

    def check(self, name, body):
        try:
            body()
        except Failed as failure:
            self.failed += 1
            log(f"FAIL {name}")
            log(f"    {failure}")
        except Exception:  # a crash in one check must not hide the others' results
            self.failed += 1
            log(f"FAIL {name} (error)")
            for line in traceback.format_exc().rstrip().splitlines():
                log(f"    {line}")
        else:
            self.passed += 1
            log(f"ok   {name}")

    def run(self):
        self.check("the console's page, script and style sheet are served", self.files_are_served)
        self.console = Console(self.base)
        try:
            self.check("a wrong password shows the API's reason on the login form", self.wrong_password)
            self.check("guest/guest logs in and lands on the overview", self.log_in)
            self.check("a queue declared through the API and an AMQP client connected", self.set_up)
            self.check("the default exchange is listed as the API lists it", self.exchanges_match)
            self.check(f"{MESSAGES} messages published through the Publish form are routed", self.publish)
            self.check("a message nobody is bound for is reported as not routed", self.publish_unroutable)
            self.check(f"the Queues page shows the {MESSAGES} ready messages, as the API does", self.queues_match)
            self.check("the Queues page refreshes itself when the queue changes", self.queues_refresh)
            self.check("the overview's totals and message rates match the API's", self.overview_matches)
            self.check("the queue's page shows its figures", self.queue_details)
            self.check("Get messages (requeue) shows the first payload and leaves it queued", self.get_requeue)
            self.check("Get messages (ack) takes two messages off the queue", self.get_ack)
            self.check("Purge, dismissed at the prompt, leaves the messages", self.purge_dismissed)
            self.check("Purge empties the queue", self.purge)
            self.check("Delete removes the queue", self.delete)
            self.check("the client's connection is listed as the API lists it", self.connection_listed)
            self.check("Close closes the client's connection with the console's reason", self.close_connection)
            self.check("a binding is on the Bindings page and on its exchange's page", self.bindings)
            self.check("a queue name that looks like HTML is shown as text", self.names_are_text)
            self.check("a reload keeps the session", self.reload_keeps_session)
            self.check("a password changed under the session returns to the login form", self.session_401)
            self.check("Log out returns to the login form and forgets the password", self.log_out)
            self.check("the browser reported no script or policy errors", self.no_script_errors)
        finally:
            self.clean_up()
        return self.passed, self.failed

    # -- set-up and clean-up

    def set_up(self):
        status, body = self.api.call("PUT", f"api/queues/%2F/{q(self.queue)}", {"durable": False})
        expect(status in (201, 204), f"declaring {self.queue}: HTTP {status} {body}")
        params = pika.ConnectionParameters(
            host=self.host, port=self.amqp_port, heartbeat=0, blocked_connection_timeout=30,
            client_properties={"connection_name": self.connection_name},
            credentials=pika.PlainCredentials("guest", "guest"))
        self.amqp = pika.BlockingConnection(params)
        self.amqp.channel()

    def clean_up(self):
        for name in (self.queue, self.bound_queue, self.hostile):
            self.api.call("DELETE", f"api/queues/%2F/{q(name)}")
        if self.amqp is not None and self.amqp.is_open:
            try:
                self.amqp.close()
            except Exception:  # already closed by the broker
                pass
        if self.console is not None:
            self.console.quit()

    # -- the checks

    def files_are_served(self):
        for path, kind, marker in (("", "text/html", "console.js"),
                                   ("console.js", "text/javascript", "'use strict'"),
                                   ("console.css", "text/css", "font")):
            # No credentials: the files hold no data and the login form is among them.
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                content_type = response.headers.get("Content-Type", "")
                body = response.read().decode()
            expect(content_type.startswith(kind), f"/{path}: Content-Type {content_type!r}, expected {kind}")
            expect(marker in body, f"/{path}: {marker!r} not in the body")

    def wrong_password(self):
        c = self.console
        c.open()
        c.wait(lambda: c.visible("#login-form"), "the login form")
        expect(not c.visible("#tabs"), "the tabs are shown before logging in")
        status, body = Api(self.base, "guest", "not-the-password").call("GET", "api/whoami")
        expect(status == 401, f"the API accepted a wrong password: HTTP {status}")
        c.log_in("guest", "not-the-password")
        c.wait(lambda: c.text("#login-error"), "the login error")
        self.login_failed = body["reason"]
        expect(c.text("#login-error") == body["reason"],
               f"login error {c.text('#login-error')!r}, the API's reason is {body['reason']!r}")
        expect(not c.visible("#tabs"), "the tabs are shown after a failed login")

    def log_in(self):
        c = self.console
        c.log_in("guest", "guest")
        c.wait(lambda: c.visible("#tabs") and c.page() == "overview", "the overview after logging in")
        expect(c.text("#whoami") == "guest", f"logged in as {c.text('#whoami')!r}")
        expect(not c.visible("#login"), "the login form is still shown")

    def exchanges_match(self):
        c = self.console
        c.open("#/exchanges")
        api_rows = self.api.get("api/exchanges")

        def probe():
            rows = c.rows("exchanges")
            if rows is None:
                return False, "no exchanges table"
            shown = {(r["vhost"], r["name"]): r["fields"] for r in rows}
            for x in api_rows:
                fields = shown.get((x["vhost"], x["name"]))
                want = {"type": x["type"], "durable": as_bool(x["durable"]),
                        "auto_delete": as_bool(x["auto_delete"]), "internal": as_bool(x["internal"])}
                got = fields and {k: fields.get(k) for k in want}
                if got != want:
                    return False, f"exchange {x['name']!r} in {x['vhost']!r}: shown {got}, API {want}"
            default = shown.get(("/", ""))
            if default is None or default.get("name") != "(AMQP default)":
                return False, f"the default exchange is shown as {default}"
            return True, None

        eventually(probe, "the Exchanges page")

    def publish(self):
        c = self.console
        # The default exchange's link, as the Exchanges page gives it.
        c.find('#exchanges tr[data-vhost="/"][data-name=""] td[data-field="name"] a').click()
        c.wait(lambda: c.visible("#publish"), "the Publish form")
        expect(c.text('[data-test="exchange-name"]') == "(AMQP default)",
               f"the exchange page is titled {c.text('[data-test=exchange-name]')!r}")
        for i in range(1, MESSAGES + 1):
            c.fill("#publish-routing-key", self.queue)
            c.fill("#publish-payload", f"message {i} of {self.queue}")
            c.find("#publish-submit").click()
            c.wait(lambda: c.find("#publish-result").get_attribute("data-sequence") == str(i),
                   f"the result of publish {i}")
            routed = c.find("#publish-result").get_attribute("data-routed")
            expect(routed == "true", f"publish {i}: routed is {routed!r}: {c.text('#publish-result')!r}")
            expect("routed" in c.text("#publish-result"), f"publish {i}: {c.text('#publish-result')!r}")

    def publish_unroutable(self):
        c = self.console
        c.fill("#publish-routing-key", f"{self.queue}-nobody")
        c.fill("#publish-payload", "lost")
        c.find("#publish-submit").click()
        c.wait(lambda: c.find("#publish-result").get_attribute("data-sequence") == str(MESSAGES + 1),
               "the result of the unroutable publish")
        expect(c.find("#publish-result").get_attribute("data-routed") == "false",
               f"shown as {c.text('#publish-result')!r}")
        expect("not routed" in c.text("#publish-result"), f"shown as {c.text('#publish-result')!r}")

    def queue_probe(self, want_ready=None):
        """Compares the Queues page's row for the test queue with the API's queue."""
        c = self.console
        fields = ["consumers", "messages_ready", "messages_unacknowledged", "messages"]
        rates = ["message_stats.publish_details.rate", "message_stats.deliver_get_details.rate",
                 "message_stats.ack_details.rate"]

        def probe():
            status, api_q = self.api.call("GET", f"api/queues/%2F/{q(self.queue)}")
            if status != 200:
                return False, f"the API answers {status} for the queue"
            row = c.row("queues", "/", self.queue)
            if row is None:
                return False, "no row for the queue"
            want = {f: as_count(api_q.get(f)) for f in fields}
            want.update({f: as_rate(pick(api_q, f)) for f in rates})
            want.update({"name": self.queue, "vhost": "/", "type": api_q["type"], "state": api_q["state"]})
            got = {k: row["fields"].get(k) for k in want}
            if got != want:
                return False, f"shown {got}, API {want}"
            if want_ready is not None and api_q["messages_ready"] != want_ready:
                return False, f"the API itself shows {api_q['messages_ready']} ready, expected {want_ready}"
            return True, row

        return probe

    def queues_match(self):
        self.console.open("#/queues")
        eventually(self.queue_probe(want_ready=MESSAGES), "the queue's row")

    def queues_refresh(self):
        c = self.console
        stamp = c.find("#refreshed-at").get_attribute("data-at")
        status, body = self.api.call("POST", "api/exchanges/%2F/amq.default/publish", {
            "properties": {}, "routing_key": self.queue, "payload": "one more", "payload_encoding": "string"})
        expect(status == 200 and body == {"routed": True}, f"publishing through the API: {status} {body}")
        eventually(self.queue_probe(want_ready=MESSAGES + 1), "the row after the page's own refresh")
        expect(c.page() == "queues", "the page changed")
        expect(c.find("#refreshed-at").get_attribute("data-at") != stamp, "the refresh time did not change")

    def overview_matches(self):
        c = self.console
        c.open("#/overview")
        counts = ["object_totals.connections", "object_totals.channels", "object_totals.exchanges",
                  "object_totals.queues", "object_totals.consumers", "queue_totals.messages",
                  "queue_totals.messages_ready", "queue_totals.messages_unacknowledged"]
        counts += [f"message_stats.{s}" for s in STATS]
        rates = [f"message_stats.{s}_details.rate" for s in STATS]

        def probe():
            o = self.api.get("api/overview")
            shown = c.figures("#overview")
            want = {f: as_count(pick(o, f)) for f in counts}
            want.update({f: as_rate(pick(o, f)) for f in rates})
            got = {f: shown.get(f) for f in want}
            # And under the right labels, not only in the right data-field.
            labelled = c.labelled("#overview")
            for label, field in (("Connections", "object_totals.connections"), ("Queues", "object_totals.queues"),
                                 ("Total", "queue_totals.messages")):
                got[label], want[label] = labelled.get(label), want[field]
            if got != want:
                differ = {f: (got[f], want[f]) for f in want if got[f] != want[f]}
                return False, f"shown vs API: {differ}"
            return True, o

        o = eventually(probe, "the overview's figures")
        # Not a comparison of zeros: this test's queue, messages and connection are in them.
        expect(o["object_totals"]["queues"] >= 1 and o["object_totals"]["connections"] >= 1
               and o["queue_totals"]["messages"] >= MESSAGES + 1, f"the API's totals are {o['object_totals']}, "
               f"{o['queue_totals']}")

    def queue_details(self):
        c = self.console
        c.open("#/queues")
        c.wait(lambda: c.row("queues", "/", self.queue), "the queue's row")
        for link in c.driver.find_elements(By.CSS_SELECTOR, '#queues tr[data-vhost="/"] td[data-field="name"] a'):
            if link.text == self.queue:
                link.click()
                break
        c.wait(lambda: c.page() == "queues" and c.visible("#queue"), "the queue's page")
        expect(c.text('[data-test="queue-name"]') == self.queue, f"titled {c.text('[data-test=queue-name]')!r}")
        api_q = self.api.get(f"api/queues/%2F/{q(self.queue)}")

        def probe():
            shown = c.figures("#queue dl.figures")
            want = {"name": self.queue, "vhost": "/", "durable": as_bool(api_q["durable"]),
                    "messages_ready": as_count(api_q["messages_ready"]), "messages": as_count(api_q["messages"]),
                    "consumers": as_count(api_q["consumers"])}
            got = {k: shown.get(k) for k in want}
            return got == want, f"shown {got}, API {want}"

        eventually(probe, "the queue's figures")

    def get_messages(self, count, ackmode):
        c = self.console
        c.fill('#get-messages input[name="count"]', str(count))
        Select(c.find('#get-messages select[name="ackmode"]')).select_by_value(ackmode)
        c.driver.execute_script("document.getElementById('messages').replaceChildren();")
        c.find("#get-messages-submit").click()
        c.wait(lambda: c.text('[data-test="messages-count"]'), "the messages")
        return c.driver.execute_script("""
            return Array.from(document.querySelectorAll('#messages article[data-test=message]')).map((m) =>
              Object.fromEntries(Array.from(m.querySelectorAll('[data-field]'))
                .map((n) => [n.dataset.field, n.textContent])));""")

    def get_requeue(self):
        got = self.get_messages(1, "ack_requeue_true")
        expect(len(got) == 1, f"{len(got)} messages shown")
        m = got[0]
        expect(m["payload"] == f"message 1 of {self.queue}", f"payload {m['payload']!r}")
        expect(m["routing_key"] == self.queue, f"routing key {m['routing_key']!r}")
        expect(m["redelivered"] == "no", f"redelivered {m['redelivered']!r}")
        expect(json.loads(m["properties"]).get("delivery_mode") == 1, f"properties {m['properties']}")
        api_q = self.api.get(f"api/queues/%2F/{q(self.queue)}")
        expect(api_q["messages_ready"] == MESSAGES + 1, f"the API shows {api_q['messages_ready']} ready after a requeue")

    def get_ack(self):
        got = self.get_messages(2, "ack_requeue_false")
        expect([m["payload"] for m in got] == [f"message {i} of {self.queue}" for i in (1, 2)],
               f"payloads {[m['payload'] for m in got]}")
        # The first was handed out once already, by the requeueing get.
        expect(got[0]["redelivered"] == "yes", f"the first shows redelivered {got[0]['redelivered']!r}")
        eventually(lambda: self.fields_equal("messages_ready", MESSAGES - 1), "the queue after the ack")

    def fields_equal(self, field, want):
        """The queue page's figure and the API's both equal want."""
        api_q = self.api.get(f"api/queues/%2F/{q(self.queue)}")
        shown = self.console.figures("#queue dl.figures").get(field)
        return (api_q[field] == want and shown == str(want)), f"shown {shown!r}, API {api_q[field]}, expected {want}"

    def purge_dismissed(self):
        c = self.console
        c.find("#purge").click()
        question = c.confirm(accept=False)
        expect(self.queue in question, f"the prompt does not name the queue: {question!r}")
        time.sleep(0.5)
        eventually(lambda: self.fields_equal("messages_ready", MESSAGES - 1), "the queue after a dismissed purge", 2)

    def purge(self):
        c = self.console
        c.find("#purge").click()
        c.confirm()
        c.wait(lambda: c.text("#notice") == "Queue purged.", "the purge notice")
        eventually(lambda: self.fields_equal("messages_ready", 0), "the queue after the purge")

    def delete(self):
        c = self.console
        c.find("#delete").click()
        c.confirm()
        c.wait(lambda: c.page() == "queues" and c.rows("queues") is not None, "the Queues page after deleting")
        status, _ = self.api.call("GET", f"api/queues/%2F/{q(self.queue)}")
        expect(status == 404, f"the API still has the queue: HTTP {status}")
        expect(c.text("#notice") == "Queue deleted.", f"notice {c.text('#notice')!r}")
        eventually(lambda: (c.row("queues", "/", self.queue) is None, "its row is still shown"), "the Queues page")

    def api_connection(self):
        for conn in self.api.get("api/connections"):
            if pick(conn, "client_properties.connection_name") == self.connection_name:
                return conn
        return None

    def connection_listed(self):
        c = self.console
        c.open("#/connections")
        conn = self.api_connection()
        expect(conn is not None, "the API does not list the test's AMQP connection")

        def probe():
            row = c.row("connections", conn["vhost"], conn["name"])
            if row is None:
                return False, f"no row named {conn['name']!r}"
            want = {"name": conn["name"], "user": "guest", "vhost": "/", "peer_host": conn["peer_host"],
                    "peer_port": as_count(conn["peer_port"]), "channels": as_count(conn["channels"]),
                    "state": conn["state"]}
            got = {k: row["fields"].get(k) for k in want}
            return got == want, f"shown {got}, API {want}"

        eventually(probe, "the connection's row")
        expect(conn["channels"] == 1, f"the API counts {conn['channels']} channels, the client opened 1")

    def close_connection(self):
        c = self.console
        conn = self.api_connection()
        expect(conn is not None, "the API does not list the test's AMQP connection")
        for row in c.driver.find_elements(By.CSS_SELECTOR, '#connections tr[data-test="row"]'):
            if row.get_attribute("data-name") == conn["name"]:
                row.find_element(By.CSS_SELECTOR, 'button[data-test="close"]').click()
                break
        else:
            raise Failed(f"no row named {conn['name']!r}")
        question = c.confirm()
        expect(conn["name"] in question, f"the prompt does not name the connection: {question!r}")

        def probe():
            # Let the client read the broker's connection.close and answer it.
            if self.amqp.is_open:
                try:
                    self.amqp.process_data_events(time_limit=0)
                except pika.exceptions.AMQPConnectionError as error:
                    self.amqp_closed_reason = repr(error)
            listed = self.api_connection() is not None
            shown = c.row("connections", conn["vhost"], conn["name"]) is not None
            return not listed and not shown, f"listed by the API: {listed}, shown: {shown}"

        eventually(probe, "the connection to go")
        expect(self.amqp_closed_reason is not None and "closed from the console" in self.amqp_closed_reason,
               f"the client saw {self.amqp_closed_reason}")

    def bindings(self):
        c = self.console
        status, body = self.api.call("PUT", f"api/queues/%2F/{q(self.bound_queue)}", {"durable": False})
        expect(status in (201, 204), f"declaring {self.bound_queue}: HTTP {status} {body}")
        status, body = self.api.call("POST", f"api/bindings/%2F/e/amq.direct/q/{q(self.bound_queue)}",
                                     {"routing_key": self.binding_key, "arguments": {}})
        expect(status in (201, 204), f"binding: HTTP {status} {body}")
        want = {"vhost": "/", "source": "amq.direct", "destination": self.bound_queue,
                "destination_type": "queue", "routing_key": self.binding_key, "arguments": "{}"}

        def shown_in(table_id):
            def probe():
                rows = c.rows(table_id) or []
                found = [r["fields"] for r in rows if r["fields"].get("destination") == self.bound_queue
                         and r["fields"].get("source") == "amq.direct"]
                got = [{k: f.get(k) for k in want} for f in found]
                return got == [want], f"rows for the binding: {got}, expected [{want}]"
            return probe

        c.open("#/bindings")
        eventually(shown_in("bindings"), "the Bindings page")
        c.open("#/exchanges/%2F/amq.direct")
        eventually(shown_in("exchange-bindings"), "amq.direct's page")

    def names_are_text(self):
        c = self.console
        status, body = self.api.call("PUT", f"api/queues/%2F/{q(self.hostile)}", {"durable": False})
        expect(status in (201, 204), f"declaring {self.hostile!r}: HTTP {status} {body}")
        c.open("#/queues")
        row = eventually(lambda: ((r := c.row("queues", "/", self.hostile)) is not None, r), "its row")
        expect(row["fields"]["name"] == self.hostile, f"shown as {row['fields']['name']!r}")
        expect(row["markup"] == 0, "the row's cells contain elements made from the name")
        expect(not c.driver.find_elements(By.CSS_SELECTOR, "#page img"), "an <img> was made from the name")
        expect(c.driver.execute_script("return window.injected;") is None, "the name's script ran")
        # Its own page too, reached through the percent-encoded link.
        c.open(f"#/queues/%2F/{q(self.hostile)}")
        c.wait(lambda: c.text('[data-test="queue-name"]') == self.hostile, "its page")
        eventually(lambda: (c.figures("#queue dl.figures").get("name") == self.hostile,
                            c.figures("#queue dl.figures")), "its page's figures")

    def reload_keeps_session(self):
        c = self.console
        c.open("#/overview")
        c.driver.refresh()
        c.wait(lambda: c.visible("#tabs") and c.page() == "overview", "the overview after a reload")

    def session_401(self):
        c = self.console
        c.open("#/overview")
        # As if the password had been changed: the next refresh gets a 401.
        c.driver.execute_script("""
            const key = 'warrenmq.console.credentials';
            const saved = JSON.parse(sessionStorage.getItem(key));
            sessionStorage.setItem(key, JSON.stringify({...saved, password: 'changed'}));""")
        c.wait(lambda: c.visible("#login-form"), "the login form after a 401", timeout=15)
        expect(c.text("#login-error") == self.login_failed,
               f"login error {c.text('#login-error')!r}, the API's reason is {self.login_failed!r}")
        expect(not c.visible("#tabs"), "the tabs are still shown")

    def log_out(self):
        c = self.console
        c.log_in("guest", "guest")
        c.wait(lambda: c.visible("#tabs"), "the console after logging in again")
        c.find("#logout").click()
        c.wait(lambda: c.visible("#login-form"), "the login form after logging out")
        saved = c.driver.execute_script("return sessionStorage.getItem('warrenmq.console.credentials');")
        expect(saved is None, f"the credentials are still stored: {saved!r}")
        c.driver.refresh()
        c.wait(lambda: c.visible("#login-form"), "the login form after a reload")
        expect(not c.visible("#tabs"), "logged in again after a reload")

    def no_script_errors(self):
        errors = self.console.script_errors()
        expect(not errors, f"{errors}")


def main():
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    host, amqp_port, management_port, counts_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    scenario = Scenario(host, amqp_port, management_port)
    try:
        scenario.run()
    except Exception:  # Chromium would not start, the broker went away: one failure, and say why
        scenario.failed += 1
        log("FAIL the scenario could not go on")
        for line in traceback.format_exc().rstrip().splitlines():
            log(f"    {line}")
    with open(counts_file, "w", encoding="utf-8") as out:
        out.write(f"{scenario.passed} {scenario.failed}\n")
    return 0 if scenario.failed == 0 and scenario.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
