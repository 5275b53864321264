"""The Python SDK, generated from openapi.yaml by openapi-python-client, against a running service.

tests/sdk/run.sh generates the client, installs it, starts the service with authentication on
and runs this with:

- ORDER_SAGA_URL: the service's base URL;
- ADMIN_TOKEN: a bearer token with the `admin` scope (creates products, reads sagas);
- CUSTOMER_TOKEN and CUSTOMER: an `orders`-scoped token and its `sub`, the customer who orders.

Every step asserts on the SDK's typed models, so the scenario fails when the service, the spec
or the generated client is wrong. The tokens are never printed.
"""

import os
import sys
import time
import uuid
from http import HTTPStatus

from order_saga_client import AuthenticatedClient
from order_saga_client.api.orders import cancel_order, get_order, place_order
from order_saga_client.api.products import create_product, get_product
from order_saga_client.api.sagas import get_saga
from order_saga_client.models import (
    NewProduct,
    Order,
    OrderFailure,
    OrderStatus,
    PlaceOrder,
    PlaceOrderItem,
    Problem,
    Product,
    Saga,
    SagaState,
    StepState,
)

PLACE_ORDER_STEPS = ["reserve_stock", "create_order", "confirm", "commit_stock"]
CANCEL_ORDER_STEPS = ["cancel", "return_stock"]


def check(condition: bool, what: str) -> None:
    """Fails the scenario with `what` unless `condition` holds (unlike `assert`, never optimised away)."""
    if not condition:
        raise AssertionError(what)


PASSED = []


def step(what: str) -> None:
    """Reports a step whose every check held."""
    PASSED.append(what)
    print(f"ok {len(PASSED)} - {what}", flush=True)


