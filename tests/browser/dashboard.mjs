// The dashboard in a real browser: headless Chromium driven by playwright-core, against a running
// service whose base URL is the first argument (tests/browser/run.sh starts one, with product
// `jammed` unable to commit its stock until an operator retries the saga).
//
// Loads /ui once, then, without reloading: an order placed through the API appears and its
// timeline shows it completed; a saga stuck after its pivot is listed first, retried from its
// timeline (reason typed into the dialog) and seen to finish; products show their stock; the
// tabs work from the keyboard; the phone width has no sideways scrolling. Any console error,
// page error or failed request fails the test. Screenshots go to target/ui-screenshots/;
// `--update-docs` also writes docs/dashboard.png (kept under 100 KB) for the README.
import { chromium } from "playwright-core";
import { mkdirSync, statSync, copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const base = (process.argv[2] || process.env.BASE_URL || "").replace(/\/$/, "");
if (!base) {
  console.error("usage: node dashboard.mjs http://127.0.0.1:PORT [--update-docs]");
  process.exit(2);
}
const updateDocs = process.argv.includes("--update-docs");
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const shots = join(root, "target", "ui-screenshots");
mkdirSync(shots, { recursive: true });
const WAIT = 30_000; // generous: the machine may be busy; nothing here asserts a duration

function check(condition, message) {
  if (!condition) throw new Error("assertion failed: " + message);
}

async function api(method, path, body, headers = {}) {
  const response = await fetch(base + path, {
    method,
    headers: { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  return { status: response.status, body: json };
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
const problems = [];
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") {
      problems.push(`console ${message.type()}: ${message.text()}`);
    }
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("requestfailed", (request) => {
    // The event stream is cut when the page closes; anything else failing is a problem.
    if (!request.url().endsWith("/sagas/events")) problems.push(`request failed: ${request.url()} ${request.failure()?.errorText}`);
  });
  page.on("response", (response) => {
    if (response.status() >= 400) problems.push(`HTTP ${response.status()}: ${response.request().method()} ${response.url()}`);
  });

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
    await page.locator("#action-actor").fill("browser-test");
    await page.locator("#action-reason").fill("the jammed commit is fixed");
    await page.locator("#action-submit").click();
    await dialog.waitFor({ state: "hidden", timeout: WAIT });
    check(await page.evaluate(() => document.activeElement.id) === "retry-button" || (await page.locator("#retry-button").isHidden()), "focus returns to the retry button");
    await page.locator(`#timeline-body[data-saga-id="${stuck.saga_id}"][data-state="completed"]`).waitFor({ timeout: WAIT });
    const action = page.locator('#timeline-events li[data-event="operator_retry"]');
    await action.waitFor({ timeout: WAIT });
    const text = await action.textContent();
    check(text.includes("browser-test") && text.includes("the jammed commit is fixed"), `the operator action shows actor and reason: ${text}`);
    await page.locator(`#sagas-table tr[data-saga-id="${stuck.saga_id}"][data-state="completed"]:not(.stuck)`).waitFor({ timeout: WAIT });
    check(await page.evaluate(() => localStorage.getItem("order-saga.actor")) === "browser-test", "the actor is remembered");
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

  await step("no console errors, page errors or failed requests", async () => {
    check(problems.length === 0, "\n  " + problems.join("\n  "));
  });
  await context.close();
} catch (error) {
  failed = true;
  console.log("FAILED");
  console.error(error.stack || error.message);
  if (problems.length) console.error("also seen in the browser:\n  " + problems.join("\n  "));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
