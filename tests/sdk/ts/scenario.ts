// The TypeScript SDK against a running service: types generated from openapi.yaml by
// openapi-typescript (target/sdk/ts/openapi.d.ts), calls made with openapi-fetch.
//
// tests/sdk/run.sh type-checks this with `tsc --noEmit` against the generated types, compiles it
// and runs it with ORDER_SAGA_URL, ADMIN_TOKEN (scope admin), CUSTOMER_TOKEN (scope orders) and
// CUSTOMER (that token's sub). Every step asserts, so it fails when the service, the spec or the
// generated types are wrong; the `@ts-expect-error` lines fail the type check if the types stop
// describing the API (an `any` would let them through). The tokens are never printed.
import createClient from "openapi-fetch";
import type { components, paths } from "order-saga-openapi";

type NewProduct = components["schemas"]["NewProduct"];
type Problem = components["schemas"]["Problem"];
type Order = components["schemas"]["Order"];
type Product = components["schemas"]["Product"];
type Saga = components["schemas"]["Saga"];

// Node's own globals, without pulling @types/node in for two of them.
declare const process: { env: Record<string, string | undefined>; exitCode?: number };

const PLACE_ORDER_STEPS = ["reserve_stock", "create_order", "confirm", "commit_stock"];
const CANCEL_ORDER_STEPS = ["cancel", "return_stock"];

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

class Failed extends Error {}

/** Fails the scenario with `what` unless `condition` holds. */
function check(condition: boolean, what: string): asserts condition {
  if (!condition) throw new Failed(what);
}

const passed: string[] = [];

/** Reports a step whose every check held. */
function step(what: string): void {
  passed.push(what);
  console.log(`ok ${passed.length} - ${what}`);
}

function show(value: unknown): string {
  return JSON.stringify(value);
}

