// The order-saga dashboard: plain JavaScript, no framework, no build step. It reads and acts only
// through the public API (fetch on this origin, the event stream included). Every value it shows
// comes from the API and is put on the page as text (textContent, attributes), never parsed as
// markup. Where the service asks for a token (401), the page asks the operator for one.
"use strict";

(() => {
  const LIST_LIMIT = 100;
  const POLL_MS = 2000;
  const ACTOR_KEY = "order-saga.actor";
  const TOKEN_KEY = "order-saga.token";
  const STREAM_RETRY_MS = 3000; // EventSource's usual wait before reconnecting
  const FINAL = new Set(["completed", "compensated"]);

  // ---- State -------------------------------------------------------------------------------

  const state = {
    tab: "sagas",
    sagas: new Map(), // id -> summary, every saga seen (lists, stream, details)
    sagaList: [], // ids shown in the sagas table (the server's answer to the filter, plus live ones)
    orders: new Map(), // id -> order, every order seen
    orderList: [], // ids shown in the orders table
    products: [],
    seqSeen: new Map(), // saga id -> highest next_seq the stream sent
    selected: null, // saga id whose timeline is open
    detail: null, // GET /sagas/{id} of the selected saga
    live: "connecting", // connecting | live | reconnecting | polling | offline
    listsInFlight: 0,
    buffered: [], // stream events that arrived while a list fetch was in flight
    auth: null, // null, or why the service refused: missing | rejected | forbidden
    epoch: 0, // bumped on sign-out: answers to calls made before are dropped
  };

  const $ = (id) => document.getElementById(id);

  // ---- Helpers -----------------------------------------------------------------------------

  /** An element with attributes and children (strings become text nodes, so nothing is parsed). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** An API error: the problem's code and detail when the server sent one. */
  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
      this.code = code;
    }
  }

  /** Whether an error is already taken care of: a refusal (the sign-in form shows) or stale. */
  const handled = (error) => Boolean(error && (error.status === 401 || error.status === 403 || error.code === "stale"));

  async function api(path, options = {}) {
    const init = { method: options.method || "GET", headers: { Accept: "application/json" } };
    const token = withToken(init.headers);
    const epoch = state.epoch;
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      throw new ApiError(0, "network", "the service cannot be reached");
    }
    const type = response.headers.get("Content-Type") || "";
    const body = type.includes("json") ? await response.json().catch(() => null) : await response.text();
    // Signed out meanwhile: what the old token fetched is not shown.
    if (epoch !== state.epoch) throw new ApiError(0, "stale", "signed out");
    if (!response.ok) {
      const problem = body && typeof body === "object" ? body : {};
      const fallback = { 401: "unauthorized", 403: "forbidden" }[response.status] || "http_" + response.status;
      const error = new ApiError(response.status, problem.code || fallback, problem.detail || problem.title);
      if (response.status === 401 || response.status === 403) refused(response.status, token);
      throw error;
    }
    return body;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    const s = q.toString();
    return s ? "?" + s : "";
  }

  const shortId = (id) => (id ? String(id).slice(-8) : "");
  const ms = (iso) => (iso ? Date.parse(iso) : NaN);

  function formatTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : d.toLocaleDateString() + " " + time;
  }

  function timeEl(iso) {
    return el("time", { datetime: iso, title: iso, text: formatTime(iso) });
  }

  function formatDuration(millis) {
    if (!Number.isFinite(millis) || millis < 0) return "";
    if (millis < 1000) return `${Math.round(millis)} ms`;
    if (millis < 60000) return `${(millis / 1000).toFixed(millis < 10000 ? 2 : 1)} s`;
    const m = Math.floor(millis / 60000);
    const s = Math.round((millis % 60000) / 1000);
    return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function money(cents) {
    return cents === null || cents === undefined ? "—" : (cents / 100).toFixed(2);
  }

  function badge(value, extra) {
    return el("span", { class: `badge badge-${value}${extra ? " " + extra : ""}`, text: value });
  }

  function announce(text) {
    const node = $("announcer");
    node.textContent = "";
    // A fresh text node after clearing makes screen readers read it even when it repeats.
    setTimeout(() => (node.textContent = text), 30);
  }

  function parseJson(text) {
    if (typeof text !== "string") return null;
    try {
      const value = JSON.parse(text);
      return value && typeof value === "object" ? value : null;
    } catch {
      return null;
    }
  }

  function debounce(fn, wait) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), wait);
    };
  }

  /** Runs an async task, reporting failure on the page rather than the console. */
  function run(task) {
    Promise.resolve()
      .then(task)
      .catch((error) => showProblem(error));
  }

  function showProblem(error) {
    if (handled(error)) return;
    if (error && error.code === "network") setConnection("offline");
    const text = error && error.message ? error.message : String(error);
    $("conn-text").textContent = state.live === "offline" ? "Offline: " + text : $("conn-text").textContent;
  }

  // ---- The token ---------------------------------------------------------------------------
  // Asked for only when the service answers 401, so with authentication off nothing changes.
  // Kept in this tab's sessionStorage (gone with the tab, never sent by the browser on its own as
  // a cookie would be), sent as `Authorization: Bearer` on every call, the event stream
  // included, and never put on the page, in a URL or in the console.

  let tokenInMemory = null; // only where sessionStorage cannot be used: then for this page load

  function currentToken() {
    if (tokenInMemory) return tokenInMemory;
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null;
    }
  }

  function keepToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
      tokenInMemory = null;
    } catch {
      tokenInMemory = token || null;
    }
  }

  /** Adds the Authorization header when there is a token; returns the token sent (or null). */
  function withToken(headers) {
    const token = currentToken();
    if (token) headers.Authorization = "Bearer " + token;
    return token;
  }

  const AUTH_MESSAGES = {
    missing: "This service needs an admin token: a token whose scope includes admin.",
    rejected: "The service did not accept that token (it may have expired). Enter another admin token.",
    forbidden:
      "This token lacks the admin scope, so the service refuses what the dashboard asks for. " +
      "Enter a token whose scope includes admin.",
  };

  /**
   * A call was answered 401 (no token, or one the service does not accept) or 403 (a good token
   * without the admin scope): stop keeping current and ask for a token.
   */
  function refused(status, tokenSent) {
    // An answer to a token that has since been replaced or removed says nothing about the new one.
    if (tokenSent !== currentToken()) return;
    const reason = status === 403 ? "forbidden" : tokenSent ? "rejected" : "missing";
    if (state.auth === reason) return;
    state.auth = reason;
    stopLive();
    setConnection("locked");
    $("auth").dataset.reason = reason;
    $("auth-message").textContent = AUTH_MESSAGES[reason];
    $("auth").hidden = false;
    $("lists").hidden = true;
    $("timeline").hidden = true;
    renderAuth();
    announce(AUTH_MESSAGES[reason]);
    // Not from under the action dialog: it says what happened and closes onto this form.
    if (!$("action-dialog").open) $("auth-token").focus();
  }

  /**
   * The `sub` claim of the held token, which the service records as the actor of an operator
   * action: read from the token's payload for display only (the service verifies the token).
   */
  function tokenSubject() {
    const token = currentToken();
    if (!token) return null;
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return typeof claims.sub === "string" && claims.sub ? claims.sub : null;
    } catch {
      return null;
    }
  }

  function renderAuth() {
    $("sign-out").hidden = !currentToken();
  }

  function signIn() {
    const input = $("auth-token");
    const token = input.value.trim().replace(/^Bearer\s+/i, "");
    if (!/^[\x21-\x7e]+$/.test(token)) {
      $("auth-message").textContent = "Paste the token itself: letters, digits and punctuation, without spaces.";
      input.focus();
      return;
    }
    input.value = "";
    keepToken(token);
    state.auth = null;
    $("auth").hidden = true;
    $("lists").hidden = false;
    $("timeline").hidden = false;
    renderAuth();
    $("tab-" + state.tab).focus();
    setConnection("connecting");
    // With a token the service refuses too, the form comes back with the reason.
    run(goLive);
    if (state.selected) refreshDetailSoon();
  }

  /** Forgets the token and what it let the page see, then asks the service again. */
  function signOut() {
    keepToken(null);
    stopLive();
    state.epoch += 1;
    state.sagas.clear();
    state.sagaList = [];
    state.orders.clear();
    state.orderList = [];
    state.products = [];
    state.seqSeen.clear();
    state.selected = null;
    state.detail = null;
    state.buffered = [];
    renderAll();
    renderAuth();
    announce("Signed out");
    setConnection("connecting");
    // A service that needs a token answers 401, and the form shows.
    run(goLive);
  }

  function setUpSignIn() {
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      signIn();
    });
    $("sign-out").addEventListener("click", signOut);
  }

  // ---- Filters -----------------------------------------------------------------------------

  function sagaFilter() {
    const form = $("saga-filters");
    return {
      state: form.elements.state.value,
      kind: form.elements.kind.value,
      stuck: form.elements.stuck.checked ? "true" : "",
    };
  }

  function orderFilter() {
    const form = $("order-filters");
    return { status: form.elements.status.value, customer_id: form.elements.customer_id.value.trim() };
  }

  function sagaMatches(s, f = sagaFilter()) {
    return (!f.state || s.state === f.state) && (!f.kind || s.kind === f.kind) && (!f.stuck || s.stuck === true);
  }

  function orderMatches(o, f = orderFilter()) {
    return (!f.status || o.status === f.status) && (!f.customer_id || o.customer_id === f.customer_id);
  }

  const isStuck = (s) => Boolean(s && s.stuck && !FINAL.has(s.state));

  // Stuck first, then newest first (ids are UUIDv7: they sort by creation time).
  function bySagaPriority(a, b) {
    const sa = isStuck(state.sagas.get(a)) ? 0 : 1;
    const sb = isStuck(state.sagas.get(b)) ? 0 : 1;
    return sa - sb || (a < b ? 1 : a > b ? -1 : 0);
  }

  function byOrderPriority(a, b) {
    const sa = isStuck(state.sagas.get(state.orders.get(a)?.saga_id)) ? 0 : 1;
    const sb = isStuck(state.sagas.get(state.orders.get(b)?.saga_id)) ? 0 : 1;
    return sa - sb || (a < b ? 1 : a > b ? -1 : 0);
  }

  // ---- Merging what arrives ----------------------------------------------------------------

  /**
   * Keeps the newer of two views of a saga. A finished saga never goes back to unfinished, and a
   * stream event older than one already seen (its next_seq is lower) is ignored; no clock is
   * compared, so an instance whose clock runs behind cannot hide its changes.
   */
  function mergeSaga(incoming) {
    const known = state.sagas.get(incoming.id);
    if (typeof incoming.next_seq === "number") {
      const seen = state.seqSeen.get(incoming.id);
      if (seen !== undefined && incoming.next_seq < seen) return { saga: known, changed: false };
      state.seqSeen.set(incoming.id, incoming.next_seq);
    }
    if (known && FINAL.has(known.state) && !FINAL.has(incoming.state)) return { saga: known, changed: false };
    const saga = { ...known, ...incoming };
    const changed = !known || known.state !== saga.state || known.stuck !== saga.stuck || known.attempts !== saga.attempts;
    state.sagas.set(saga.id, saga);
    return { saga, changed, previous: known };
  }

  function applySagaPage(items, filter) {
    const ids = [];
    for (const item of items) {
      const { saga } = mergeSaga(item);
      if (saga && sagaMatches(saga, filter)) ids.push(saga.id);
    }
    state.sagaList = ids;
  }

  async function refreshSagas() {
    const filter = sagaFilter();
    const [page, stuck] = await Promise.all([
      api("/sagas" + query({ ...filter, limit: LIST_LIMIT })),
      // The stuck ones, whatever the filter, so that orders can be sorted stuck first too.
      api("/sagas" + query({ stuck: "true", limit: LIST_LIMIT })),
    ]);
    for (const item of stuck.items) mergeSaga(item);
    applySagaPage(page.items, filter);
  }

  async function refreshOrders() {
    const filter = orderFilter();
    const page = await api("/orders" + query({ ...filter, limit: LIST_LIMIT }));
    const ids = [];
    for (const order of page.items) {
      state.orders.set(order.id, order);
      ids.push(order.id);
    }
    state.orderList = ids;
  }

  async function refreshProducts() {
    const page = await api("/products" + query({ limit: 500 }));
    state.products = page.items;
  }

  /** Fetches every list again (on start, on a filter change, on reconnect, each poll). */
  async function refreshLists() {
    state.listsInFlight += 1;
    try {
      await Promise.all([refreshSagas(), refreshOrders(), refreshProducts()]);
    } finally {
      state.listsInFlight -= 1;
    }
    // Events that arrived while the lists were on their way may be newer than the answers.
    if (state.listsInFlight === 0) {
      const events = state.buffered.splice(0);
      for (const event of events) onSagaEvent(event, true);
    }
    renderAll();
  }

  async function refreshDetail() {
    const id = state.selected;
    if (!id) return;
    try {
      const detail = await api("/sagas/" + encodeURIComponent(id));
      if (state.selected !== id) return;
      const { steps, events, ...summary } = detail;
      mergeSaga(summary);
      state.detail = detail;
    } catch (error) {
      if (error.status === 404 && state.selected === id) state.detail = null;
      else throw error;
    }
    renderTimeline();
  }

  const refreshDetailSoon = debounce(() => run(refreshDetail), 100);
  const refreshProductsSoon = debounce(
    () => run(async () => {
      await refreshProducts();
      renderProducts();
    }),
    400,
  );

  const orderFetches = new Map();
  function fetchOrderSoon(orderId) {
    clearTimeout(orderFetches.get(orderId));
    orderFetches.set(
      orderId,
      setTimeout(() => {
        orderFetches.delete(orderId);
        run(async () => {
          let order;
          try {
            order = await api("/orders/" + encodeURIComponent(orderId));
          } catch (error) {
            if (error.status === 404) return; // not an order this dashboard can show
            throw error;
          }
          const isNew = !state.orders.has(order.id);
          state.orders.set(order.id, order);
          const listed = state.orderList.includes(order.id);
          if (orderMatches(order) && !listed) state.orderList.push(order.id);
          if (!orderMatches(order) && listed) state.orderList = state.orderList.filter((id) => id !== order.id);
          if (isNew) announce(`New order ${shortId(order.id)} from ${order.customer_id}`);
          renderOrders();
          // The open timeline shows its order's status and total: it may have been drawn before
          // the order arrived, and a finished saga sends nothing that would draw it again.
          if (state.detail && state.detail.order_id === order.id) renderTimeline();
        });
      }, 120),
    );
  }

  /** One `saga` event of GET /sagas/events: a saga was created or its history grew. */
  function onSagaEvent(summary, replayed) {
    if (state.listsInFlight > 0 && !replayed) state.buffered.push(summary);
    const { saga, changed, previous } = mergeSaga(summary);
    if (!saga) return;
    const listed = state.sagaList.includes(saga.id);
    if (sagaMatches(saga) && !listed) state.sagaList.push(saga.id);
    if (!sagaMatches(saga) && listed) state.sagaList = state.sagaList.filter((id) => id !== saga.id);
    if (saga.order_id && (changed || !state.orders.has(saga.order_id))) fetchOrderSoon(saga.order_id);
    if (changed && previous && !replayed && previous.state !== saga.state) {
      announce(`Saga ${shortId(saga.id)} is ${saga.state}`);
    } else if (changed && previous && !replayed && saga.stuck && !previous.stuck) {
      announce(`Saga ${shortId(saga.id)} is stuck`);
    }
    if (saga.id === state.selected) refreshDetailSoon();
    refreshProductsSoon();
    renderSagas();
    renderOrders();
  }

  // ---- Live updates ------------------------------------------------------------------------

  let pollTimer = null;
  let polling = false;

  function setConnection(live) {
    state.live = live;
    const text = {
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Reconnecting…",
      polling: `Updating every ${POLL_MS / 1000} s`,
      offline: "Offline",
      locked: "Token needed",
    }[live];
    $("conn").dataset.state = live;
    $("conn-text").textContent = text;
  }

  function startPolling() {
    if (polling) return;
    polling = true;
    setConnection("polling");
    const tick = async () => {
      try {
        await refreshLists();
        if (state.selected && !(state.detail && FINAL.has(state.detail.state))) await refreshDetail();
        if (polling && state.live !== "polling") setConnection("polling");
      } catch (error) {
        showProblem(error);
      } finally {
        // Stopped meanwhile (the stream opened, or the service refused): no next tick.
        if (polling) pollTimer = setTimeout(tick, POLL_MS);
      }
    };
    pollTimer = setTimeout(tick, POLL_MS);
  }

  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
    pollTimer = null;
  }

  /**
   * Whether this service serves GET /sagas/events: read from its own API description rather than
   * by trying the stream, because a browser logs a refused request as a console error.
   */
  async function streamServed() {
    try {
      const spec = await api("/openapi.yaml");
      return typeof spec === "string" && /\n {2}\/sagas\/events:/.test(spec);
    } catch (error) {
      if (handled(error)) throw error;
      return false;
    }
  }

  /** Keeps the page current: from the event stream where the service serves one, else by polling. */
  async function goLive() {
    const served = await streamServed();
    if (state.auth) return; // refused: signing in calls this again
    if (served) startStream();
    else {
      await refreshLists().catch(showProblem);
      if (!state.auth) startPolling();
    }
  }

  // The event stream is read with fetch, not EventSource: EventSource cannot send the
  // Authorization header, and a token in the URL would reach logs. It behaves as EventSource
  // does: it reconnects after a drop (sending Last-Event-ID if the stream gave ids), and gives up
  // on an answer that is not a stream, which here falls back to polling.

  let stream = null; // the AbortController of the stream being read, or null
  let streamRetryTimer = null; // the later try of the stream after falling back to polling

  function stopLive() {
    if (stream) stream.abort();
    stream = null;
    clearTimeout(streamRetryTimer);
    stopPolling();
  }

  function startStream() {
    const controller = new AbortController();
    stream = controller;
    run(() => readStream(controller));
    // A first look before the stream opens; fetched again on open, so that a change made
    // between this fetch and the stream's start is not missed.
    run(refreshLists);
  }

  /** Resolves after `millis`, or at once when `signal` aborts. */
  function pause(millis, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, millis);
      signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
    });
  }

  /** Reads GET /sagas/events for as long as `controller` is the current stream. */
  async function readStream(controller) {
    const current = () => stream === controller;
    const sse = { lastEventId: "", retry: STREAM_RETRY_MS };
    while (current()) {
      const headers = { Accept: "text/event-stream" };
      if (sse.lastEventId) headers["Last-Event-ID"] = sse.lastEventId;
      const token = withToken(headers);
      let response = null;
      try {
        response = await fetch("/sagas/events", { headers, cache: "no-store", signal: controller.signal });
      } catch {
        // No answer (the service is restarting, the network dropped): try again, as EventSource does.
      }
      if (!current()) {
        if (response && response.body) response.body.cancel().catch(() => {});
        return;
      }
      if (response && (response.status === 401 || response.status === 403)) {
        response.body?.cancel().catch(() => {});
        refused(response.status, token);
        if (state.auth) return; // stopped; signing in starts a new stream
      } else if (response && (!response.ok || !(response.headers.get("Content-Type") || "").startsWith("text/event-stream") || !response.body)) {
        // Not a stream (EventSource gives up here): poll, and try the stream again later.
        response.body?.cancel().catch(() => {});
        stream = null;
        startPolling();
        streamRetryTimer = setTimeout(() => {
          if (!stream && !state.auth) {
            stopPolling();
            startStream();
          }
        }, 30000);
        return;
      } else if (response) {
        stopPolling();
        setConnection("live");
        // On the first open and after every reconnect: whatever changed before the stream was
        // (back) up is in the lists, so nothing is missed.
        run(refreshLists);
        if (state.selected) refreshDetailSoon();
        try {
          await readEvents(response.body, sse, (type, data) => {
            if (type !== "saga") return;
            const summary = parseJson(data);
            if (summary && summary.id) onSagaEvent(summary, false);
          });
        } catch {
          // The connection dropped, or this stream was stopped.
        }
        if (!current()) return;
      }
      setConnection("reconnecting");
      await pause(sse.retry, controller.signal);
    }
  }

  /**
   * Reads a `text/event-stream` body as EventSource does, calling `onEvent(type, data)` per event:
   * lines end in CRLF, LF or CR; a blank line ends an event; `data:` lines join with \n; `event:`
   * names it (`message` if not); `id:` becomes `sse.lastEventId` once its event ends (sent back
   * as Last-Event-ID on reconnect); `retry:` sets `sse.retry`, the wait before reconnecting; a
   * line starting with `:` (the keepalive) is a comment. An event cut off by the end is dropped.
   */
  async function readEvents(body, sse, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder(); // UTF-8, a leading BOM skipped
    let buffer = ""; // an unfinished line
    let afterCR = false; // the text so far ended in CR: a LF next belongs to it
    let type = "";
    let data = [];
    let id = sse.lastEventId;
    const line = (text) => {
      if (text === "") {
        sse.lastEventId = id;
        if (data.length) {
          const [name, joined] = [type || "message", data.join("\n")];
          try {
            onEvent(name, joined);
          } catch (error) {
            // A bug in handling one event must not cut the stream; it still surfaces as an error.
            setTimeout(() => {
              throw error;
            });
          }
        }
        type = "";
        data = [];
        return;
      }
      if (text[0] === ":") return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && !value.includes("\0")) id = value;
      else if (field === "retry" && /^\d+$/.test(value)) sse.retry = Number(value);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      let text = decoder.decode(value, { stream: true });
      if (!text) continue;
      if (afterCR && text[0] === "\n") text = text.slice(1);
      afterCR = text.endsWith("\r");
      const lines = (buffer + text).split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const each of lines) line(each);
    }
  }

  // ---- Rendering ---------------------------------------------------------------------------

  function renderAll() {
    renderSagas();
    renderOrders();
    renderProducts();
    renderTimeline();
  }

  function selectButton(sagaId, label, description) {
    return el("button", {
      type: "button",
      class: "link",
      "aria-label": description,
      dataset: { open: sagaId },
      onclick: () => select(sagaId),
      text: label,
    });
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function renderSagas() {
    const ids = [...state.sagaList].sort(bySagaPriority);
    const rows = ids.map((id) => {
      const s = state.sagas.get(id);
      const order = s.order_id ? state.orders.get(s.order_id) : null;
      return el(
        "tr",
        {
          class: [isStuck(s) ? "stuck" : "", id === state.selected ? "selected" : ""].join(" ").trim(),
          dataset: { sagaId: id, state: s.state, stuck: String(Boolean(s.stuck)) },
          "aria-current": id === state.selected ? "true" : null,
        },
        el("td", { "data-label": "Saga" }, selectButton(id, shortId(id), `Open saga ${id}`)),
        el("td", { "data-label": "Kind", text: s.kind }),
        el("td", { "data-label": "State" }, badge(s.state), isStuck(s) ? badge("stuck") : null),
        el("td", { "data-label": "Attempts", class: "num", text: s.attempts }),
        el(
          "td",
          { "data-label": "Order" },
          s.order_id ? el("span", { class: "mono", title: s.order_id, text: shortId(s.order_id) }) : "—",
          order ? el("span", { class: "muted", text: " " + order.customer_id }) : null,
        ),
        el("td", { "data-label": "Updated" }, timeEl(s.updated_at)),
      );
    });
    replaceRows($("sagas-table").tBodies[0], rows);
    $("sagas-empty").hidden = rows.length > 0;
  }

  function renderOrders() {
    const ids = [...state.orderList].sort(byOrderPriority);
    const rows = ids.map((id) => {
      const o = state.orders.get(id);
      const saga = state.sagas.get(o.saga_id);
      return el(
        "tr",
        {
          class: [isStuck(saga) ? "stuck" : "", o.saga_id === state.selected ? "selected" : ""].join(" ").trim(),
          dataset: { orderId: id, status: o.status },
          "aria-current": o.saga_id === state.selected ? "true" : null,
        },
        el("td", { "data-label": "Order" }, selectButton(o.saga_id, shortId(id), `Open the saga of order ${id}`)),
        el("td", { "data-label": "Customer", text: o.customer_id }),
        el(
          "td",
          { "data-label": "Status" },
          badge(o.status),
          o.failure ? el("span", { class: "muted", title: o.failure.detail, text: " " + o.failure.code }) : null,
        ),
        el("td", { "data-label": "Total", class: "num", text: money(o.total_cents) }),
        el("td", { "data-label": "Saga" }, saga ? badge(saga.state) : "—", isStuck(saga) ? badge("stuck") : null),
        el("td", { "data-label": "Created" }, timeEl(o.created_at)),
      );
    });
    replaceRows($("orders-table").tBodies[0], rows);
    $("orders-empty").hidden = rows.length > 0;
  }

  function renderProducts() {
    const rows = state.products.map((p) =>
      el(
        "tr",
        { dataset: { productId: p.id } },
        el("td", { "data-label": "Product", class: "mono", text: p.id }),
        el("td", { "data-label": "Name", text: p.name }),
        el("td", { "data-label": "Price", class: "num", text: money(p.price_cents) }),
        el("td", { "data-label": "Available", class: "num", dataset: { field: "available" }, text: p.available }),
        el("td", { "data-label": "Reserved", class: "num", dataset: { field: "reserved" }, text: p.reserved }),
        el("td", { "data-label": "Sold", class: "num", dataset: { field: "sold" }, text: p.sold }),
      ),
    );
    replaceRows($("products-table").tBodies[0], rows);
    $("products-empty").hidden = rows.length > 0;
  }

  /** An operator action's actor and reason, from the event's detail JSON. */
  function operatorAction(event) {
    const detail = parseJson(event.detail) || {};
    const what = event.event.slice("operator_".length);
    return { what, actor: detail.actor, reason: detail.reason };
  }

  /**
   * The history as the timeline shows it: consecutive failed attempts of one step with the same
   * error fold into one entry (a stuck saga may fail thousands of times), each entry with the
   * time since the one before.
   */
  function historyEntries(events) {
    const entries = [];
    for (const event of events) {
      const last = entries[entries.length - 1];
      if (
        last &&
        event.event === "failed" &&
        last.event.event === "failed" &&
        last.event.step === event.step &&
        last.event.detail === event.detail
      ) {
        last.count += 1;
        last.lastAt = event.at;
        continue;
      }
      entries.push({ event, count: 1, lastAt: event.at });
    }
    let previous = null;
    for (const entry of entries) {
      entry.sincePrevious = previous === null ? NaN : ms(entry.event.at) - previous;
      previous = ms(entry.lastAt);
    }
    return entries;
  }

  function eventClass(kind) {
    if (kind.startsWith("operator_")) return "ev-operator";
    if (kind === "failed" || kind === "stuck" || kind === "compensation_failed") return "ev-error";
    if (kind.startsWith("compensat")) return "ev-compensation";
    if (kind === "succeeded" || kind === "completed") return "ev-ok";
    return "ev-info";
  }

  function renderEvent(entry) {
    const e = entry.event;
    const parts = [];
    if (e.event.startsWith("operator_")) {
      const action = operatorAction(e);
      parts.push(
        el("strong", { text: `Operator ${action.what}` }),
        " by ",
        el("span", { class: "actor", text: action.actor || "unknown" }),
        action.reason ? el("q", { class: "reason", text: action.reason }) : null,
      );
    } else {
      parts.push(el("strong", { text: e.event.replaceAll("_", " ") }));
      if (e.step) parts.push(" ", el("span", { class: "mono", text: e.step }));
      if (entry.count > 1) {
        const span = formatDuration(ms(entry.lastAt) - ms(e.at));
        parts.push(el("span", { class: "count", text: ` × ${entry.count} attempts over ${span}` }));
      }
      const failure = e.event === "compensating" ? parseJson(e.detail) : null;
      if (failure) {
        parts.push(el("div", { class: "detail" }, el("span", { class: "mono", text: failure.code || "" }), " ", failure.detail || ""));
        if (failure.actor) parts.push(el("div", { class: "detail", text: "by " + failure.actor }));
      } else if (e.detail) {
        parts.push(el("div", { class: "detail", text: e.detail }));
      }
    }
    return el(
      "li",
      { class: eventClass(e.event), dataset: { event: e.event, seq: e.seq } },
      el("div", { class: "when" }, timeEl(e.at), Number.isFinite(entry.sincePrevious) ? el("span", { class: "delta", text: "+" + formatDuration(entry.sincePrevious) }) : null),
      el("div", { class: "what" }, parts),
    );
  }

  function renderStep(step, events) {
    const compensations = events.filter((e) => e.step === step.name && e.event.startsWith("compensat")).length;
    const duration = formatDuration(ms(step.finished_at) - ms(step.started_at));
    return el(
      "li",
      { class: `step step-${step.state}`, dataset: { step: step.name, state: step.state } },
      el("div", { class: "step-head" }, el("span", { class: "mono", text: step.name }), " ", badge(step.state)),
      el(
        "div",
        { class: "step-facts" },
        `${step.attempts} attempt${step.attempts === 1 ? "" : "s"}`,
        duration ? ` · ${duration}` : "",
        compensations ? ` · ${compensations} compensation event${compensations === 1 ? "" : "s"}` : "",
      ),
      step.last_error ? el("div", { class: "detail error-text", text: step.last_error }) : null,
    );
  }

  function renderTimeline() {
    const detail = state.detail;
    const body = $("timeline-body");
    $("timeline-empty").hidden = Boolean(detail);
    body.hidden = !detail;
    if (!detail) {
      $("timeline-empty").textContent = state.selected
        ? "Loading…"
        : "Choose a saga or an order to see its steps and history.";
      return;
    }
    body.dataset.sagaId = detail.id;
    body.dataset.state = detail.state;
    body.dataset.stuck = String(Boolean(detail.stuck));
    $("timeline-title").textContent = `Saga ${shortId(detail.id)}`;
    const order = detail.order_id ? state.orders.get(detail.order_id) : null;
    const fact = (name, ...value) => [el("dt", { text: name }), el("dd", {}, ...value)];
    const total = ms(detail.updated_at) - ms(detail.created_at);
    $("timeline-facts").replaceChildren(
      ...fact("Id", el("span", { class: "mono", text: detail.id })),
      ...fact("Kind", detail.kind),
      ...fact("State", badge(detail.state), isStuck(detail) ? badge("stuck") : null),
      ...fact("Attempts", String(detail.attempts)),
      ...(detail.order_id
        ? fact(
            "Order",
            el("span", { class: "mono", text: detail.order_id }),
            order ? el("span", { class: "muted", text: ` ${order.customer_id} · ${order.status} · ${money(order.total_cents)}` }) : null,
          )
        : []),
      ...fact("Created", timeEl(detail.created_at)),
      ...fact("Updated", timeEl(detail.updated_at), Number.isFinite(total) ? ` (${formatDuration(total)} after creation)` : ""),
      ...(detail.last_error ? fact("Last error", el("span", { class: "error-text", text: detail.last_error })) : []),
    );
    const finished = FINAL.has(detail.state);
    $("timeline-actions").hidden = finished;
    $("abort-button").hidden = detail.state !== "running";
    $("timeline-steps").replaceChildren(...detail.steps.map((s) => renderStep(s, detail.events)));
    $("timeline-events").replaceChildren(...historyEntries(detail.events).map(renderEvent));
  }

  // ---- Interaction -------------------------------------------------------------------------

  function select(sagaId) {
    if (!sagaId) return;
    state.selected = sagaId;
    state.detail = null;
    renderTimeline();
    renderSagas();
    renderOrders();
    run(async () => {
      await refreshDetail();
      $("timeline").focus({ preventScroll: window.matchMedia("(min-width: 60em)").matches });
    });
  }

  function showTab(name) {
    state.tab = name;
    for (const tab of $("tabs").querySelectorAll("[role=tab]")) {
      const on = tab.id === "tab-" + name;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !on;
    }
    if (name === "products") refreshProductsSoon();
  }

  function setUpTabs() {
    const tabs = [...$("tabs").querySelectorAll("[role=tab]")];
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => showTab(tab.id.slice(4)));
      tab.addEventListener("keydown", (event) => {
        let next = null;
        if (event.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
        else if (event.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
        else if (event.key === "Home") next = tabs[0];
        else if (event.key === "End") next = tabs[tabs.length - 1];
        if (next) {
          event.preventDefault();
          next.focus();
          showTab(next.id.slice(4));
        }
      });
    });
  }

  const MESSAGES = {
    saga_past_pivot: "This saga is past its pivot: it can only go forward. Retry it instead.",
    saga_finished: "This saga has already finished.",
    saga_not_found: "There is no such saga.",
    validation_failed: "Give your name (up to 100 characters) and a reason (up to 500).",
    reason_missing: "Give a reason (up to 500 characters).",
    network: "The service cannot be reached.",
    unauthorized: "The service needs an admin token. Cancel, then enter one.",
    forbidden: "This token lacks the admin scope. Cancel, then enter a token with the admin scope.",
  };

  let dialogAction = null; // { kind: "retry" | "abort" | "retry-stuck", sagaId?, opener }

  function openDialog(kind, opener) {
    const dialog = $("action-dialog");
    const id = state.selected;
    dialogAction = { kind, sagaId: id, opener };
    const title = { retry: "Retry saga", abort: "Abort saga", "retry-stuck": "Retry every stuck saga" }[kind];
    $("action-title").textContent = title;
    $("action-what").textContent =
      kind === "retry"
        ? `Saga ${id} tries its current step again now.`
        : kind === "abort"
          ? `Saga ${id} stops going forward and compensates what it did. Only before its pivot.`
          : "Every stuck saga matching the kind and state filters tries its current step again now.";
    $("action-submit").textContent = { retry: "Retry", abort: "Abort", "retry-stuck": "Retry all" }[kind];
    $("action-submit").className = kind === "abort" ? "danger" : "";
    $("action-error").hidden = true;
    $("action-reason").value = "";
    // With a token the service records its subject as the actor, so there is no name to type.
    const signedIn = Boolean(currentToken());
    $("action-actor-field").hidden = signedIn;
    $("action-actor").required = !signedIn;
    $("action-as").hidden = !signedIn;
    const subject = tokenSubject();
    $("action-as").textContent = subject ? `Recorded as ${subject}, from your token.` : "Recorded as your token's subject.";
    let actor = "";
    try {
      actor = localStorage.getItem(ACTOR_KEY) || "";
    } catch {
      // Storage may be off; the actor is then typed each time.
    }
    $("action-actor").value = actor;
    dialog.showModal();
    (actor || signedIn ? $("action-reason") : $("action-actor")).focus();
  }

  function closeDialog() {
    $("action-dialog").close();
  }

  async function submitDialog() {
    const action = dialogAction;
    if (!action) return;
    const signedIn = $("action-actor-field").hidden; // as the dialog was opened
    const actor = signedIn ? "" : $("action-actor").value.trim();
    const reason = $("action-reason").value.trim();
    const error = $("action-error");
    if ((!signedIn && !actor) || !reason) {
      error.textContent = signedIn ? MESSAGES.reason_missing : MESSAGES.validation_failed;
      error.hidden = false;
      return;
    }
    $("action-submit").disabled = true;
    try {
      const body = signedIn ? { reason } : { actor, reason };
      if (action.kind === "retry-stuck") {
        const f = sagaFilter();
        const answer = await api("/sagas/retry" + query({ stuck: "true", kind: f.kind, state: f.state }), { method: "POST", body });
        announce(`Retried ${answer.retried} stuck saga${answer.retried === 1 ? "" : "s"}`);
      } else {
        const path = `/sagas/${encodeURIComponent(action.sagaId)}/${action.kind}`;
        const saga = await api(path, { method: "POST", body });
        if (saga && saga.id === state.selected) {
          const { steps, events, ...summary } = saga;
          mergeSaga(summary);
          state.detail = saga;
        }
        announce(`${action.kind === "retry" ? "Retry" : "Abort"} of saga ${shortId(action.sagaId)} recorded`);
      }
      try {
        if (actor) localStorage.setItem(ACTOR_KEY, actor);
      } catch {
        // Not remembered; nothing else depends on it.
      }
      closeDialog();
      renderAll();
      if (state.live !== "live" && !state.auth) run(refreshLists);
    } catch (failure) {
      error.textContent = MESSAGES[failure.code] || failure.message;
      error.hidden = false;
    } finally {
      $("action-submit").disabled = false;
    }
  }

  function setUpDialog() {
    const dialog = $("action-dialog");
    $("action-form").addEventListener("submit", (event) => {
      event.preventDefault();
      run(submitDialog);
    });
    $("action-cancel").addEventListener("click", closeDialog);
    dialog.addEventListener("close", () => {
      const opener = dialogAction && dialogAction.opener;
      dialogAction = null;
      if (state.auth) $("auth-token").focus();
      else if (opener && !opener.hidden && opener.isConnected) opener.focus();
    });
    $("retry-button").addEventListener("click", (e) => openDialog("retry", e.currentTarget));
    $("abort-button").addEventListener("click", (e) => openDialog("abort", e.currentTarget));
    $("retry-stuck").addEventListener("click", (e) => openDialog("retry-stuck", e.currentTarget));
  }

  function setUpFilters() {
    const onChange = () => run(refreshLists);
    $("saga-filters").addEventListener("change", onChange);
    $("saga-filters").addEventListener("submit", (e) => e.preventDefault());
    $("order-filters").addEventListener("change", onChange);
    $("order-filters").addEventListener("input", debounce(onChange, 300));
    $("order-filters").addEventListener("submit", (e) => e.preventDefault());
  }

  async function start() {
    setUpTabs();
    setUpDialog();
    setUpFilters();
    setUpSignIn();
    renderAll();
    renderAuth();
    await goLive();
  }

  document.addEventListener("DOMContentLoaded", () => run(start));
})();
