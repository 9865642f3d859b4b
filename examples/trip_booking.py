"""A trip booking saga on a real SQLite database, undone step by step when it fails.

    kira run examples/trip_booking.py                       # books a trip
    kira run examples/trip_booking.py --set fail=payment    # the payment fails: all undone
    kira run examples/trip_booking.py --set flaky=payment   # fails once, the retry succeeds

The saga: create the customer; reserve the flight, the hotel and the car at the
same time; charge the card for all three; put the confirmation e-mail in the
outbox. Each step is one SQLite transaction, and each has a compensation that
undoes it (free the seat, the room, the car; void the charge; drop the e-mail),
which kira runs in reverse dependency order when a later step fails for good.

Config (`--set KEY=VALUE`):
    db        the database file (default ./trip.db; created, with its seat, room
              and car inventory, on first use)
    fail      flight | hotel | car | payment | confirmation: that step fails every
              attempt (payment and car are retried first, as flaky remote services)
    flaky     car | payment: that step fails its first attempt only (the retry succeeds)
    latency   multiplies the simulated delay of each remote call (default 1; 0 for
              tests)
    customer, email, flight, hotel, nights, car, days, card: what to book

Every callback opens its own connection (callbacks run on several threads, and a
sqlite3 connection belongs to one), with a busy `timeout` so that concurrent
steps wait for each other's write lock instead of failing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kira

STEPS = ("customer", "flight", "hotel", "car", "payment", "confirmation")
RETRIED = ("car", "payment")  # remote services that may not answer: retried

config: dict[str, Any] = {
    "db": "trip.db",
    "customer": "Ada Lovelace",
    "email": "ada@example.org",
    "flight": "KI101",
    "hotel": "KIRA-TOKYO",
    "nights": 3,
    "car": "COMPACT",
    "days": 3,
    "card": "4242424242424242",
    "fail": None,
    "flaky": None,
    "latency": 1.0,
}


class BookingError(Exception):
    """A supplier refused a reservation (not retried: asking again will not help)."""


class ServiceUnavailable(Exception):
    """A remote service did not answer (retried: it may answer next time)."""


# -- the database ------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS seats (
    flight TEXT PRIMARY KEY, route TEXT NOT NULL, price_cents INTEGER NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0));
CREATE TABLE IF NOT EXISTS rooms (
    hotel TEXT PRIMARY KEY, city TEXT NOT NULL, price_cents INTEGER NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0));
CREATE TABLE IF NOT EXISTS cars (
    model TEXT PRIMARY KEY, agency TEXT NOT NULL, price_cents INTEGER NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0));
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flight_bookings (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    flight TEXT NOT NULL REFERENCES seats(flight), quantity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS hotel_bookings (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    hotel TEXT NOT NULL REFERENCES rooms(hotel), quantity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS car_bookings (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    model TEXT NOT NULL REFERENCES cars(model), quantity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    amount_cents INTEGER NOT NULL, card_last4 TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    recipient TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL);
"""

INVENTORY = {
    "seats": [("KI101", "Lisbon - Tokyo", 84_000, 5), ("KI202", "Tokyo - Lisbon", 79_000, 5)],
    "rooms": [("KIRA-TOKYO", "Tokyo", 12_500, 4), ("KIRA-KYOTO", "Kyoto", 9_800, 4)],
    "cars": [("COMPACT", "Kira Rent", 4_500, 3), ("VAN", "Kira Rent", 8_900, 2)],
}