async function main(): Promise<void> {
  const baseUrl = env("ORDER_SAGA_URL");
  const customer = env("CUSTOMER");
  const admin = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${env("ADMIN_TOKEN")}` } });
  const shopper = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${env("CUSTOMER_TOKEN")}` } });
  const run = Math.random().toString(16).slice(2, 10);
  const productId = `ts-mug-${run}`;

  // A product: only an admin may create one; a customer's token is refused with a typed 403.
  const newProduct: NewProduct = { id: productId, name: "Mug", price_cents: 1250, stock: 5 };
  const refused = await shopper.POST("/products", { body: newProduct });
  check(refused.response.status === 403, `a customer creating a product: ${refused.response.status}`);
  check(refused.error?.code === "forbidden", `403 body: ${show(refused.error)}`);
  const created = await admin.POST("/products", { body: newProduct });
  check(created.response.status === 201, `create product: ${created.response.status} ${show(created.error)}`);
  const product: Product | undefined = created.data;
  check(product !== undefined, "a Product back");
  check(product.id === productId && product.available === 5 && product.sold === 0, show(product));
  check(created.response.headers.get("location") === `/products/${productId}`, "Location");
  step("create a product (admin token; a customer token gets a typed 403 forbidden)");

  // An order with an Idempotency-Key; customer_id defaults to the token's sub.
  const key = `sdk-ts-${run}`;
  const body = { items: [{ product_id: productId, quantity: 2 }] };
  const params = { header: { "Idempotency-Key": key } };
  const placed = await shopper.POST("/orders", { params, body });
  check(placed.response.status === 201, `place order: ${placed.response.status} ${show(placed.error)}`);
  const order: Order | undefined = placed.data;
  check(order !== undefined, "an Order back");
  check(order.status === "confirmed" && order.customer_id === customer, show(order));
  check(order.total_cents === 2500 && order.failure === null, show(order));
  check(order.items[0]?.unit_price_cents === 1250, show(order.items));
  check(placed.response.headers.get("location") === `/orders/${order.id}`, "Location");
  check(!placed.response.headers.has("idempotent-replayed"), "a first request is no replay");
  // @ts-expect-error an order status is one of the spec's enum values
  check(order.status !== "shipped", "no such status");
  step(`place an order with Idempotency-Key ${key}: 201 confirmed, 2500 cents`);

  const replayed = await shopper.POST("/orders", { params, body });
  check(replayed.response.status === 201, `replay: ${replayed.response.status}`);
  check(replayed.data?.id === order.id, `the same order: ${show(replayed.data)}`);
  check(replayed.response.headers.get("idempotent-replayed") === "true", "Idempotent-Replayed: true");
  step("replay it: the same order, Idempotent-Replayed: true");

  const again = await shopper.GET("/orders/{id}", { params: { path: { id: order.id } } });
  check(again.data !== undefined, `get order: ${again.response.status}`);
  check(again.data.id === order.id && again.data.status === "confirmed", show(again.data));
  check(again.data.saga_id === order.saga_id && again.data.cancel_saga_id === null, show(again.data));
  step("read it back");

  // More than there is: openapi-fetch hands the 409 back as `error`, typed as the spec's Problem.
  const short = await shopper.POST("/orders", { body: { items: [{ product_id: productId, quantity: 10 }] } });
  check(short.response.status === 409, `short order: ${short.response.status}`);
  check(short.data === undefined && short.error !== undefined, "an error, not data");
  const problem: Problem = short.error;
  check(problem.code === "insufficient_stock" && problem.status === 409, show(problem));
  check(problem.type === "urn:order-saga:problem:insufficient_stock", show(problem));
  check(problem.product_id === productId && typeof problem.order_id === "string", show(problem));
  // @ts-expect-error the spec's Problem has no `message` member: program against `code`
  check(problem.message === undefined, show(problem));
  const rejected = await shopper.GET("/orders/{id}", { params: { path: { id: problem.order_id } } });
  check(rejected.data?.status === "rejected", show(rejected.data));
  check(rejected.data.failure?.code === "insufficient_stock", show(rejected.data.failure));
  step("order too many: a typed 409 Problem, code insufficient_stock; the order is rejected");

  const saga = await admin.GET("/sagas/{id}", { params: { path: { id: order.saga_id } } });
  check(saga.data !== undefined, `get saga: ${saga.response.status}`);
  check(saga.data.kind === "place_order" && saga.data.state === "completed", show(saga.data));
  check(show(saga.data.steps.map((s) => s.name)) === show(PLACE_ORDER_STEPS), show(saga.data.steps));
  check(saga.data.steps.every((s) => s.state === "succeeded"), show(saga.data.steps));
  check(saga.data.events[0]?.event === "created" && saga.data.events.at(-1)?.event === "completed", "events");
  const stock = await shopper.GET("/products/{id}", { params: { path: { id: productId } } });
  check(stock.data?.available === 3 && stock.data.reserved === 0 && stock.data.sold === 2, show(stock.data));
  step("its saga completed every step; stock 3 available, 2 sold");

  const cancelled = await shopper.POST("/orders/{id}/cancel", { params: { path: { id: order.id } } });
  const status = cancelled.response.status;
  check(status === 200 || status === 202, `cancel: ${status} ${show(cancelled.error)}`);
  check(cancelled.data?.status === "cancelled", show(cancelled.data));
  const cancelSagaId = cancelled.data.cancel_saga_id;
  check(typeof cancelSagaId === "string", show(cancelled.data));
  // A 200 has its stock back and its saga completed already; a 202 (a slow machine) is followed
  // until they are.
  const deadline = Date.now() + 30_000;
  let cancelSaga: Saga | undefined;
  for (;;) {
    const now = await shopper.GET("/products/{id}", { params: { path: { id: productId } } });
    cancelSaga = (await admin.GET("/sagas/{id}", { params: { path: { id: cancelSagaId } } })).data;
    check(now.data !== undefined && cancelSaga !== undefined, "product and cancel saga read");
    const back = now.data.available === 5 && now.data.reserved === 0 && now.data.sold === 0;
    if (back && cancelSaga.state === "completed") break;
    check(status === 202, `a 200 cancel is done: ${show(now.data)} ${cancelSaga.state}`);
    check(Date.now() < deadline, `the cancel finished within 30 s: ${show(now.data)} ${cancelSaga.state}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  check(cancelSaga.kind === "cancel_order", show(cancelSaga));
  check(show(cancelSaga.steps.map((s) => s.name)) === show(CANCEL_ORDER_STEPS), show(cancelSaga.steps));
  step(`cancel it (${status}): cancelled, all 5 units available again`);
}

main().then(
  () => console.log(`sdk-typescript: ${passed.length} passed, 0 failed`),
  (error: unknown) => {
    const what = error instanceof Failed ? error.message : String(error instanceof Error ? error.stack : error);
    console.error(`not ok ${passed.length + 1} - ${what}`);
    process.exitCode = 1;
  },
);