def main() -> None:
    base = os.environ["ORDER_SAGA_URL"]
    customer = os.environ["CUSTOMER"]
    # A status the spec does not declare raises errors.UnexpectedStatus instead of parsing to None.
    admin = AuthenticatedClient(base_url=base, token=os.environ["ADMIN_TOKEN"], raise_on_unexpected_status=True)
    shopper = AuthenticatedClient(base_url=base, token=os.environ["CUSTOMER_TOKEN"], raise_on_unexpected_status=True)
    run = uuid.uuid4().hex[:8]
    product_id = f"py-mug-{run}"

    # A product: only an admin may create one; a customer's token is refused with a typed 403.
    new = NewProduct(id=product_id, name="Mug", price_cents=1250, stock=5)
    refused = create_product.sync_detailed(client=shopper, body=new)
    check(refused.status_code == HTTPStatus.FORBIDDEN, f"a customer creating a product: {refused.status_code}")
    check(isinstance(refused.parsed, Problem) and refused.parsed.code == "forbidden", f"403 body: {refused.parsed}")
    created = create_product.sync_detailed(client=admin, body=new)
    check(created.status_code == HTTPStatus.CREATED, f"create product: {created.status_code} {created.content!r}")
    product = created.parsed
    check(isinstance(product, Product), f"a Product back: {product!r}")
    check((product.id, product.available, product.reserved, product.sold) == (product_id, 5, 0, 0), f"{product}")
    check(created.headers.get("location") == f"/products/{product_id}", f"Location: {created.headers}")
    step("create a product (admin token; a customer token gets a typed 403 forbidden)")

    # An order with an Idempotency-Key; customer_id defaults to the token's sub.
    key = f"sdk-py-{run}"
    body = PlaceOrder(items=[PlaceOrderItem(product_id=product_id, quantity=2)])
    placed = place_order.sync_detailed(client=shopper, body=body, idempotency_key=key)
    check(placed.status_code == HTTPStatus.CREATED, f"place order: {placed.status_code} {placed.content!r}")
    order = placed.parsed
    check(isinstance(order, Order), f"an Order back: {order!r}")
    check(order.status == OrderStatus.CONFIRMED, f"status {order.status}")
    check(order.customer_id == customer, f"customer_id {order.customer_id!r} is the token's sub")
    check(order.total_cents == 2500 and order.failure is None, f"{order}")
    check(order.items[0].unit_price_cents == 1250, f"{order.items}")
    check(placed.headers.get("location") == f"/orders/{order.id}", f"Location: {placed.headers}")
    check("idempotent-replayed" not in placed.headers, "a first request is no replay")
    step(f"place an order with Idempotency-Key {key}: 201 confirmed, 2500 cents")

    replayed = place_order.sync_detailed(client=shopper, body=body, idempotency_key=key)
    check(replayed.status_code == HTTPStatus.CREATED, f"replay: {replayed.status_code} {replayed.content!r}")
    check(isinstance(replayed.parsed, Order) and replayed.parsed.id == order.id, f"the same order: {replayed.parsed}")
    check(replayed.headers.get("idempotent-replayed") == "true", f"Idempotent-Replayed: {replayed.headers}")
    step("replay it: the same order, Idempotent-Replayed: true")

    again = get_order.sync(client=shopper, id=order.id)
    check(isinstance(again, Order), f"get order: {again!r}")
    check((again.id, again.status, again.saga_id) == (order.id, OrderStatus.CONFIRMED, order.saga_id), f"{again}")
    check(again.cancel_saga_id is None, f"{again}")
    step("read it back")

    # More than there is: the 409 parses into the SDK's Problem model, with its stable code.
    short = place_order.sync_detailed(
        client=shopper, body=PlaceOrder(items=[PlaceOrderItem(product_id=product_id, quantity=10)])
    )
    check(short.status_code == HTTPStatus.CONFLICT, f"short order: {short.status_code} {short.content!r}")
    problem = short.parsed
    check(isinstance(problem, Problem), f"a Problem back: {problem!r}")
    check(problem.code == "insufficient_stock" and problem.status == 409, f"{problem}")
    check(problem.type_ == "urn:order-saga:problem:insufficient_stock", f"{problem.type_}")
    check(problem.product_id == product_id and isinstance(problem.order_id, str), f"{problem}")
    rejected = get_order.sync(client=shopper, id=problem.order_id)
    check(isinstance(rejected, Order) and rejected.status == OrderStatus.REJECTED, f"{rejected}")
    check(isinstance(rejected.failure, OrderFailure) and rejected.failure.code == "insufficient_stock", f"{rejected}")
    step("order too many: a typed 409 Problem, code insufficient_stock; the order is rejected")

    saga = get_saga.sync(client=admin, id=order.saga_id)
    check(isinstance(saga, Saga), f"get saga: {saga!r}")
    check((saga.kind, saga.state, saga.order_id) == ("place_order", SagaState.COMPLETED, order.id), f"{saga}")
    check([s.name for s in saga.steps] == PLACE_ORDER_STEPS, f"steps {[s.name for s in saga.steps]}")
    check(all(s.state == StepState.SUCCEEDED for s in saga.steps), f"{saga.steps}")
    check(saga.events[0].event == "created" and saga.events[-1].event == "completed", f"{saga.events}")
    check([e.seq for e in saga.events] == list(range(len(saga.events))), f"{saga.events}")
    stock = get_product.sync(client=shopper, id=product_id)
    check(isinstance(stock, Product) and (stock.available, stock.reserved, stock.sold) == (3, 0, 2), f"{stock}")
    step("its saga completed every step; stock 3 available, 2 sold")

    cancelled = cancel_order.sync_detailed(client=shopper, id=order.id)
    check(cancelled.status_code in (HTTPStatus.OK, HTTPStatus.ACCEPTED), f"cancel: {cancelled.status_code}")
    check(isinstance(cancelled.parsed, Order) and cancelled.parsed.status == OrderStatus.CANCELLED, f"{cancelled}")
    cancel_saga_id = cancelled.parsed.cancel_saga_id
    check(isinstance(cancel_saga_id, str), f"cancel_saga_id {cancel_saga_id!r}")
    # A 200 has its stock back and its saga completed already; a 202 (a slow machine) is
    # followed until they are.
    deadline = time.monotonic() + 30
    while True:
        stock = get_product.sync(client=shopper, id=product_id)
        check(isinstance(stock, Product), f"get product: {stock!r}")
        cancel_saga = get_saga.sync(client=admin, id=cancel_saga_id)
        check(isinstance(cancel_saga, Saga) and cancel_saga.kind == "cancel_order", f"{cancel_saga!r}")
        if (stock.available, stock.reserved, stock.sold) == (5, 0, 0) and cancel_saga.state == SagaState.COMPLETED:
            break
        check(cancelled.status_code == HTTPStatus.ACCEPTED, f"a 200 cancel is done: {stock}, {cancel_saga.state}")
        check(time.monotonic() < deadline, f"the cancel finished within 30 s: {stock}, {cancel_saga.state}")
        time.sleep(0.1)
    check([s.name for s in cancel_saga.steps] == CANCEL_ORDER_STEPS, f"{cancel_saga.steps}")
    check(all(s.state == StepState.SUCCEEDED for s in cancel_saga.steps), f"{cancel_saga.steps}")
    step(f"cancel it ({cancelled.status_code.value}): cancelled, all 5 units available again")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as failure:
        print(f"not ok {len(PASSED) + 1} - {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"sdk-python: {len(PASSED)} passed, 0 failed")
