"""Sagas for the conformance run to act on: stuck after their pivot, so unfinished all run long.

Usage: seed.py BASE_URL SQLITE_FILE OUT_FILE, with the admin token in CONFORMANCE_ADMIN_TOKEN.

Sagas finish in milliseconds, so without these every `POST /sagas/{id}/retry` and `/abort` that
Schemathesis sends would meet a finished saga (409) or none (404), and the 200 answers and the
`saga_past_pivot` refusal would never be checked. As in the dashboard's browser test, a SQLite
trigger makes committing the stock of product `jammed` fail for good, and returning it too (so
that a cancel, which the stateful phase may send, cannot settle them either); the engine retries
those steps (they are past the pivot) until the run ends. Writes the sagas' ids to OUT_FILE, one a line in
libFuzzer's dictionary format (`"id"`), which schemathesis.toml reads as a dictionary of ids.
Uses the standard library only.
"""

import json
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.request

SAGAS = 3
PRODUCT = "jammed"


def call(base, method, path, body=None, headers=None):
    """One request with the admin token; the answer's status and JSON body."""
    request = urllib.request.Request(base + path, method=method)
    request.add_header("Authorization", "Bearer " + os.environ["CONFORMANCE_ADMIN_TOKEN"])
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, data, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def main():
    base, database, out = sys.argv[1:4]
    status, body = call(base, "POST", "/products", {"id": PRODUCT, "name": "Jammed", "price_cents": 1, "stock": 1000})
    if status != 201:
        sys.exit(f"seed: creating product {PRODUCT} answered {status}: {body}")
    with sqlite3.connect(database, timeout=5) as db:
        db.execute(
            f"""CREATE TRIGGER conformance_jam BEFORE UPDATE OF status ON reservations
                WHEN NEW.product_id = '{PRODUCT}' AND NEW.status <> OLD.status
                BEGIN SELECT RAISE(ABORT, 'conformance: the stock of {PRODUCT} never moves'); END"""
        )
    sagas = []
    for _ in range(SAGAS):
        order = {"customer_id": "conformance", "items": [{"product_id": PRODUCT, "quantity": 1}]}
        status, body = call(base, "POST", "/orders", order, {"Prefer": "respond-async"})
        if status != 202:
            sys.exit(f"seed: placing an order of {PRODUCT} answered {status}: {body}")
        sagas.append(body["saga_id"])
    # Past the pivot and failing commit_stock, so that what retry and abort answer is settled.
    deadline = time.monotonic() + 30
    for saga in sagas:
        while True:
            status, body = call(base, "GET", f"/sagas/{saga}")
            steps = {step["name"]: step for step in body.get("steps", [])} if status == 200 else {}
            commit = steps.get("commit_stock", {})
            if steps.get("confirm", {}).get("state") == "succeeded" and commit.get("last_error"):
                break
            if time.monotonic() > deadline:
                sys.exit(f"seed: saga {saga} did not get stuck at commit_stock: {status} {body}")
            time.sleep(0.1)
    with open(out, "w") as file:
        file.write("".join(f'"{saga}"\n' for saga in sagas))
    print(f"seed: {len(sagas)} sagas stuck after their pivot on product {PRODUCT}")


if __name__ == "__main__":
    main()