@contextmanager
def transaction(config: Mapping[str, Any]) -> Iterator[sqlite3.Connection]:
    """One connection, one transaction: committed if the block ends normally, rolled
    back if it raises. BEGIN IMMEDIATE takes the write lock up front, so two steps
    never both read and then deadlock upgrading to write."""
    db = sqlite3.connect(config["db"], timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()


def ensure_database(path: str) -> None:
    """Create the tables and the inventory, if they are not there yet."""
    with transaction({"db": path}) as db:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        for table, rows in INVENTORY.items():
            for row in rows:
                db.execute(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?, ?)", row)


# -- simulated remote calls and injected failures ---------------------------------------

_first_attempts: set[tuple[int, str]] = set()
_first_attempts_lock = threading.Lock()


def remote_call(config: Mapping[str, Any], step: str, seconds: float) -> None:
    """Stand in for a supplier's API: take some time, and fail when the config asks."""
    time.sleep(seconds * float(config.get("latency", 1.0)))
    if config.get("flaky") == step:
        with _first_attempts_lock:
            first = (id(config), step) not in _first_attempts
            _first_attempts.add((id(config), step))
        if first:
            raise ServiceUnavailable(f"the {step} service timed out (flaky={step}: once)")
    if config.get("fail") == step:
        error = ServiceUnavailable if step in RETRIED else BookingError
        raise error(f"the {step} service refused (forced by fail={step})")


# -- the steps and their compensations ----------------------------------------------------


def create_customer(config: Mapping[str, Any], deps: Mapping[str, Any]) -> int:
    """Create the customer; return their id."""
    ensure_database(config["db"])
    remote_call(config, "customer", 0.1)
    with transaction(config) as db:
        cursor = db.execute(
            "INSERT INTO customers (name, email) VALUES (?, ?)",
            (config["customer"], config["email"]),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def delete_customer(config: Mapping[str, Any], deps: Mapping[str, Any], customer: int) -> None:
    """Undo create_customer (every booking of theirs is gone by now: kira unapplies
    dependents first, and the foreign keys would refuse otherwise)."""
    with transaction(config) as db:
        db.execute("DELETE FROM customers WHERE id = ?", (customer,))


@dataclass(frozen=True)
class Inventory:
    """Where one kind of reservation lives: inventory table, key column, bookings."""

    table: str
    key: str
    bookings: str
    config_key: str  # which config entry names the item
    quantity_key: str | None  # nights / days, priced per unit


KINDS = {
    "flight": Inventory("seats", "flight", "flight_bookings", "flight", None),
    "hotel": Inventory("rooms", "hotel", "hotel_bookings", "hotel", "nights"),
    "car": Inventory("cars", "model", "car_bookings", "car", "days"),
}


def reserve(config: Mapping[str, Any], customer: int, kind: str, latency: float) -> dict[str, Any]:
    """Take one unit of inventory and record the booking, in one transaction."""
    inv = KINDS[kind]
    item = config[inv.config_key]
    quantity = int(config[inv.quantity_key]) if inv.quantity_key else 1
    remote_call(config, kind, latency)
    with transaction(config) as db:
        row = db.execute(
            f"SELECT price_cents FROM {inv.table} WHERE {inv.key} = ?", (item,)
        ).fetchone()
        if row is None:
            raise BookingError(f"no {kind} {item!r} in the inventory")
        taken = db.execute(
            f"UPDATE {inv.table} SET available = available - 1 "
            f"WHERE {inv.key} = ? AND available > 0",
            (item,),
        )
        if taken.rowcount == 0:
            raise BookingError(f"{kind} {item} is sold out")
        cursor = db.execute(
            f"INSERT INTO {inv.bookings} (customer_id, {inv.key}, quantity) VALUES (?, ?, ?)",
            (customer, item, quantity),
        )
        return {
            "kind": kind,
            "item": item,
            "booking": cursor.lastrowid,
            "price_cents": row[0] * quantity,
        }


def release(config: Mapping[str, Any], reservation: Mapping[str, Any]) -> None:
    """Undo `reserve`: drop the booking and give the unit back (only if the booking was
    still there, so running it twice gives back one unit, not two)."""
    inv = KINDS[reservation["kind"]]
    with transaction(config) as db:
        gone = db.execute(f"DELETE FROM {inv.bookings} WHERE id = ?", (reservation["booking"],))
        if gone.rowcount:
            db.execute(
                f"UPDATE {inv.table} SET available = available + 1 WHERE {inv.key} = ?",
                (reservation["item"],),
            )


def reserve_flight(config: Mapping[str, Any], deps: Mapping[str, Any]) -> dict[str, Any]:
    """Reserve a seat on the flight."""
    return reserve(config, deps["customer"], "flight", 0.4)


def reserve_hotel(config: Mapping[str, Any], deps: Mapping[str, Any]) -> dict[str, Any]:
    """Reserve a room for the nights."""
    return reserve(config, deps["customer"], "hotel", 0.3)


def reserve_car(config: Mapping[str, Any], deps: Mapping[str, Any]) -> dict[str, Any]:
    """Reserve a car for the days."""
    return reserve(config, deps["customer"], "car", 0.25)


def cancel(config: Mapping[str, Any], deps: Mapping[str, Any], reservation: Any) -> None:
    """Cancel a flight, hotel or car reservation."""
    release(config, reservation)


def charge_card(config: Mapping[str, Any], deps: Mapping[str, Any]) -> dict[str, Any]:
    """Charge the card for the flight, the hotel and the car together."""
    amount = sum(deps[kind]["price_cents"] for kind in ("flight", "hotel", "car"))
    remote_call(config, "payment", 0.3)
    with transaction(config) as db:
        cursor = db.execute(
            "INSERT INTO payments (customer_id, amount_cents, card_last4, status) "
            "VALUES (?, ?, ?, 'captured')",
            (deps["customer"], amount, str(config["card"])[-4:]),
        )
        return {"payment": cursor.lastrowid, "amount_cents": amount}


def void_charge(config: Mapping[str, Any], deps: Mapping[str, Any], charge: Any) -> None:
    """Undo charge_card: void the charge before it settles (so no trace is kept)."""
    with transaction(config) as db:
        db.execute("DELETE FROM payments WHERE id = ?", (charge["payment"],))


def send_confirmation(config: Mapping[str, Any], deps: Mapping[str, Any]) -> int:
    """Put the confirmation e-mail in the outbox (a relay sends it once the saga is
    done); return its outbox id."""
    remote_call(config, "confirmation", 0.1)
    lines = [f"Dear {config['customer']},", "your trip is booked:"]
    for kind in ("flight", "hotel", "car"):
        lines.append(f"- {kind} {deps[kind]['item']} (booking {deps[kind]['booking']})")
    lines.append(f"Charged: {deps['payment']['amount_cents'] / 100:.2f} EUR.")
    with transaction(config) as db:
        cursor = db.execute(
            "INSERT INTO outbox (customer_id, recipient, subject, body) VALUES (?, ?, ?, ?)",
            (deps["customer"], config["email"], "Your trip", "\n".join(lines)),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def drop_confirmation(config: Mapping[str, Any], deps: Mapping[str, Any], message: int) -> None:
    """Undo send_confirmation: take the e-mail out of the outbox before it is sent."""
    with transaction(config) as db:
        db.execute("DELETE FROM outbox WHERE id = ?", (message,))


# -- the flow -----------------------------------------------------------------------------


def branches(config: Mapping[str, Any]) -> list[kira.Branch]:
    """The saga's branches (checks `fail` and `flaky` first, so a typo fails at once)."""
    if config.get("fail") not in (None, *STEPS):
        raise ValueError(f"fail must be one of {', '.join(STEPS)}, not {config['fail']!r}")
    if config.get("flaky") not in (None, *RETRIED):
        raise ValueError(
            f"flaky must be one of {', '.join(RETRIED)} (the retried steps), "
            f"not {config['flaky']!r}"
        )
    # Remote services that may not answer: retried, with backoff, before giving up.
    flaky_service = kira.retry_policy(attempts=3, backoff=0.2, on=ServiceUnavailable)
    return [
        kira.Branch("customer", create_customer, unapply=delete_customer),
        kira.Branch("flight", reserve_flight, ["customer"], unapply=cancel),
        kira.Branch("hotel", reserve_hotel, ["customer"], unapply=cancel),
        kira.Branch("car", reserve_car, ["customer"], unapply=cancel, on_apply_error=flaky_service),
        kira.Branch(
            "payment",
            charge_card,
            ["customer", "flight", "hotel", "car"],
            unapply=void_charge,
            on_apply_error=flaky_service,
        ),
        kira.Branch(
            "confirmation",
            send_confirmation,
            ["customer", "flight", "hotel", "car", "payment"],
            unapply=drop_confirmation,
        ),
    ]


if __name__ == "__main__":
    print(kira.run_tasks(config, branches(config)))
