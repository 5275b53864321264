// The dashboard in a real browser: headless Chromium driven by playwright-core, against a running
// service whose base URL is the first argument (tests/browser/run.sh starts one, with product
// `jammed` unable to commit its stock until an operator retries the saga).
//
// Loads /ui once, then, without reloading: an order placed through the API appears and its
// timeline shows it completed; a saga stuck after its pivot is listed first, retried from its
// timeline (reason typed into the dialog) and seen to finish; products show their stock; the
// tabs work from the keyboard; the phone width has no sideways scrolling; the event stream's
// parser and reconnection, on a second tab whose stream the test serves itself.
//
// With AUTH_JWT_SECRET set (the service runs with the same secret), the script mints HS256
// tokens and sends an admin one with its own API calls. The page must first show its token form
// (the service answered 401), and everything above runs after the token is typed into it; every
// call then carries the token, which is kept in sessionStorage and never shows in the page, a
// URL or the console. Signing out brings the form back, and a token with only the `orders`
// scope gets the plain 403 message.
//
// Any console error, page error or failed request fails the test, except the refusals the test
// causes on purpose: a 401 to a call sent without a token, a 403 to one sent with the `orders`
// token, and the "Failed to load resource" console entry Chromium logs for each of them (fetch
// cannot hide those). Screenshots go to target/ui-screenshots/ (auth/ with authentication);
// `--update-docs` also writes docs/dashboard.png (kept under 100 KB) for the README.
import { chromium } from "playwright-core";
import { createHmac } from "node:crypto";
import { mkdirSync, statSync, copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const base = (process.argv[2] || process.env.BASE_URL || "").replace(/\/$/, "");
if (!base) {
  console.error("usage: node dashboard.mjs http://127.0.0.1:PORT [--update-docs]");
  process.exit(2);
}
const updateDocs = process.argv.includes("--update-docs");
const secret = process.env.AUTH_JWT_SECRET || "";
const auth = secret !== "";
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const shots = join(root, "target", "ui-screenshots", ...(auth ? ["auth"] : []));
mkdirSync(shots, { recursive: true });
const WAIT = 30_000; // generous: the machine may be busy; nothing here asserts a duration
const TOKEN_KEY = "order-saga.token"; // where the page keeps the token, in sessionStorage

function check(condition, message) {
  if (!condition) throw new Error("assertion failed: " + message);
}

/** An HS256 JWT signed with the service's secret. */
function mint(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const signed = part({ alg: "HS256", typ: "JWT" }) + "." + part(claims);
  return signed + "." + createHmac("sha256", secret).update(signed).digest("base64url");
}
const exp = Math.floor(Date.now() / 1000) + 3600;
const adminToken = auth ? mint({ sub: "operator-1", scope: "admin", exp }) : null;
const ordersToken = auth ? mint({ sub: "shop-1", scope: "orders", exp }) : null;
const tokens = [adminToken, ordersToken].filter(Boolean);

async function api(method, path, body, headers = {}) {
  const response = await fetch(base + path, {
    method,
    headers: {
      "Content-Type": "application/json",
      ...(adminToken ? { Authorization: "Bearer " + adminToken } : {}),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  return { status: response.status, body: json, headers: response.headers };
}

async function step(name, fn) {
  const began = Date.now();
  process.stdout.write(`- ${name} ... `);
  await fn();
  console.log(`ok (${Date.now() - began} ms)`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in a container has no user namespaces for Chromium's sandbox.
  args: ["--no-sandbox"],
});
const problems = []; // seen at once to be wrong
const consoleEntries = []; // console errors and warnings, judged at the end against `refusals`
const refusals = []; // 401s and 403s the test caused on purpose: { status, url }
const apiRequests = []; // every request to the API: { url, token } (token: what it sent, or null)
let expectToken = null; // while set, every API call the page makes must send this token

/** Problems found so far: those seen at once, and console entries no allowed refusal explains. */
function allProblems() {
  const found = [...problems];
  for (const entry of consoleEntries) {
    const refusal = /^Failed to load resource: the server responded with a status of (\d+)/.exec(entry.text);
    const explained = refusal && refusals.some((r) => r.status === Number(refusal[1]) && r.url === entry.url);
    if (!explained) found.push(`console ${entry.type}: ${entry.text} (${entry.url})`);
  }
  return found;
}

/** What `page` does that the test watches: console, errors, requests and their answers. */
function watch(page) {
  page.on("console", (message) => {
    if (tokens.some((t) => message.text().includes(t))) problems.push(`a token in the console: ${message.type()}`);
    if (message.type() === "error" || message.type() === "warning") {
      consoleEntries.push({ type: message.type(), text: message.text(), url: message.location().url });
    }
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("request", (request) => {
    const url = request.url();
    if (tokens.some((t) => url.includes(t))) problems.push(`a token in a URL: ${request.method()}`);
    if (new URL(url).pathname.startsWith("/ui")) return; // the page's own files, public
    const header = request.headers()["authorization"] || "";
    const token = header.startsWith("Bearer ") ? header.slice(7) : null;
    apiRequests.push({ url, token });
    if (expectToken && token !== expectToken) problems.push(`sent without the token: ${request.method()} ${url}`);
  });
  page.on("requestfailed", (request) => {
    // The event stream is cut when the page closes or signs out; anything else failing is a problem.
    if (!request.url().endsWith("/sagas/events")) problems.push(`request failed: ${request.url()} ${request.failure()?.errorText}`);
  });
  page.on("response", (response) => {
    const status = response.status();
    if (status < 400) return;
    const request = response.request();
    const header = request.headers()["authorization"] || "";
    const onPurpose =
      auth &&
      !new URL(response.url()).pathname.startsWith("/ui") &&
      ((status === 401 && header === "") || (status === 403 && header === "Bearer " + ordersToken));
    if (onPurpose) refusals.push({ status, url: response.url() });
    else problems.push(`HTTP ${status}: ${request.method()} ${response.url()}`);
  });
}

/** Types `token` into the page's token form from the keyboard and submits it with Enter. */
async function signIn(page, token) {
  const input = page.getByLabel("Admin token");
  check((await input.getAttribute("type")) === "password", "the token field hides what is typed");
  await input.focus();
  await page.keyboard.type(token);
  await page.keyboard.press("Enter");
}

/** Waits for the token form with `reason` (missing | rejected | forbidden). */
async function tokenFormShows(page, reason) {
  await page.locator(`#auth[data-reason="${reason}"]`).waitFor({ state: "visible", timeout: WAIT });
  await page.locator("#conn[data-state=locked]").waitFor({ timeout: WAIT });
  check(await page.locator("#lists").isHidden(), "the lists are hidden while there is no usable token");
}

/** The token is where it belongs (this tab's sessionStorage) and nowhere else the page can reach. */
async function tokenKeptOnlyInSession(page, token) {
  const where = await page.evaluate(
    ([key, token]) => ({
      session: sessionStorage.getItem(key) === token,
      local: Object.keys(localStorage).some((k) => localStorage.getItem(k).includes(token)),
      cookie: document.cookie.includes(token),
      dom: document.documentElement.outerHTML.includes(token) || document.body.innerText.includes(token),
      field: document.getElementById("auth-token").value !== "",
      url: location.href.includes(token),
    }),
    [TOKEN_KEY, token],
  );
  check(where.session, "the token is in sessionStorage");
  check(!where.local && !where.cookie, "the token is not in localStorage or a cookie");
  check(!where.dom && !where.field && !where.url, "the token is not in the page, its form field or the URL");
}

/** A saga summary as GET /sagas/events sends it, for the stream the test serves itself. */
function fakeSaga(id) {
  const at = new Date().toISOString();
  return { id, kind: "place_order", state: "running", stuck: false, order_id: null, attempts: 1, last_error: null, created_at: at, updated_at: at, next_seq: 1 };
}

let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  watch(page);

  if (auth) {
    await step("with AUTH_JWT_SECRET the service refuses calls without a token", async () => {
      const anonymous = await fetch(base + "/sagas");
      const problem = await anonymous.json().catch(() => ({}));
      check(anonymous.status === 401, `GET /sagas without a token is 401, not ${anonymous.status}: is authentication in this binary?`);
      check(problem.code === "unauthorized", `the 401's code: ${JSON.stringify(problem)}`);
      check((anonymous.headers.get("www-authenticate") || "").startsWith("Bearer"), "a 401 says WWW-Authenticate: Bearer");
      check((await api("GET", "/sagas")).status === 200, "GET /sagas with the admin token is 200");
    });
  }

  await step("set up products through the API", async () => {
    for (const product of [
      { id: "mug", name: "Mug", price_cents: 1250, stock: 50 },
      { id: "pen", name: "Pen <b>bold</b>", price_cents: 99, stock: 20 },
      { id: "jammed", name: "Jammed widget", price_cents: 500, stock: 10 },
    ]) {
      const created = await api("POST", "/products", product);
      check(created.status === 201, `product ${product.id} created: ${JSON.stringify(created.body)}`);
    }
  });

  let headers;
  await step("load /ui with its security headers", async () => {
    const response = await page.goto(base + "/ui");
    check(response.status() === 200, `GET /ui is 200, not ${response.status()}`);
    headers = response.headers();
    check(headers["content-type"].startsWith("text/html"), "/ui is HTML");
    const csp = headers["content-security-policy"] || "";
    check(csp.includes("script-src 'self'") && csp.includes("connect-src 'self'") && !csp.includes("unsafe-inline"), `strict CSP: ${csp}`);
    check(headers["x-content-type-options"] === "nosniff", "X-Content-Type-Options: nosniff");
    check(headers["referrer-policy"] === "no-referrer", "Referrer-Policy: no-referrer");
    if (!auth) {
      // Without authentication nothing asks for a token.
      await page.waitForFunction(() => ["live", "polling"].includes(document.getElementById("conn").dataset.state), null, { timeout: WAIT });
      check(await page.locator("#auth").isHidden(), "no token form without authentication");
      check(await page.locator("#sign-out").isHidden(), "no sign-out without a token");
    }
  });

  if (auth) {
    await step("the token form appears (the service answered 401) and takes the token from the keyboard", async () => {
      await tokenFormShows(page, "missing");
      check(refusals.some((r) => r.status === 401), "the page was answered 401");
      check((await page.locator("#auth-message").textContent()).includes("admin token"), "the form says an admin token is needed");
      check(await page.evaluate(() => document.activeElement.id) === "auth-token", "focus is in the token field");
      check(await page.locator("#sign-out").isHidden(), "no sign-out before a token is given");
      await page.screenshot({ path: join(shots, "signin.png") });
      process.stdout.write(`[${refusals.length} refused: ${[...new Set(refusals.map((r) => new URL(r.url).pathname))].join(" ")}] `);
      expectToken = adminToken;
      await signIn(page, adminToken);
      await page.locator("#auth").waitFor({ state: "hidden", timeout: WAIT });
      // The event stream itself, read with fetch and the token (polling would not do).
      await page.locator("#conn[data-state=live]").waitFor({ timeout: WAIT });
      check(await page.locator("#sign-out").isVisible(), "a sign-out control once there is a token");
      await tokenKeptOnlyInSession(page, adminToken);
    });
  }

  await step("keeping current", async () => {
    await page.waitForFunction(() => ["live", "polling"].includes(document.getElementById("conn").dataset.state), null, { timeout: WAIT });
    // Marks this page load: if the page reloaded, the mark would be gone.
    await page.evaluate(() => (window.__loadedOnce = true));
    // Which way it keeps current (the stream, or polling without one), for the log.
    process.stdout.write(`[${await page.locator("#conn").getAttribute("data-state")}] `);
  });

  let order;
  await step("an order placed through the API appears and its timeline shows it completed", async () => {
    const placed = await api("POST", "/orders", { customer_id: "c-browser", items: [{ product_id: "mug", quantity: 2 }, { product_id: "pen", quantity: 1 }] }, { "Idempotency-Key": "browser-1" });
    check(placed.status === 201, `order placed: ${JSON.stringify(placed.body)}`);
    order = placed.body;
    const row = page.locator(`#sagas-table tr[data-saga-id="${order.saga_id}"]`);
    await row.waitFor({ timeout: WAIT });
    await row.locator("button[data-open]").click();
    const timeline = page.locator(`#timeline-body[data-saga-id="${order.saga_id}"][data-state="completed"]`);
    await timeline.waitFor({ timeout: WAIT });
    for (const name of ["reserve_stock", "create_order", "confirm", "commit_stock"]) {
      await page.locator(`#timeline-steps li[data-step="${name}"][data-state="succeeded"]`).waitFor({ timeout: WAIT });
    }
    await page.locator(`#timeline-events li[data-event="completed"]`).waitFor({ timeout: WAIT });
    await page.locator("#timeline-facts", { hasText: "confirmed" }).waitFor({ timeout: WAIT });
    check(await page.locator("#retry-button").isHidden(), "no retry button on a finished saga");
  });

  await step("the tabs work from the keyboard; orders and products show what the API holds", async () => {
    await page.locator("#tab-sagas").focus();
    await page.keyboard.press("ArrowRight");
    check(await page.locator("#panel-orders").isVisible(), "ArrowRight shows the orders");
    check(await page.evaluate(() => document.activeElement.id) === "tab-orders", "focus follows the tab");
    await page.locator(`#orders-table tr[data-order-id="${order.id}"][data-status="confirmed"]`).waitFor({ timeout: WAIT });
    await page.keyboard.press("ArrowRight");
    check(await page.locator("#panel-products").isVisible(), "ArrowRight shows the products");
    const pen = page.locator('#products-table tr[data-product-id="pen"]');
    await pen.waitFor({ timeout: WAIT });
    check((await pen.locator("td").nth(1).textContent()) === "Pen <b>bold</b>", "markup in data is shown as text");
    check((await page.locator("#products-table b").count()) === 0, "markup in data is not parsed");
    await page.locator('#products-table tr[data-product-id="mug"] td[data-field="sold"]', { hasText: /^2$/ }).waitFor({ timeout: WAIT });
    await page.keyboard.press("Home");
    check(await page.locator("#panel-sagas").isVisible(), "Home shows the sagas");
  });

  let stuck;
  await step("a saga stuck after its pivot is listed first, flagged stuck, without a reload", async () => {
    // Answered at once (202): its saga will not finish on its own.
    const placed = await api("POST", "/orders", { customer_id: "c-jam", items: [{ product_id: "jammed", quantity: 1 }] }, { Prefer: "respond-async" });
    check(placed.status === 202, `jammed order accepted: ${JSON.stringify(placed.body)}`);
    stuck = placed.body;
    await page.locator(`#sagas-table tbody tr:first-child[data-saga-id="${stuck.saga_id}"][data-stuck="true"]`).waitFor({ timeout: WAIT });
    await page.locator(`#sagas-table tr[data-saga-id="${stuck.saga_id}"] button[data-open]`).click();
    await page.locator(`#timeline-body[data-saga-id="${stuck.saga_id}"][data-stuck="true"]`).waitFor({ timeout: WAIT });
    await page.locator('#timeline-steps li[data-step="commit_stock"]', { hasText: "browser test: commits of jammed" }).waitFor({ timeout: WAIT });
    await page.locator('#timeline-events li[data-event="stuck"]').waitFor({ timeout: WAIT });
    await page.screenshot({ path: join(shots, "desktop-stuck.png") });
  });

  await step("retry from the timeline, with a reason typed into the dialog; the saga finishes", async () => {
    await page.locator("#retry-button").focus();
    await page.keyboard.press("Enter");
    const dialog = page.locator("#action-dialog");
    await dialog.waitFor({ state: "visible", timeout: WAIT });
    if (auth) {
      // The service records the token's subject as the actor: there is no name to type.
      check(await page.locator("#action-actor").isHidden(), "with a token the dialog asks for no name");
      const as = await page.locator("#action-as").textContent();
      check(as.includes("operator-1"), `the dialog says whom the action is recorded as: ${as}`);
    } else {
      check(await page.locator("#action-as").isHidden(), "without a token the name is typed");
      await page.locator("#action-actor").fill("browser-test");
    }
    await page.locator("#action-reason").fill("the jammed commit is fixed");
    await page.locator("#action-submit").click();
    await dialog.waitFor({ state: "hidden", timeout: WAIT });
    check(await page.evaluate(() => document.activeElement.id) === "retry-button" || (await page.locator("#retry-button").isHidden()), "focus returns to the retry button");
    await page.locator(`#timeline-body[data-saga-id="${stuck.saga_id}"][data-state="completed"]`).waitFor({ timeout: WAIT });
    const action = page.locator('#timeline-events li[data-event="operator_retry"]');
    await action.waitFor({ timeout: WAIT });
    const text = await action.textContent();
    const actor = auth ? "operator-1" : "browser-test";
    check(text.includes(actor) && text.includes("the jammed commit is fixed"), `the operator action shows actor (${actor}) and reason: ${text}`);
    await page.locator(`#sagas-table tr[data-saga-id="${stuck.saga_id}"][data-state="completed"]:not(.stuck)`).waitFor({ timeout: WAIT });
    check(await page.evaluate(() => localStorage.getItem("order-saga.actor")) === (auth ? null : "browser-test"), "a typed actor is remembered");
    await page.locator("#tab-products").click();
    await page.locator('#products-table tr[data-product-id="jammed"] td[data-field="sold"]', { hasText: /^1$/ }).waitFor({ timeout: WAIT });
    await page.locator('#products-table tr[data-product-id="jammed"] td[data-field="reserved"]', { hasText: /^0$/ }).waitFor({ timeout: WAIT });
    await page.locator("#tab-sagas").click();
    check(await page.evaluate(() => window.__loadedOnce === true), "the page never reloaded");
  });

  await step("screenshots at desktop and phone widths; no sideways scrolling on a phone", async () => {
    await page.screenshot({ path: join(shots, "desktop.png"), fullPage: true });
    await page.setViewportSize({ width: 375, height: 812 });
    await page.waitForTimeout(200); // let the layout settle before measuring and capturing
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `the phone layout scrolls sideways by ${overflow}px`);
    await page.screenshot({ path: join(shots, "phone.png"), fullPage: true });
    await page.setViewportSize({ width: 1000, height: 640 });
    await page.waitForTimeout(200);
    const small = join(shots, "readme.png");
    await page.screenshot({ path: small });
    const size = statSync(small).size;
    if (updateDocs) {
      check(size <= 100 * 1024, `the README screenshot is ${size} bytes, over 100 KB`);
      copyFileSync(small, join(root, "docs", "dashboard.png"));
    }
  });

  if (auth) {
    await step("every call the page made since the token was typed carried it", async () => {
      const since = apiRequests.filter((r) => r.token === adminToken);
      check(since.some((r) => new URL(r.url).pathname === "/sagas/events"), "the event stream was asked for with the token");
      check(since.some((r) => /\/sagas\/[^/]+\/retry$/.test(new URL(r.url).pathname)), "the retry was sent with the token");
      for (const path of ["/sagas", "/orders", "/products"]) {
        check(since.some((r) => new URL(r.url).pathname === path), `${path} was fetched with the token`);
      }
      await tokenKeptOnlyInSession(page, adminToken);
    });

    await step("sign out: the token is forgotten and the form is back", async () => {
      expectToken = null;
      await page.locator("#sign-out").click();
      await tokenFormShows(page, "missing");
      check(await page.evaluate((key) => sessionStorage.getItem(key), TOKEN_KEY) === null, "sessionStorage no longer holds the token");
      check(await page.locator("#sign-out").isHidden(), "no sign-out without a token");
      check((await page.locator("#sagas-table tbody tr").count()) === 0, "what the token let the page see is gone");
    });

    await step("a token without the admin scope gets the plain 403 message, and another token can be typed", async () => {
      expectToken = ordersToken;
      await signIn(page, ordersToken);
      await tokenFormShows(page, "forbidden");
      check(refusals.some((r) => r.status === 403), "the page was answered 403");
      const message = await page.locator("#auth-message").textContent();
      check(message.includes("lacks the admin scope"), `the 403 message: ${message}`);
      check(await page.locator("#sign-out").isVisible(), "the refused token can be signed out");
      await page.setViewportSize({ width: 375, height: 812 });
      await page.waitForTimeout(200); // let the layout settle before measuring and capturing
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      check(overflow <= 0, `the token form scrolls sideways on a phone by ${overflow}px`);
      await page.screenshot({ path: join(shots, "forbidden-phone.png"), fullPage: true });
      await page.setViewportSize({ width: 1280, height: 900 });
      expectToken = adminToken;
      await signIn(page, adminToken);
      await page.locator("#conn[data-state=live]").waitFor({ timeout: WAIT });
      await page.locator(`#sagas-table tr[data-saga-id="${stuck.saga_id}"][data-state="completed"]`).waitFor({ timeout: WAIT });
      await tokenKeptOnlyInSession(page, adminToken);
    });
  }

  await step("the event stream as EventSource reads it: line ends, multi-line data, ids, retry, reconnect", async () => {
    // A second tab whose GET /sagas/events the test answers itself: a first stream with an id and
    // a short retry that then ends, and, once the page reconnects with that id, a second with
    // each kind of line ending, comments, an event of another type and one cut off at the end.
    expectToken = null; // the new tab starts without a token (sessionStorage is per tab)
    const tab = await context.newPage();
    watch(tab);
    const streams = [];
    const a = "0190ffff-0000-7000-8000-00000000000a";
    const b = "0190ffff-0000-7000-8000-00000000000b";
    const c = "0190ffff-0000-7000-8000-00000000000c";
    const d = "0190ffff-0000-7000-8000-00000000000d";
    const e = "0190ffff-0000-7000-8000-00000000000e";
    await tab.route("**/sagas/events", async (route) => {
      const headers = route.request().headers();
      // Without a token the service's own 401 is the answer (the page then asks for a token).
      if (auth && !headers["authorization"]) return route.continue();
      streams.push({ lastEventId: headers["last-event-id"] ?? null, authorization: headers["authorization"] ?? null });
      const bodies = [
        `: hello\n\nretry: 50\nid: 41\nevent: saga\ndata: ${JSON.stringify(fakeSaga(a))}\n\n`,
        "retry: 600000\r\n: a comment\r\n" +
          `event: saga\r\ndata: {"id":"${b}",\r\ndata: ${JSON.stringify(fakeSaga(b)).slice(1).replace(/"id":"[^"]*",/, "")}\r\n\r\n` +
          `event: other\ndata: ${JSON.stringify(fakeSaga(d))}\n\n` +
          `event:saga\rdata:${JSON.stringify(fakeSaga(c))}\r\r` +
          `event: saga\ndata: ${JSON.stringify(fakeSaga(e))}\n`,
      ];
      const body = bodies[streams.length - 1];
      if (body === undefined) return route.abort(); // a third connection is not expected
      await route.fulfill({ status: 200, headers: { "content-type": "text/event-stream", "cache-control": "no-cache" }, body });
    });
    await tab.goto(base + "/ui");
    if (auth) {
      await tokenFormShows(tab, "missing");
      await signIn(tab, adminToken);
    }
    await tab.locator(`#sagas-table tr[data-saga-id="${b}"]`).waitFor({ timeout: WAIT });
    await tab.locator(`#sagas-table tr[data-saga-id="${c}"]`).waitFor({ timeout: WAIT });
    // The second stream has ended and the page waits (retry: 600000) to reconnect: all of it is read.
    await tab.locator("#conn[data-state=reconnecting]").waitFor({ timeout: WAIT });
    check(streams.length === 2, `two connections, not ${streams.length}`);
    check(streams[0].lastEventId === null, "the first connection sends no Last-Event-ID");
    check(streams[1].lastEventId === "41", `the reconnection sends Last-Event-ID: 41, not ${streams[1].lastEventId}`);
    for (const [i, s] of streams.entries()) {
      check(s.authorization === (auth ? "Bearer " + adminToken : null), `connection ${i + 1} sends ${auth ? "the token" : "no token"}`);
    }
    check((await tab.locator(`#sagas-table tr[data-saga-id="${d}"]`).count()) === 0, "an event of another type is not a saga");
    check((await tab.locator(`#sagas-table tr[data-saga-id="${e}"]`).count()) === 0, "an event cut off by the end is dropped");
    await tab.close();
  });

  await step("no console errors, page errors or failed requests", async () => {
    const found = allProblems();
    check(found.length === 0, "\n  " + found.join("\n  "));
    if (!auth) check(apiRequests.every((r) => r.token === null), "without authentication the page never sends a token");
  });
  await context.close();
} catch (error) {
  failed = true;
  console.log("FAILED");
  console.error(error.stack || error.message);
  const found = allProblems();
  if (found.length) console.error("also seen in the browser:\n  " + found.join("\n  "));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
